"""Local services: an MLflow tracking server and a development S3 endpoint.

``aimctl services up|down|status`` runs them as background processes whose PID, address and
log file are recorded in a state folder (default ``./runs/services``, or ``AIM_SERVICES_DIR``):

- ``mlflow``: ``mlflow server`` with a SQL backend store (a SQLite file in the state folder by
  default; a ``postgresql://`` or other SQLAlchemy URI accepted) and an artifact store (a local
  folder or ``s3://``), optionally behind MLflow's basic-auth app;
- ``s3``: a **development stand-in** for S3 (moto's server, everything in memory and lost on
  ``down``). Production points at AWS S3 or MinIO instead.

Both bind to 127.0.0.1 unless a host is given explicitly; MLflow is served beyond loopback
only behind its basic-auth app, and the development S3 endpoint (which takes any credentials)
never is. The state folder is private (0700) and every file the services or ``aimctl services
secrets`` write is created 0600 (a server's own files through its umask, 077), so no secret
is ever readable by another user, not even for a moment. ``up`` returns only once the service
answers over HTTP; ``down`` stops the process and every process below it and waits until
they are gone. Processes are found, told apart from reused PIDs and stopped with psutil, so
the same commands work on Linux and macOS.

Over 400 lines on purpose: start, health check, status and stop of two services, with the
messages a person needs when one fails.
"""

from __future__ import annotations

import base64
import contextlib
import ipaddress
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path

import psutil

from aim_platform.errors import PlatformError
from aim_platform.security import redact_text

DEFAULT_STATE_DIR = Path("runs/services")
STATE_DIR_ENV = "AIM_SERVICES_DIR"
LOOPBACK = "127.0.0.1"
DEFAULT_PORTS = {"mlflow": 5000, "s3": 9000}
SERVICES = ("mlflow", "s3")
DEV_S3_EXTRA = "dev-s3"  # the pyproject extra with moto and boto3
DEV_S3_LABEL = (
    "development stand-in for S3 (moto, in memory, lost on down); use S3 or MinIO in production"
)
_SQL_SCHEMES = ("sqlite", "postgresql", "mysql", "mssql")
# Two readings of one process's start time agree within this; a reused PID started later.
START_TOLERANCE_S = 0.5
PRIVATE_FILE = 0o600  # every secret or state file: owner read/write, nobody else
PRIVATE_DIR = 0o700
SERVER_UMASK = 0o077  # what the servers create (SQLite stores, artifacts) is private too
# MLflow's basic-auth configuration, the same here and in infra/k8s/mlflow.yaml (ConfigMap
# aim-mlflow-auth; tests/test_infra.py compares them): a user sees only what they created or
# were granted (NO_PERMISSIONS), and every request must log in (the app has no anonymous user).
AUTH_DEFAULT_PERMISSION = "NO_PERMISSIONS"
AUTH_ADMIN_USERNAME = "admin"
# The compose stack's secret files (infra/compose/compose.yaml, `aimctl services secrets`):
# name -> how its value is made. MinIO's root user and one user per consumer (MLflow's artifacts,
# the Ray containers' data and checkpoints), each limited to its buckets by infra/compose.
COMPOSE_SECRETS = {
    "ray_auth_token": "hex32",
    "postgres_password": "hex24",
    "mlflow_admin_password": "hex24",
    "mlflow_flask_secret_key": "hex32",
    "mlflow_ray_password": "hex24",
    "s3_access_key_id": "aimadmin",
    "s3_secret_access_key": "hex24",
    "s3_mlflow_access_key_id": "aim-mlflow",
    "s3_mlflow_secret_access_key": "hex24",
    "s3_ray_access_key_id": "aim-ray",
    "s3_ray_secret_access_key": "hex24",
}


class ServiceError(PlatformError, RuntimeError):
    """A service that cannot be started, reached or stopped; the message says why."""


@dataclass
class ServiceRecord:
    """What the state folder records about one running service."""

    name: str
    pid: int
    host: str
    port: int
    url: str
    log: str
    started_at: float
    proc_start: float | None = None  # psutil's create_time(): tells a reused PID
    details: dict[str, str] = field(default_factory=dict)


