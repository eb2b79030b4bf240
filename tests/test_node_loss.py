"""A node that disappears with its disk: the two-node loopback cluster the node-loss journey
uses (a token-auth Ray head and a second ``ray start --address`` node on 127.0.0.1, 2 CPUs
each, the second with its own temp dir), its helpers, and what a resumed rank 0 logs.

The journey itself (the second node's raylet killed after a checkpoint, its temp dir deleted
at once, then the whole cluster) is ``tests/test_head_loss.py``. Before the platform restarted
training itself, Ray Train brought both workers back on the surviving node, they took its 2
CPUs, the data pipeline's read tasks could never be scheduled and the job hung without a word.
Now it resumes from the checkpoint on what fits (1 worker, 0.5 CPU kept for data), says so,
and goes on; the MLflow run records the restart and holds every step once (the redone steps
are not logged again).
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from net_helpers import free_port
from test_submit import _stop_head


def _ports(*flags: str) -> list[str]:
    return [item for flag in flags for item in (flag, str(free_port()))]


def _node_args() -> list[str]:
    """What both nodes get: 127.0.0.1, 2 CPUs, a small object store, ports of their own."""
    return [
        "--node-ip-address", "127.0.0.1", "--num-cpus", "2", "--disable-usage-stats",
        "--min-worker-port", "0", "--max-worker-port", "0",
        "--object-store-memory", str(300 * 1024**2),
        *_ports(
            "--node-manager-port", "--object-manager-port", "--dashboard-agent-listen-port",
            "--dashboard-agent-grpc-port", "--metrics-export-port", "--runtime-env-agent-port",
        ),
    ]  # fmt: skip


def _start(args: list[str], env: dict[str, str], temp_dir: str) -> subprocess.Popen[bytes]:
    log = open(Path(temp_dir) / "node.log", "wb")  # noqa: SIM115 - the process keeps it
    cmd = [str(Path(sys.executable).parent / "ray"), "start", "--block", *args]
    return subprocess.Popen(
        cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )


def _node_count(env: dict[str, str], gcs: str) -> int:
    code = (
        f"import ray; ray.init(address={gcs!r}, log_to_driver=False); "
        "print('NODES', sum(n['Alive'] for n in ray.nodes()))"
    )
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    lines = [line for line in out.stdout.splitlines() if line.startswith("NODES")]
    return int(lines[-1].split()[1]) if lines else 0


def _up(
    args: list[str] | Callable[[], list[str]],
    env: dict[str, str],
    temp_dir: str,
    gcs: str,
    nodes: int,
) -> subprocess.Popen[bytes]:
    """``ray start --block ARGS`` until the cluster counts ``nodes`` nodes; a start that dies
    (on a loaded machine the raylet can give up waiting for its agents, Ray's own wait for
    a node to register is 30 s) is tried again, with ports of its own when ``args`` is a
    function (a port picked minutes before may have been taken since: a head once failed six
    tries in a row with the same ports, and started at the next run)."""
    for _ in range(6):
        proc = _start(args() if callable(args) else args, env, temp_dir)
        while proc.poll() is None and _node_count(env, gcs) < nodes:
            time.sleep(2)
        if proc.poll() is None:
            return proc
        _stop_head(proc, temp_dir)
    raise AssertionError(Path(temp_dir, "node.log").read_text()[-3000:])


def cluster_env(head_dir: str) -> dict[str, str]:
    """The environment of a token-auth cluster's nodes and drivers (the AWS variables of the
    session's S3 endpoint included: its credentials, as a cluster's pods get them)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(
        RAY_AUTH_MODE="token",
        RAY_AUTH_TOKEN=secrets.token_hex(24),
        HOME=head_dir,
        PATH=str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", ""),
        RAY_USAGE_STATS_ENABLED="0",
        RAY_ENABLE_UV_RUN_RUNTIME_ENV="0",
    )
    return env


