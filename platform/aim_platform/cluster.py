"""Joining a Ray cluster: the one place that connects a driver (``aimctl pretrain``, ``study``,
``probe``, ``tokenizer-fit``) to Ray and that finds the cluster's auth token.

Ray token authentication (Ray 2.52+, on by default for local clusters since 2.59): a client
sends the token, looked up in order in an explicit token file (``--token-file``),
``$RAY_AUTH_TOKEN``, the file ``$RAY_AUTH_TOKEN_PATH`` and, only when ``RAY_AUTH_MODE=token``,
``~/.ray/auth_token`` (Ray's own order after the explicit file). A driver that joins a cluster
with a token gets ``RAY_AUTH_MODE=token`` and ``RAY_AUTH_TOKEN`` set in its environment here
(:func:`use_token`), so nobody has to know about Ray's variables. That is Ray's documented
way, and it has one rule: Ray reads them when it is imported, so they are set before that
(the command line calls :func:`use_token` first thing; :func:`connect` refuses, saying why,
when Ray was imported without them).
"""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from aim_platform.errors import PlatformError

if TYPE_CHECKING:
    from aim_platform.config import JobConfig

TOKEN_HELP = (
    "set RAY_AUTH_TOKEN to the cluster's token, or point --token-file (or RAY_AUTH_TOKEN_PATH) "
    "at a file holding it; on the head node `ray get-auth-token` prints it"
)


class ClusterError(PlatformError):
    """A cluster that cannot be reached or joined; the message says what to do."""


def resolve_token(
    token_file: str | Path | None = None, environ: Mapping[str, str] | None = None
) -> str | None:
    """The Ray auth token to send, or None when none is configured.

    Args:
        token_file: an explicit file holding the token (``--token-file``); wins over the rest.
        environ: the environment to read (default ``os.environ``).

    Returns:
        The token (whitespace stripped) or None.

    Raises:
        ClusterError: a named token file is missing or empty.
    """
    env = os.environ if environ is None else environ
    if token_file is not None:
        return _read_token(Path(token_file), "--token-file")
    if env.get("RAY_AUTH_TOKEN", "").strip():
        return env["RAY_AUTH_TOKEN"].strip()
    if env.get("RAY_AUTH_TOKEN_PATH"):
        return _read_token(Path(env["RAY_AUTH_TOKEN_PATH"]), "RAY_AUTH_TOKEN_PATH")
    default = Path(env.get("HOME", str(Path.home()))) / ".ray" / "auth_token"
    if env.get("RAY_AUTH_MODE", "").lower() == "token" and default.is_file():
        return _read_token(default, "~/.ray/auth_token")
    return None


def _read_token(path: Path, source: str) -> str:
    try:
        token = path.expanduser().read_text().strip()
    except OSError as exc:
        raise ClusterError(f"{source}: cannot read token file {str(path)!r}: {exc}") from None
    if not token:
        raise ClusterError(f"{source}: token file {str(path)!r} is empty")
    return token


def auth_error(address: str, token: str | None, exc: Exception | None = None) -> ClusterError:
    """The message for a cluster that refused us: no token given, or a wrong one."""
    if token is None:
        return ClusterError(
            f"the Ray cluster at {address} requires token authentication and no token was "
            f"given: {TOKEN_HELP}"
        )
    reason = f" ({str(exc).splitlines()[0]})" if exc is not None and str(exc) else ""
    return ClusterError(
        f"the Ray cluster at {address} rejected the auth token{reason}; check that it is this "
        f"cluster's token: {TOKEN_HELP}"
    )


def _quiet_ray_data() -> None:
    """No Ray Data progress bars: the command line draws its own display, and Ray's bars
    would only fill the log (and warn that tqdm is missing)."""
    from ray.data import DataContext

    DataContext.get_current().enable_progress_bars = False