@dataclass
class ServiceStatus:
    """``status`` of one service: ``running``, ``stopped`` or ``stale`` (PID gone or reused)."""

    name: str
    state: str
    record: ServiceRecord | None = None

    def describe(self) -> str:
        """One human line: what runs where, or why not."""
        if self.record is None:
            return f"{self.name}: stopped"
        r = self.record
        if self.state == "stale":
            return (
                f"{self.name}: stale (pid {r.pid} is not running; state left from an earlier "
                f"run; `aimctl services down` clears it)"
            )
        extra = "".join(f", {k}={v}" for k, v in r.details.items())
        return f"{self.name}: running at {r.url} (pid {r.pid}, log {r.log}{extra})"


def state_dir(path: str | Path | None = None) -> Path:
    """The state folder: ``path``, else ``$AIM_SERVICES_DIR``, else ``./runs/services``."""
    chosen = path or os.environ.get(STATE_DIR_ENV) or DEFAULT_STATE_DIR
    return Path(chosen).expanduser().resolve()


def free_port(host: str = LOOPBACK) -> int:
    """A TCP port nothing listens on right now."""
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _port_in_use(host: str, port: int) -> bool:
    probe = LOOPBACK if host in ("0.0.0.0", "::", "") else host
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex((probe, port)) == 0


def _process(pid: int, proc_start: float | None = None) -> psutil.Process | None:
    """The live process ``pid`` (not a zombie), or None; with ``proc_start`` (its recorded
    :meth:`psutil.Process.create_time`), None too when another process now holds that PID."""
    try:
        # Reap it if it is our own child that has exited (tests start services in-process).
        if os.waitpid(pid, os.WNOHANG)[0] == pid:
            return None
    except ChildProcessError:
        pass
    try:
        proc = psutil.Process(pid)
    except psutil.NoSuchProcess:
        return None
    try:
        if proc.status() == psutil.STATUS_ZOMBIE:
            return None
        if proc_start is not None and abs(proc.create_time() - proc_start) > START_TOLERANCE_S:
            return None
    except psutil.NoSuchProcess:
        return None
    except psutil.AccessDenied:  # another user's process: alive, but never one we started
        return None if proc_start is not None else proc
    return proc


def pid_alive(pid: int, proc_start: float | None = None) -> bool:
    """Whether ``pid`` runs (not a zombie) and, if ``proc_start`` is given, is the same process."""
    return _process(pid, proc_start) is not None


def _proc_start_time(pid: int) -> float | None:
    """When ``pid`` started (seconds since the epoch), to tell a reused PID from ours."""
    try:
        return psutil.Process(pid).create_time()
    except psutil.Error:
        return None


def _record_path(root: Path, name: str) -> Path:
    return root / f"{name}.json"


def read_record(root: Path, name: str) -> ServiceRecord | None:
    """The recorded state of service ``name``, or None when there is none."""
    path = _record_path(root, name)
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
        if not isinstance(data.get("proc_start"), int | float):
            data["proc_start"] = None  # older records held Linux clock ticks: liveness only
        return ServiceRecord(**data)
    except (ValueError, TypeError, AttributeError) as exc:
        raise ServiceError(f"state file {path} is corrupt ({exc}); remove it") from None


def status(root: str | Path | None = None) -> list[ServiceStatus]:
    """The state of every service in the state folder.

    Args:
        root: the state folder (see :func:`state_dir`).

    Returns:
        One :class:`ServiceStatus` per known service, in a fixed order.
    """
    folder = state_dir(root)
    out = []
    for name in SERVICES:
        rec = read_record(folder, name)
        if rec is None:
            out.append(ServiceStatus(name, "stopped"))
        elif pid_alive(rec.pid, rec.proc_start):
            out.append(ServiceStatus(name, "running", rec))
        else:
            out.append(ServiceStatus(name, "stale", rec))
    return out


