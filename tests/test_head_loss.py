"""A lost node, then a lost head: one run on a two-node loopback cluster with its checkpoints,
``latest.json`` and MLflow run id on the local S3 endpoint (nothing a restart needs on a
node's disk).

1. The second node's raylet is SIGKILLed after a checkpoint and its temp dir deleted (a node
   and its disk gone): the job resumes from the checkpoint on what fits (1 worker of 2), says
   so, and goes on.
2. After a later checkpoint the whole cluster (head, node and the driver on the head) is
   SIGKILLed, a new cluster is started (fresh temp dirs: pods come back with empty disks) and
   the same command run again by name, as a RayJob with ``backoffLimit`` does (its entrypoint
   is ``aimctl pretrain ... --address auto`` on the new head). It resumes from the checkpoint
   the lost attempt committed, in the same MLflow run, once that attempt's lease is stale
   (``train.lease_ttl_s``), on both nodes again.

Both losses fall in epoch 0 (1,717 rows: it ends at step 27), and the data stream goes on from
each checkpoint's record of trained rows: epoch 0 trains every train row once.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from fault_rows import FaultRow, console_lines, current_test, record
from net_helpers import REPO
from test_node_loss import (
    _raylet_of,
    cluster_env,
    local_cluster,
    read_state,
    s3_storage,
    wait_past_checkpoint,
)
from test_submit import DIGITS_TRAIN_ROWS, _head_processes

STEPS = 30  # epoch 0 ends at step 27: the resumed run finishes it
EPOCH0_END = 27  # 1,717 rows at batch 64
LEASE_TTL_S = 5


def _kill_everything(driver: subprocess.Popen[bytes], nodes: dict) -> None:
    """SIGKILL the driver and every process of both nodes, until none is left (30 s at most)."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        left = [pid for proc in nodes["procs"] for folder in (nodes["head_dir"], nodes["node_dir"])
                for pid in _head_processes(proc.pid, folder)]  # fmt: skip
        if driver.poll() is None:
            os.killpg(driver.pid, signal.SIGKILL)
        if not left and driver.poll() is not None:
            return
        for pid in left:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.3)