def use_token(address: str | None, token_file: str | Path | None = None) -> str | None:
    """Put the cluster's token where Ray reads it, before Ray is imported: a driver that
    joins the cluster at ``address`` (not an embedded Ray, ``address`` None) and has a token
    (see :func:`resolve_token`) gets ``RAY_AUTH_MODE=token`` and ``RAY_AUTH_TOKEN`` in this
    process's environment, which the Ray processes it starts inherit.

    Returns:
        The token, or None (no cluster address, or no token configured).

    Raises:
        ClusterError: a named token file is unreadable, or Ray was imported in this process
            before the token was set (Ray would not send it).
    """
    if not address or address.startswith(("http://", "https://")):
        return None
    token = resolve_token(token_file)
    if token is None:
        return None
    wanted = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token}
    if all(os.environ.get(k) == v for k, v in wanted.items()):
        return token  # already there (the shell's, or an earlier call's)
    if "ray" in sys.modules:
        raise ClusterError(
            "Ray was imported before the auth token was set, so it would not send it: set "
            "RAY_AUTH_MODE=token and RAY_AUTH_TOKEN in the environment, or call "
            "aim_platform.cluster.use_token(address, token_file) before importing ray"
        )
    os.environ.update(wanted)
    return token


@contextlib.contextmanager
def _stderr_captured() -> Iterator[Path]:
    """Send this process's file descriptor 2 (Ray's C++ core writes there) to a temp file."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.NamedTemporaryFile("w+", prefix="aim-ray-connect-", suffix=".log") as f:
        os.dup2(f.fileno(), 2)
        try:
            yield Path(f.name)
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)


#: How many times an embedded Ray is started before its failure stands. Ray's raylet gives its
#: dashboard agent a fixed 15 s to write its port files and aborts when the agent is later
#: (ray-project/ray#65983; no setting lengthens it): on a loaded machine (two test processes
#: on 2 cores, seen twice in one evening) the agent's first imports take longer, and
#: ``ray.init`` fails with "The current node timed out during startup". A second start finds
#: those imports in the page cache.
EMBEDDED_START_TRIES = 3
_SLOW_START = "timed out during startup"


#: ``AIM_RAY_DASHBOARD=0`` starts an embedded Ray without its dashboard (its web server and
#: nine module processes: about 5 core-s at each start, 2.4 core-s a minute idle), for CI and
#: shared machines where nobody opens it. Unset or ``1``: Ray's default (the dashboard on
#: http://127.0.0.1:8265 when its packages are installed).
DASHBOARD_ENV = "AIM_RAY_DASHBOARD"


def embedded_dashboard() -> bool | None:
    """``include_dashboard`` for an embedded Ray from ``$AIM_RAY_DASHBOARD`` (None: Ray's
    default)."""
    value = os.environ.get(DASHBOARD_ENV, "").strip().lower()
    if value in ("", "1", "true", "yes", "on"):
        return None
    if value in ("0", "false", "no", "off"):
        return False
    raise ClusterError(f"{DASHBOARD_ENV}={value!r}: use 0 (no dashboard) or 1 (Ray's default)")


def start_embedded(tries: int = EMBEDDED_START_TRIES, **init_args: object) -> None:
    """``ray.init(address="local", **init_args)``, started again (up to ``tries`` times, with
    a line on stderr each time) when Ray's node dies during its start-up; what the failed
    start left running (its GCS, dashboard, log monitor: this process's children) is ended
    first. Other failures are raised at once. Without ``include_dashboard`` in
    ``init_args`` it follows ``$AIM_RAY_DASHBOARD`` (:func:`embedded_dashboard`)."""
    import psutil
    import ray

    init_args.setdefault("include_dashboard", embedded_dashboard())
    for attempt in range(1, tries + 1):
        before = {c.pid for c in psutil.Process().children()}
        try:
            ray.init(address="local", **init_args)
            return
        except Exception as exc:
            if _SLOW_START not in str(exc) or attempt == tries:
                raise
            with contextlib.suppress(Exception):
                ray.shutdown()
            for child in psutil.Process().children(recursive=True):
                if child.pid not in before:
                    with contextlib.suppress(psutil.Error):
                        child.kill()
            print(
                f"Ray's local node did not start (try {attempt} of {tries}: its dashboard agent "
                "was too slow, ray-project/ray#65983 on a loaded machine); starting it again",
                file=sys.stderr,
                flush=True,
            )


def connect(address: str | None, token_file: str | Path | None = None) -> bool:
    """Join the Ray cluster at ``address`` (``auto``, ``HOST:6379``), or start an embedded
    local Ray when ``address`` is None; a no-op when this process is already connected.

    Embedded means this process's own Ray: never the cluster that ``ray start`` or
    ``ray.cluster_utils`` last named in ``/tmp/ray/ray_current_cluster`` (Ray's ``ray.init()``
    joins that one, so on a shared machine a job joined someone else's cluster and died when
    it was shut down). ``$RAY_ADDRESS`` (set inside a Ray job) is still followed, as by Ray.

    Returns:
        True when this call initialized Ray in this process (started an embedded Ray or
        joined a cluster): the caller calls ``ray.shutdown()`` at the end.

    Raises:
        ClusterError: a dashboard URL where a cluster address belongs, an unreachable
            cluster, or a token that is missing or rejected.
    """
    if not address:
        import ray

        if ray.is_initialized():
            return False
        if os.environ.get("RAY_ADDRESS"):
            ray.init()
        else:
            start_embedded()
        _quiet_ray_data()
        return True
    if address.startswith(("http://", "https://")):
        raise ClusterError(
            f"--address (or RAY_ADDRESS) {address}: that is a dashboard URL, which `aimctl "
            f"submit` takes; a driver joins a cluster by its GCS address (HOST:6379) or "
            f"`auto` on a node"
        )
    token = use_token(address, token_file)
    import ray

    if ray.is_initialized():
        return False
    failure: ConnectionError | None = None
    with _stderr_captured() as log:  # Ray retries for ~20 s, printing a line a second
        try:
            ray.init(address=address)
        except ConnectionError as exc:
            failure = exc
        said = log.read_text(errors="replace")
    if failure is None:
        _quiet_ray_data()
        return True
    if "InvalidAuthToken" in said or "Unauthenticated" in said:
        raise auth_error(address, token)
    raise ClusterError(f"cannot join the Ray cluster at {address}: {failure}")


def resolve_use_gpu(setting: bool | str, cluster_gpus: float) -> bool:
    """``train.use_gpu`` as a bool: ``auto`` is True when the cluster has a GPU.

    Args:
        setting: the config's value, ``"auto"``, True or False.
        cluster_gpus: the GPUs the cluster holds (Ray's ``cluster_resources()["GPU"]``; an
            embedded Ray counts this machine's).

    Returns:
        Whether each training worker takes a GPU. An explicit True stays True on a cluster
        without GPUs (an autoscaler may add GPU nodes).
    """
    if setting == "auto":
        return cluster_gpus > 0
    return bool(setting)


def cluster_gpus() -> float:
    """The GPUs of the Ray cluster this process has joined (0 when none)."""
    import ray

    return float(ray.cluster_resources().get("GPU", 0.0))


def resolve_devices(job: JobConfig, gpus: float | None = None) -> JobConfig:
    """The job with ``train.use_gpu`` a bool (see :func:`resolve_use_gpu`); ``gpus`` defaults
    to the joined cluster's (:func:`cluster_gpus`), asked only when the setting is ``auto``."""
    setting = job.train.use_gpu
    if setting != "auto":
        return job
    use = resolve_use_gpu(setting, cluster_gpus() if gpus is None else gpus)
    train = job.train.model_copy(update={"use_gpu": use})
    return job.model_copy(update={"train": train})
