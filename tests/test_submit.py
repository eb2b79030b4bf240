"""``aimctl submit`` and ``aimctl jobs``: a real ``ray start --head`` with token auth on.

The head runs on 127.0.0.1 with its own ports, temp dir and HOME (so ``~/.ray`` never
matters), and is stopped by its own PIDs: ``ray stop`` would kill every Ray on the machine.
"""

from __future__ import annotations

import contextlib
import os
import pkgutil
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import fault_rows
import pytest
from net_helpers import REPO, free_port
from typer.testing import CliRunner

import aim_platform
from aim_platform import submit as sub
from aim_platform.cli import app
from aim_platform.tracking import git_commit


def _head_processes(pgid: int, temp_dir: str) -> list[int]:
    """PIDs (not zombies) of the head's group, or whose command line or cwd is in temp_dir."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            if fields[0] == "Z":
                continue
            cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            try:
                cwd = os.readlink(entry / "cwd")
            except OSError:
                cwd = ""
        except OSError:
            continue
        if int(fields[2]) == pgid or temp_dir in cmd or cwd.startswith(temp_dir):
            found.append(int(entry.name))
    return found


def _stop_head(proc: subprocess.Popen[bytes], temp_dir: str) -> list[int]:
    """SIGTERM ``ray start --block`` (it tears its node down), then SIGKILL leftovers until
    none is left (a killed process with a large address space takes a while to exit on a
    loaded machine; a raylet may start a worker while dying). Returns the survivors."""
    proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and _head_processes(proc.pid, temp_dir):
        proc.poll()
        time.sleep(0.3)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and (left := _head_processes(proc.pid, temp_dir)):
        for pid in left:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        proc.poll()
        time.sleep(0.3)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=10)
    return _head_processes(proc.pid, temp_dir)


@pytest.fixture(scope="module")
def ray_head(s3_endpoint: dict[str, str]) -> Iterator[dict[str, str]]:
    """A token-auth Ray head on 127.0.0.1 (2 CPUs, as the demo needs; dashboard on): address,
    GCS address, token, temp dir. Started after the S3 endpoint: its nodes have the object
    store's credentials in their environment, as a cluster's nodes do."""
    temp_dir = tempfile.mkdtemp(prefix="aimray", dir="/tmp")  # short: unix socket paths
    token = secrets.token_hex(24)
    venv_bin = str(Path(sys.executable).parent)
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(
        RAY_AUTH_MODE="token",
        RAY_AUTH_TOKEN=token,
        HOME=temp_dir,
        PATH=venv_bin + os.pathsep + env.get("PATH", ""),
        RAY_USAGE_STATS_ENABLED="0",
        RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S="0",
        RAY_ENABLE_UV_RUN_RUNTIME_ENV="0",
        RAY_enable_metrics_collection="0",  # as tests/conftest.py: no test reads Ray's metrics
    )
    dash = free_port()
    ports = {
        "--port": free_port(),
        "--dashboard-port": dash,
        "--ray-client-server-port": free_port(),
        "--node-manager-port": free_port(),
        "--object-manager-port": free_port(),
        "--dashboard-agent-listen-port": free_port(),
        "--dashboard-agent-grpc-port": free_port(),
        "--metrics-export-port": free_port(),
        "--runtime-env-agent-port": free_port(),
    }
    cmd = [
        os.path.join(venv_bin, "ray"), "start", "--head", "--block",
        "--node-ip-address", "127.0.0.1", "--dashboard-host", "127.0.0.1",
        "--include-dashboard", "true", "--num-cpus", "2", "--temp-dir", temp_dir,
        "--min-worker-port", "0", "--max-worker-port", "0", "--disable-usage-stats",
        "--object-store-memory", str(300 * 1024**2),
    ]  # fmt: skip
    for flag, port in ports.items():
        cmd += [flag, str(port)]
    log = open(Path(temp_dir) / "head.log", "wb")
    proc = subprocess.Popen(
        cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    address = f"http://127.0.0.1:{dash}"
    try:
        deadline = time.monotonic() + 180
        while True:
            req = urllib.request.Request(
                f"{address}/api/jobs/", headers={"Authorization": f"Bearer {token}"}
            )
            try:
                with urllib.request.urlopen(req, timeout=3) as r:
                    if r.status == 200:
                        break
            except (urllib.error.URLError, OSError):
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError((Path(temp_dir) / "head.log").read_text()[-3000:])
            time.sleep(0.5)
        yield {
            "address": address,
            "gcs": f"127.0.0.1:{ports['--port']}",
            "token": token,
            "temp_dir": temp_dir,
        }
    finally:
        left = _stop_head(proc, temp_dir)
        log.close()
        assert not left, f"Ray head processes left running: {left}"
        shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.fixture
def token_env(ray_head: dict[str, str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """The client side: token only in RAY_AUTH_TOKEN, an empty HOME, auth mode not set."""
    for var in ("RAY_AUTH_TOKEN_PATH", "RAY_API_SERVER_ADDRESS", "MLFLOW_TRACKING_URI"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("RAY_AUTH_TOKEN", ray_head["token"])


def _job_id(output: str) -> str:
    m = re.search(r"submitted (\S+)", output)
    assert m, output
    return m.group(1)


@pytest.mark.slow
def test_submit_tiny_job_runs_submitted_code(ray_head: dict[str, str], token_env: None) -> None:
    runner = CliRunner()
    code = (
        "import os, pkgutil, aim_platform; print('AIM_FROM', aim_platform.__file__); "
        "print('VAR', os.environ['AIM_TEST_VAR']); print('CWD', os.getcwd()); "
        "print('MODULES', ','.join(sorted(m.name for m in "
        "pkgutil.walk_packages(aim_platform.__path__, 'aim_platform.'))))"
    )
    result = runner.invoke(
        app,
        [
            "submit",
            "--address", ray_head["address"],
            "--entrypoint", f'python -c "{code}"',
            "--env", "AIM_TEST_VAR=hello",
        ],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    job_id = _job_id(result.output)
    assert sub.wait_for(ray_head["address"], job_id, timeout=120, poll=0.5) == "SUCCEEDED"

    status = runner.invoke(app, ["jobs", "status", job_id, "--address", ray_head["address"]])
    assert status.exit_code == 0 and f"{job_id}: SUCCEEDED" in status.output

    logs = runner.invoke(app, ["jobs", "logs", job_id, "--address", ray_head["address"]])
    assert logs.exit_code == 0, logs.output
    # The job imported the uploaded package, not the checkout, and ran in the uploaded repo.
    aim_from = re.search(r"AIM_FROM (\S+)", logs.output).group(1)
    assert aim_from.startswith(ray_head["temp_dir"]) and "py_modules_files" in aim_from
    cwd = Path(re.search(r"CWD (\S+)", logs.output).group(1))
    assert (cwd / "jobs").is_dir() and (cwd / "platform" / "aim_platform").is_dir()
    assert not (cwd / ".venv").exists() and not (cwd / ".git").exists()
    assert "VAR hello" in logs.output
    # The whole package travelled: every module and sub-package (data/ once went missing).
    shipped = set(re.search(r"MODULES (\S+)", logs.output).group(1).split(","))
    local = {m.name for m in pkgutil.walk_packages(aim_platform.__path__, "aim_platform.")}
    assert {"aim_platform.data", "aim_platform.data.pipeline", "aim_platform.train.loop"} <= local
    assert shipped == local
    # The token went in the Authorization header only, never into the job's runtime_env.
    info = sub.client(ray_head["address"]).get_job_info(job_id)
    assert info.runtime_env["env_vars"]["AIM_TEST_VAR"] == "hello"
    assert ray_head["token"] not in repr(info)

    follow = runner.invoke(app, ["jobs", "logs", job_id, "-f", "--address", ray_head["address"]])
    assert follow.exit_code == 0 and "VAR hello" in follow.output


@pytest.mark.slow
def test_stop_long_job_with_token_file(
    ray_head: dict[str, str], token_env: None, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.delenv("RAY_AUTH_TOKEN")
    token_file = tmp_path / "token"
    token_file.write_text(ray_head["token"] + "\n")
    address = ray_head["address"]
    job_id = sub.submit(
        address,
        entrypoint="python -c \"import os, time; print('PID', os.getpid(), flush=True); time.sleep(600)\"",
        token_file=token_file,
    )
    deadline = time.monotonic() + 120
    # the log may echo the entrypoint (with its 'PID' text) before the driver prints
    while not (found := re.search(r"PID (\d+)", sub.logs(address, job_id, token_file))):
        assert time.monotonic() < deadline, sub.logs(address, job_id, token_file)
        time.sleep(0.5)
    pid = int(found.group(1))
    assert sub.status(address, job_id, token_file).status == "RUNNING"

    result = CliRunner().invoke(
        app, ["jobs", "stop", job_id, "--address", address, "--token-file", str(token_file)]
    )
    assert result.exit_code == 0 and f"{job_id}: STOPPED" in result.output, result.output
    deadline = time.monotonic() + 30
    while Path(f"/proc/{pid}").exists():
        assert time.monotonic() < deadline, f"job driver {pid} still runs after stop"
        time.sleep(0.3)


@pytest.mark.slow
def test_submit_without_or_with_wrong_token_fails_clearly(
    ray_head: dict[str, str], token_env: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("RAY_AUTH_TOKEN")
    runner = CliRunner()
    args = ["submit", "--address", ray_head["address"], "--entrypoint", "echo hi"]
    result = runner.invoke(app, args)
    assert result.exit_code == 2
    text = " ".join(result.output.split())
    assert "requires token authentication" in text
    assert "RAY_AUTH_TOKEN" in text and "--token-file" in text

    monkeypatch.setenv("RAY_AUTH_TOKEN", "not-the-token")
    result = runner.invoke(app, args)
    assert result.exit_code == 2 and "rejected the auth token" in result.output


@pytest.mark.slow
def test_unknown_job_is_a_clear_error(ray_head: dict[str, str], token_env: None) -> None:
    result = CliRunner().invoke(
        app, ["jobs", "status", "raysubmit_nope", "--address", ray_head["address"]]
    )
    assert result.exit_code == 2 and "no job 'raysubmit_nope'" in result.output


# ------------------------------------------------------------------ without a cluster


def test_runtime_env_carries_repo_without_secrets(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow.internal:5000")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "never-forwarded")
    monkeypatch.setenv("RAY_AUTH_TOKEN", "never-forwarded-either")
    renv = sub.runtime_env(REPO, sub.job_env({"AIM_X": "1"}))
    assert renv["working_dir"] == str(REPO)
    assert renv["py_modules"] == [str(REPO / "platform" / "aim_platform")]
    # Root folders stay home through the anchored .rayignore (working dir only); the global
    # excludes are safe at any depth of the package: none names one of its folders.
    assert {".venv", ".git", "runs", "data", "mlruns"} <= set(sub.root_excludes(REPO))
    package = REPO / "platform" / "aim_platform"
    folders = {p.name for p in package.rglob("*") if p.is_dir() and p.name != "__pycache__"}
    assert "data" in folders
    assert not {e.strip("/") for e in renv["excludes"]} & folders
    assert renv["env_vars"]["MLFLOW_TRACKING_URI"] == "http://mlflow.internal:5000"
    assert renv["env_vars"]["AIM_X"] == "1"
    assert "never-forwarded" not in repr(renv)
    with pytest.raises(sub.SubmitError, match="looks like a secret"):
        sub.parse_env(["AWS_SECRET_ACCESS_KEY=abc"])
    with pytest.raises(sub.SubmitError, match="looks like a secret"):
        sub.parse_env(["DB=postgresql://u:pw@h/db"])
    with pytest.raises(sub.SubmitError, match="KEY=VALUE"):
        sub.parse_env(["NOVALUE"])


def test_submit_waits_for_a_job_agent_that_is_not_up_yet(monkeypatch: pytest.MonkeyPatch) -> None:
    """A head that has just started refuses jobs until its agent is up: the submission is
    retried (the console told once), other errors are not, and a limit ends the wait."""
    refusal = RuntimeError(
        "Request failed with status code 500: No available agent to submit job, please try "
        "again later.."
    )

    class Jobs:
        def __init__(self, errors: list[Exception]) -> None:
            self.errors, self.calls = errors, 0

        def submit_job(self, **kwargs: object) -> str:
            self.calls += 1
            if self.errors:
                raise self.errors.pop(0)
            return "raysubmit_x"

    monkeypatch.setattr(sub.time, "sleep", lambda s: None)
    told: list[str] = []
    jobs = Jobs([refusal, refusal])
    monkeypatch.setattr(sub, "client", lambda address, token_file: jobs)
    job = sub.submit("http://h:8265", entrypoint="true", repo=REPO, on_wait=told.append)
    assert job == "raysubmit_x" and jobs.calls == 3
    assert len(told) == 1 and "job agent is not up yet" in told[0]
    other = Jobs([RuntimeError("Request failed with status code 400: bad runtime_env")])
    monkeypatch.setattr(sub, "client", lambda address, token_file: other)
    with pytest.raises(RuntimeError, match="bad runtime_env"):
        sub.submit("http://h:8265", entrypoint="true", repo=REPO)
    assert other.calls == 1
    never = Jobs([refusal] * 100)
    monkeypatch.setattr(sub, "client", lambda address, token_file: never)
    clock = iter(range(0, 10_000, 7))  # each look at the clock: 7 s later
    monkeypatch.setattr(sub.time, "monotonic", lambda: float(next(clock)))
    with pytest.raises(sub.SubmitError, match="job agent did not come up in 120 s"):
        sub.submit("http://h:8265", entrypoint="true", repo=REPO)
    assert 2 <= never.calls < 100


def test_a_stopped_pretraining_gets_its_preempt_grace(monkeypatch: pytest.MonkeyPatch) -> None:
    """`aimctl jobs stop` is Ray's SIGTERM, then SIGKILL after RAY_JOB_STOP_WAIT_TIME_S (3 s
    by default): a submitted pre-training job carries its train.preempt_grace_s plus a
    margin, so it can save the checkpoint of the step it stops at; a set value is kept."""
    sent: list[dict[str, Any]] = []

    class Jobs:
        def submit_job(self, **kwargs: Any) -> str:
            sent.append(kwargs)
            return "raysubmit_x"

    monkeypatch.setattr(sub, "client", lambda address, token_file: Jobs())
    demo = REPO / "jobs" / "configs" / "demo.yaml"
    shared = "train.storage_shared=true"
    sub.submit("http://h:8265", demo, overrides=[shared, "train.preempt_grace_s=45"], repo=REPO)
    sub.submit("http://h:8265", demo, overrides=[shared], env={sub.STOP_WAIT_ENV: "7"}, repo=REPO)
    sub.submit("http://h:8265", REPO / "jobs" / "studies" / "head.yaml", repo=REPO)
    waits = [kw["runtime_env"]["env_vars"].get(sub.STOP_WAIT_ENV) for kw in sent]
    assert waits == [str(45 + sub.STOP_MARGIN_S), "7", None]


def test_submit_checks_config_and_address_before_sending(tmp_path: Path) -> None:
    outside = tmp_path / "c.yaml"
    outside.write_text("name: x\n")
    with pytest.raises(sub.SubmitError, match="outside the repository"):
        sub.submit("http://127.0.0.1:1", outside)
    with pytest.raises(sub.SubmitError, match="does not exist"):
        sub.submit("http://127.0.0.1:1", REPO / "jobs" / "configs" / "nope.yaml")
    config = REPO / "jobs" / "configs" / "aim-600M.yaml"
    with pytest.raises(sub.SubmitError, match="model.embed_dim: 100 is not divisible"):
        sub.submit("http://127.0.0.1:1", config, overrides=["model.embed_dim=100"])
    with pytest.raises(sub.SubmitError, match=r"data\.sources\.0\.url: is a placeholder"):
        sub.submit("http://127.0.0.1:1", config)  # the recipe's data URLs must be set
    with pytest.raises(sub.SubmitError, match="--set applies to the default entrypoint"):
        sub.submit("http://127.0.0.1:1", entrypoint="echo", overrides=["seed=1"])
    with pytest.raises(sub.SubmitError, match="give a CONFIG"):
        sub.submit("http://127.0.0.1:1")
    with pytest.raises(sub.SubmitError, match="not a ray:// client"):
        sub.check_address("ray://head:10001")
    with pytest.raises(sub.SubmitError, match="no cluster address"):
        sub.check_address(None)
    assert sub.check_address("head:8265") == "http://head:8265"
    with pytest.raises(sub.SubmitError, match="cannot reach the Ray dashboard"):
        sub.submit(f"http://127.0.0.1:{free_port()}", entrypoint="echo hi")
    assert (
        sub.default_entrypoint("jobs/configs/a b.yaml", ["optim.lr=1e-3"])
        == "aimctl pretrain 'jobs/configs/a b.yaml' --set optim.lr=1e-3 --address auto"
    )
    study = sub.default_entrypoint(
        "jobs/studies/head.yaml", ["seed=1"], study_scale="small", seeds=3, variants="none,mlp"
    )
    assert study == (
        "aimctl study jobs/studies/head.yaml --scale small --seeds 3 --variants none,mlp "
        "--set seed=1 --address auto"
    )
    with pytest.raises(sub.SubmitError, match="--variants: s9 not in study 'head'"):
        sub.submit("http://127.0.0.1:1", "jobs/studies/head.yaml", variants="none,s9")
    with pytest.raises(sub.SubmitError, match="apply to study specs"):
        sub.submit("http://127.0.0.1:1", "jobs/configs/demo.yaml", seeds=3)


# ------------------------------------------------------- the real jobs, as users submit them
# The demo config, a tiny study and a probe go through `aimctl submit` to the token-auth head;
# each must SUCCEED and leave its MLflow runs on the (session) MLflow server.

# Ray Jobs frames every job log with two lines of its own (`ray job logs` shows them too).
JOBS_FRAME = re.compile(
    r"job_manager\.py:\d+ -- Runtime env is setting up|^Running entrypoint for job"
)
RAW_RAY_LINE = re.compile(
    r"\((pid|RayTrainWorker|SplitCoordinator|raylet|TrainController)[ =]|core_worker|"
    r"TrainingReport\(|^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+\s+(INFO|WARNING)|Warning:"
)


JOURNEY_STEPS = 30  # the demo job, stopped after its first checkpoint (step 10), resubmitted
DIGITS_TRAIN_ROWS = 1717  # builtin:digits' train split: epoch 0 ends at step 27 at batch 64


def _journey_args(storage: str) -> list[str]:
    sets = {
        "name": "journey",
        "train.steps": JOURNEY_STEPS,
        "train.checkpoint_every": 10,
        "train.val_every": 30,
        "train.storage_path": str(storage),
    }
    return [item for k, v in sets.items() for item in ("--set", f"{k}={v}")]


@pytest.fixture
def journey_env(token_env: None, mlflow_server: str, monkeypatch: pytest.MonkeyPatch) -> str:
    """Jobs log to the session's MLflow server (`aimctl submit` forwards the variable)."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    return mlflow_server


