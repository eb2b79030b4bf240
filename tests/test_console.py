"""What a person reads: progress lines, study rows, and everything else in a log file."""

from __future__ import annotations

import io
import os
import re
import sys
import time
import traceback
from pathlib import Path

import pytest
from rich.console import Console

from aim_platform.console import StudyDisplay, TrainDisplay, captured_output
from aim_platform.failures import root_cause
from aim_platform.outbox import OutboxStatus
from aim_platform.tracking import ui_command
from aim_platform.train.progress import Snapshot


def _plain(width: int = 40) -> tuple[Console, io.StringIO]:
    out = io.StringIO()
    return Console(file=out, width=width, soft_wrap=True, force_terminal=False), out


def test_train_display_prints_a_line_per_logged_step_and_no_wrapping() -> None:
    console, out = _plain(width=40)
    display = TrainDisplay(console, "demo", total=60)
    display.update(Snapshot(total=60))  # still starting: nothing printed
    snap = Snapshot(step=10, total=60, phase="training")
    snap.metrics = {"train/loss": 0.5785, "perf/images_per_s": 128.0, "perf/mfu": 0.502}
    display.update(snap)
    snap2 = Snapshot(step=11, total=60, phase="training", metrics=dict(snap.metrics))
    display.update(snap2)  # a step without new metrics: no new line
    snap3 = Snapshot(step=20, total=60, phase="training")
    snap3.metrics = {**snap.metrics, "train/loss": 0.47, "perf/data_wait_fraction": 0.25}
    display.update(snap3)
    display.close()
    lines = out.getvalue().splitlines()
    assert len(lines) == 2, lines
    assert lines[0].startswith("demo: step 10/60 | loss 0.5785 | 128 img/s | MFU 50.2%")
    assert "step 20/60 | loss 0.4700" in lines[1] and "data wait 25%" in lines[1]


def test_mlflow_outage_said_once_with_since_when_and_how_much_is_buffered() -> None:
    """Rank 0's queue status arrives with each snapshot; the console says when MLflow stops
    answering (once per outage), shows it on every progress line, and when it answers again."""
    console, out = _plain(width=300)
    display = TrainDisplay(console, "demo", total=60, tracking_uri="http://127.0.0.1:5000")
    metrics = {"train/loss": 0.5}
    error = "MlflowException: API request to http://127.0.0.1:5000/x failed: Connection refused"
    since = 1_700_000_000.0
    for step, status in [
        (10, OutboxStatus(written=5)),
        (20, OutboxStatus(written=5, buffered=1, down_since=since, outages=1, last_error=error)),
        (30, OutboxStatus(written=5, buffered=11, down_since=since, outages=1, last_error=error)),
        (40, OutboxStatus(written=5, buffered=30, down_since=since, outages=1, dropped=2)),
        (50, OutboxStatus(written=40, buffered=3, outages=1, dropped=2, last_up=since + 65)),
        (60, OutboxStatus(written=45, outages=1, dropped=2)),
    ]:
        metrics = {**metrics, "train/loss": 1.0 / step}
        display.update(Snapshot(step, 60, 0, dict(metrics), phase="training", tracking=status))
    display.close()
    text = out.getvalue()
    clock = time.strftime("%H:%M:%S", time.localtime(since))
    down = [ln for ln in text.splitlines() if "unreachable since" in ln]
    assert down == [
        f"MLflow at http://127.0.0.1:5000 unreachable since {clock} (connection refused): "
        "training goes on; 1 writes buffered so far, written in order once it answers"
    ]
    (line30,) = [ln for ln in text.splitlines() if "step 30/60" in ln]
    assert line30.endswith(f"| MLflow down since {clock}, 11 buffered")
    assert len([ln for ln in text.splitlines() if "writes are being dropped" in ln]) == 1
    (back,) = [ln for ln in text.splitlines() if "answers again" in ln]
    back_at = time.strftime("%H:%M:%S", time.localtime(since + 65))
    assert back.endswith(
        f"answers again since {back_at} (down 1:05): 3 buffered writes still going in, in order"
    )
    assert "MLflow down" not in text.splitlines()[-1]


