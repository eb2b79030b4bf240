"""Tracking is never on the training path: a real MLflow server (``aimctl services``) stopped
mid-run and started again on the same port and store.

No assertion is about time: the machine is shared and slow. Waits are for progress (a console
line, a step), with generous limits that only turn a hang into a failure.
"""

from __future__ import annotations

import os
import queue
import re
import socket
import subprocess
import sys
import threading
from pathlib import Path

import fault_rows
import pytest
from net_helpers import free_port

from aim_platform import services, tracking
from aim_platform.config import ProbeConfig
from aim_platform.eval.probe import ProbeReport, ProbeScore
from aim_platform.jobs.probe import log_probe
from aim_platform.outbox import OutboxStatus

AIMCTL = "from aim_platform.cli import main; main()"


def test_a_step_never_waits_for_a_server_that_does_not_answer() -> None:
    """A server that accepts connections and never answers: every log call returns, the
    writes wait in the queue (none can have been written)."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(64)
        uri = f"http://127.0.0.1:{listener.getsockname()[1]}"
        logger = tracking.RunLogger(uri, "run-that-hangs")
        for step in range(1, 21):
            logger.log_metrics({"train/loss": 1.0 / step}, step=step)
        assert logger.status().buffered == 20  # logged without waiting for any answer
        status, left = logger.close(timeout=0)
    assert len(left) == 20 and [w.args[2] for w in left] == list(range(1, 21))
    assert status.written == 0


def test_a_server_down_at_the_start_is_one_line_not_minutes_of_retries() -> None:
    uri = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    with pytest.raises(tracking.TrackingUnavailable) as exc:
        tracking.Tracker(uri).start_run("outage", "never")
    message = str(exc.value)
    assert "\n" not in message and message.startswith(f"MLflow at {uri} does not answer")
    assert "aimctl services up" in message


def test_one_outage_seen_by_rank_0_then_the_driver_is_reported_once() -> None:
    """Rank 0 hands its writes over while MLflow is down; the driver's queue then sees the
    same outage end: one outage, from the first failure to the driver's first success."""
    rank0 = OutboxStatus(written=5, down_since=100.0, outages=1, first_down=100.0)
    driver = OutboxStatus(written=9, outages=1, first_down=130.0, last_up=200.0)
    report = tracking.TrackingReport.of([], [rank0], driver)
    assert report.outages == 1 and report.first_down == 100.0 and report.last_up == 200.0
    assert report.complete and report.metrics()["tracking/unwritten_writes"] == 0
    (line,) = report.lines("http://m:5000", 60)
    assert line.startswith("MLflow was unreachable 1 time(s), between ")
    down_at_end = OutboxStatus(buffered=7, down_since=130.0, outages=1, first_down=130.0)
    replaced = OutboxStatus(buffered=2, dropped=3)  # a rank 0 that died with 2 writes queued
    report = tracking.TrackingReport.of([replaced], [rank0], down_at_end)
    assert (report.outages, report.unwritten, report.lost, report.dropped) == (1, 7, 2, 3)
    assert report.down_since == 100.0  # since rank 0 saw it go, not since the driver did
    lines = report.lines("http://m:5000", 60)
    assert "MLflow: 3 writes dropped" in lines[0] and "2 buffered writes lost" in lines[1]
    assert "7 writes not written after waiting 60s" in lines[2]
    assert report.metrics() == {
        tracking.DROPPED_METRIC: 3,
        "tracking/unwritten_writes": 9,
        tracking.REFUSED_ARTIFACTS_METRIC: 0,
    }


def test_a_study_names_the_trials_whose_writes_mlflow_missed() -> None:
    from types import SimpleNamespace

    from aim_platform.cli.run import _study_tracking_lines
    from aim_platform.jobs.study_table import TrialOutcome

    missed = {tracking.DROPPED_METRIC: 3, "tracking/unwritten_writes": 2}
    result = SimpleNamespace(
        trials=[
            TrialOutcome("mlp", "r1", {"tracking/unwritten_writes": 0}, None, 0),
            TrialOutcome("none", "r2", missed, None, 0),
        ],
        tracking_uri=f"http://127.0.0.1:{free_port()}",  # the server is gone at the end
        parent_run_id="p",
    )
    lines = _study_tracking_lines(result, seeds=1)
    assert lines[0] == "trial none: 5 MLflow writes dropped or not written"
    assert lines[1].startswith("the study run's table and plots may be missing in MLflow")
    assert len(lines) == 2