@pytest.fixture(scope="module")
def shared_storage(s3_endpoint: dict[str, str]) -> str:
    """Storage every job of the cluster reaches: object storage, as on a real cluster (a
    local folder is refused by `aimctl submit`: it would stay on one node's disk)."""
    return f"s3://{s3_endpoint['bucket']}/submit-{secrets.token_hex(4)}"


def _read_json(url: str) -> Any:
    """A small JSON object of the storage, read afresh (no cached listing)."""
    import json

    from aim_platform.storage import filesystem

    fs, path = filesystem(url)
    return json.loads(fs.cat_file(path))


def _exists(url: str, *, folder: bool = False) -> bool:
    from aim_platform.storage import filesystem

    fs, path = filesystem(url)
    fs.invalidate_cache()
    return fs.isdir(path) if folder else fs.exists(path)


def _wait_for_checkpoint(run_root: str, job_id: str, address: str, timeout: float) -> int:
    latest = f"{run_root}/latest.json"
    deadline = time.monotonic() + timeout
    while not _exists(latest):
        state = sub.status(address, job_id).status
        assert state in ("PENDING", "RUNNING"), sub.logs(address, job_id)[-3000:]
        assert time.monotonic() < deadline, sub.logs(address, job_id)[-3000:]
        time.sleep(1)
    return int(_read_json(latest)["step"])