@pytest.mark.faults  # `make test-faults` (CI runs it after `make test`)
@pytest.mark.slow
@pytest.mark.cluster
@pytest.mark.timeout(2700)  # two cluster starts, two job starts: minutes each when loaded
def test_lost_node_then_lost_head_resume_from_the_object_store(
    s3_endpoint: dict[str, str], tmp_path: Path
) -> None:
    from mlflow.tracking import MlflowClient

    storage, options = s3_storage(s3_endpoint, f"lost-{tmp_path.name}")
    tracking = f"sqlite:///{tmp_path / 'mlflow.db'}"  # outside the cluster, as a server is
    sets = {
        "name": "lost",
        "train.steps": STEPS,
        "train.checkpoint_every": 10,
        "train.val_every": 20,
        "train.log_every": 1,
        "train.placement_strategy": "STRICT_SPREAD",  # one worker a node, or no start
        "train.cpus_per_worker": 1,
        "train.max_failures": 3,
        "train.lease_ttl_s": LEASE_TTL_S,
        "train.storage_path": storage,
        "train.storage_options": json.dumps(options),
        "tracking.tracking_uri": tracking,
    }
    args = [item for k, v in sets.items() for item in ("--set", f"{k}={v}")]
    env = {**cluster_env(str(tmp_path)), "AIM_DATA_CACHE": str(tmp_path / "cache")}
    run = f"{storage}/lost"

    def driver(gcs: str, console: Path) -> subprocess.Popen[bytes]:
        # from tmp_path: the driver's own log goes to ./runs/lost/logs (its storage is S3)
        return subprocess.Popen(
            [str(Path(sys.executable).parent / "aimctl"), "pretrain",
             str(REPO / "jobs" / "configs" / "demo.yaml"), "--address", gcs, *args],
            cwd=tmp_path, env=env, stdout=console.open("w"), stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip

    first_console = tmp_path / "first.txt"
    with local_cluster(env) as nodes:
        first = driver(nodes["gcs"], first_console)
        try:
            # 1. the second node and its disk, once a checkpoint is in and steps after it are
            # logged (progress-based: no speed assumed)
            saved, node_logged = wait_past_checkpoint(first, first_console, run, options, tracking)
            os.kill(_raylet_of(nodes["node_dir"]), signal.SIGKILL)
            shutil.rmtree(nodes["node_dir"], ignore_errors=True)
            time.sleep(3)  # a commit past its barrier when the node went finishes; no other can
            node_kept = read_state(f"{run}/latest.json", options)["step"]
            assert saved <= node_kept < node_logged < 20, (saved, node_kept, node_logged)
            # 2. the whole cluster, after a checkpoint of the attempt on the one node left
            saved, head_logged = wait_past_checkpoint(
                first, first_console, run, options, tracking, at_least=20
            )
        finally:
            _kill_everything(first, nodes)
    console = first_console.read_text()
    assert "lost 1 of 2 node(s)" in console, console[-4000:]
    assert f"resuming from the checkpoint at step {node_kept}" in console, console[-4000:]
    assert "on 1 worker(s) (of 2" in console, console[-4000:]
    head_kept = read_state(f"{run}/latest.json", options)["step"]
    assert saved <= head_kept < head_logged < EPOCH0_END, (saved, head_kept, head_logged)
    run_id = read_state(f"{run}/mlflow_run_id.json", options)["run_id"]
    time.sleep(LEASE_TTL_S + 1)  # the dead attempt's lease goes stale

    second_console = tmp_path / "second.txt"
    with local_cluster(env) as nodes:  # a new cluster: new temp dirs, new ports
        second = driver(nodes["gcs"], second_console)
        try:
            second.wait(timeout=1800)
        finally:
            if second.poll() is None:
                os.killpg(second.pid, signal.SIGKILL)
    again = second_console.read_text()
    assert second.returncode == 0, again[-4000:]
    assert f"resuming from the checkpoint at step {head_kept}" in again, again[-4000:]
    assert f"step {STEPS}/{STEPS}" in again

    assert read_state(f"{run}/mlflow_run_id.json", options)["run_id"] == run_id
    client = MlflowClient(tracking_uri=tracking)
    mlflow_run = client.get_run(run_id)
    assert mlflow_run.info.status == "FINISHED"
    assert "lost 1 of 2 node(s)" in mlflow_run.data.tags["restart_1"]
    resumed = sorted(m.value for m in client.get_metric_history(run_id, "train/resumed_from_step"))
    assert resumed == [node_kept, head_kept], resumed
    # every step once in the one run: the steps each loss made redo are not logged again
    steps = sorted(m.step for m in client.get_metric_history(run_id, "train/loss"))
    assert steps == list(range(1, STEPS + 1)), steps
    workers = sorted(client.get_metric_history(run_id, "train/workers"), key=lambda m: m.step)
    assert [w.value for w in workers][:1] == [2] and 1 in [w.value for w in workers]
    assert workers[-1].value == 2  # the new cluster has both nodes again
    rows, distinct = (
        {m.step: m.value for m in client.get_metric_history(run_id, key)}
        for key in ("data/epoch_rows", "data/epoch_distinct_rows")
    )
    assert rows.get(0) == distinct.get(0) == DIGITS_TRAIN_ROWS, (rows, distinct)
    assert read_state(f"{run}/latest.json", options)["step"] == STEPS
    from aim_platform.storage import filesystem

    fs, final = filesystem(f"{run}/final/trunk.safetensors", options)
    assert fs.exists(final)
    epoch0 = f"epoch 0's {DIGITS_TRAIN_ROWS} rows each once (epoch_rows = epoch_distinct_rows)"
    record(
        FaultRow(
            fault="lost node with its disk (2-node loopback, checkpoints on S3, temp dir deleted)",
            console=console_lines(console, r"lost 1 of 2 node\(s\)", r"restart 1 of"),
            steps_redone=f"{node_logged - node_kept} (logged through {node_logged}, "
            f"resumed from {node_kept})",
            data_lost=f"0: train/loss at 1..{STEPS} once each, {epoch0}",
            test=current_test(),
        )
    )
    record(
        FaultRow(
            fault="head loss (whole cluster and job SIGKILLed mid-epoch, a new cluster, the "
            "same command run again)",
            console=console_lines(again, r"resuming from the checkpoint at step", r"^run "),
            steps_redone=f"{head_logged - head_kept} (logged through {head_logged}, "
            f"resumed from {head_kept})",
            data_lost=f"0: the same MLflow run FINISHED, train/loss at 1..{STEPS} once each, "
            f"{epoch0}",
            test=current_test(),
        )
    )
