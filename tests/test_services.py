"""``aimctl services up|down|status``: a real MLflow server and dev S3 endpoint on 127.0.0.1."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import psutil
import pytest
import yaml
from typer.testing import CliRunner

from aim_platform import services as svc
from aim_platform.cli import app
from aim_platform.config import flatten
from aim_platform.security import REDACTED, redact

PLANTED = "planted-Secret-9f8e7d6c5b4a"
PLANTED_KEY_ID = "AKIAPLANTED000000000"


def _aimctl(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    code = "from aim_platform.cli import main; main()"
    return subprocess.run(
        [sys.executable, "-c", code, *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=240,
    )


def _listen_addresses(port: int) -> set[str]:
    """Local IPv4 addresses (hex, as in /proc/net/tcp) listening on ``port``."""
    found = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        local, state = line.split()[1], line.split()[3]
        addr, p = local.split(":")
        if int(p, 16) == port and state == "0A":  # 0A: LISTEN
            found.add(addr)
    return found


def _walk_bytes(root: Path) -> bytes:
    return b"".join(p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file())


@pytest.mark.slow
def test_services_up_log_run_down(tmp_path: Path) -> None:
    state = tmp_path / "state"
    env = dict(os.environ)
    env.update(
        AWS_ACCESS_KEY_ID="testing",
        AWS_SECRET_ACCESS_KEY="testing",
        AWS_DEFAULT_REGION="us-east-1",
    )
    env.pop("AWS_ENDPOINT_URL", None)

    runner = CliRunner()  # `up` runs as its own process (it must detach); the rest in-process
    before = runner.invoke(app, ["services", "status", "--state-dir", str(state)])
    assert before.exit_code == 0, before.output
    assert "mlflow: stopped" in before.output and "s3: stopped" in before.output

    up = _aimctl(
        "services", "up", "--state-dir", str(state), "--mlflow-port", "0", "--s3",
        "--s3-port", "0", "--bucket", "aim-artifacts", "--artifacts", "s3://aim-artifacts/mlflow",
        env=env,
    )  # fmt: skip
    assert up.returncode == 0, up.stdout + up.stderr
    exports = dict(
        line.removeprefix("export ").split("=", 1)
        for line in up.stdout.splitlines()
        if line.startswith("export ")
    )
    records = {st.name: st.record for st in svc.status(state)}
    try:
        mlflow_rec, s3_rec = records["mlflow"], records["s3"]
        assert mlflow_rec is not None and s3_rec is not None
        # `up` returned, yet the servers run on in the background, bound to loopback only.
        assert svc.pid_alive(mlflow_rec.pid) and svc.pid_alive(s3_rec.pid)
        # the tracking server only: none of MLflow's job-execution workers (seven more Pythons)
        tree = psutil.Process(mlflow_rec.pid).children(recursive=True)
        assert not [p for p in tree if "huey" in " ".join(p.cmdline())]
        assert exports["MLFLOW_TRACKING_URI"] == mlflow_rec.url
        assert exports["AWS_ENDPOINT_URL"] == s3_rec.url
        for rec in (mlflow_rec, s3_rec):
            assert rec.url.startswith("http://127.0.0.1:")
            assert _listen_addresses(rec.port) == {"0100007F"}  # 127.0.0.1, nothing else
        status = runner.invoke(app, ["services", "status", "--state-dir", str(state)])
        assert status.exit_code == 0, status.output
        assert f"mlflow: running at {mlflow_rec.url}" in status.output
        assert "s3: running at" in status.output and "development stand-in" in status.output

        # The dev S3 endpoint answers S3 calls over HTTP.
        import boto3

        s3 = boto3.client(
            "s3",
            endpoint_url=s3_rec.url,
            aws_access_key_id="testing",
            aws_secret_access_key="testing",
            region_name="us-east-1",
        )
        s3.put_object(Bucket="aim-artifacts", Key="hello.txt", Body=b"hi")
        assert s3.get_object(Bucket="aim-artifacts", Key="hello.txt")["Body"].read() == b"hi"

        # A client logs a run with a planted secret; only redacted values reach the server.
        from mlflow import MlflowClient

        config = {
            "name": "svc-test",
            "data": {
                "url": "s3://aim-data/shards",
                "storage_options": {
                    "key": PLANTED_KEY_ID,
                    "secret": PLANTED,
                    "client_kwargs": {"endpoint_url": s3_rec.url},
                },
            },
            "tracking": {"uri": f"postgresql://aim:{PLANTED}@db:5432/mlflow"},
        }
        client = MlflowClient(tracking_uri=mlflow_rec.url)
        exp = client.create_experiment("services-test")
        run = client.create_run(exp, tags=redact({"env.AWS_SESSION_TOKEN": PLANTED, "who": "me"}))
        for k, v in flatten(redact(config)).items():
            client.log_param(run.info.run_id, k, v)
        client.log_metric(run.info.run_id, "train/loss", 1.5, step=3)
        cfg_file = tmp_path / "config.yaml"
        cfg_file.write_text(yaml.safe_dump(redact(config)))
        client.log_artifact(run.info.run_id, str(cfg_file))
        client.set_terminated(run.info.run_id)

        got = client.get_run(run.info.run_id)
        assert got.data.params["data.url"] == "s3://aim-data/shards"
        assert got.data.params["data.storage_options.secret"] == REDACTED
        assert got.data.params["data.storage_options.key"] == REDACTED
        assert got.data.params["tracking.uri"] == f"postgresql://aim:{REDACTED}@db:5432/mlflow"
        assert got.data.tags["who"] == "me"
        assert got.data.tags["env.AWS_SESSION_TOKEN"] == REDACTED
        assert got.data.metrics["train/loss"] == 1.5
        assert [f.path for f in client.list_artifacts(run.info.run_id)] == ["config.yaml"]
        back = Path(client.download_artifacts(run.info.run_id, "config.yaml", str(tmp_path)))
        assert yaml.safe_load(back.read_text())["data"]["url"] == "s3://aim-data/shards"

        # Grep everything the server stored (SQLite file, artifact objects in S3).
        stored = [_walk_bytes(state)]
        for obj in s3.list_objects_v2(Bucket="aim-artifacts").get("Contents", []):
            stored.append(s3.get_object(Bucket="aim-artifacts", Key=obj["Key"])["Body"].read())
        blob = b"".join(stored)
        assert b"aim-data/shards" in blob  # the grep sees what was logged...
        assert (
            PLANTED.encode() not in blob and PLANTED_KEY_ID.encode() not in blob
        )  # ...but no secret
    finally:
        down = runner.invoke(app, ["services", "down", "--state-dir", str(state)])
    assert down.exit_code == 0, down.output
    assert "mlflow: stopped" in down.output and "s3: stopped" in down.output
    for rec in (mlflow_rec, s3_rec):
        assert not svc.pid_alive(rec.pid)
        assert not _group_has_processes(rec.pid), f"processes left in group {rec.pid}"
        assert _listen_addresses(rec.port) == set()
    after = runner.invoke(app, ["services", "status", "--state-dir", str(state)])
    assert "mlflow: stopped" in after.output and "s3: stopped" in after.output


def _group_has_processes(pgid: int) -> bool:
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            return True
    return False


def test_status_notices_stale_pid_and_down_clears_it(tmp_path: Path) -> None:
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    rec = svc.ServiceRecord(
        name="mlflow",
        pid=dead.pid,
        host="127.0.0.1",
        port=5999,
        url="http://127.0.0.1:5999",
        log=str(tmp_path / "mlflow.log"),
        started_at=0.0,
    )
    (tmp_path / "mlflow.json").write_text(__import__("json").dumps(rec.__dict__))
    runner = CliRunner()
    result = runner.invoke(app, ["services", "status", "--state-dir", str(tmp_path)])
    assert result.exit_code == 1
    assert f"mlflow: stale (pid {dead.pid} is not running" in result.output
    result = runner.invoke(app, ["services", "down", "--state-dir", str(tmp_path)])
    assert result.exit_code == 0 and "cleared stale state" in result.output
    assert not (tmp_path / "mlflow.json").exists()
    assert [st.state for st in svc.status(tmp_path)] == ["stopped", "stopped"]


def test_reused_pid_is_stale(tmp_path: Path) -> None:
    # Our own PID is alive, but with another start time it is not the recorded process.
    started = svc._proc_start_time(os.getpid())
    assert started is not None and svc.pid_alive(os.getpid(), proc_start=started)
    assert not svc.pid_alive(os.getpid(), proc_start=started - 60)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    assert not svc.pid_alive(dead.pid) and svc._proc_start_time(dead.pid) is None


def test_down_stops_the_whole_process_tree(tmp_path: Path) -> None:
    """A service's child that left its process group (its own session) still goes: down
    walks the process tree (psutil), not the group."""
    import json

    import psutil

    code = (
        "import subprocess, sys, time; "
        "c = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)'], "
        "start_new_session=True); print(c.pid, flush=True); time.sleep(600)"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, process_group=0
    )
    child = psutil.Process(int(proc.stdout.readline()))
    assert os.getpgid(child.pid) != proc.pid  # out of the service's group
    rec = svc.ServiceRecord(
        name="mlflow", pid=proc.pid, host="127.0.0.1", port=5999, url="http://127.0.0.1:5999",
        log=str(tmp_path / "mlflow.log"), started_at=0.0,
        proc_start=svc._proc_start_time(proc.pid),
    )  # fmt: skip
    (tmp_path / "mlflow.json").write_text(json.dumps(rec.__dict__))
    assert [st.state for st in svc.status(tmp_path)] == ["running", "stopped"]
    assert svc.down(tmp_path, timeout=10) == [f"mlflow: stopped (pid {proc.pid})"]
    assert proc.poll() is not None
    assert not child.is_running() or child.status() == psutil.STATUS_ZOMBIE


def test_s3_endpoint_without_its_extra_names_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "moto", None)  # as if `pip install aim-platform` only
    monkeypatch.setitem(sys.modules, "moto.server", None)
    args = ["services", "up", "--s3", "--no-mlflow", "--state-dir", str(tmp_path)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 1
    assert result.output.splitlines() == [
        "error: --s3 needs moto and boto3 (moto is not installed): "
        "pip install 'aim-platform[dev-s3]'"
    ]
    assert not (tmp_path / "s3.json").exists()


def test_mlflow_up_rejects_folder_backend_and_busy_port(tmp_path: Path) -> None:
    with pytest.raises(svc.ServiceError, match="not a SQL URI"):
        svc.mlflow_up(tmp_path, port=0, backend_store_uri=str(tmp_path / "mlruns"))
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        with pytest.raises(svc.ServiceError, match=f"port {port} .* already in use"):
            svc.mlflow_up(tmp_path, port=port)
    assert not (tmp_path / "mlflow.json").exists()


def test_auth_needs_flask_wtf_and_admin_password(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(svc, "_has_module", lambda name: False)
    with pytest.raises(svc.ServiceError, match=r"pip install 'mlflow\[auth\]'"):
        svc.mlflow_up(tmp_path, port=0, auth=True)
    monkeypatch.setattr(svc, "_has_module", lambda name: True)
    monkeypatch.delenv("MLFLOW_AUTH_ADMIN_PASSWORD", raising=False)
    with pytest.raises(svc.ServiceError, match="MLFLOW_AUTH_ADMIN_PASSWORD"):
        svc.mlflow_up(tmp_path, port=0, auth=True)
    assert not (tmp_path / "mlflow.json").exists()


@pytest.mark.slow
def test_failed_start_leaves_nothing_and_hides_db_password(tmp_path: Path) -> None:
    # Nothing listens on the database port: the server dies during start-up.
    uri = f"postgresql://mlflow:{PLANTED}@127.0.0.1:{svc.free_port()}/mlflow"
    with pytest.raises(svc.ServiceError, match="exited with code|did not answer") as err:
        svc.mlflow_up(tmp_path, port=0, backend_store_uri=uri, timeout=90)
    assert PLANTED not in str(err.value)
    assert not (tmp_path / "mlflow.json").exists()
    assert [st.state for st in svc.status(tmp_path)] == ["stopped", "stopped"]
    assert not _processes_mentioning(str(tmp_path))


def _processes_mentioning(text: str) -> list[str]:
    found = []
    for p in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if text.encode() in p.read_bytes():
                found.append(p.parent.name)
        except OSError:
            continue
    return found


# ------------------------------------------------ exposure, private files, the auth server


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["--expose"], "--expose/--host 0.0.0.0 without --auth"),
        (["--host", "10.1.2.3"], "--expose/--host 10.1.2.3 without --auth"),
        (["--expose", "--auth", "--s3"], "--s3 with --expose/--host 0.0.0.0"),
    ],
)
def test_exposing_without_a_login_is_refused(tmp_path: Path, args: list[str], says: str) -> None:
    """Nothing starts: one line, exit 2, before any server or state file exists."""
    cmd = ["services", "up", "--state-dir", str(tmp_path), "--mlflow-port", "0", "--s3-port", "0"]
    result = CliRunner().invoke(app, [*cmd, *args, "--timeout", "1"])
    assert result.exit_code == 2, result.output
    lines = result.output.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and says in lines[0], lines
    assert not list(tmp_path.iterdir())  # no state, no log: nothing was started


def test_loopback_needs_no_auth() -> None:
    for host in ("127.0.0.1", "127.0.0.2", "localhost", "::1"):
        svc.check_exposure(host, mlflow=True, auth=False, s3=True)
    svc.check_exposure("0.0.0.0", mlflow=True, auth=True, s3=False)


def _spy_creations(monkeypatch: pytest.MonkeyPatch, under: Path) -> list[tuple[str, int]]:
    """Record (path, mode) of every file created under ``under`` through os.open, the mode
    being the file's own at its first moment (fstat right after the call)."""
    created: list[tuple[str, int]] = []
    real_open = os.open

    def spy(path: object, flags: int, mode: int = 0o777, *a: object, **k: object) -> int:
        existed = os.path.exists(path)  # type: ignore[arg-type]
        fd = real_open(path, flags, mode, *a, **k)  # type: ignore[arg-type]
        if str(path).startswith(str(under)) and flags & os.O_CREAT and not existed:
            created.append((str(path), os.fstat(fd).st_mode & 0o777))
        return fd

    monkeypatch.setattr(os, "open", spy)
    return created


