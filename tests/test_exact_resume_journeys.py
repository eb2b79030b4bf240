"""Every image once per epoch across restarts, and hung ranks that end, through the real job
(issue 29 points 1 and 3): one run of a multi-day job's two commonest faults in turn.

``aimctl pretrain`` of the demo config (digits) drawing 512 of its 1,717 train rows an epoch
(``data.samples_per_epoch``: 8 steps at batch 64, each row drawn at most once, by a seeded
hash) with a checkpoint every 2 steps, ``train.max_failures: 2``:

1. In epoch 0 a training worker is SIGKILLed after a checkpoint, and the job restarts itself
   from it. Before the fix each restart began epoch 0 again at its first row: rows trained
   before the checkpoint were trained twice. Now the run's MLflow record of epoch 0, computed
   from the ids the workers consumed, holds exactly the epoch's drawn rows, each once.
2. In epoch 1, rank 1 sleeps where it reads its next batch (a stuck read); after
   ``train.step_timeout_s`` its watchdog ends it, the console names the rank and its node,
   and the job restarts from its last checkpoint and finishes, instead of waiting for the
   backend's 30-minute collective timeout.

Meanwhile a second ``aimctl pretrain`` of the same name and storage, with its own Ray (two
clusters sharing a bucket, the case the lease exists for), is refused before any step naming
the first, which goes on untouched (one writer per run).

The whole job lost mid-epoch and run again by name is the head loss journey
(``tests/test_head_loss.py``), which asserts the same of its epoch 0; a job stopped and
resubmitted is ``tests/test_submit.py``'s.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest
from fault_rows import FaultRow, console_lines, current_test, record
from journey_helpers import metric, mlflow_run, start_demo, wait_for_checkpoint

from aim_platform.train.watchdog import HANG_ENV

STEPS = 12
EPOCH_ROWS = 512  # data.samples_per_epoch: 8 steps at batch 64
HANG_AT = 9  # rank 1 sleeps after step 9 (epoch 1), the step-8 checkpoint behind it
TIMEOUT_S = 20  # train.step_timeout_s


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
    "train.max_failures": 2,
    "train.restart_settle_s": 2,  # one node: nothing to wait for
    "train.step_timeout_s": TIMEOUT_S,
}


@pytest.mark.faults  # `make test-faults` (CI runs it after `make test`)
@pytest.mark.slow
@pytest.mark.timeout(2400)  # three worker-group starts: minutes each on a loaded machine
def test_a_second_writer_a_killed_worker_and_a_hung_rank_in_one_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    storage, log, marker = tmp_path / "runs", tmp_path / "console.log", tmp_path / "hung"
    run = storage / "exact"
    proc = start_demo(storage, log, SETS, env={HANG_ENV: f"1:{HANG_AT}:{marker}"})
    second, second_log = None, tmp_path / "second.log"
    try:
        while not (run / "lease.json").exists():  # the first holds the run: a second writer
            assert proc.poll() is None, log.read_text()[-3000:]
            time.sleep(0.3)
        second = start_demo(storage, second_log, SETS)  # its own Ray, the same name
        wait_for_checkpoint(run, 2, proc, log)
        workers = _train_workers(proc)
        assert workers, "no training worker process found"
        os.kill(workers[-1], signal.SIGKILL)  # restart inside the job, from the checkpoint
        assert second.wait(timeout=600) == 2, second_log.read_text()[-3000:]
        assert proc.wait(timeout=1500) == 0, log.read_text()[-3000:]
    finally:
        for p in (proc, second):
            if p is not None and p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
    said = " ".join(second_log.read_text().split())
    assert "error: run exact is held by Ray job " in said, said
    assert f"on host {socket.gethostname()}, pid {proc.pid}, last heartbeat" in said, said
    assert "Traceback" not in said and "step 2/" not in said, said
    assert marker.exists(), "the fault did not happen: rank 1 never slept"
    console = log.read_text()
    failed = [int(m) for m in re.findall(r"training failed at step (\d+)", console)]
    assert len(failed) == 2 and failed[1] == HANG_AT, (failed, console[-3000:])
    assert "restart 1 of 2: resuming from the checkpoint at step" in console
    hung = (
        rf"rank 1 on node \S+ made no step for {TIMEOUT_S} s after step {HANG_AT}, waiting for "
        r"its next batch \(train.step_timeout_s\)"
    )
    assert re.search(hung, console), console[-3000:]
    assert "restart 2 of 2: resuming from the checkpoint at step 8" in console

    client, run_id = mlflow_run(run)
    resumed_at = metric(client, run_id, "train/resumed_from_step")
    assert len(resumed_at) == 2 and resumed_at[8] == 8.0, resumed_at  # 1 step redone
    resumed = min(resumed_at)
    assert 2 <= resumed <= failed[0] < EPOCH_ROWS // 64, (resumed, failed)
    steps = [m.step for m in client.get_metric_history(run_id, "train/loss")]
    assert sorted(steps) == list(range(2, STEPS + 1, 2)), steps  # each logged step once
    rows = metric(client, run_id, "data/epoch_rows")
    distinct = metric(client, run_id, "data/epoch_distinct_rows")
    monkeypatch.setenv("AIM_DATA_CACHE", str(storage.parent / "cache"))
    expected = _epoch0_rows(storage.parent / "cache")
    assert rows.get(0) == distinct.get(0) == expected, (rows, distinct, expected)
    # rank 0 failed with its peer; its queued writes went to the driver, none died with it
    assert "writes lost" not in console, console[-3000:]
    finished = client.get_run(run_id)
    assert finished.info.status == "FINISHED"
    assert not (run / "lease.json").exists()  # released at the end
    # one run in the experiment: the refused one never opened its own
    assert [r.info.run_id for r in client.search_runs([finished.info.experiment_id])] == [run_id]
    record(
        FaultRow(
            fault="second writer (two `aimctl pretrain` of one name on one storage, each its "
            "own Ray)",
            console=[f"the second: {said}", f"the first: run exact: {STEPS} steps, exit 0"],
            steps_redone="0",
            data_lost="0: the first run FINISHED (through the faults below), each logged step "
            "once, the lease released",
            test=current_test(),
        )
    )
    record(
        FaultRow(
            fault="killed training worker (SIGKILL, embedded Ray, real pipeline, mid-epoch)",
            console=console_lines(console, r"training failed at step", r"restart 1 of 2"),
            steps_redone=f"{failed[0] - resumed} (failed at {failed[0]}, from {resumed})",
            data_lost=f"0: epoch 0's {expected} drawn rows each once "
            "(epoch_rows = epoch_distinct_rows)",
            test=current_test(),
        )
    )
    record(
        FaultRow(
            fault=f"hung rank (one of 2 gloo ranks sleeps mid-step, train.step_timeout_s {TIMEOUT_S})",
            console=console_lines(console, hung, r"restart 2 of 2", r"^run exact: "),
            steps_redone=f"{HANG_AT - 8} (hung after step {HANG_AT}, resumed from 8)",
            data_lost="0 (the stream resumes from the checkpoint's record of trained rows)",
            test=current_test(),
        )
    )