def _wait_http(url: str, proc: subprocess.Popen[bytes], log: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    last: object = None
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise ServiceError(
                f"the server exited with code {proc.returncode} before answering {url}; "
                f"log {log}:\n{_tail(log)}"
            )
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
                last = r.status
        except (urllib.error.URLError, OSError) as exc:
            last = exc
        time.sleep(0.3)
    raise ServiceError(f"{url} did not answer in {timeout:.0f}s ({last}); log {log}:\n{_tail(log)}")


def _tail(log: Path, chars: int = 3000) -> str:
    try:
        return redact_text(log.read_text(errors="replace")[-chars:])
    except OSError:
        return "(no log)"


def _running(proc: psutil.Process) -> bool:
    """Whether ``proc`` (the same process, not a reused PID) still runs and is no zombie."""
    return _process(proc.pid, proc.create_time()) is not None  # create_time(): cached


def _stop(pid: int, timeout: float, proc_start: float | None = None) -> None:
    """SIGTERM process ``pid`` and every process below it, then SIGKILL what is left after
    ``timeout`` seconds; a PID that is gone or reused is left alone."""
    root = _process(pid, proc_start)
    if root is None:
        return
    try:
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return
    for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 5.0)):
        for proc in procs:
            with contextlib.suppress(psutil.NoSuchProcess):
                proc.send_signal(sig)
        deadline = time.monotonic() + wait
        while procs and time.monotonic() < deadline:
            procs = [p for p in procs if _running(p)]  # zombies count as gone
            if procs:
                time.sleep(0.2)
        if not procs:
            return
    raise ServiceError(f"processes {[p.pid for p in procs]} survived SIGKILL")


def _check_host(host: str) -> str:
    if not host:
        raise ServiceError("empty host; use 127.0.0.1 (default) or an explicit interface")
    return host


