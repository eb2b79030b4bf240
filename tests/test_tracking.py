"""The one door to MLflow: where runs go, what a run carries, concurrent writers."""

from __future__ import annotations

import json
import multiprocessing as mp
import threading
import time
from pathlib import Path

import pytest

from aim_platform import tracking
from aim_platform.outbox import OutboxStatus
from aim_platform.tracking import Tracker
from aim_platform.tracking.report import TrackingReport
from aim_platform.tracking.run_logger import STATUS_COPY
from aim_platform.train.progress import ProgressBoard


@pytest.fixture
def store(tmp_path: Path) -> str:
    return tracking.resolve_tracking_uri(None, str(tmp_path / "runs"))


def test_resolve_tracking_uri_config_then_env_then_runs_folder(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://env:5000")
    assert tracking.resolve_tracking_uri("http://cfg:5000", "x") == "http://cfg:5000"
    assert tracking.resolve_tracking_uri(None, "x") == "http://env:5000"
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    default = f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}"
    assert tracking.resolve_tracking_uri(None) == default  # probe, correlate
    assert tracking.resolve_tracking_uri(None, "./runs") == default  # the demo's storage
    assert tracking.resolve_tracking_uri(None, "s3://bucket/runs") == default
    other = tmp_path / "elsewhere"
    assert tracking.resolve_tracking_uri(None, str(other)) == f"sqlite:///{other / 'mlflow.db'}"
    assert other.is_dir()


def test_run_carries_experiment_kind_git_commit_and_names(store: str) -> None:
    tracker = Tracker(store)
    run = tracker.start_run("exp", "my-run", {"a.b": 1}, {"kind": "study", "none": None})
    assert (
        tracker.experiment_tags("exp")[tracking.EXPERIMENT_KIND_TAG] == "custom_model_development"
    )
    tags = tracker.tags(run)
    commit = tracking.git_commit()
    assert commit and tags["git_commit"] == commit == tags["mlflow.source.git.commit"]
    assert tags["kind"] == "study" and "none" not in tags
    assert tracker.run_name(run) == "my-run"

    # an experiment made elsewhere (an older version) gets its kind on first use
    from mlflow.tracking import MlflowClient

    MlflowClient(store).create_experiment("old")
    assert tracking.EXPERIMENT_KIND_TAG not in tracker.experiment_tags("old")
    tracker.start_run("old", "r")
    assert tracker.experiment_tags("old")[tracking.EXPERIMENT_KIND_TAG] == tracking.EXPERIMENT_KIND


def test_dataset_input_from_manifest(store: str, tmp_path: Path) -> None:
    root = tmp_path / "ingested"
    root.mkdir()
    counts = {"listed": 12, "train": 9, "val": 2, "rejected": 1}
    manifest = {"name": "shapes", "fingerprint": "ab" * 32, "counts": counts, "shards": {}}
    (root / "_manifest.json").write_text(json.dumps(manifest))
    tracker = Tracker(store)
    run = tracker.start_run("exp", "r")
    tracking.log_datasets(tracker, run, [str(root), str(tmp_path / "no-manifest")])
    (got,) = tracker.datasets(run)
    assert got["name"] == "shapes" and got["digest"] == "ab" * 8
    assert got["source"].endswith("ingested") and got["context"] == "training"
    assert got["profile"] == {"num_rows": 9, **counts}


def test_metrics_integers_and_non_numbers(store: str) -> None:
    tracker = Tracker(store)
    run = tracker.start_run("exp", "r")
    metric = {"best_block": 3, "top1": 0.5, "nan": float("nan"), "flag": True, "text": "x"}
    tracker.log_metrics(run, metric, step=2)
    assert tracker.metric_keys(run) == ["best_block", "top1"]
    assert tracker.metric_history(run, "best_block") == [(2, 3.0)]
    assert tracking.format_metric(3) == "3" and tracking.format_metric(0.5) == "0.5000"