@contextlib.contextmanager
def local_cluster(env: dict[str, str]) -> Iterator[dict[str, Any]]:
    """Head and worker node (2 CPUs each) on 127.0.0.1, fresh temp dirs; yields the GCS
    address, both temp dirs and both ``ray start`` processes. Stopped (and checked gone) on
    the way out, even if the test killed them."""
    head_dir = tempfile.mkdtemp(prefix="aimh", dir="/tmp")  # short: unix socket paths
    node_dir = tempfile.mkdtemp(prefix="aimn", dir="/tmp")
    gcs_port = free_port()
    gcs = f"127.0.0.1:{gcs_port}"
    head = node = None
    try:
        head = _up(
            lambda: ["--head", "--port", str(gcs_port), "--include-dashboard", "false",
                     "--temp-dir", head_dir,
                     *_ports("--ray-client-server-port", "--dashboard-port"), *_node_args()],
            env, head_dir, gcs, 1,
        )  # fmt: skip
        node = _up(
            lambda: ["--address", gcs, "--temp-dir", node_dir, *_node_args()],
            env, node_dir, gcs, 2,
        )  # fmt: skip
        yield {"gcs": gcs, "head_dir": head_dir, "node_dir": node_dir, "procs": [head, node]}
    finally:
        left = []
        for proc, folder in ((node, node_dir), (head, head_dir)):
            if proc is not None:
                left += _stop_head(proc, folder)
        shutil.rmtree(head_dir, ignore_errors=True)
        shutil.rmtree(node_dir, ignore_errors=True)
        assert not left, f"Ray processes left running: {left}"


@pytest.fixture
def two_nodes(s3_endpoint: dict[str, str], tmp_path: Path) -> Iterator[dict[str, Any]]:
    """Head and worker node (2 CPUs each) on 127.0.0.1 with token auth, started after the S3
    endpoint (the nodes inherit its ``AWS_*`` credentials); yields the GCS address, the
    environment that reaches it, and the worker node's temp dir."""
    env = cluster_env(str(tmp_path))
    with local_cluster(env) as nodes:
        yield {**nodes, "env": env}


def s3_storage(s3_endpoint: dict[str, str], prefix: str) -> tuple[str, dict[str, str]]:
    """``train.storage_path`` and ``train.storage_options`` on the session's S3 endpoint."""
    url = f"s3://{s3_endpoint['bucket']}/{prefix}"
    return url, {"endpoint_url": s3_endpoint["endpoint_url"]}


def read_state(url: str, options: dict[str, str]) -> dict | None:
    """The JSON at ``url`` (local or S3), or None while it is not there."""
    from aim_platform.storage import filesystem

    fs, path = filesystem(url, options)
    fs.invalidate_cache()  # s3fs lists once and remembers
    if not fs.exists(path):
        return None
    with fs.open(path) as f:
        return json.loads(f.read())


def wait_past_checkpoint(
    driver: subprocess.Popen[bytes],
    console: Path,
    run: str,
    options: dict,
    tracking: str,
    at_least: int = 10,
) -> tuple[int, int]:
    """Wait for a checkpoint at step ``at_least`` or later and two logged steps past it (steps
    a restart redoes); returns the checkpoint's step and the last step logged so far."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracking)
    while True:
        assert driver.poll() is None, console.read_text()[-3000:]
        state = read_state(f"{run}/latest.json", options)
        ids = read_state(f"{run}/mlflow_run_id.json", options)
        if state and state["step"] >= at_least and ids:
            losses = client.get_metric_history(ids["run_id"], "train/loss")
            logged = max((m.step for m in losses), default=0)
            if logged >= state["step"] + 2:
                return state["step"], logged
        time.sleep(1)


def _raylet_of(temp_dir: str) -> int:
    """The PID of the raylet whose session lives under ``temp_dir``."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if "raylet/raylet" in cmd and temp_dir in cmd:
            return int(entry.name)
    raise AssertionError(f"no raylet under {temp_dir}")


def test_a_resumed_rank_0_logs_only_the_steps_the_run_lacks(tmp_path: Path) -> None:
    """What a restart redoes was logged before it: rank 0 logs only the steps after the run's
    last ``train/loss`` step; MLflow not answering, it logs them all (twice over a gap)."""
    from aim_platform.tracking import RunLogger, Tracker
    from aim_platform.train.loop import _logged_through

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracker = Tracker(uri)
    run_id = tracker.start_run("redo", "redo", {}, {}, None)
    for step in range(1, 15):  # the failed attempt got to step 14; its checkpoint: step 10
        tracker.log_metrics(run_id, {"train/loss": 1.0 / step}, step=step)
    logger = RunLogger(uri, run_id)
    assert _logged_through(logger) == 14
    logger.close(timeout=10)
    down = RunLogger(f"http://127.0.0.1:{free_port()}", run_id)
    assert _logged_through(down) == 0
    down.close(timeout=0)