def test_compose_secret_files_are_private_from_their_first_moment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = tmp_path / "infra" / "secrets"
    created = _spy_creations(monkeypatch, tmp_path)
    old = os.umask(0)  # the widest umask there is: the code, not the umask, keeps them private
    try:
        result = CliRunner().invoke(app, ["services", "secrets", "--dir", str(folder)])
    finally:
        os.umask(old)
    assert result.exit_code == 0, result.output
    files = {p.name: p for p in folder.iterdir()}
    assert set(files) == set(svc.COMPOSE_SECRETS)
    assert created and all(mode == 0o600 for _, mode in created), created  # born 0600
    for p in files.values():
        assert p.stat().st_mode & 0o777 == 0o600, p
        assert p.read_text().strip(), p
    assert folder.stat().st_mode & 0o777 == 0o700
    assert len({files[n].read_text() for n in ("postgres_password", "mlflow_ray_password")}) == 2
    # A second run keeps what exists (a database initialised with a password keeps it).
    before = {n: p.read_text() for n, p in files.items()}
    (folder / "ray_auth_token").unlink()
    again = CliRunner().invoke(app, ["services", "secrets", "--dir", str(folder)])
    assert again.output.strip() == "created ray_auth_token"
    assert {n: p.read_text() for n, p in files.items() if n != "ray_auth_token"} == {
        n: v for n, v in before.items() if n != "ray_auth_token"
    }


