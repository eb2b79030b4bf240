"""Every image once per epoch across restarts, through the real job (issue 29 point 1).

``aimctl pretrain`` of the demo config (digits) drawing 512 of its 1,717 train rows an epoch
(``data.samples_per_epoch``: 8 steps at batch 64, each row drawn at most once, by a seeded
hash) with a checkpoint every 2 steps. In epoch 0 a training worker is SIGKILLed after a
checkpoint, and the job restarts itself from it. Before the fix each restart began epoch 0
again at its first row: rows trained before the checkpoint were trained twice. Now the run's
MLflow record of epoch 0, computed from the ids the workers consumed, holds exactly the
epoch's drawn rows, each once. The whole job lost mid-epoch and run again by name is the head
loss journey (``tests/test_head_loss.py``), which asserts the same of its epoch 0; a job
stopped and resubmitted is ``tests/test_submit.py``'s.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
from pathlib import Path

import pytest
from fault_rows import FaultRow, console_lines, current_test, record
from journey_helpers import metric, mlflow_run, start_demo, wait_for_checkpoint

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
@pytest.mark.timeout(1800)  # two worker-group starts: minutes on a loaded machine
def test_epoch_rows_exactly_once_after_a_killed_worker(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    storage, log = tmp_path / "runs", tmp_path / "console.log"
    run = storage / "exact"
    proc = start_demo(storage, log, SETS)
    try:
        wait_for_checkpoint(run, 2, proc, log)
        workers = _train_workers(proc)
        assert workers, "no training worker process found"
        os.kill(workers[-1], signal.SIGKILL)  # restart inside the job, from the checkpoint
        assert proc.wait(timeout=900) == 0, log.read_text()[-3000:]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    console = log.read_text()
    assert "restart 1 of 1: resuming from the checkpoint at step" in console

    client, run_id = mlflow_run(run)
    (resumed,) = metric(client, run_id, "train/resumed_from_step").values()
    failed = [int(m) for m in re.findall(r"training failed at step (\d+)", console)]
    assert len(failed) == 1 and 2 <= resumed <= failed[0] < EPOCH_ROWS // 64, (resumed, failed)
    rows = metric(client, run_id, "data/epoch_rows")
    distinct = metric(client, run_id, "data/epoch_distinct_rows")
    monkeypatch.setenv("AIM_DATA_CACHE", str(storage.parent / "cache"))
    expected = _epoch0_rows(storage.parent / "cache")
    assert rows.get(0) == distinct.get(0) == expected, (rows, distinct, expected)
    assert client.get_run(run_id).info.status == "FINISHED"
    record(
        FaultRow(
            fault="killed training worker (SIGKILL, embedded Ray, real pipeline, mid-epoch)",
            console=console_lines(console, r"training failed at step", r"restart 1 of 1"),
            steps_redone=f"{failed[0] - int(resumed)} (failed at {failed[0]}, from {int(resumed)})",
            data_lost=f"0: epoch 0's {expected} drawn rows each once "
            "(epoch_rows = epoch_distinct_rows)",
            test=current_test(),
        )
    )
