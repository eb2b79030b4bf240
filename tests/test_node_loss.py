"""A node that disappears: a token-auth Ray head and a second ``ray start --address`` node on
127.0.0.1 (2 CPUs each, the second with its own temp dir), the demo job with one worker on each
(STRICT_SPREAD, 1 CPU a worker), and the second node's raylet killed after a checkpoint.

Before the platform restarted training itself, Ray Train brought both workers back on the
surviving node, they took its 2 CPUs, the data pipeline's read tasks could never be scheduled
and the job hung without a word. Now it resumes from the checkpoint on what fits (1 worker,
0.5 CPU kept for data), says so, and finishes; the MLflow run records the restart.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from net_helpers import REPO, free_port
from test_submit import _stop_head

STEPS = 40


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
    args: list[str], env: dict[str, str], temp_dir: str, gcs: str, nodes: int
) -> subprocess.Popen[bytes]:
    """``ray start --block ARGS`` until the cluster counts ``nodes`` nodes; a start that dies
    (on a loaded machine the raylet can give up waiting for its agents) is tried again."""
    for _ in range(3):
        proc = _start(args, env, temp_dir)
        while proc.poll() is None and _node_count(env, gcs) < nodes:
            time.sleep(2)
        if proc.poll() is None:
            return proc
        _stop_head(proc, temp_dir)
    raise AssertionError(Path(temp_dir, "node.log").read_text()[-3000:])


@pytest.fixture
def two_nodes() -> Iterator[dict[str, str]]:
    """Head and worker node (2 CPUs each) on 127.0.0.1 with token auth; yields the GCS
    address, the environment that reaches it, and the worker node's temp dir."""
    token = secrets.token_hex(24)
    head_dir = tempfile.mkdtemp(prefix="aimh", dir="/tmp")  # short: unix socket paths
    node_dir = tempfile.mkdtemp(prefix="aimn", dir="/tmp")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "AWS_"))}
    env.update(
        RAY_AUTH_MODE="token",
        RAY_AUTH_TOKEN=token,
        HOME=head_dir,
        PATH=str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", ""),
        RAY_USAGE_STATS_ENABLED="0",
        RAY_ENABLE_UV_RUN_RUNTIME_ENV="0",
    )
    gcs_port = free_port()
    gcs = f"127.0.0.1:{gcs_port}"
    head = node = None
    try:
        head = _up(
            ["--head", "--port", str(gcs_port), "--include-dashboard", "false",
             "--temp-dir", head_dir, *_ports("--ray-client-server-port", "--dashboard-port"),
             *_node_args()],
            env, head_dir, gcs, 1,
        )  # fmt: skip
        node = _up(["--address", gcs, "--temp-dir", node_dir, *_node_args()], env, node_dir, gcs, 2)
        yield {"gcs": gcs, "node_dir": node_dir, "env": env}
    finally:
        left = []
        for proc, folder in ((node, node_dir), (head, head_dir)):
            if proc is not None:
                left += _stop_head(proc, folder)
        shutil.rmtree(head_dir, ignore_errors=True)
        shutil.rmtree(node_dir, ignore_errors=True)
        assert not left, f"Ray processes left running: {left}"


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


@pytest.mark.slow
@pytest.mark.cluster
def test_lost_node_resumes_on_what_is_left_and_finishes(two_nodes, tmp_path: Path) -> None:
    from mlflow.tracking import MlflowClient

    storage = tmp_path / "runs"
    tracking = f"sqlite:///{tmp_path / 'mlflow.db'}"
    sets = {
        "name": "lost-node",
        "train.steps": STEPS,
        "train.checkpoint_every": 10,
        "train.val_every": 20,
        "train.placement_strategy": "STRICT_SPREAD",  # one worker a node, or no start
        "train.cpus_per_worker": 1,
        "train.max_failures": 3,
        "train.storage_path": str(storage),
        "tracking.tracking_uri": tracking,
    }
    args = [item for k, v in sets.items() for item in ("--set", f"{k}={v}")]
    env = {**two_nodes["env"], "HOME": str(tmp_path), "AIM_DATA_CACHE": str(tmp_path / "cache")}
    out = open(tmp_path / "console.txt", "w")  # noqa: SIM115 - closed below
    driver = subprocess.Popen(
        [str(Path(sys.executable).parent / "aimctl"), "pretrain", "jobs/configs/demo.yaml",
         "--address", two_nodes["gcs"], *args],
        cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    latest = storage / "lost-node" / "latest.json"
    try:
        # Kill the second node once a checkpoint is in (progress-based: no speed assumed).
        while not (latest.exists() and json.loads(latest.read_text())["step"] >= 10):
            assert driver.poll() is None, (tmp_path / "console.txt").read_text()[-3000:]
            time.sleep(1)
        killed_at = json.loads(latest.read_text())["step"]
        assert killed_at < STEPS
        os.kill(_raylet_of(two_nodes["node_dir"]), signal.SIGKILL)
        driver.wait(timeout=1800)
    finally:
        if driver.poll() is None:
            os.killpg(driver.pid, signal.SIGKILL)
        out.close()
    console = (tmp_path / "console.txt").read_text()
    assert driver.returncode == 0, console[-4000:]
    assert "lost 1 of 2 node(s)" in console, console[-4000:]
    assert "resuming from the checkpoint at step" in console
    assert "on 1 worker(s) (of 2" in console
    assert f"step {STEPS}/{STEPS}" in console

    run_id = json.loads((storage / "lost-node" / "mlflow_run_id.json").read_text())["run_id"]
    client = MlflowClient(tracking_uri=tracking)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags["restarts"] == "1" and "lost 1 of 2 node(s)" in run.data.tags["restart_1"]
    (restart,) = client.get_metric_history(run_id, "train/restarts")
    assert restart.value == 1 and restart.step >= killed_at
    steps = {m.step for m in client.get_metric_history(run_id, "train/loss")}
    assert max(steps) == STEPS
    workers = sorted(client.get_metric_history(run_id, "train/workers"), key=lambda m: m.step)
    assert workers[0].value == 2 and workers[-1].value == 1
    assert latest.exists() and json.loads(latest.read_text())["step"] == STEPS
    assert (storage / "lost-node" / "final" / "trunk.safetensors").is_file()
