"""``aimctl submit`` and ``aimctl jobs``: a real ``ray start --head`` with token auth on.

The head runs on 127.0.0.1 with its own ports, temp dir and HOME (so ``~/.ray`` never
matters), and is stopped by its own PIDs: ``ray stop`` would kill every Ray on the machine.
"""

from __future__ import annotations

import os
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

import pytest
from conftest import REPO, free_port
from typer.testing import CliRunner

from aim_platform import submit as sub
from aim_platform.cli import app


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
    """SIGTERM ``ray start --block`` (it tears its node down), then SIGKILL leftovers."""
    proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and _head_processes(proc.pid, temp_dir):
        proc.poll()
        time.sleep(0.3)
    for pid in _head_processes(proc.pid, temp_dir):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    time.sleep(1)
    proc.poll()
    return _head_processes(proc.pid, temp_dir)


@pytest.fixture(scope="module")
def ray_head() -> Iterator[dict[str, str]]:
    """A token-auth Ray head on 127.0.0.1 (1 CPU, dashboard on): address, token, temp dir."""
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
        "--include-dashboard", "true", "--num-cpus", "1", "--temp-dir", temp_dir,
        "--min-worker-port", "0", "--max-worker-port", "0", "--disable-usage-stats",
        "--object-store-memory", str(80 * 1024**2),
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
        yield {"address": address, "token": token, "temp_dir": temp_dir}
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
        "import os, aim_platform; print('AIM_FROM', aim_platform.__file__); "
        "print('VAR', os.environ['AIM_TEST_VAR']); print('CWD', os.getcwd())"
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
    while "PID" not in sub.logs(address, job_id, token_file):
        assert time.monotonic() < deadline, sub.logs(address, job_id, token_file)
        time.sleep(0.5)
    pid = int(re.search(r"PID (\d+)", sub.logs(address, job_id, token_file)).group(1))
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


def test_token_precedence(tmp_path: Path) -> None:
    f1, f2, home = tmp_path / "f1", tmp_path / "f2", tmp_path / "home"
    f1.write_text("from-file\n")
    f2.write_text("from-path-env")
    (home / ".ray").mkdir(parents=True)
    (home / ".ray" / "auth_token").write_text("from-home")
    env = {"RAY_AUTH_TOKEN": "from-env", "RAY_AUTH_TOKEN_PATH": str(f2), "HOME": str(home)}
    assert sub.resolve_token(f1, env) == "from-file"
    assert sub.resolve_token(None, env) == "from-env"
    env.pop("RAY_AUTH_TOKEN")
    assert sub.resolve_token(None, env) == "from-path-env"
    env.pop("RAY_AUTH_TOKEN_PATH")
    assert sub.resolve_token(None, env) is None  # ~/.ray only counts with RAY_AUTH_MODE=token
    assert sub.resolve_token(None, {**env, "RAY_AUTH_MODE": "token"}) == "from-home"
    with pytest.raises(sub.SubmitError, match="--token-file: cannot read"):
        sub.resolve_token(tmp_path / "missing", env)
    (tmp_path / "empty").write_text(" \n")
    with pytest.raises(sub.SubmitError, match="RAY_AUTH_TOKEN_PATH: token file .* is empty"):
        sub.resolve_token(None, {"RAY_AUTH_TOKEN_PATH": str(tmp_path / "empty")})


def test_runtime_env_carries_repo_without_secrets(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow.internal:5000")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "never-forwarded")
    monkeypatch.setenv("RAY_AUTH_TOKEN", "never-forwarded-either")
    renv = sub.runtime_env(REPO, sub.job_env({"AIM_X": "1"}))
    assert renv["working_dir"] == str(REPO)
    assert renv["py_modules"] == [str(REPO / "platform" / "aim_platform")]
    for excluded in (".venv", "runs", "data", ".git"):
        assert excluded in renv["excludes"]
    assert renv["env_vars"]["MLFLOW_TRACKING_URI"] == "http://mlflow.internal:5000"
    assert renv["env_vars"]["AIM_X"] == "1"
    assert "never-forwarded" not in repr(renv)
    with pytest.raises(sub.SubmitError, match="looks like a secret"):
        sub.parse_env(["AWS_SECRET_ACCESS_KEY=abc"])
    with pytest.raises(sub.SubmitError, match="looks like a secret"):
        sub.parse_env(["DB=postgresql://u:pw@h/db"])
    with pytest.raises(sub.SubmitError, match="KEY=VALUE"):
        sub.parse_env(["NOVALUE"])


def test_submit_checks_config_and_address_before_sending(tmp_path: Path) -> None:
    outside = tmp_path / "c.yaml"
    outside.write_text("name: x\n")
    with pytest.raises(sub.SubmitError, match="outside the repository"):
        sub.submit("http://127.0.0.1:1", outside)
    with pytest.raises(sub.SubmitError, match="does not exist"):
        sub.submit("http://127.0.0.1:1", REPO / "jobs" / "configs" / "nope.yaml")
    config = REPO / "jobs" / "configs" / "pretrain_aim600m.yaml"
    with pytest.raises(sub.SubmitError, match="model.embed_dim: 100 is not divisible"):
        sub.submit("http://127.0.0.1:1", config, overrides=["model.embed_dim=100"])
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