def test_report_metrics_keep_best_block_an_integer() -> None:
    from aim_platform.eval.probe import ProbeReport, ProbeScore, report_metrics

    report = ProbeReport(
        layers=[1],
        main={"attentive": ProbeScore(0.6, 0.9)},
        per_block={"attentive": {0: ProbeScore(0.7, 0.8), 1: ProbeScore(0.6, 0.9)}},
        train_images=10,
        val_images=5,
    )
    best = report_metrics(report)["probe/attentive/best_block"]
    assert isinstance(best, int) and tracking.format_metric(best) == "0"


def test_probe_run_names_trunk_and_dataset() -> None:
    assert tracking.probe_run_name("/r/runs/demo/final", "builtin:digits") == "probe demo on digits"
    assert (
        tracking.probe_run_name("s3://b/runs/demo/trunks/step_00000010", "s3://b/data/imgs/")
        == "probe demo@10 on imgs"
    )
    assert tracking.probe_run_name("/w/aim-600M.pt", "/d/in1k") == "probe aim-600M on in1k"


def test_system_metrics_sampled_then_stopped(store: str) -> None:
    tracker = Tracker(store)
    run = tracker.start_run("exp", "r")
    logger = tracking.RunLogger(store, run, system_metrics=True, interval=0.2)
    key = "system/cpu_utilization_percentage"
    deadline = time.monotonic() + 60
    while not tracker.metric_history(run, key) and time.monotonic() < deadline:
        logger.log_metrics({"train/loss": 1.0}, step=1)
        time.sleep(0.2)
    logger.close()
    assert tracker.metric_history(run, key)
    assert "system/system_memory_usage_megabytes" in tracker.metric_keys(run)
    names = {t.name for t in threading.enumerate()}
    assert not names & {"SystemMetricsMonitor", "aim-system-metrics", "aim-mlflow"}


def _write(uri: str, run_id: str, n: int) -> None:
    logger = tracking.RunLogger(uri, run_id)
    for step in range(n):
        logger.log_metrics({"a": step, "b": 2.0 * step}, step=step)
    status, left = logger.close(timeout=240)
    assert left == [] and status.unwritten == 0, status


def test_four_concurrent_writers_lose_nothing(store: str) -> None:
    """The study's path: the driver creates the store and the runs, then 4 trials write into
    the SQLite file at once (each from its own process)."""
    tracker = Tracker(store)
    runs = [tracker.start_run("exp", f"trial-{i}") for i in range(4)]
    n = 40
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_write, args=(store, r, n)) for r in runs]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=240)
    assert [p.exitcode for p in procs] == [0, 0, 0, 0]
    for r in runs:
        assert tracker.metric_history(r, "a") == [(s, float(s)) for s in range(n)]
        assert len(tracker.metric_history(r, "b")) == n


def test_figures_titled_labelled_and_points_inside() -> None:
    from aim_platform import plots

    figs = [
        plots.chunk_loss_figure({0: [(10, 0.5), (20, 0.4)], 1: [(10, 0.6), (20, 0.45)]}),
        plots.loss_vs_probe_figure([(20, 0.4)], [(20, 0.3)], {"block_1": [(20, 0.25)]}),
        plots.scatter_figure(["a", "b"], [0.4, 0.5], [0.3, 0.2]),
        plots.accuracy_per_block_figure({"attentive": {0: 0.2, 1: 0.3}}),
        plots.chunk_curves_figure({"mlp": [0.5, 0.4, 0.45]}),
    ]
    for fig in figs:
        ax = fig.axes[0]
        assert ax.get_title() and ax.get_xlabel() and ax.get_ylabel()
        for line in ax.lines:  # every point strictly inside the frame
            (x0, x1), (y0, y1) = ax.get_xlim(), ax.get_ylim()
            for x, y in line.get_xydata():
                assert x0 < x < x1 and y0 < y < y1, (ax.get_title(), x, y)
    # a single step: a padded axis with one tick, the value written beside the point
    single = figs[1].axes[0]
    assert single.get_xlim() == (19, 21) and list(single.get_xticks()) == [20]
    assert any(t.get_text() == "0.400" for t in single.texts)
    scatter = figs[2].axes[0]
    (x0, x1), (y0, y1) = scatter.get_xlim(), scatter.get_ylim()
    assert x0 < 0.4 and 0.5 < x1 and y0 < 0.2 and 0.3 < y1