@pytest.mark.slow
def test_demo_submitted_stopped_and_resubmitted_resumes(
    ray_head: dict[str, str], journey_env: str, shared_storage: str
) -> None:
    import json

    from mlflow.tracking import MlflowClient

    from aim_platform.storage import filesystem

    runner = CliRunner()
    address = ray_head["address"]
    args = ["submit", "jobs/configs/demo.yaml", "--address", address]
    first = runner.invoke(app, [*args, *_journey_args(shared_storage)])
    assert first.exit_code == 0, first.output
    job_id = _job_id(first.output)
    run_root = f"{shared_storage}/journey"
    _wait_for_checkpoint(run_root, job_id, address, timeout=600)  # a loaded CI machine
    stopped = runner.invoke(app, ["jobs", "stop", job_id, "--address", address])
    assert stopped.exit_code == 0 and f"{job_id}: STOPPED" in stopped.output, stopped.output
    saved = _read_json(f"{run_root}/latest.json")
    assert _exists(f"{run_root}/{saved['checkpoint']}", folder=True)
    assert 10 <= saved["step"] < JOURNEY_STEPS
    # `jobs stop` is a SIGTERM with the job's preempt grace before Ray's SIGKILL: the job
    # saved a checkpoint of the step it stopped at, so nothing is redone.
    first_log = sub.logs(address, job_id)
    preempted = re.search(r"preempted \(SIGTERM to the driver\) at step (\d+): checkpoint saved",
                          first_log)  # fmt: skip
    assert preempted and int(preempted[1]) == saved["step"], first_log[-3000:]
    client = MlflowClient(tracking_uri=journey_env)
    run_id = _read_json(f"{run_root}/mlflow_run_id.json")["run_id"]
    stopped_run = client.get_run(run_id)
    assert stopped_run.info.status == "KILLED", stopped_run.info
    assert stopped_run.data.tags["preempted_at_step"] == str(saved["step"])
    # A save that crashed half-way (rank 0's files without rank 1's, never committed to
    # latest.json) is newer than the last good one: the restart must not take it.
    fs, half = filesystem(f"{run_root}/checkpoint_00000099")
    fs.pipe_file(f"{half}/train_state.json", json.dumps({"step": 99, "epoch": 9, "data_seed": 0}))
    fs.pipe_file(f"{half}/.metadata", b"partial")

    # Through the real entry point, stdout and stderr both: what a person sees is ours only
    # (Ray's packaging and upload lines go to runs/logs/submit-*.log).
    again = subprocess.run(
        [str(Path(sys.executable).parent / "aimctl"), *args, *_journey_args(shared_storage),
         "--wait"],
        capture_output=True, text=True, timeout=900, cwd=REPO,
    )  # fmt: skip
    seen = (again.stdout + again.stderr).splitlines()
    assert again.returncode == 0, [*seen, sub.logs(address, _job_id(again.stdout))[-4000:]]
    job_id = _job_id(again.stdout)
    assert [line for line in seen if line.strip()] == [
        f"submitted {job_id}",
        f"  aimctl jobs logs {job_id} --follow --address {address}",
        f"{job_id}: SUCCEEDED",
    ], seen
    log = sub.logs(address, job_id)
    # What a person reads: a header, progress lines, a summary; no raw Ray log line.
    lines = [line for line in log.splitlines() if line.strip() and not JOBS_FRAME.search(line)]
    assert len(lines) <= 60, log
    assert not [line for line in lines if RAW_RAY_LINE.search(line)], log
    assert f"resuming from the checkpoint at step {saved['step']}" in log
    assert f"step {JOURNEY_STEPS}/{JOURNEY_STEPS}" in log and "mlflow" in log.lower()

    assert _read_json(f"{run_root}/mlflow_run_id.json")["run_id"] == run_id  # the same run
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags["git_commit"] == git_commit(REPO)  # the commit it was sent from
    resumed = client.get_metric_history(run_id, "train/resumed_from_step")
    assert [int(m.value) for m in resumed] == [saved["step"]]
    losses = sorted(client.get_metric_history(run_id, "train/loss"), key=lambda m: m.step)
    assert losses[-1].step == JOURNEY_STEPS and losses[-1].value < 0.8 * losses[0].value
    assert losses[0].step <= saved["step"]  # one MLflow run: the steps before the stop too
    assert _exists(f"{run_root}/final/trunk.safetensors")
    assert not _exists(f"{run_root}/lease.json")  # the run's lease, released at its end
    logged = [m.step for m in losses]
    assert len(logged) == len(set(logged))  # each logged step once in the one run
    rows = {m.step: m.value for m in client.get_metric_history(run_id, "data/epoch_rows")}
    distinct = {
        m.step: m.value for m in client.get_metric_history(run_id, "data/epoch_distinct_rows")
    }
    assert rows.get(0) == distinct.get(0) == DIGITS_TRAIN_ROWS, (rows, distinct)
    lost = f"0: epoch 0's {DIGITS_TRAIN_ROWS} rows each once (epoch_rows = epoch_distinct_rows)"
    fault_rows.record(
        fault_rows.FaultRow(
            fault="stopped submitted job (`aimctl jobs stop` after its first checkpoint), "
            "the same `aimctl submit` again",
            console=[
                *fault_rows.console_lines(stopped.output, r": STOPPED"),
                *fault_rows.console_lines(first_log, r"preempted \(SIGTERM"),
                *fault_rows.console_lines(log, r"resuming from the checkpoint at step"),
                *[line for line in seen if "SUCCEEDED" in line],
            ],
            steps_redone=f"0 (stopped and saved at step {saved['step']}, resumed there)",
            data_lost=lost,
            test=fault_rows.current_test(),
        )
    )
    fault_rows.record(
        fault_rows.FaultRow(
            fault="half-written checkpoint newer than the last good one (rank 0's "
            "train_state.json at step 99 and a partial .metadata, never in latest.json)",
            console=fault_rows.console_lines(log, r"resuming from the checkpoint at step"),
            steps_redone=f"0 (resumed at {saved['step']}, the last committed step, not 99)",
            data_lost=lost,
            test=fault_rows.current_test(),
        )
    )


