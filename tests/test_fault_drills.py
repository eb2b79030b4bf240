"""The fault drills' checks (``tests/fault_drills.py``), fed recorded consoles and made-up
MLflow histories: a drill passes and records its row only when its fault really happened and
its row's claims hold; otherwise it ends with exit 1 and one line naming the failed check."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from fault_drills import (
    CheckFailed,
    IngestKill,
    Kill,
    KillAfterCheckpoint,
    RunFacts,
    check_data,
    check_half_checkpoint,
    check_ingest_again,
    check_ingest_kill,
    check_restart,
    check_s3_half,
    check_s3_pair,
    conclude,
    restart_row,
)
from fault_rows import FaultRow, render, short_paths

TRAIN_ROWS = 1717  # builtin:digits' train rows

# A killed-worker drill's console, as the drill prints it (lines shortened).
KILLED_WORKER = """\
[  300.2s] pre-training demo: aim-tiny, 150 steps at batch 64 on 2 worker(s)
[  580.0s] demo: step 30/150 | loss 0.4012 | 23 img/s | ...
[  617.1s] demo: step 40/150 | loss 0.3464 | 24 img/s | ...
[  617.1s] KILLED training worker 4242 (of 2) (console at step 40, checkpoint 30)
[  650.2s] demo: training failed at step 41: rank 0: The actor is dead ...; waiting up to 30 s for Ray to report lost nodes
[  650.6s] demo: restart 1 of 1: resuming from the checkpoint at step 30 on 2 worker(s)
[  900.0s] demo: step 40/150 | loss 0.3418 | 23 img/s | ...
[  928.5s] demo: step 50/150 | loss 0.3301 | 23 img/s | ...
[ 1500.0s] demo: step 150/150 | loss 0.2068 | val 0.1993 | ...
[ 1501.0s] run demo: 150 steps, storage /tmp/drill/runs/demo
"""

LOST_NODE = KILLED_WORKER.replace(
    "[  650.6s] demo: restart",
    "[  650.4s] demo: lost 1 of 2 node(s) at step 41\n[  650.6s] demo: restart",
)


def _run(
    status: str = "FINISHED",
    resumed: list[int] | None = None,
    last: int = 150,
    distinct: dict[int, int] | None = None,
    rows: dict[int, int] | None = None,
    dropped: float = 0.0,
) -> RunFacts:
    """A made-up MLflow run: train/loss every 10 steps to ``last``, the given restarts and
    epoch counts (default: epochs 0-4 with every train row once)."""
    distinct = {e: TRAIN_ROWS for e in range(5)} if distinct is None else distinct
    rows = dict(distinct) if rows is None else rows
    resumed = [30] if resumed is None else resumed
    return RunFacts(
        run_id="r1",
        status=status,
        tags={"restarts": str(len(resumed))},
        history={
            "train/loss": [(s, 1.0 / s) for s in range(10, last + 1, 10)],
            "train/resumed_from_step": [(s, float(s)) for s in resumed],
            "data/dropped_images": [(s, dropped) for s in range(10, last + 1, 10)],
            "data/epoch_rows": [(e, float(n)) for e, n in rows.items()],
            "data/epoch_distinct_rows": [(e, float(n)) for e, n in distinct.items()],
        },
    )


KILL = Kill(step=40, checkpoint=30, what="training worker 4242", t={"kill": 617.1, "back": 900.0})


def test_killed_worker_checks_hold_and_give_its_row() -> None:
    failed, resumed = check_restart(KILLED_WORKER, KILL, _run(), 0, node_lost=False)
    assert (failed, resumed) == (41, 30)  # the failed step from the console, the resumed one
    data = check_data(_run(), TRAIN_ROWS)
    row = restart_row("killed worker", KILLED_WORKER, KILL, failed, resumed, data, "python x")
    assert row.steps_redone.startswith("11 (failed at step 41, `train/resumed_from_step` 30)")
    assert "282.9 s from the kill" in row.steps_redone
    assert row.data_lost.startswith("0: epochs 0-4 each 1717 of 1717 train ids once")
    shown = " / ".join(row.console)
    for said in ("step 40/150 | loss 0.3464", "KILLED", "training failed at step 41"):
        assert said in shown
    assert "restart 1 of 1" in shown and "step 50/150 | loss 0.3301" in shown  # back past 41
    assert "step 150/150" not in shown
    assert row.console[-1].endswith("run demo: 150 steps, storage /tmp/drill/runs/demo")


def test_lost_node_needs_the_node_lost_line() -> None:
    assert check_restart(LOST_NODE, KILL, _run(), 0, node_lost=True) == (41, 30)
    with pytest.raises(CheckFailed, match=r"console: no failure line /lost"):
        check_restart(KILLED_WORKER, KILL, _run(), 0, node_lost=True)  # a worker, not a node


@pytest.mark.parametrize(
    ("console", "kill", "run", "rc", "failed_check"),
    [
        # the step was never reached: no kill, the run finished untouched
        (KILLED_WORKER, Kill(), _run(resumed=[]), 0, "kill: never struck"),
        (KILLED_WORKER, Kill(error="could not kill: no ray::RayTrainWorker"), _run(), 0,
         "kill: could not kill"),
        # killed, but the job never said it failed, or never restarted
        (KILLED_WORKER.replace("training failed at step 41", "slow"), KILL, _run(), 0,
         "console: no failure line"),
        (KILLED_WORKER.replace("restart 1 of 1", "gave up"), KILL, _run(), 0,
         "console: no restart line"),
        (KILLED_WORKER.replace("checkpoint at step 30", "checkpoint at step 0"), KILL, _run(), 0,
         "console: restarted from step 0"),
        (KILLED_WORKER, KILL, _run(), 1, "exit: the job exited 1"),
        (KILLED_WORKER, KILL, None, 0, "mlflow: no run"),
        # a fresh start (no train/resumed_from_step) or a second restart
        (KILLED_WORKER, KILL, _run(resumed=[]), 0, r"train/resumed_from_step is \[\]"),
        (KILLED_WORKER, KILL, _run(resumed=[30, 60]), 0, r"is \[30, 60\], not \[30\]"),
        (KILLED_WORKER, KILL, _run(status="RUNNING"), 0, "is RUNNING, not FINISHED"),
        (KILLED_WORKER, KILL, _run(last=120), 0, "last logged at step 120, not 150"),
    ],
)  # fmt: skip
def test_a_restart_drill_whose_fault_or_claim_did_not_happen_fails(
    console: str, kill: Kill, run: RunFacts | None, rc: int, failed_check: str
) -> None:
    with pytest.raises(CheckFailed, match=failed_check):
        check_restart(console, kill, run, rc, node_lost=False)


def test_a_failure_line_before_the_kill_does_not_count() -> None:
    lines = KILLED_WORKER.splitlines()
    kill_line = next(line for line in lines if "KILLED" in line)
    early = "\n".join([line for line in lines if line != kill_line] + [kill_line])
    with pytest.raises(CheckFailed, match="console: no failure line"):
        check_restart(early, KILL, _run(), 0, node_lost=False)


@pytest.mark.parametrize(
    ("run", "failed_check"),
    [
        (_run(distinct={0: TRAIN_ROWS, 1: 1700}), r"data: epochs whose .* \{1: 17\}"),
        (_run(rows={e: TRAIN_ROWS + (e == 2) * 9 for e in range(5)}), r"epoch_rows differs.*\{2: 1726\}"),
        (_run(dropped=3), "data/dropped_images reached 3"),
        (_run(distinct={}), "no complete epoch"),
    ],
)  # fmt: skip
def test_data_lost_is_counted_from_the_runs_epochs(run: RunFacts, failed_check: str) -> None:
    with pytest.raises(CheckFailed, match=failed_check):
        check_data(run, TRAIN_ROWS)


HALF_SECOND = """\
[    6.0s] pre-training demo: aim-tiny, 30 steps at batch 64 on 2 worker(s)
[    6.0s] resuming from the checkpoint at step 20; log: /tmp/drill/runs/demo/log
[   96.7s] demo: step 30/30 | loss 0.4508 | val 0.4316 | ...
[   97.0s] run demo: 30 steps, storage /tmp/drill/runs/demo
"""


def _half_run(resumed: list[int], logged: list[int]) -> RunFacts:
    return RunFacts(
        "r2",
        "FINISHED",
        history={
            "train/loss": [(s, 0.5) for s in logged],
            "train/resumed_from_step": [(s, float(s)) for s in resumed],
        },
    )


def test_half_checkpoint_checks() -> None:
    ok = _half_run([20], [10, 20, 30])
    assert check_half_checkpoint(0, 20, True, HALF_SECOND, 0, ok) == 20
    fresh = HALF_SECOND.replace("resuming from the checkpoint at step 20", "starting")
    cases = [
        ((0, 20, False, HALF_SECOND, 0, ok), "setup: the half-written checkpoint was not planted"),
        ((0, 10, True, HALF_SECOND, 0, ok), "setup: latest.json names step 10"),
        ((0, 20, True, fresh, 0, ok), "the second run says no resume"),
        ((0, 20, True, HALF_SECOND.replace("step 20", "step 99"), 0, ok), "resumes from step 99"),
        ((0, 20, True, HALF_SECOND + "loading checkpoint_00000099\n", 0, ok), "mentions the half"),
        ((0, 20, True, HALF_SECOND, 0, _half_run([99], [10, 20, 30])), r"is \[99\], not \[20\]"),
        ((0, 20, True, HALF_SECOND, 0, _half_run([], [10, 20, 30])), r"is \[\], not \[20\]"),
        ((0, 20, True, HALF_SECOND, 0, _half_run([20], [10, 20, 20, 30])), "logged twice"),
    ]
    for args, failed_check in cases:
        with pytest.raises(CheckFailed, match=failed_check):
            check_half_checkpoint(*args)


def test_killed_ingest_checks() -> None:
    check_ingest_kill(IngestKill(groups=20, progress=True, finished=False))
    with pytest.raises(CheckFailed, match="the ingest finished before the kill"):
        check_ingest_kill(IngestKill(groups=9, progress=False, finished=True))
    with pytest.raises(CheckFailed, match="no _progress/ at the kill"):
        check_ingest_kill(IngestKill(groups=20, progress=False, finished=False))

    counts = {"listed": 6, "train": 5, "val": 1, "rejected": 0}
    manifest = {"counts": counts, "resumed_groups": 2}
    ids = [f"p{i}" for i in range(6)]
    text = check_ingest_again(0, manifest, ids, 6, False, 0, {"counts": counts})
    assert text.startswith("0: 6 ids of 6, each once")
    cases = [
        ((1, manifest, ids, 6, False, 0, {"counts": counts}), "exited 1"),
        ((0, {**manifest, "resumed_groups": 0}, ids, 6, False, 0, {"counts": counts}),
         "resumed_groups 0"),
        ((0, manifest, [*ids[:5], "p0"], 6, False, 0, {"counts": counts}), "ids more than once"),
        ((0, manifest, ids[:5], 6, False, 0, {"counts": counts}), "5 distinct ids"),
        ((0, manifest, ids, 6, True, 0, {"counts": counts}), "_progress/ still there"),
        ((0, manifest, ids, 6, False, 0, {"counts": {**counts, "train": 4}}), "counts:"),
    ]  # fmt: skip
    for args, failed_check in cases:
        with pytest.raises(CheckFailed, match=failed_check):
            check_ingest_again(*args)


def test_s3_checks_need_faults_in_the_faulty_half() -> None:
    run = _run(resumed=[])
    latest = "checkpoint_00000150"
    check_s3_half("clean", 0.0, 0, 0, 0, latest, run)
    check_s3_half("faulty", 0.1, 0, 0, 81, latest, run)
    with pytest.raises(CheckFailed, match="faulty: the proxy injected no fault at rate 0.1"):
        check_s3_half("faulty", 0.1, 0, 0, 0, latest, run)
    with pytest.raises(CheckFailed, match="latest.json names checkpoint_00000120"):
        check_s3_half("faulty", 0.1, 0, 0, 5, "checkpoint_00000120", run)
    with pytest.raises(CheckFailed, match="faulty: the ingest exited 1"):
        check_s3_half("faulty", 0.1, 1, 0, 5, latest, run)

    manifests = {"clean": {"counts": {"train": 1}, "shards": [1]}}
    manifests["faulty"] = dict(manifests["clean"])
    check_s3_pair(manifests, {"clean": run, "faulty": _run(resumed=[])})
    other = _run(resumed=[])
    other.history["train/loss"][3] = (40, 0.1)
    with pytest.raises(CheckFailed, match=r"\['train/loss'\] differ"):
        check_s3_pair(manifests, {"clean": run, "faulty": other})


def test_the_kill_watch_strikes_once_after_the_checkpoint(tmp_path: Path) -> None:
    latest = tmp_path / "latest.json"
    killed: list[int] = []
    watch = KillAfterCheckpoint(latest, lambda driver: killed.append(1) or "a worker")
    assert watch(1.0, "demo: step 40/150 | loss 1", None) is None  # no checkpoint yet
    latest.write_text(json.dumps({"step": 30}))
    assert watch(2.0, "demo: step 30/150 | loss 1", None) is None  # before step 40
    note = watch(3.0, "demo: step 40/150 | loss 1", None)
    assert note == "KILLED a worker (console at step 40, checkpoint 30)" and killed == [1]
    watch(4.0, "demo: training failed at step 42: rank 0: ...", None)
    watch(5.0, "demo: restart 1 of 1: resuming from the checkpoint at step 30 on 2", None)
    watch(6.0, "demo: step 40/150 | loss 1", None)  # not yet back at step 42
    watch(7.0, "demo: step 50/150 | loss 1", None)
    assert killed == [1] and watch.kill.t == {
        "kill": 3.0,
        "failed": 4.0,
        "restart": 5.0,
        "back": 7.0,
    }

    def refuse(driver: object) -> str:
        raise RuntimeError("no ray::RayTrainWorker under the driver")

    broken = KillAfterCheckpoint(latest, refuse)
    assert (
        broken(1.0, "demo: step 40/150", None)
        == "KILL FAILED: no ray::RayTrainWorker under the driver"
    )
    with pytest.raises(CheckFailed, match="kill: could not kill: no ray::RayTrainWorker"):
        check_restart(KILLED_WORKER, broken.kill, _run(), 0, node_lost=False)


def test_a_failed_check_exits_1_with_one_line_and_records_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("AIM_FAULT_ROWS", str(tmp_path))

    def no_fault() -> list[FaultRow]:
        check_restart(KILLED_WORKER, Kill(), _run(resumed=[]), 0, node_lost=False)
        return []

    assert conclude(no_fault) == 1
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and out[0].startswith("DRILL FAILED: kill: never struck")
    assert not list(tmp_path.iterdir())


def test_a_passing_drill_records_its_row_under_its_command_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AIM_FAULT_ROWS", str(tmp_path))
    test = "python tests/fault_drills.py killed-worker"

    def drill() -> list[FaultRow]:
        failed, resumed = check_restart(KILLED_WORKER, KILL, _run(), 0, node_lost=False)
        data = check_data(_run(), TRAIN_ROWS)
        return [restart_row("killed worker", KILLED_WORKER, KILL, failed, resumed, data, test)]

    assert conclude(drill) == 0
    (saved,) = tmp_path.glob("*.json")
    assert json.loads(saved.read_text())["test"] == test
    table = render(tmp_path)
    assert "| killed worker |" in table and f"`{test}`" in table and "| 11 (failed at" in table


def test_the_table_shortens_temporary_paths_only() -> None:
    line = (
        "resuming from the checkpoint at step 11; log: /tmp/aimray1/session_2/runtime_resources/"
        "_ray_pkg_9d/runs/journey/logs/pretrain-1.log"
    )
    assert short_paths(line) == (
        "resuming from the checkpoint at step 11; log: .../logs/pretrain-1.log"
    )
    kept = "run x: 30 steps, storage s3://aim-test/a/b/c/d/head-loss; MLflow at http://h:5/a/b/c"
    assert short_paths(kept) == kept  # URLs and short paths as they are
    assert short_paths("shard /tmp/p/gw0/bad0/data/train/part-2.parquet (4 rows)") == (
        "shard .../train/part-2.parquet (4 rows)"
    )