def _mlflow_up(state: Path, port: int) -> str:
    return services.mlflow_up(state, port=port, timeout=600).url


def _report() -> ProbeReport:
    return ProbeReport(
        layers=[1],
        main={"attentive": ProbeScore(0.6, 0.9)},
        per_block={"attentive": {0: ProbeScore(0.5, 0.8), 1: ProbeScore(0.6, 0.9)}},
        train_images=10,
        val_images=5,
    )


@pytest.mark.slow
@pytest.mark.timeout(3600)  # two server starts: minutes each on a loaded machine
def test_a_probe_logged_while_mlflow_is_down_lands_when_it_returns(tmp_path: Path) -> None:
    state, port = tmp_path / "services", free_port()
    uri = _mlflow_up(state, port)
    try:
        parent = tracking.Tracker(uri).start_run("outage", "pretrain")
        services.down(state)
        tracker = tracking.Tracker(uri, background=True, flush_timeout=600)
        run_id = log_probe(
            tracker,
            _report(),
            ProbeConfig(),
            experiment="outage",
            run_name="probe while down",
            trunk_path="/t",
            dataset="/d",
            parent_run_id=parent,
            step=10,
        )  # returns at once: the run is created once the server answers
        assert run_id.startswith(tracking.PENDING) and tracker.created(run_id) is None
        _mlflow_up(state, port)  # same port, same store
        status, left = tracker.close()
        assert left == [] and status.unwritten == 0 and status.outages == 1
        child = tracker.created(run_id)
        assert child is not None
        reader = tracking.Tracker(uri)
        assert reader.tags(child)["mlflow.parentRunId"] == parent
        assert reader.run_status(child) == "FINISHED"
        assert reader.metric_history(child, "probe/attentive/top1") == [(10, 0.6)]
        assert reader.metric_history(parent, "probe/attentive/top1") == [(10, 0.6)]
    finally:
        services.down(state)


def _lines(proc: subprocess.Popen[str]) -> queue.Queue[str | None]:
    """The process's output, line by line (None at its end), read by a thread."""
    out: queue.Queue[str | None] = queue.Queue()

    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            out.put(line.rstrip("\n"))
        out.put(None)

    threading.Thread(target=read, daemon=True).start()
    return out


def _wait_for(lines: queue.Queue[str | None], seen: list[str], pattern: str) -> re.Match[str]:
    """The next output line matching ``pattern`` (every line read is kept in ``seen``)."""
    while True:
        try:
            line = lines.get(timeout=1800)
        except queue.Empty:
            raise AssertionError(f"no line matching {pattern!r}:\n" + "\n".join(seen)) from None
        assert line is not None, f"ended before {pattern!r}:\n" + "\n".join(seen)
        seen.append(line)
        found = re.search(pattern, line)
        if found:
            return found


def _aimctl(*args: str, env: dict[str, str]) -> str:
    out = subprocess.run(
        [sys.executable, "-c", AIMCTL, *args], capture_output=True, text=True, env=env, timeout=900
    )
    assert out.returncode == 0, out.stdout + out.stderr
    return out.stdout