@pytest.mark.slow
def test_probe_of_a_trunk_on_shared_storage_submitted(
    ray_head: dict[str, str], journey_env: str, shared_storage: str
) -> None:
    from mlflow.tracking import MlflowClient

    trunk = f"{shared_storage}/journey/final"
    if not _exists(f"{trunk}/trunk.safetensors"):
        pytest.skip("needs the trunk of test_demo_submitted_stopped_and_resubmitted_resumes")
    command = (
        f"aimctl probe {trunk} builtin:digits --set labels_per_class=20 --set steps=100 "
        f"--set sweep=false --set kind=both --experiment journey-probe --address auto"
    )
    result = CliRunner().invoke(
        app,
        ["submit", "--address", ray_head["address"], "--entrypoint", command, "--wait"],
    )
    assert result.exit_code == 0, result.output
    client = MlflowClient(tracking_uri=journey_env)
    exp = client.get_experiment_by_name("journey-probe")
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == 1
    metrics = runs[0].data.metrics
    # Ten classes: chance is 10%; a 40-step trunk with 20 labels a class is well above it.
    assert metrics["probe/attentive/top1"] > 0.15 and metrics["probe/linear/top1"] > 0.15


CIFAR_MINI = REPO / "tests" / "assets" / "cifar10-mini"  # 200 CIFAR-10 JPEGs, class folders
BROKEN_SPEC = "tests/assets/studies/head-and-broken.yaml"  # none, mlp and a variant without data


