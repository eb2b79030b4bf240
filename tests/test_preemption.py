"""Preemption: SIGTERM, as Kubernetes and spot reclaims send it, to ``aimctl pretrain`` (the
driver) or to one Ray Train worker process stops the run at the next step boundary with a
checkpoint, says so, and exits with :data:`~aim_platform.train.preempt.EXIT_CODE`; the same
command again resumes from that step. A SIGTERM while a checkpoint upload cannot finish stops
the run after ``train.preempt_grace_s`` without it, and ``latest.json`` keeps naming the
previous, complete checkpoint.

One journey through the real command line, checkpoints on the S3 endpoint behind the fault
proxy (``tests/s3_fault_proxy.py``, faults only in the second run), ``checkpoint_every: 50``
so that no periodic checkpoint helps:

1. SIGTERM to one worker process at step ~25: preempted, checkpoint at that step, MLflow
   ``KILLED`` with ``preempted=true``;
2. again: resumes from that step, in the same MLflow run; with every checkpoint upload held
   by the store, SIGTERM to the driver while the final checkpoint's upload hangs: preempted
   without it after the grace period, ``latest.json`` still naming run 1's checkpoint.

A third run resuming from there to ``FINISHED`` is the stop-and-resubmit journey's second
half (tests/test_submit.py): left out here to keep CI within its budget.

A SIGTERM to the driver with a store that answers is ``aimctl jobs stop`` of a submitted job:
tests/test_submit.py's stop-and-resubmit journey.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
from fault_rows import FaultRow, console_lines, current_test, record
from net_helpers import REPO
from s3_fault_proxy import FaultProxy

from aim_platform.train.preempt import EXIT_CODE

STEPS = 40
STEP = re.compile(r": step (\d+)/\d+")
PREEMPTED = re.compile(r"preempted \(SIGTERM to ([^)]+)\) at step (\d+): (.*)")
CHECKPOINT_FILES = {"__0_0.distcp", "__1_0.distcp", ".metadata", "train_state.json", "config.yaml"}
GRACE_S = 8  # run 2's train.preempt_grace_s: the held upload never finishes in it
TIMEOUT_S = 900  # one run, on a loaded 2-core machine


@pytest.fixture
def proxy(s3_endpoint: dict[str, str]) -> Iterator[FaultProxy]:
    """A fault proxy (0% to start with) in front of the session's S3 endpoint."""
    with FaultProxy(s3_endpoint["endpoint_url"], hang_s=120) as p:
        yield p


def _workers(driver: subprocess.Popen[Any]) -> list[psutil.Process]:
    """This run's Ray Train worker processes (descendants of its driver: embedded Ray)."""
    found = []
    for p in psutil.Process(driver.pid).children(recursive=True):
        try:
            if "RayTrainWorker" in " ".join(p.cmdline()):
                found.append(p)
        except psutil.Error:
            continue
    return found