@pytest.mark.faults  # `make test-faults` (CI runs it after `make test`)
@pytest.mark.slow
@pytest.mark.cluster
@pytest.mark.timeout(5400)  # three server starts, Ray and 40 steps on a shared 2-core machine
def test_pretrain_goes_on_while_the_mlflow_server_is_down(tmp_path: Path) -> None:
    """The journey: `aimctl services up`, `aimctl pretrain`, the server stopped (`aimctl
    services down`) at a logged step and started again later on the same port and store."""
    state, port = tmp_path / "services", free_port()
    env = {**os.environ, "AIM_SERVICES_DIR": str(state)}
    env.pop("MLFLOW_TRACKING_URI", None)
    up = _aimctl("services", "up", "--mlflow-port", str(port), "--timeout", "900", env=env)
    uri = re.search(r"export MLFLOW_TRACKING_URI=(\S+)", up)[1]
    steps, log_every = 40, 2
    config = tmp_path / "job.yaml"
    config.write_text(
        f"""
name: outage
model: {{size: aim-tiny}}
data: {{sources: [{{url: "builtin:digits"}}]}}
train:
  steps: {steps}
  num_workers: 1
  cpus_per_worker: 1
  global_batch_size: 16
  micro_batch_size: 16
  log_every: {log_every}
  val_every: 1000
  checkpoint_every: 1000
  storage_path: {tmp_path / "runs"}
tracking: {{experiment: outage, flush_timeout_s: 900}}
"""
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", AIMCTL, "pretrain", str(config)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        # no RAY_raylet_start_wait_time_s here: Ray's node-info wait loops that long once the
        # raylet has died at start-up (15 minutes at 900), before cluster.start_embedded's
        # retry can start it again
        env={**env, "MLFLOW_TRACKING_URI": uri},
        cwd=tmp_path,
        start_new_session=True,
    )
    seen: list[str] = []
    record: services.ServiceRecord | None = None
    down = ""
    try:
        lines = _lines(proc)
        stopped_at = int(_wait_for(lines, seen, r"step (\d+)/")[1])
        services.down(state)  # what `aimctl services down` does, without its start-up time
        _wait_for(lines, seen, r"MLflow at \S+ unreachable since \d\d:\d\d:\d\d")
        # training reaches later steps while the server is down
        while int(_wait_for(lines, seen, r"step (\d+)/.*MLflow down since")[1]) < stopped_at + 8:
            pass
        _aimctl(
            "services", "up", "--mlflow-port", str(port), "--timeout", "900", env=env
        )  # same port and store
        while (line := lines.get(timeout=1800)) is not None:
            seen.append(line)
        assert proc.wait(timeout=600) == 0, "\n".join(seen)
        console = "\n".join(seen)
        (tmp_path / "console.txt").write_text(console)  # what the user saw, for the record
        assert len(re.findall(r"unreachable since .*: training goes on", console)) == 1, console
        clock = r"\d\d:\d\d:\d\d"
        assert re.search(
            rf"MLflow was unreachable 1 time\(s\), between {clock} and {clock}; training went "
            "on, and every buffered write went in afterwards",
            console,
        ), console
        assert "not written" not in console and "writes dropped" not in console
        assert "no per-chunk loss plot" not in console  # made once the server answered
        run_id = re.search(r"MLflow run (\w+):", console)[1]
        # read back from the server started again mid-run, still up (no third start)
        record = services.read_record(state, "mlflow")
        reader = tracking.Tracker(uri)
        logged = [s for s, _ in reader.metric_history(run_id, "train/loss")]
        assert logged == list(range(log_every, steps + 1, log_every))  # every logged step
        assert reader.run_status(run_id) == "FINISHED"
        assert reader.metric_history(run_id, tracking.DROPPED_METRIC)[-1] == (steps, 0.0)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, 9)
        down = subprocess.run(
            [sys.executable, "-c", AIMCTL, "services", "down"],
            env=env,
            capture_output=True,
            text=True,
        ).stdout
    # `services down` leaves nothing running
    assert record is not None
    assert f"mlflow: stopped (pid {record.pid})" in down, down
    assert not services.pid_alive(record.pid, record.proc_start)
    assert all(s.state == "stopped" for s in services.status(state))
    fault_rows.record(
        fault_rows.FaultRow(
            fault="MLflow server stopped mid-run (`aimctl services down` at a logged step), "
            "started again on the same port and store",
            console=fault_rows.console_lines(
                console, r"unreachable since", r"MLflow down since", r"MLflow was unreachable"
            ),
            steps_redone="0 (training went on while the server was down)",
            data_lost=f"0: train/loss at every logged step {log_every}..{steps}, "
            "dropped writes 0, run FINISHED",
            test=fault_rows.current_test(),
        )
    )