@pytest.mark.slow
def test_cifar10_study_submitted_prints_verdicts_and_the_floor(
    ray_head: dict[str, str], journey_env: str, tmp_path: Path
) -> None:
    """The study journey on natural images, submitted to a cluster: ingest CIFAR-10 class
    folders with --split-folders, submit a study spec at the cifar10 preset with 2 seeds (cut
    to a few steps), read the job's console: a table with verdicts and intervals, the
    random-trunk floor and the probe recipe, no raw Ray log line; the same in MLflow. One
    variant cannot read its data: its trials fail, the study goes on and says so (a failed
    trial is reported, never fatal)."""
    import json

    from mlflow.tracking import MlflowClient

    runner = CliRunner()
    root = tmp_path / "cifar"
    res = runner.invoke(app, ["ingest", str(CIFAR_MINI), str(root), "--split-folders"])
    assert res.exit_code == 0 and "train 160, val 40" in " ".join(res.output.split()), res.output
    cut = ["train.steps=4", "train.val_every=4", "train.checkpoint_every=4", "probe.steps=5"]
    cut += ["train.global_batch_size=16", "train.micro_batch_size=16", "data.val_limit=16"]
    cut += [f"data.sources.0.url={root}", "tracking.experiment=journey-study"]
    args = ["submit", BROKEN_SPEC, "--scale", "cifar10", "--seeds", "2", "--wait"]
    args += ["--address", ray_head["address"], *[x for c in cut for x in ("--set", c)]]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    log = sub.logs(ray_head["address"], _job_id(result.output))
    (tmp_path / "console.txt").write_text(log)
    lines = [line for line in log.splitlines() if line.strip() and not JOBS_FRAME.search(line)]
    assert not [line for line in lines if RAW_RAY_LINE.search(line)], log
    assert len(lines) <= 80, log
    assert "| random trunk (linear) |" in log and "| random trunk (attentive) |" in log
    assert "| linear | mlp − none |" in log  # the paper's better variant first
    assert "(n=2)" in log and "of 1 pair(s) the paper orders" in log
    assert "above the random-trunk floor" in log and "one fixed recipe for every variant" in log
    assert "trial broken/s0 failed:" in log and "trial broken/s1 failed:" in log, log
    failure = next(line for line in lines if line.startswith("trial broken/s0 failed:"))
    assert failure.count("no _manifest.json") == 1 and "pid=" not in failure, failure
    rows: dict[str, str] = {}  # the table's rows (the verdicts' rows come after, also "linear")
    for line in lines:
        if line.startswith("|"):
            rows.setdefault(line.split("|")[1].strip(), line)
    assert rows["probe"].split("|")[2:5] == [" none ", " mlp ", " broken "]
    assert rows["linear"].split("|")[4].strip() == "failed"
    assert "±" in rows["linear"].split("|")[3]
    assert rows["random trunk (linear)"].split("|")[4].strip() == "-"
    folder = Path(re.search(r"table: (\S+)", log).group(1)).parent
    assert folder.name == "head-cifar10"
    table = (folder / "table.csv").read_text()
    assert "verdict" in table and "random trunk" in table
    assert (folder / "trials" / "head-cifar10-mlp-s1" / "latest.json").is_file()

    client = MlflowClient(tracking_uri=journey_env)
    exp = client.get_experiment_by_name("journey-study")
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"  # runs, not GenAI
    parent_id = json.loads((folder / "parent_run.json").read_text())["run_id"]
    parent = client.get_run(parent_id)
    assert parent.info.status == "FINISHED" and parent.data.tags["git_commit"]
    tags = parent.data.tags
    assert tags["verdict.linear.mlp-vs-none"].split()[0] in ("agrees", "opposite", "inconclusive")
    assert "failed.broken/s0" in tags and "failed.broken/s1" in tags
    # The broken variant's floor cannot read its data either: a tag, not a stopped study.
    assert "floor_failed.broken/s0" in tags
    artifacts = {a.path for a in client.list_artifacts(parent_id)}
    assert {"table.md", "table.csv", "loss_per_chunk.png", "correlation_across_runs.md"} <= (
        artifacts
    )
    nested = client.search_runs([exp.experiment_id], f"tags.mlflow.parentRunId = '{parent_id}'")
    # under the study run: its trials and the random-trunk floor's probes, one a seed (none
    # and mlp share each seed's random trunk: the trunk and its probe ignore the head)
    floors = [r for r in nested if r.info.run_name.startswith("random-trunk-")]
    assert len(floors) == 2 and all("probe/linear/top1" in r.data.metrics for r in floors)
    trials = [r for r in nested if r.data.tags.get("variant") == "mlp"]
    params = sorted((r.data.params["seed"], r.data.params["probe.seed"]) for r in trials)
    assert len({r.info.run_id for r in trials}) == 2 and params == [("0", "0"), ("1", "1")]
    for child in trials:  # each trial pre-trained on CIFAR-10 and probed its trunk
        assert child.data.tags["git_commit"]
        assert [d.dataset.name for d in child.inputs.dataset_inputs] == ["cifar10-mini"]
        assert {"probe/attentive/top1", "probe/linear/top1", "train/loss"} <= set(
            child.data.metrics
        )