class Run:
    """One ``aimctl pretrain`` of the journey's config, its console in a file."""

    def __init__(self, tmp: Path, env: dict[str, str], sets: dict[str, object], n: int) -> None:
        self.console = tmp / f"console{n}.txt"
        args = [x for k, v in sets.items() for x in ("--set", f"{k}={v}")]
        self.out = open(self.console, "w")  # noqa: SIM115 - closed in wait()
        self.proc = subprocess.Popen(
            [str(Path(sys.executable).parent / "aimctl"), "pretrain", "jobs/configs/demo.yaml",
             *args],
            cwd=REPO, env=env, stdout=self.out, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip

    def text(self) -> str:
        return self.console.read_text()

    def step(self) -> int:
        """The last step the console shows (0: none yet)."""
        steps = STEP.findall(self.text())
        return int(steps[-1]) if steps else 0

    def until(self, ready: Callable[[], bool]) -> None:
        """Wait until ``ready()`` (the run still going)."""
        deadline = time.monotonic() + TIMEOUT_S
        while not ready():
            assert self.proc.poll() is None, self.text()[-4000:]
            assert time.monotonic() < deadline, self.text()[-4000:]
            time.sleep(0.2)

    def wait(self) -> tuple[int, str]:
        """Its exit status and console (killed, with its process group, if it hangs)."""
        try:
            self.proc.wait(timeout=TIMEOUT_S)
        finally:
            if self.proc.poll() is None:
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.out.close()
        return self.proc.returncode, self.text()


def _preempted(console: str) -> tuple[str, int, str]:
    """Who got SIGTERM, the step, and the rest of the console's "preempted" line."""
    found = PREEMPTED.search(console)
    assert found, console[-4000:]
    return found.group(1), int(found.group(2)), found.group(3)


@pytest.mark.faults  # `make test-faults` (CI runs it after `make test`)
@pytest.mark.slow
@pytest.mark.cluster
@pytest.mark.timeout(2400)  # two runs, each starting Ray: minutes each on a loaded machine
def test_sigterm_stops_at_a_step_with_a_checkpoint_and_the_run_resumes_there(
    proxy: FaultProxy, s3_endpoint: dict[str, str], tmp_path: Path
) -> None:
    import s3fs
    from mlflow.tracking import MlflowClient

    bucket = s3_endpoint["bucket"]
    root = f"{bucket}/preempt/pre"
    tracking = f"sqlite:///{tmp_path / 'mlflow.db'}"
    sets: dict[str, object] = {
        "name": "pre",
        "train.steps": STEPS,
        "train.global_batch_size": 8,  # small steps: the journey is about the stops
        "train.micro_batch_size": 4,
        "train.checkpoint_every": 50,  # no periodic checkpoint before the end
        "train.val_every": 100,
        "train.log_every": 1,  # the console shows every step
        "train.storage_path": f"s3://{bucket}/preempt",
        "tracking.tracking_uri": tracking,
    }
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("RAY_ADDRESS")},
        "AWS_ENDPOINT_URL": proxy.url,
        "HOME": str(tmp_path),
        "AIM_DATA_CACHE": str(tmp_path / "cache"),
    }
    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3_endpoint["endpoint_url"]})

    def latest() -> dict[str, Any]:
        fs.invalidate_cache()
        return json.loads(fs.cat_file(f"{root}/latest.json"))

    # 1. SIGTERM to one worker process at step ~25: a checkpoint of the next step boundary
    run = Run(tmp_path, env, sets, 1)
    run.until(lambda: run.step() >= 25)
    signalled_at = run.step()
    (worker, *_) = _workers(run.proc)
    worker.send_signal(signal.SIGTERM)
    code, console = run.wait()
    assert code == EXIT_CODE, console[-4000:]
    who, first, rest = _preempted(console)
    assert re.fullmatch(r"rank \d", who), who  # the worker: not the driver
    assert signalled_at <= first <= signalled_at + 3, console[-3000:]  # the steps in flight
    assert f"SIGTERM to {who}: saving a checkpoint of step {first}" in console
    assert rest.startswith("checkpoint saved in ") and f"resume from step {first}" in rest
    assert latest()["step"] == first
    assert CHECKPOINT_FILES <= {Path(p).name for p in fs.ls(f"{root}/checkpoint_{first:08d}")}
    run_id = json.loads(fs.cat_file(f"{root}/mlflow_run_id.json"))["run_id"]
    client = MlflowClient(tracking_uri=tracking)
    ended = client.get_run(run_id)
    assert ended.info.status == "KILLED"
    assert ended.data.tags["preempted"] == "true"
    assert ended.data.tags["preempted_at_step"] == str(first)
    worker_lines = console_lines(console, r"SIGTERM to rank", r"preempted \(SIGTERM to rank")

    # 2. again, every checkpoint upload held by the store; SIGTERM while the final one hangs
    proxy.configure(rate=1.0, kinds=["timeout"], methods={"PUT", "POST"}, path=r"checkpoint_\d")
    run = Run(tmp_path, env, {**sets, "train.preempt_grace_s": GRACE_S}, 2)
    run.until(lambda: any("checkpoint_00000040" in r for r in proxy.in_flight()))
    run.proc.send_signal(signal.SIGTERM)
    code, console = run.wait()
    assert code == EXIT_CODE, console[-4000:]
    assert f"resuming from the checkpoint at step {first}" in console
    who, step, rest = _preempted(console)
    assert (who, step) == ("the driver", STEPS)
    assert f"no checkpoint of it (the checkpoint not finished within {GRACE_S} s" in rest
    assert rest.endswith(f"resume from step {first}")
    state = latest()  # still the complete checkpoint of run 1, all its files there
    assert state["step"] == first
    assert CHECKPOINT_FILES <= {Path(p).name for p in fs.ls(f"{root}/{state['checkpoint']}")}
    assert not fs.exists(f"{root}/final/trunk.safetensors")
    hung_upload = console_lines(console, r"preempted \(SIGTERM to the driver\) at step")

    # what the two runs left in their one MLflow run: nothing before `first` redone, every
    # step logged once (run 2 trained to the end; only its final checkpoint is missing)
    resumed = client.get_metric_history(run_id, "train/resumed_from_step")
    assert [m.value for m in resumed] == [first]
    logged = [m.step for m in client.get_metric_history(run_id, "train/loss")]
    assert logged == list(range(1, STEPS + 1)), logged
    again = client.get_run(run_id)
    assert again.info.status == "KILLED" and again.data.tags["preempted_at_step"] == str(STEPS)

    record(
        FaultRow(
            fault="preemption: SIGTERM to one Ray Train worker",
            console=worker_lines,
            steps_redone=f"0 (stopped at {first}, resumed from {first})",
            data_lost=f"0: run KILLED with preempted=true, the next run resumed from {first} in "
            "the same MLflow run, each step logged once",
            test=current_test(),
        )
    )
    record(
        FaultRow(
            fault=f"SIGTERM while the checkpoint upload hangs (preempt_grace_s {GRACE_S})",
            console=hung_upload,
            steps_redone=f"{STEPS - first} (the steps since the step-{first} checkpoint)",
            data_lost=f"0: latest.json still names step {first}, all its files whole",
            test=current_test(),
        )
    )