def test_study_display_one_line_per_state_change_and_quarter_of_the_steps() -> None:
    console, out = _plain(width=60)
    display = StudyDisplay(console, "head", ["none", "mlp"], total_steps=10)
    display.trial("none", "running")
    display.trial("none", "running", {"step": 1, "train/loss": 1.5})  # under a quarter
    display.trial("none", "running", {"step": 5, "train/loss": 1.2})
    display.trial("none", "running", {"step": 6, "train/loss": 1.1})  # the same quarter
    display.trial("none", "done", {"step": 10, "probe/linear/top1": 0.5, "done": True})
    display.trial("mlp", "failed")
    display.close()
    lines = out.getvalue().splitlines()
    assert lines == [
        "trial none: running",
        "trial none: running (step 5/10, train/loss 1.2000)",
        "trial none: done (step 10/10, train/loss 1.1000, linear 50.0%)",
        "trial mlp: failed",
    ]
    rendered = io.StringIO()
    Console(file=rendered, width=120).print(display.table())
    assert "50.0%" in rendered.getvalue() and "failed" in rendered.getvalue()


def test_captured_output_sends_everything_else_to_the_log(tmp_path: Path) -> None:
    log = tmp_path / "run" / "logs" / "x.log"
    terminal = io.StringIO()
    saved = sys.stdout
    sys.stdout = terminal  # an in-memory terminal (as under a test runner)
    try:
        with captured_output(log) as term:
            term.print("shown to the person")
            print("a library's print")
            sys.stderr.write("a warning line\n")
            os.write(2, b"a C++ core line on fd 2\n")
            os.write(1, b"a raw fd 1 line\n")
    finally:
        sys.stdout = saved
    assert terminal.getvalue() == "shown to the person\n"
    text = log.read_text()
    for expected in ("a library's print", "a warning line", "C++ core line", "raw fd 1"):
        assert expected in text
    assert "shown to the person" not in text
    assert os.write(2, b"") == 0  # descriptors restored and usable


