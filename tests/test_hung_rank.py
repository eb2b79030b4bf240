"""Hung ranks end (issue 29 point 3): one of two gloo ranks sleeps in the middle of a step (a
stuck read); after ``train.step_timeout_s`` its watchdog ends it, the console names the rank
and its node, and the job restarts from its last checkpoint and finishes, instead of waiting
for the backend's 30-minute collective timeout."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from fault_rows import FaultRow, console_lines, current_test, record
from journey_helpers import metric, mlflow_run, start_demo

from aim_platform.train.watchdog import HANG_ENV


@pytest.mark.faults  # `make test-faults` (CI runs it after `make test`)
@pytest.mark.slow
@pytest.mark.timeout(1800)  # several job starts: minutes each on a loaded machine
def test_a_rank_that_sleeps_is_ended_and_the_job_resumes(tmp_path: Path) -> None:
    storage, log, marker = tmp_path / "runs", tmp_path / "console.log", tmp_path / "hung"
    sets = {
        "name": "hung",
        "train.steps": 12,
        "train.checkpoint_every": 4,
        "train.log_every": 2,
        "train.val_every": 100,
        "train.max_failures": 1,
        "train.restart_settle_s": 2,
        "train.step_timeout_s": 20,
    }
    proc = start_demo(storage, log, sets, env={HANG_ENV: f"1:6:{marker}"})
    assert proc.wait(timeout=900) == 0, log.read_text()[-3000:]
    assert marker.exists(), "the fault did not happen: rank 1 never slept"
    console = log.read_text()
    line = (
        r"rank 1 on node \S+ made no step for 20 s after step 6, waiting for its next batch "
        r"\(train.step_timeout_s\)"
    )
    assert re.search(line, console), console[-3000:]
    assert "restart 1 of 1: resuming from the checkpoint at step 4" in console
    client, run_id = mlflow_run(storage / "hung")
    assert metric(client, run_id, "train/resumed_from_step") == {4: 4.0}  # 2 steps redone
    steps = [m.step for m in client.get_metric_history(run_id, "train/loss")]
    assert sorted(steps) == [2, 4, 6, 8, 10, 12]  # each logged step once, redone or not
    # rank 0 failed with its peer; its queued writes went to the driver, none died with it
    assert "writes lost" not in console, console[-3000:]
    assert client.get_run(run_id).info.status == "FINISHED"
    record(FaultRow(
        fault="hung rank (one of 2 gloo ranks sleeps mid-step, train.step_timeout_s 20)",
        console=console_lines(console, line, r"restart 1 of 1", r"^run hung: "),
        steps_redone="2 (hung after step 6, resumed from 4)",
        data_lost="0 (the stream resumes from the checkpoint's record of trained rows)",
        test=current_test(),
    ))  # fmt: skip