@pytest.mark.slow
def test_failed_job_shows_its_error_with_wait(ray_head: dict[str, str], token_env: None) -> None:
    command = "python -c \"print('setting up'); raise SystemExit('the data bucket is empty')\""
    result = CliRunner().invoke(
        app, ["submit", "--address", ray_head["address"], "--entrypoint", command, "--wait"]
    )
    assert result.exit_code == 1
    assert "FAILED" in result.output and "the data bucket is empty" in result.output


@pytest.mark.slow
def test_drivers_join_a_token_cluster_like_submit_does(
    ray_head: dict[str, str], tmp_path: Path
) -> None:
    """`aimctl pretrain/study/probe --address` find the token as submit does: no RAY_AUTH_MODE."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env["HOME"] = str(tmp_path)
    script = (  # a driver joins first: Ray reads the token from the environment on import
        "from aim_platform.cluster import connect; "
        f"connect('{ray_head['gcs']}'); import ray; print('CPUS', ray.cluster_resources()['CPU'])"
    )
    ok = subprocess.run(
        [sys.executable, "-c", script],
        env={**env, "RAY_AUTH_TOKEN": ray_head["token"]},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert "CPUS 2.0" in ok.stdout, ok.stderr[-2000:]

    token_file = tmp_path / "token"
    token_file.write_text(ray_head["token"])
    config = REPO / "jobs" / "configs" / "demo.yaml"
    for extra_env, args, expected in [
        ({}, [], "requires token authentication and no token was given"),
        ({"RAY_AUTH_TOKEN": "wrong"}, [], "rejected the auth token"),
    ]:
        bad = subprocess.run(
            [str(Path(sys.executable).parent / "aimctl"), "pretrain", str(config),
             "--address", ray_head["gcs"], "--set", f"train.storage_path={tmp_path}", *args],
            env={**env, **extra_env},
            capture_output=True,
            text=True,
            timeout=180,
        )  # fmt: skip
        assert bad.returncode == 2, bad.stdout + bad.stderr
        text = " ".join(bad.stdout.split())
        assert expected in text and "RAY_AUTH_TOKEN" in text and "Traceback" not in bad.stdout