def test_auth_config_is_written_private_from_its_first_moment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`up --auth` writes basic_auth.ini 0600 in a 0700 state folder (the server, not started
    here, makes its databases under umask 077)."""
    monkeypatch.setenv("MLFLOW_AUTH_ADMIN_PASSWORD", PLANTED)
    monkeypatch.setattr(svc, "_has_module", lambda name: True)

    def no_start(name: str, cmd: list[str], **kwargs: object) -> None:
        raise svc.ServiceError("not started in this test")

    monkeypatch.setattr(svc, "_start", no_start)
    created = _spy_creations(monkeypatch, tmp_path)
    old = os.umask(0)
    try:
        with pytest.raises(svc.ServiceError, match="not started"):
            svc.mlflow_up(tmp_path / "state", port=0, auth=True)
    finally:
        os.umask(old)
    ini = tmp_path / "state" / "basic_auth.ini"
    assert ini.stat().st_mode & 0o777 == 0o600
    assert created and all(mode == 0o600 for _, mode in created), created
    assert (tmp_path / "state").stat().st_mode & 0o777 == 0o700
    assert f"default_permission = {svc.AUTH_DEFAULT_PERMISSION}" in ini.read_text()
    assert PLANTED not in ini.read_text()  # the admin password stays in the environment


def _post(url: str, body: dict[str, object], auth: tuple[str, str] | None = None) -> int:
    import base64
    import json
    import urllib.error
    import urllib.request

    headers = {"Content-Type": "application/json"}
    if auth:
        headers["Authorization"] = "Basic " + base64.b64encode(":".join(auth).encode()).decode()
    req = urllib.request.Request(url, json.dumps(body).encode(), headers, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return int(r.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)


@pytest.mark.slow
def test_auth_server_refuses_anonymous_writes_and_accepts_the_pods_user(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The cluster's MLflow configuration on a real local server (`aimctl services up --auth`),
    its Ray pods' user made as the cluster's Job makes it (`aimctl services user`)."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    state = tmp_path / "state"
    admin_pw, ray_pw = "admin-" + PLANTED, "ray-" + PLANTED
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_TRACKING_")}
    env["MLFLOW_AUTH_ADMIN_PASSWORD"] = admin_pw
    up = _aimctl(
        "services", "up", "--auth", "--state-dir", str(state), "--mlflow-port", "0", env=env
    )
    assert up.returncode == 0, up.stdout + up.stderr
    rec = svc.status(state)[0].record
    assert rec is not None and rec.details["auth"] == "basic-auth"
    url = rec.url
    try:
        create = f"{url}/api/2.0/mlflow/experiments/create"
        assert _post(create, {"name": "anonymous"}) == 401  # no login, no write
        assert _post(create, {"name": "x"}, ("admin", "wrong")) == 401

        def user(name: str, password: str, admin: str = admin_pw) -> subprocess.CompletedProcess:
            user_env = dict(env, MLFLOW_TRACKING_USERNAME="admin", MLFLOW_TRACKING_PASSWORD=admin)
            user_env["AIM_MLFLOW_USER_PASSWORD"] = password
            return _aimctl("services", "user", name, "--tracking-uri", url, env=user_env)

        made = user("aim-ray", ray_pw)
        assert made.returncode == 0 and "mlflow user aim-ray: created" in made.stdout, made
        again = user("aim-ray", ray_pw)  # the Job may run twice: idempotent
        assert again.returncode == 0 and "aim-ray: updated" in again.stdout, again
        wrong = user("aim-other", "pw", admin="wrong")
        assert wrong.returncode == 2 and "HTTP 401" in wrong.stdout, wrong
        short = user("aim-short", "pw")  # the server's own rule, said in one line
        assert short.returncode == 2 and len(short.stdout.splitlines()) == 1, short
        assert short.stdout.startswith("error: mlflow user 'aim-short': ")
        assert user("someone", "someone-Pw-0123456789").returncode == 0

        # The pods' user, through the MLflow client and the variables the pods get.
        monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "aim-ray")
        monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", ray_pw)
        client = MlflowClient(tracking_uri=url)
        exp = client.create_experiment("pods")
        run = client.create_run(exp)
        client.log_metric(run.info.run_id, "train/loss", 0.25, step=1)
        assert client.get_run(run.info.run_id).data.metrics["train/loss"] == 0.25

        # default_permission NO_PERMISSIONS: another user sees none of it.
        monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "someone")
        monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "someone-Pw-0123456789")
        with pytest.raises(MlflowException, match="PERMISSION_DENIED|403|Permission denied"):
            MlflowClient(tracking_uri=url).get_run(run.info.run_id)

        # Everything the server and the services wrote is private.
        assert state.stat().st_mode & 0o777 == 0o700
        files = [p for p in state.rglob("*") if p.is_file()]
        assert {"basic_auth.db", "basic_auth.ini", "mlflow.db"} <= {p.name for p in files}
        wide = [f"{p.name} {p.stat().st_mode & 0o777:o}" for p in files if p.stat().st_mode & 0o077]
        assert not wide, wide
    finally:
        down = CliRunner().invoke(app, ["services", "down", "--state-dir", str(state)])
    assert down.exit_code == 0, down.output