def test_a_log_handler_made_during_the_capture_still_works_after_it(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    """Ray makes its log handler when it is imported, keeping the stderr of that moment: one
    made inside the capture must write to the log then and to stderr after, never to the
    closed log file (a `--- Logging error ---` on the terminal)."""
    import logging

    log = tmp_path / "capture.log"
    logger = logging.getLogger("aim-test-capture")
    logger.propagate = False
    with captured_output(log):
        handler = logging.StreamHandler()  # takes sys.stderr now, as Ray's does
        logger.addHandler(handler)
        logger.warning("inside")
    capfd.readouterr()
    try:
        logger.warning("after")
    finally:
        logger.removeHandler(handler)
    assert log.read_text() == "inside\n"
    assert capfd.readouterr().err == "after\n"


def test_mlflow_ui_line_is_one_copyable_command_at_any_width() -> None:
    uri = "sqlite:////very/long/path/" + "x" * 80 + "/runs/mlflow.db"
    console, out = _plain(width=30)
    console.print(f"MLflow run abc: {ui_command(uri)}", markup=False)
    assert out.getvalue() == f"MLflow run abc: mlflow ui --backend-store-uri {uri}\n"
    assert ui_command("http://mlflow:5000") == "http://mlflow:5000"


def test_a_failing_job_shows_one_line_and_keeps_the_traceback_in_the_log(tmp_path: Path) -> None:
    import pytest
    import typer

    from aim_platform.cli.app import run_console

    log = tmp_path / "logs" / "job.log"
    terminal = io.StringIO()
    saved = sys.stdout
    sys.stdout = terminal
    try:
        with pytest.raises(typer.Exit) as exit_info:
            with run_console("the job", "running the job", log, ray=False):
                raise RuntimeError("the bucket is empty")
    finally:
        sys.stdout = saved
    assert exit_info.value.exit_code == 1
    shown = terminal.getvalue().splitlines()
    assert len(shown) == 3 and shown[0] == f"running the job; log: {log}"
    assert re.fullmatch(
        r"the job failed: RuntimeError: the bucket is empty \(raised at tests/test_console.py:\d+\)",
        shown[1],
    ), shown[1]
    assert shown[2] == f"the whole story is in the log: {log}"
    assert "Traceback" in log.read_text() and "the bucket is empty" in log.read_text()


def test_a_failing_job_shuts_its_ray_down_still_captured_and_a_failed_start_is_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ray prints the workers' last lines (a failure's tracebacks) when it shuts down: that
    happens inside the capture, into the log, not at exit onto the terminal."""
    import ray
    import typer

    from aim_platform import cluster
    from aim_platform.cli.app import run_console

    monkeypatch.setattr(cluster, "connect", lambda address, token_file: True)
    monkeypatch.setattr(ray, "shutdown", lambda: print("(RayTrainWorker pid=7) Traceback ..."))
    log = tmp_path / "job.log"
    terminal = io.StringIO()
    monkeypatch.setattr(sys, "stdout", terminal)
    with pytest.raises(typer.Exit):
        with run_console("the job", "running the job", log):
            raise RuntimeError("the bucket is empty")
    assert "(RayTrainWorker pid=7) Traceback ..." in log.read_text()
    assert "RayTrainWorker" not in terminal.getvalue()

    def no_start(address: object, token_file: object) -> bool:
        raise Exception("The current node timed out during startup.")

    monkeypatch.setattr(cluster, "connect", no_start)
    terminal.seek(0)
    terminal.truncate()
    with pytest.raises(typer.Exit):
        with run_console("the job", "running the job", log):
            raise AssertionError("never reached")
    shown = terminal.getvalue().splitlines()
    assert len(shown) == 3 and "The current node timed out during startup." in shown[1]
    assert "never reached" not in log.read_text()


def _empty_shard_error(tmp_path: Path) -> tuple[BaseException, str]:
    """What the read task raises on a 0-byte Parquet shard (through the real task body), and
    the traceback text Ray keeps of it."""
    import numpy as np
    import pyarrow.fs as pafs

    from aim_platform.data.tasks import read_and_decode

    shard = tmp_path / "train" / "part-00003.parquet"
    shard.parent.mkdir()
    shard.write_bytes(b"")
    batch = {"epoch": np.array([0]), "source": np.array([0]), "path": np.array([str(shard)])}
    sources = [("digits", 1.0, pafs.LocalFileSystem())]
    try:
        next(read_and_decode(batch, sources=sources, train=False, model={}, seed=0,
                             chunk_rows=8, aug={"max_pixels": 1}))  # fmt: skip
    except Exception as exc:
        return exc, traceback.format_exc()
    raise AssertionError("an empty shard was read")


def test_root_cause_digs_the_failure_out_of_rays_layers(tmp_path: Path) -> None:
    """Ray Train's WorkerGroupError holds each rank's error; a read task's error arrives as a
    RayTaskError whose text is the remote traceback. One line names the innermost exception,
    the shard, the rank, the task and where it was raised (no Ray is started here)."""
    from ray.exceptions import RayTaskError
    from ray.train import WorkerGroupError

    cause, remote_traceback = _empty_shard_error(tmp_path)
    task = RayTaskError(
        "read_and_decode", remote_traceback, cause,
        proctitle="ray::MapBatches(read_and_decode)", pid=7, ip="10.0.0.2",
    ).as_instanceof_cause()  # fmt: skip
    wrapped = WorkerGroupError("[Rank 1 Error Snippet]:\n" + str(task)[:500], {1: task})
    line = root_cause(wrapped)
    shard = tmp_path / "train" / "part-00003.parquet"
    assert line.startswith(f"ArrowInvalid: Parquet file size is 0 bytes; reading shard {shard} (")
    assert "worker rank 1" in line and "Ray task MapBatches(read_and_decode)" in line
    assert (
        "from aim_platform/data/tasks.py:" in line and "in read_chunks" in line
    )  # the innermost platform frame
    assert "\n" not in line
    assert len(str(wrapped).splitlines()) > 5  # what the console used to show a line of