def is_loopback(host: str) -> bool:
    """Whether ``host`` is reachable from this machine only (127.0.0.0/8, ::1, localhost)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name: assume it resolves to a reachable interface


def check_exposure(host: str, *, mlflow: bool, auth: bool, s3: bool) -> None:
    """Refuse to serve anything beyond loopback without a login.

    Args:
        host: the interface the services would bind.
        mlflow: the MLflow server is started.
        auth: with MLflow's basic-auth app.
        s3: the development S3 endpoint is started (it accepts any credentials).

    Raises:
        ServiceError: ``host`` is not loopback and MLflow runs without ``--auth``, or the
            development S3 endpoint would be exposed.
    """
    if is_loopback(host):
        return
    if mlflow and not auth:
        raise ServiceError(
            f"--expose/--host {host} without --auth would let anyone on the network read, write "
            f"and delete runs; add --auth (and set MLFLOW_AUTH_ADMIN_PASSWORD)"
        )
    if s3:
        raise ServiceError(
            f"--s3 with --expose/--host {host}: the development S3 endpoint accepts any "
            f"credentials and stays on 127.0.0.1 (MLflow proxies its artifacts); drop --s3 "
            f"or use MinIO (infra/compose)"
        )


def private_dir(path: Path) -> Path:
    """Create ``path`` (and parents) if needed and make it 0700: nobody else may list or open
    what is inside, whatever their modes."""
    path.mkdir(parents=True, exist_ok=True, mode=PRIVATE_DIR)
    os.chmod(path, PRIVATE_DIR)
    return path


def write_private(path: Path, text: str, *, overwrite: bool = True) -> bool:
    """Write ``text`` to a file created 0600 from the start (never wider, whatever the umask;
    no moment at which another user could open it). Replaces an existing file atomically when
    ``overwrite``, else leaves it alone.

    Returns:
        Whether the file was written.
    """
    if path.exists() and not overwrite:
        return False
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
    fd = os.open(tmp, flags, PRIVATE_FILE)
    try:
        os.fchmod(fd, PRIVATE_FILE)  # os.open's mode is masked by the umask, never widened
        with os.fdopen(fd, "w") as fh:
            fd = -1
            fh.write(text)
        if overwrite:
            tmp.replace(path)
        else:
            os.link(tmp, path)  # fails if it appeared meanwhile: never overwrite
    finally:
        if fd >= 0:
            os.close(fd)
        tmp.unlink(missing_ok=True)
    return True


def write_compose_secrets(folder: str | Path) -> list[str]:
    """Create the compose stack's secret files that are missing, each 0600 from the start.

    Existing files are kept (a database initialised with a password keeps needing it). The
    containers read them as root and then drop to their unprivileged user
    (``infra/compose/with-secrets.sh``), so they need no wider mode.

    Args:
        folder: where compose.yaml looks for them (``infra/secrets``).

    Returns:
        The names of the files created.
    """
    root = private_dir(Path(folder))
    made = []
    for name, kind in COMPOSE_SECRETS.items():
        value = secrets.token_hex(int(kind[3:])) if kind.startswith("hex") else kind
        if write_private(root / name, value + "\n", overwrite=False):
            made.append(name)
    return made


def basic_auth_ini(database_uri: str, admin_username: str = AUTH_ADMIN_USERNAME) -> str:
    """MLflow's basic-auth configuration (``MLFLOW_AUTH_CONFIG_PATH``), as the cluster runs it.

    The admin's password is never in it: MLflow reads ``MLFLOW_AUTH_ADMIN_PASSWORD``.
    """
    return (
        "[mlflow]\n"
        f"default_permission = {AUTH_DEFAULT_PERMISSION}\n"
        f"database_uri = {database_uri}\n"
        f"admin_username = {admin_username}\n"
    )  # authorization_function: MLflow's default, basic auth


def mlflow_user(
    url: str,
    username: str,
    password: str,
    *,
    admin_username: str,
    admin_password: str,
    timeout: float = 30.0,
) -> str:
    """Create MLflow basic-auth user ``username``, or set its password if it exists.

    The same call makes the Ray pods' user in the cluster (Job ``aim-mlflow-users`` in
    infra/k8s/mlflow.yaml runs ``aimctl services user``) and a local one.

    Args:
        url: the tracking server, e.g. ``http://aim-mlflow:5000``.
        username: the user to create.
        password: its password.
        admin_username: an admin of the server.
        admin_password: that admin's password.
        timeout: seconds for each request.

    Returns:
        ``"created"`` or ``"updated"``.

    Raises:
        ServiceError: the server refused (wrong admin credentials, not an auth server) or did
            not answer.
    """
    if not username or not password:
        raise ServiceError("mlflow user: the username and the password must not be empty")
    token = base64.b64encode(f"{admin_username}:{admin_password}".encode()).decode()
    body = json.dumps({"username": username, "password": password}).encode()

    def call(path: str, method: str) -> tuple[int, str]:
        req = urllib.request.Request(
            url.rstrip("/") + path,
            data=body,
            method=method,
            headers={"Authorization": f"Basic {token}", "Content-Type": "application/json"},
        )
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                return int(r.status), ""
        except urllib.error.HTTPError as exc:
            return int(exc.code), exc.read().decode(errors="replace")
        except (urllib.error.URLError, OSError) as exc:
            raise ServiceError(f"mlflow user: {url} did not answer ({exc})") from None

    status, text = call("/api/2.0/mlflow/users/create", "POST")
    if status == 200:
        return "created"
    if "RESOURCE_ALREADY_EXISTS" in text:  # set the password it should have
        status, text = call("/api/2.0/mlflow/users/update-password", "PATCH")
        if status == 200:
            return "updated"
    try:
        said = str(json.loads(text).get("message", ""))
    except (ValueError, AttributeError):
        said = text
    hint = {401: "wrong admin username or password", 403: "not an admin"}.get(
        status, said.splitlines()[0][:200] if said.strip() else "is it running with --auth?"
    )
    raise ServiceError(f"mlflow user {username!r}: {url} answered HTTP {status} ({hint})")


def _start(
    name: str,
    cmd: list[str],
    *,
    root: Path,
    host: str,
    port: int,
    health_path: str,
    env: dict[str, str],
    timeout: float,
    details: dict[str, str],
) -> ServiceRecord:
    """Start ``cmd`` in its own process group, wait for ``health_path``, record its state."""
    current = read_record(root, name)
    if current is not None:
        if pid_alive(current.pid, current.proc_start):
            raise ServiceError(
                f"{name} already runs at {current.url} (pid {current.pid}); "
                f"`aimctl services down` first"
            )
        _record_path(root, name).unlink()  # stale state from a run that died
    if _port_in_use(host, port):
        raise ServiceError(f"port {port} on {host} is already in use; choose another port")
    private_dir(root)
    log = root / f"{name}.log"
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, PRIVATE_FILE)
    with os.fdopen(fd, "ab") as fh:
        proc = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=fh,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=root,
            # Its own process group (a Ctrl-C in the terminal does not reach it), not its own
            # session: `mlflow server` started with setsid takes 50 s or more to answer
            # (10 s otherwise, measured), and never with its job runner off.
            process_group=0,
            umask=SERVER_UMASK,  # its SQLite stores, auth database and artifacts: 0600
        )
    local = LOOPBACK if host in ("0.0.0.0", "::") else host
    url = f"http://{local}:{port}"
    try:
        _wait_http(url + health_path, proc, log, timeout)
    except ServiceError:
        _stop(proc.pid, timeout=10)  # whatever it spawned goes with it
        raise
    rec = ServiceRecord(
        name=name,
        pid=proc.pid,
        host=host,
        port=port,
        url=url,
        log=str(log),
        started_at=time.time(),
        proc_start=_proc_start_time(proc.pid),
        details=details,
    )
    write_private(_record_path(root, name), json.dumps(asdict(rec), indent=2))
    return rec


def require_dev_s3(what: str = "--s3") -> None:
    """Fail with one line naming the extra to install when moto or boto3 is missing.

    Raises:
        ServiceError: ``pip install 'aim-platform[dev-s3]'`` is needed.
    """
    try:
        import boto3  # noqa: F401
        import moto.server  # noqa: F401
    except ImportError as exc:
        raise ServiceError(
            f"{what} needs moto and boto3 ({(exc.name or '?').split('.')[0]} is not installed): "
            f"pip install 'aim-platform[{DEV_S3_EXTRA}]'"
        ) from None


def _has_module(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


def _check_backend(uri: str) -> str:
    scheme = uri.split(":", 1)[0].split("+", 1)[0].lower() if ":" in uri else ""
    if scheme not in _SQL_SCHEMES:
        raise ServiceError(
            f"backend store {redact_text(uri)!r} is not a SQL URI; use sqlite:///path/mlflow.db "
            f"or postgresql://user:password@host:5432/db (MLflow 3.17 refuses folder stores)"
        )
    return uri


def mlflow_up(
    root: str | Path | None = None,
    *,
    host: str = LOOPBACK,
    port: int = DEFAULT_PORTS["mlflow"],
    backend_store_uri: str | None = None,
    artifacts: str | None = None,
    auth: bool = False,
    workers: int = 1,
    s3_endpoint: str | None = None,
    timeout: float = 120.0,
) -> ServiceRecord:
    """Start an MLflow tracking server in the background and wait until ``/health`` answers.

    Args:
        root: the state folder (see :func:`state_dir`).
        host: interface to bind; 127.0.0.1 unless the caller explicitly exposes it.
        port: TCP port; 0 picks a free one.
        backend_store_uri: SQLAlchemy URI of the tracking store; default a SQLite file
            ``mlflow.db`` in the state folder. Passed through the environment, so that a
            database password never shows in the process list.
        artifacts: artifact destination served by the server (a folder or ``s3://...``);
            default ``artifacts/`` in the state folder.
        auth: run MLflow's basic-auth app (``--app-name basic-auth``) with the cluster's
            configuration (:func:`basic_auth_ini`: every request logs in, a user sees only what
            it created or was granted); needs ``mlflow[auth]`` installed and
            ``MLFLOW_AUTH_ADMIN_PASSWORD`` in the environment on first start.
        workers: server worker processes.
        s3_endpoint: S3 endpoint for an ``s3://`` artifact store (MinIO, the dev endpoint).
        timeout: seconds to wait for ``/health``.

    Returns:
        The recorded state of the running server.

    Raises:
        ServiceError: bad arguments, port in use, already running, or the server did not come
            up (the message holds the log's tail).
    """
    folder = state_dir(root)
    host = _check_host(host)
    port = port or free_port(LOOPBACK if host == "0.0.0.0" else host)
    backend = _check_backend(backend_store_uri or f"sqlite:///{folder / 'mlflow.db'}")
    if artifacts is None:
        artifacts = str(folder / "artifacts")
    elif "://" not in artifacts:
        artifacts = str(Path(artifacts).expanduser().resolve())
    env = dict(os.environ)
    env["MLFLOW_BACKEND_STORE_URI"] = backend
    env.setdefault("PYTHONUNBUFFERED", "1")
    # MLflow's job execution (GenAI scorers and the like, which the platform never runs) starts
    # seven more Python processes beside the server: on two busy cores the server then took
    # over two minutes to answer its first health check. A user can still turn it on.
    env.setdefault("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")
    cmd = [
        sys.executable,
        "-m",
        "mlflow",
        "server",
        "--host",
        host,
        "--port",
        str(port),
        "--workers",
        str(workers),
        "--artifacts-destination",
        artifacts,
    ]
    if s3_endpoint:
        env["MLFLOW_S3_ENDPOINT_URL"] = s3_endpoint
    details = {"backend": redact_text(backend), "artifacts": artifacts}
    if auth:
        if not _has_module("flask_wtf"):
            raise ServiceError(
                "--auth: MLflow's basic-auth app needs Flask-WTF, which this environment lacks: "
                "pip install 'mlflow[auth]' (the Docker image has it)"
            )
        if not env.get("MLFLOW_AUTH_ADMIN_PASSWORD") and not (folder / "basic_auth.db").exists():
            raise ServiceError(
                "--auth needs MLFLOW_AUTH_ADMIN_PASSWORD in the environment on first start "
                "(MLflow ships no default admin password)"
            )
        ini = private_dir(folder) / "basic_auth.ini"
        admin = env.get("MLFLOW_AUTH_ADMIN_USERNAME") or AUTH_ADMIN_USERNAME
        write_private(ini, basic_auth_ini(f"sqlite:///{folder / 'basic_auth.db'}", admin))
        env["MLFLOW_AUTH_CONFIG_PATH"] = str(ini)
        env.setdefault("MLFLOW_FLASK_SERVER_SECRET_KEY", secrets.token_hex(32))
        cmd += ["--app-name", "basic-auth"]
        details["auth"] = "basic-auth"
    return _start(
        "mlflow",
        cmd,
        root=folder,
        host=host,
        port=port,
        health_path="/health",
        env=env,
        timeout=timeout,
        details=details,
    )


def s3_up(
    root: str | Path | None = None,
    *,
    host: str = LOOPBACK,
    port: int = DEFAULT_PORTS["s3"],
    buckets: list[str] | None = None,
    timeout: float = 60.0,
) -> ServiceRecord:
    """Start the development S3 endpoint (moto's server) and create ``buckets`` on it.

    This is a development stand-in: data lives in memory and is lost on ``down``, and any
    credentials are accepted. Production points at AWS S3 or MinIO.

    Args:
        root: the state folder (see :func:`state_dir`).
        host: interface to bind; 127.0.0.1 unless the caller explicitly exposes it.
        port: TCP port; 0 picks a free one.
        buckets: bucket names to create once it answers.
        timeout: seconds to wait for it to answer.

    Returns:
        The recorded state of the running endpoint.

    Raises:
        ServiceError: moto or boto3 missing (the ``dev-s3`` extra), or it did not come up.
    """
    require_dev_s3()
    folder = state_dir(root)
    host = _check_host(host)
    port = port or free_port(LOOPBACK if host == "0.0.0.0" else host)
    cmd = [sys.executable, "-m", "moto.server", "-H", host, "-p", str(port)]
    rec = _start(
        "s3",
        cmd,
        root=folder,
        host=host,
        port=port,
        health_path="/moto-api/",
        env=dict(os.environ),
        timeout=timeout,
        details={"kind": DEV_S3_LABEL},
    )
    if buckets:
        import boto3

        client = boto3.client(
            "s3",
            endpoint_url=rec.url,
            aws_access_key_id="testing",
            aws_secret_access_key="testing",
            region_name="us-east-1",
        )
        try:
            for bucket in buckets:
                client.create_bucket(Bucket=bucket)
        except Exception as exc:
            down(folder, names=["s3"])
            raise ServiceError(f"could not create bucket {bucket!r}: {exc}") from None
    return rec


def down(
    root: str | Path | None = None, *, names: list[str] | None = None, timeout: float = 20.0
) -> list[str]:
    """Stop every recorded service (the process and all below it) and remove its state.

    Args:
        root: the state folder (see :func:`state_dir`).
        names: only these services (default: all).
        timeout: seconds to wait after SIGTERM before SIGKILL.

    Returns:
        One line per service saying what was done.
    """
    folder = state_dir(root)
    lines = []
    for st in status(folder):
        if st.record is None or (names is not None and st.name not in names):
            continue
        rec = st.record
        if st.state == "running":
            _stop(rec.pid, timeout, rec.proc_start)
            lines.append(f"{st.name}: stopped (pid {rec.pid})")
        else:
            lines.append(f"{st.name}: cleared stale state (pid {rec.pid} was not running)")
        _record_path(folder, st.name).unlink(missing_ok=True)
    return lines


def client_env(records: list[ServiceRecord]) -> dict[str, str]:
    """Environment variables that point clients at the given running services."""
    env: dict[str, str] = {}
    for rec in records:
        if rec.name == "mlflow":
            env["MLFLOW_TRACKING_URI"] = rec.url
        elif rec.name == "s3":
            env["AWS_ENDPOINT_URL"] = rec.url
            env["MLFLOW_S3_ENDPOINT_URL"] = rec.url
    return env