# ------------------------------------------------------------------ the parts, without Ray


def test_preempt_grace_s_is_a_positive_number_of_seconds() -> None:
    from aim_platform.config import ConfigError, load_config

    assert load_config("jobs/configs/demo.yaml").train.preempt_grace_s == 60
    with pytest.raises(ConfigError, match=r"train\.preempt_grace_s"):
        load_config("jobs/configs/demo.yaml", ["train.preempt_grace_s=0"])


def test_driver_sigterm_asks_once_a_second_one_or_the_grace_period_stops() -> None:
    """The driver's first SIGTERM is a request (the process goes on, the console is told); a
    second one, or the grace period running out, raises GaveUp in the main thread; the
    handler before is back afterwards."""
    from aim_platform.train.preempt import DriverPreemption, GaveUp

    before = signal.getsignal(signal.SIGTERM)
    said: list[str] = []
    p = DriverPreemption(60, said.append)
    p.start()
    try:
        os.kill(os.getpid(), signal.SIGTERM)
        deadline = time.monotonic() + 10
        while not said and time.monotonic() < deadline:
            time.sleep(0.05)
        assert p.active and said and said[0].startswith("SIGTERM: saving a checkpoint")
        with pytest.raises(GaveUp, match="a second SIGTERM"):
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)
    finally:
        p.close()
    assert signal.getsignal(signal.SIGTERM) is before

    p = DriverPreemption(0.3, said.append)
    p.start()
    try:
        os.kill(os.getpid(), signal.SIGTERM)
        with pytest.raises(GaveUp, match="not finished within 0.3 s"):
            for _ in range(100):  # the watcher interrupts the main thread after 0.3 s
                time.sleep(0.1)
    finally:
        p.close()
    assert signal.getsignal(signal.SIGTERM) is before