def test_ui_url_opens_the_run_in_the_training_view(store: str) -> None:
    tracker = Tracker(store)
    run = tracker.start_run("exp", "r")
    exp = tracker.find_experiment("exp")
    url = tracking.ui_url(tracker, run)
    assert url == (
        f"http://127.0.0.1:5000/#/experiments/{exp}/runs/{run}?workflowType=machine_learning"
    )
    assert tracker.latest_run(exp) == run and tracker.latest_run(exp, parent=True) is None
    child = tracker.start_run("exp", "child", parent_run_id=run)
    assert tracker.latest_run(exp) == run != child and tracker.latest_run(exp, parent=True) == run


def _rank0_status(run_id: str, steps: list[int]) -> OutboxStatus:
    """Rank 0's last report to the board while its writes were still queued: a RunLogger
    whose server refuses connections, so that nothing it logs goes in."""
    logger = tracking.RunLogger("http://127.0.0.1:9", run_id)  # port 9: nothing listens
    for step in steps:
        logger.log_metrics({"train/loss": 1.0 / step}, step=step)
    deadline = time.monotonic() + 120
    while not logger.status().down:
        assert time.monotonic() < deadline, "the refused connection was never noticed"
        time.sleep(0.05)
    status = logger.status()
    logger.close(timeout=0)  # the process ends without handing its queue over
    return status


def test_writes_of_a_rank_0_ended_before_its_hand_over_are_made_by_the_driver(store) -> None:
    """The hung-rank journey once said "1 buffered writes lost" though every step was in the
    run: Ray Train ended rank 0 before it could hand its queue over, and its last report said 1
    was waiting. The report carries a copy of those writes; the driver makes them (some may
    have gone in meanwhile: not twice) and nothing is counted as lost."""
    tracker = Tracker(store)
    run_id = tracker.start_run("exp", "hung")
    status = _rank0_status(run_id, [2, 4, 6])
    assert status.buffered == 3 and len(status.waiting) == 3
    tracker.enqueue(status.waiting[:1])  # step 2 had gone in before rank 0 ended
    assert tracker.flush(60)
    board = ProgressBoard(12)
    board.started(0)
    board.step(6, {"train/loss": 1 / 6}, status)  # rank 0's last report; no hand-over
    tracker.enqueue(board.take_leftover())  # the driver, before the restart
    assert tracker.flush(60)
    board.started(4)  # the restart: the failed rank 0's queue is a replaced one
    report = TrackingReport.of(board.get().tracking_replaced, [], tracker.status())
    assert report.lost == 0 and report.complete
    assert tracker.metric_history(run_id, "train/loss") == [(s, 1.0 / s) for s in (2, 4, 6)]
    assert board.take_leftover() == []  # once


def test_writes_beyond_the_copy_of_a_report_are_counted_lost() -> None:
    """While MLflow is down rank 0's queue outgrows the copy its reports carry: what it held
    when it ended without a hand-over is lost with it, and the summary says how many."""
    board = ProgressBoard(12)
    board.started(0)
    board.step(6, None, OutboxStatus(buffered=STATUS_COPY + 4))  # too many to copy
    assert board.take_leftover() == []
    board.started(4)
    report = TrackingReport.of(board.get().tracking_replaced, [], OutboxStatus())
    assert report.lost == STATUS_COPY + 4
    line = f"MLflow: {STATUS_COPY + 4} buffered writes lost with a replaced worker"
    assert line in report.lines("http://x", 60)
