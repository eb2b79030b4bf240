"""Head loss: the whole cluster (head, node and the driver on the head) killed with SIGKILL
after a checkpoint, a new cluster started (fresh temp dirs: pods come back with empty disks),
and the same command run again by name, as a RayJob with ``backoffLimit`` does (its
entrypoint is ``aimctl pretrain ... --address auto`` on the new head).

The run's checkpoints, ``latest.json`` and MLflow run id are on the local S3 endpoint: the
second attempt resumes from the checkpoint the first one committed, in the same MLflow run,
once the first attempt's lease is stale (``train.lease_ttl_s``).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from fault_rows import FaultRow, console_lines, current_test, record
from net_helpers import REPO
from test_node_loss import (
    cluster_env,
    local_cluster,
    read_state,
    s3_storage,
    wait_past_checkpoint,
)
from test_submit import _head_processes

STEPS = 30
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
def test_head_loss_resubmitted_by_name_resumes_from_the_object_store(
    s3_endpoint: dict[str, str], tmp_path: Path
) -> None:
    from mlflow.tracking import MlflowClient

    storage, options = s3_storage(s3_endpoint, f"head-loss-{tmp_path.name}")
    tracking = f"sqlite:///{tmp_path / 'mlflow.db'}"  # outside the cluster, as a server is
    sets = {
        "name": "head-loss",
        "train.steps": STEPS,
        "train.checkpoint_every": 10,
        "train.val_every": 30,
        "train.log_every": 1,
        "train.cpus_per_worker": 1,
        "train.max_failures": 3,
        "train.lease_ttl_s": LEASE_TTL_S,
        "train.storage_path": storage,
        "train.storage_options": json.dumps(options),
        "tracking.tracking_uri": tracking,
    }
    args = [item for k, v in sets.items() for item in ("--set", f"{k}={v}")]
    env = {**cluster_env(str(tmp_path)), "AIM_DATA_CACHE": str(tmp_path / "cache")}
    run = f"{storage}/head-loss"

    def driver(gcs: str, console: Path) -> subprocess.Popen[bytes]:
        return subprocess.Popen(
            [str(Path(sys.executable).parent / "aimctl"), "pretrain", "jobs/configs/demo.yaml",
             "--address", gcs, *args],
            cwd=REPO, env=env, stdout=console.open("w"), stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip

    first_console = tmp_path / "first.txt"
    with local_cluster(env) as nodes:
        first = driver(nodes["gcs"], first_console)
        try:  # a checkpoint in, steps after it logged (redone after the loss)
            saved, logged = wait_past_checkpoint(first, first_console, run, options, tracking)
        finally:
            _kill_everything(first, nodes)
    kept = read_state(f"{run}/latest.json", options)["step"]
    assert saved <= kept < logged < STEPS
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
    console = second_console.read_text()
    assert second.returncode == 0, console[-4000:]
    assert f"resuming from the checkpoint at step {kept}" in console, console[-4000:]
    assert f"step {STEPS}/{STEPS}" in console

    assert read_state(f"{run}/mlflow_run_id.json", options)["run_id"] == run_id
    client = MlflowClient(tracking_uri=tracking)
    assert client.get_run(run_id).info.status == "FINISHED"
    (resumed,) = client.get_metric_history(run_id, "train/resumed_from_step")
    assert resumed.value == kept
    steps = sorted(m.step for m in client.get_metric_history(run_id, "train/loss"))
    assert steps == list(range(1, STEPS + 1)), steps
    assert read_state(f"{run}/latest.json", options)["step"] == STEPS
    record(
        FaultRow(
            fault="head loss (whole cluster SIGKILLed, a new one, the same command run again)",
            console=console_lines(console, r"resuming from the checkpoint at step", r"^run "),
            steps_redone=f"{logged - kept} (logged through {logged}, resumed from {kept})",
            data_lost=f"0: the same MLflow run FINISHED, train/loss at 1..{STEPS} once each",
            test=current_test(),
        )
    )
