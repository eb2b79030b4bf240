"""Every image once per epoch across restarts, through the real job (issue 29 point 1).

``aimctl pretrain`` of the demo config (digits) drawing 512 of its 1,717 train rows an epoch
(``data.samples_per_epoch``: 8 steps at batch 64, each row drawn at most once, by a seeded
hash) with a checkpoint every 2 steps. In epoch 0 a training worker is SIGKILLed after a
checkpoint (the job restarts itself from it), then the whole job (the CLI and its embedded
Ray) is SIGKILLed after a later checkpoint, still in epoch 0, and the same command is run
again. Before the fix each restart began epoch 0 again at its first row: rows trained before
the checkpoint were trained twice. Now the run's MLflow record of epoch 0, computed from the
ids the workers consumed, holds exactly the epoch's drawn rows, each once.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest
from fault_rows import FaultRow, console_lines, current_test, record
from journey_helpers import latest_step, metric, mlflow_run, start_demo, wait_for_checkpoint

STEPS = 12
EPOCH_ROWS = 512  # data.samples_per_epoch: 8 steps at batch 64


def _epoch0_rows(cache: Path) -> int:
    """Rows epoch 0 draws: the mixture's draw of every train id (seed 0, epoch 0)."""
    import pyarrow.parquet as pq

    from aim_platform.config import DataConfig
    from aim_platform.data.pipeline import mixture_rates, resolve_url, source_shards
    from aim_platform.data.tasks import draw_counts

    source = DataConfig().sources[0]  # builtin:digits
    assert resolve_url(source.url).startswith(str(cache))
    shards = source_shards(source, "train")
    (rate,) = mixture_rates([shards.rows], [1.0], EPOCH_ROWS)
    ids = [i for p in shards.paths for i in pq.read_table(p, columns=["id"])["id"].to_pylist()]
    assert len(ids) == len(set(ids)) == shards.rows == 1717
    return int(draw_counts(ids, rate, seed=0, epoch=0, source=source.source_name).sum())


def _train_workers(proc: subprocess.Popen[bytes]) -> list[int]:
    import psutil

    found = []
    for child in psutil.Process(proc.pid).children(recursive=True):
        try:
            if "RayTrainWorker" in " ".join(child.cmdline()):
                found.append(child.pid)
        except psutil.Error:
            continue
    return found


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    """SIGKILL the CLI and everything it started (its embedded Ray), as a lost job is."""
    import psutil

    family = [proc.pid, *(c.pid for c in psutil.Process(proc.pid).children(recursive=True))]
    for pid in family:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait(timeout=60)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and any(psutil.pid_exists(p) for p in family[1:]):
        time.sleep(0.5)


SETS = {
    "name": "exact",
    "data.samples_per_epoch": EPOCH_ROWS,
    "train.steps": STEPS,
    "train.checkpoint_every": 2,
    "train.log_every": 2,
    "train.val_every": 100,
    "train.max_failures": 1,
    "train.restart_settle_s": 2,  # one node: nothing to wait for
}


@pytest.mark.faults  # `make test-faults` (CI runs it after `make test`)
@pytest.mark.slow
@pytest.mark.timeout(1800)  # several job starts: minutes each on a loaded machine
def test_epoch_rows_exactly_once_after_a_killed_worker_and_a_killed_job(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    storage, log = tmp_path / "runs", tmp_path / "console.log"
    run = storage / "exact"
    first = start_demo(storage, log, SETS)
    try:
        at = wait_for_checkpoint(run, 2, first, log)
        workers = _train_workers(first)
        assert workers, "no training worker process found"
        os.kill(workers[-1], signal.SIGKILL)  # restart inside the job, from the checkpoint
        wait_for_checkpoint(run, at + 2, first, log)
        _kill_group(first)  # the job lost mid-epoch after a checkpoint
    finally:
        if first.poll() is None:
            _kill_group(first)
    killed_at = latest_step(run)
    assert killed_at < EPOCH_ROWS // 64, "the job must be stopped inside epoch 0"
    second = start_demo(storage, log, SETS)
    assert second.wait(timeout=900) == 0, log.read_text()[-3000:]
    console = log.read_text()
    assert "restart 1 of 1: resuming from the checkpoint at step" in console
    assert f"resuming from the checkpoint at step {killed_at}" in console

    client, run_id = mlflow_run(run)
    resumed = sorted(int(v) for v in metric(client, run_id, "train/resumed_from_step").values())
    assert resumed[0] >= 2 and resumed[-1] == killed_at  # both restarts, from their checkpoints
    rows = metric(client, run_id, "data/epoch_rows")
    distinct = metric(client, run_id, "data/epoch_distinct_rows")
    monkeypatch.setenv("AIM_DATA_CACHE", str(storage.parent / "cache"))
    expected = _epoch0_rows(storage.parent / "cache")
    assert rows.get(0) == distinct.get(0) == expected, (rows, distinct, expected)
    assert client.get_run(run_id).info.status == "FINISHED"

    failed = [int(m) for m in re.findall(r"training failed at step (\d+)", console)]
    second_run = console.split("pre-training exact")[1]
    reached = max(int(m) for m in re.findall(r"exact: step (\d+)/", second_run))
    test = current_test()
    lost = f"0: epoch 0's {expected} drawn rows each once (epoch_rows = epoch_distinct_rows)"
    record(
        FaultRow(
            fault="killed training worker (SIGKILL, embedded Ray, real pipeline, mid-epoch)",
            console=console_lines(console, r"training failed at step", r"restart 1 of 1"),
            steps_redone=f"{failed[0] - resumed[0]} (failed at {failed[0]}, from {resumed[0]})",
            data_lost=lost,
            test=test,
        )
    )
    record(
        FaultRow(
            fault="whole job SIGKILLed mid-epoch (CLI and its Ray), same command run again",
            console=console_lines(console, f"checkpoint at step {killed_at};", r"^run exact: "),
            steps_redone=f"{max(reached - killed_at, 0)} (reached {reached}, from {killed_at})",
            data_lost=lost,
            test=test,
        )
    )
