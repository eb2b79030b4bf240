"""Fault drills behind BENCHMARKS.md's fault table: a job under one fault, its console
with a time stamp on each line, then what it cost (SUMMARY lines: time lost, steps redone;
the MLflow run's steps, images dropped and restarts; on S3, the faults each phase met).

    python tests/fault_drills.py killed-worker   # embedded Ray, one training worker SIGKILLed
    python tests/fault_drills.py lost-node       # 2-node loopback cluster, node 2's raylet killed
    python tests/fault_drills.py s3 --rate 0.1   # ingest + demo on S3 through the fault proxy:
                                                 # 0% first, then --rate
    python tests/fault_drills.py half-checkpoint # a half-written checkpoint, the job run again
    python tests/fault_drills.py killed-ingest   # an ingest SIGKILLed, run again

The killing drills strike once the console shows step 40 and the step-30 checkpoint is in
(``train.checkpoint_every=30``). Each kills only what it started. Run from the repository
root with the venv's python; a run takes a few minutes on 2 cores. The jobs run from the
repository root, as ``make demo`` does (the S3 runs' logs go to the ignored ``./runs``).

A drill proves its row: it checks that its fault really happened (the worker killed after
the checkpoint, the node lost, faults injected by the proxy, the half-written checkpoint
planted, the ingest killed before it finished) and what the row claims (the console's
failure and restart lines, ``train/resumed_from_step`` equal to the checkpoint's step, the run
FINISHED, every train id of every complete epoch trained once). The first check that does not
hold ends the drill with exit 1 and one line ``DRILL FAILED: <check>: <what was seen>``.
When all hold, the drill records its row(s) with :func:`fault_rows.record` (``test`` is the
drill's command line) for ``python tests/fault_rows.py`` to render. The checks are pure
functions of the console text, the MLflow histories and counts (``tests/test_fault_drills.py``
tests them without running a drill).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import secrets
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))
from fault_rows import FaultRow, console_lines, record  # noqa: E402
from net_helpers import REPO, free_port  # noqa: E402

BIN = Path(sys.executable).parent
DRILL = "python tests/fault_drills.py"
STEP = re.compile(r": step (\d+)/\d+")
FAILED = re.compile(r"training failed at step (\d+)")
NODE_LOST = re.compile(r"lost \d+ of \d+ node\(s\) at step (\d+)")
RESTART = re.compile(r"restart \d+ of \S+: resuming from the checkpoint at step (\d+)")
RESUMING = re.compile(r"resuming from the checkpoint at step (\d+)")
FINAL = r"run \w+: \d+ steps"
KILLED = r"\] KILLED "  # the drill's own line when it strikes
KILL_AT_STEP, CHECKPOINT_EVERY = 40, 30
DEMO_STEPS = 150  # jobs/configs/demo.yaml's train.steps
HALF_STEPS, HALF_PLANTED = (20, 30), 99  # the half-checkpoint drill's two runs, planted step
PHOTOS = 600  # the killed ingest's
OnLine = Callable[[float, str, subprocess.Popen], str | None]


class CheckFailed(Exception):
    """A drill's check that did not hold; the message is the one line the drill ends with."""


def require(ok: bool, what: str) -> None:
    """Raise :class:`CheckFailed` with ``what`` unless ``ok``."""
    if not ok:
        raise CheckFailed(what)


# --- what a drill reads back: console text, MLflow run ----------------------------------


def first_step(pattern: re.Pattern[str], text: str) -> int | None:
    """The number ``pattern``'s first group matches first in ``text`` (None: no match)."""
    m = pattern.search(text)
    return int(m.group(1)) if m else None


def after(pattern: str, text: str) -> str:
    """``text`` from the first line matching ``pattern`` on ("" when none matches)."""
    m = re.search(pattern, text)
    return text[text.rfind("\n", 0, m.start()) + 1 :] if m else ""


@dataclass
class RunFacts:
    """The job's MLflow run as a drill checks it: status, tags, and each metric's history as
    ``(step, value)`` pairs in the order logged.

    Attributes:
        run_id: The MLflow run id.
        status: ``FINISHED``, ``FAILED``, ``RUNNING``, ...
        tags: The run's tags.
        history: Metric key -> its ``(step, value)`` pairs.
    """

    run_id: str
    status: str
    tags: dict[str, str] = field(default_factory=dict)
    history: dict[str, list[tuple[int, float]]] = field(default_factory=dict)

    def steps(self, key: str) -> list[int]:
        """The steps ``key`` was logged at, sorted, repeats kept."""
        return sorted(s for s, _ in self.history.get(key, []))

    def values(self, key: str) -> list[float]:
        """``key``'s values in the order logged."""
        return [v for _, v in self.history.get(key, [])]

    def at(self, key: str) -> dict[int, float]:
        """``key`` as step -> the last value logged at that step."""
        return dict(self.history.get(key, []))

    def line(self) -> str:
        """One line for the drill's log: status, logged steps, drops, workers, restarts."""
        steps = Counter(self.steps("train/loss"))
        workers = [int(v) for v in self.values("train/workers")]
        tags = {k: v for k, v in self.tags.items() if k.startswith("restart")}
        return (
            f"MLFLOW run {self.run_id} {self.status}: train/loss at {len(steps)} steps (last "
            f"{max(steps, default=0)}; logged twice: {sorted(s for s, n in steps.items() if n > 1)}), "
            f"train/resumed_from_step {self.values('train/resumed_from_step')}, "
            f"data/dropped_images max {max(self.values('data/dropped_images'), default=None)}, "
            f"data/epoch_rows {self.at('data/epoch_rows')}, data/epoch_distinct_rows "
            f"{self.at('data/epoch_distinct_rows')}, train/workers {workers[:1] + workers[-1:]}, "
            f"tags {tags}"
        )  # fmt: skip


METRICS = (
    "train/loss", "val/loss", "train/epoch", "train/workers", "train/resumed_from_step",
    "data/dropped_images", "data/epoch_rows", "data/epoch_distinct_rows",
)  # fmt: skip


def read_run(tracking_uri: str, run_id: str) -> RunFacts:
    """The MLflow run ``run_id`` at ``tracking_uri`` as :class:`RunFacts`."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    run = client.get_run(run_id)
    history = {
        key: [(m.step, m.value) for m in sorted(
            client.get_metric_history(run_id, key), key=lambda m: (m.timestamp, m.step))]
        for key in METRICS
    }  # fmt: skip
    return RunFacts(run_id, run.info.status, dict(run.data.tags), history)


def _local_run(work: Path, name: str = "demo") -> RunFacts | None:
    marker = work / "runs" / name / "mlflow_run_id.json"
    if not marker.exists():
        print("MLFLOW: no run (the job never started one)", flush=True)
        return None
    saved = json.loads(marker.read_text())
    run = read_run(saved["tracking_uri"], saved["run_id"])
    print(run.line(), flush=True)
    return run


def _train_rows(cache: Path, source: str = "digits") -> int:
    """The train rows of a built-in source ingested under ``cache`` (``AIM_DATA_CACHE``)."""
    manifest = cache / source / "_manifest.json"
    require(manifest.exists(), f"data: no {manifest}: the built-in data was never ingested")
    return int(json.loads(manifest.read_text())["counts"]["train"])


# --- the checks (pure: text, numbers, RunFacts) ------------------------------------------


def check_finished(run: RunFacts | None, rc: int, steps: int) -> RunFacts:
    """The job exited 0, its MLflow run is FINISHED and logged ``train/loss`` at ``steps``."""
    require(rc == 0, f"exit: the job exited {rc}")
    require(run is not None, "mlflow: no run (the job never started one)")
    assert run is not None
    require(run.status == "FINISHED", f"mlflow: run {run.run_id} is {run.status}, not FINISHED")
    last = max(run.steps("train/loss"), default=0)
    require(last == steps, f"mlflow: train/loss last logged at step {last}, not {steps}")
    return run


def check_data(run: RunFacts, train_rows: int) -> str:
    """Data lost 0, from the run's counts: each complete epoch's distinct train ids
    (``data/epoch_distinct_rows``) are all ``train_rows``, none trained twice
    (``data/epoch_rows`` equal), no image dropped (``data/dropped_images``).

    Returns:
        The row's "data lost" text.
    """
    distinct = run.at("data/epoch_distinct_rows")
    rows = run.at("data/epoch_rows")
    require(
        bool(distinct),
        "data: no complete epoch in data/epoch_distinct_rows: data lost cannot be counted",
    )
    lost = {e: train_rows - int(n) for e, n in sorted(distinct.items()) if int(n) != train_rows}
    require(
        not lost, f"data: epochs whose distinct ids are not all {train_rows} train rows: {lost}"
    )
    twice = {e: int(rows.get(e, -1)) for e, n in sorted(distinct.items()) if rows.get(e) != n}
    require(
        not twice, f"data: data/epoch_rows differs from the distinct ids ({train_rows}): {twice}"
    )
    dropped = max(run.values("data/dropped_images"), default=0.0)
    require(dropped == 0, f"data: data/dropped_images reached {dropped:g}")
    epochs = sorted(distinct)
    span = f"epoch {epochs[0]}" if len(epochs) == 1 else f"epochs {epochs[0]}-{epochs[-1]}"
    return (
        f"0: {span} each {train_rows} of {train_rows} train ids once (`data/epoch_rows` = "
        f"`data/epoch_distinct_rows`), `data/dropped_images` 0, run {run.status}"
    )


@dataclass
class Kill:
    """What a killing drill did: the console step and ``latest.json``'s checkpoint when it
    struck (0: it never struck), what it killed, or why it could not."""

    step: int = 0
    checkpoint: int = 0
    what: str = ""
    error: str | None = None
    t: dict[str, float] = field(default_factory=dict)


def check_restart(
    console: str, kill: Kill, run: RunFacts | None, rc: int, *, node_lost: bool,
    steps: int = DEMO_STEPS,
) -> tuple[int, int]:  # fmt: skip
    """The killed-worker and lost-node drills' checks: the kill struck after the checkpoint;
    after it the console shows the failure line (``lost N of M node(s) at step S`` for a lost
    node, ``training failed at step S`` otherwise) and a restart from that checkpoint; the job
    exited 0; ``train/resumed_from_step`` is that checkpoint's step, once; the run FINISHED.

    Returns:
        (the step training had reached when it failed, the step it resumed from).
    """
    require(kill.error is None, f"kill: {kill.error}")
    require(
        kill.step > 0,
        f"kill: never struck (the console never showed step {KILL_AT_STEP} with a checkpoint "
        f"of step {CHECKPOINT_EVERY} or later in)",
    )
    later = after(KILLED, console)
    failure = NODE_LOST if node_lost else FAILED
    failed = first_step(failure, later)
    require(failed is not None, f"console: no failure line /{failure.pattern}/ after the kill")
    assert failed is not None
    restart = first_step(RESTART, later)
    require(restart is not None, f"console: no restart line /{RESTART.pattern}/ after the kill")
    require(
        restart == kill.checkpoint,
        f"console: restarted from step {restart}, not the checkpoint at the kill ({kill.checkpoint})",
    )
    run = check_finished(run, rc, steps)
    resumed = [int(v) for v in run.values("train/resumed_from_step")]
    require(
        resumed == [kill.checkpoint],
        f"mlflow: train/resumed_from_step is {resumed}, not [{kill.checkpoint}] (the checkpoint "
        "at the kill)",
    )
    require(failed >= kill.checkpoint, f"console: failed at step {failed}, before the checkpoint")
    return failed, kill.checkpoint


def restart_row(
    fault: str, console: str, kill: Kill, failed: int, resumed: int, data: str, test: str
) -> FaultRow:
    """The fault-table row of a killing drill whose checks held."""
    later = after(KILLED, console)
    shown = console_lines(console[: len(console) - len(later)], rf": step {kill.step}/\d+")
    shown += console_lines(later, KILLED, FAILED.pattern, NODE_LOST.pattern)
    back = after(RESTART.pattern, later)
    again = next((m.group(1) for m in STEP.finditer(back) if int(m.group(1)) >= failed), None)
    shown += console_lines(back, RESTART.pattern, rf": step {again}/\d+", FINAL)
    t0 = kill.t.get("kill", 0.0)
    lost = f"{kill.t['back'] - t0:.1f} s" if "back" in kill.t else "not measured"
    return FaultRow(
        fault=fault,
        console=shown,
        steps_redone=(
            f"{failed - resumed} (failed at step {failed}, `train/resumed_from_step` {resumed}); "
            f"{lost} from the kill to step {failed} again"
        ),
        data_lost=data,
        test=test,
    )


def check_half_checkpoint(
    first_rc: int, first_latest: int, planted: bool, console: str, rc: int,
    run: RunFacts | None, steps: tuple[int, int] = HALF_STEPS, planted_step: int = HALF_PLANTED,
) -> int:  # fmt: skip
    """The half-checkpoint drill's checks: the first run ended at its complete checkpoint
    (``latest.json`` names ``steps[0]``), the half-written one was planted; the second run
    says it resumes from ``steps[0]``, never mentions the planted checkpoint, exits 0, logs
    ``train/resumed_from_step`` = ``steps[0]`` once and ``train/loss`` once at each logged step
    up to ``steps[1]``, and FINISHED.

    Returns:
        The step the second run resumed from.
    """
    require(first_rc == 0, f"setup: the first run exited {first_rc}")
    require(
        first_latest == steps[0],
        f"setup: latest.json names step {first_latest} after the first run, not {steps[0]}",
    )
    require(planted, "setup: the half-written checkpoint was not planted")
    said = first_step(RESUMING, console)
    require(
        said == steps[0],
        f"console: the second run {'says no resume' if said is None else f'resumes from step {said}'}, "
        f"not from the complete checkpoint at step {steps[0]}",
    )
    name = f"checkpoint_{planted_step:08d}"
    require(
        name not in console and not re.search(rf"\bstep {planted_step}\b", console),
        f"console: the second run mentions the half-written {name}",
    )
    run = check_finished(run, rc, steps[1])
    resumed = [int(v) for v in run.values("train/resumed_from_step")]
    require(
        resumed == [steps[0]],
        f"mlflow: train/resumed_from_step is {resumed}, not [{steps[0]}] (the complete checkpoint)",
    )
    twice = sorted(s for s, n in Counter(run.steps("train/loss")).items() if n > 1)
    require(not twice, f"mlflow: train/loss logged twice at steps {twice}")
    return steps[0]


@dataclass
class IngestKill:
    """The killed-ingest drill's kill: group markers done, whether ``_progress/`` existed and
    whether the ingest had already finished (exited or written ``_manifest.json``)."""

    groups: int
    progress: bool
    finished: bool


def check_ingest_kill(kill: IngestKill) -> None:
    """The kill struck an ingest in progress: not finished, its ``_progress/`` there."""
    require(
        not kill.finished,
        f"kill: the ingest finished before the kill ({kill.groups} groups done): give it more photos",
    )
    require(kill.progress, "kill: no _progress/ at the kill: the ingest was not in progress")


def check_ingest_again(
    rc: int, manifest: dict[str, Any], ids: list[str], photos: int, progress_left: bool,
    rc_clean: int, clean: dict[str, Any],
) -> str:  # fmt: skip
    """The ingest run again after the kill: exit 0, resumed from the groups the killed one
    finished (``resumed_groups`` > 0), every id once, ``_progress/`` gone, counts equal a
    clean ingest's.

    Returns:
        The row's "data lost" text.
    """
    require(rc == 0, f"exit: the ingest run again exited {rc}")
    resumed = int(manifest.get("resumed_groups", 0))
    require(resumed > 0, "resume: _manifest.json says resumed_groups 0: every group was redone")
    twice = sorted(i for i, n in Counter(ids).items() if n > 1)
    require(not twice, f"ids: {len(twice)} ids more than once, e.g. {twice[:3]}")
    require(len(ids) == photos, f"ids: {len(ids)} distinct ids in train + val, not {photos}")
    require(not progress_left, "resume: _progress/ still there after the ingest run again")
    require(rc_clean == 0, f"exit: the clean ingest exited {rc_clean}")
    require(
        manifest["counts"] == clean["counts"],
        f"counts: {manifest['counts']} after the kill, {clean['counts']} from a clean ingest",
    )
    return (
        f"{photos - len(ids)}: {len(ids)} ids of {photos}, each once; counts "
        f"{manifest['counts']} equal a clean ingest's"
    )


def check_s3_half(
    name: str, rate: float, rc_ingest: int, rc_pretrain: int, faults: int, latest: str,
    run: RunFacts | None, steps: int = DEMO_STEPS,
) -> RunFacts:  # fmt: skip
    """One half of the S3 drill: the ingest and the job exited 0; at a rate above 0 the proxy
    injected at least one fault (none at 0); the job FINISHED at ``steps`` with
    ``latest.json`` naming that step's checkpoint."""
    require(rc_ingest == 0, f"{name}: the ingest exited {rc_ingest}")
    if rate > 0:
        require(faults > 0, f"{name}: the proxy injected no fault at rate {rate:g}")
    else:
        require(faults == 0, f"{name}: the proxy injected {faults} faults at rate 0")
    run = check_finished(run, rc_pretrain, steps)
    want = f"checkpoint_{steps:08d}"
    require(latest == want, f"{name}: latest.json names {latest}, not {want}")
    return run


CURVES = ("train/loss", "val/loss", "data/dropped_images", "train/epoch")


def differing_curves(a: RunFacts, b: RunFacts, keys: tuple[str, ...] = CURVES) -> list[str]:
    """The metrics whose ``(step, value)`` pairs differ between two runs."""
    return [k for k in keys if sorted(a.history.get(k, [])) != sorted(b.history.get(k, []))]


def check_s3_pair(manifests: dict[str, dict[str, Any]], runs: dict[str, RunFacts]) -> None:
    """The faulty half's manifest (counts, shards) and curves equal the clean half's."""
    for key in ("counts", "shards"):
        require(
            manifests["clean"][key] == manifests["faulty"][key],
            f"ingest: the faulty manifest's {key} differ from the clean one's",
        )
    differ = differing_curves(runs["clean"], runs["faulty"])
    require(not differ, f"pretrain: the faulty run's {differ} differ from the clean run's")


# --- running jobs ------------------------------------------------------------------------


def _env(**extra: str) -> dict[str, str]:
    """This process's environment without Ray's and AWS's variables, with this checkout's
    ``platform/`` first on ``PYTHONPATH`` (the venv may hold another checkout's editable
    install: the driver, the nodes and the Ray workers must all run this code)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "AWS_"))}
    path = [str(REPO / "platform"), *filter(None, env.get("PYTHONPATH", "").split(os.pathsep))]
    return {**env, "PYTHONPATH": os.pathsep.join(path), **extra}


def _say(t: float, text: str) -> str:
    line = f"[{t:7.1f}s] {text}"
    print(line, flush=True)
    return line


def _console(
    cmd: list[str], env: dict[str, str], on_line: OnLine | None = None
) -> tuple[int, float, str]:
    """Run ``cmd``, print its lines time-stamped; ``on_line(t, line, proc)`` may act on them
    and return a note to print. Returns the exit code, the seconds and the printed text."""
    t0 = time.monotonic()
    shown: list[str] = []
    proc = subprocess.Popen(
        cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True,
    )  # fmt: skip
    assert proc.stdout is not None
    try:
        for line in proc.stdout:
            t = time.monotonic() - t0
            shown.append(_say(t, line.rstrip()))
            note = on_line(t, line, proc) if on_line else None
            if note:
                shown.append(_say(t, note))
        return proc.wait(), time.monotonic() - t0, "\n".join(shown)
    finally:
        if proc.poll() is None:  # the drill itself failed: take the job down with it
            os.killpg(proc.pid, signal.SIGKILL)


def _demo(work: Path, sets: dict[str, object]) -> list[str]:
    sets = {
        "name": "demo",
        "train.storage_path": str(work / "runs"),
        "tracking.tracking_uri": f"sqlite:///{work}/mlflow.db",
        **sets,
    }
    args = [x for k, v in sets.items() for x in ("--set", f"{k}={v}")]
    return [str(BIN / "aimctl"), "pretrain", "jobs/configs/demo.yaml", *args]


class KillAfterCheckpoint:
    """An ``on_line`` that calls ``kill(driver)`` once the console shows a step of at least
    ``KILL_AT_STEP`` and ``latest.json`` names a checkpoint of at least ``CHECKPOINT_EVERY``
    (once: a kill that raises is recorded in ``kill.error``), then times the way back: the
    failure reported, the restart said, the killed step shown again."""

    def __init__(self, latest: Path, kill: Callable[[subprocess.Popen], str]) -> None:
        self.latest, self.strike = latest, kill
        self.kill = Kill()
        self.back_at = 0  # the step training had reached when it failed

    def __call__(self, t: float, line: str, driver: subprocess.Popen) -> str | None:
        k = self.kill
        m = STEP.search(line)
        if "kill" not in k.t:
            if k.error or not m or int(m.group(1)) < KILL_AT_STEP or not self.latest.exists():
                return None
            checkpoint = json.loads(self.latest.read_text())["step"]
            if checkpoint < CHECKPOINT_EVERY:
                return None
            try:
                k.what = self.strike(driver)
            except Exception as exc:  # noqa: BLE001 - the check reports it
                k.error = f"could not kill: {exc}"
                return f"KILL FAILED: {exc}"
            k.t["kill"], k.step, k.checkpoint = t, int(m.group(1)), checkpoint
            return f"KILLED {k.what} (console at step {k.step}, checkpoint {checkpoint})"
        if "failed" not in k.t and (FAILED.search(line) or NODE_LOST.search(line)):
            k.t["failed"] = t
            said = re.search(r"at step (\d+)", line)  # the step training had reached
            self.back_at = max(k.step, int(said.group(1))) if said else k.step
        elif "restart" not in k.t and RESTART.search(line):
            k.t["restart"] = t
        elif "back" not in k.t and "restart" in k.t and m:
            if int(m.group(1)) >= max(self.back_at, k.step):
                k.t["back"] = t
        return None

    def summary(self) -> str:
        k = self.kill
        if "kill" not in k.t:
            return f"SUMMARY: no kill happened ({k.error or 'no step 40 after a checkpoint'})"
        t0 = k.t["kill"]
        since = {n: f"+{v - t0:.1f} s" for n, v in k.t.items() if n != "kill"}
        lost = f"{k.t['back'] - t0:.1f} s" if "back" in k.t else "never (not back)"
        return (
            f"SUMMARY: killed at {t0:.1f} s at step {k.step}, checkpoint {k.checkpoint}; "
            f"failure said {since.get('failed', 'never')}, restart said "
            f"{since.get('restart', 'never')}, step reached shown again "
            f"{since.get('back', 'never')}; time lost {lost}"
        )


# --- the drills: each returns its rows once every check held ----------------------------


def lost_node(work: Path, test: str) -> list[FaultRow]:
    """The issue's journey: SPREAD over a head and a second node, 1 CPU a worker."""
    from test_node_loss import _node_args, _ports, _raylet_of, _up
    from test_submit import _stop_head

    head_dir = tempfile.mkdtemp(prefix="aimh", dir="/tmp")  # short: unix socket paths
    node_dir = tempfile.mkdtemp(prefix="aimn", dir="/tmp")
    env = _env(
        RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(24), HOME=head_dir,
        PATH=f"{BIN}{os.pathsep}{os.environ['PATH']}", RAY_USAGE_STATS_ENABLED="0",
        RAY_ENABLE_UV_RUN_RUNTIME_ENV="0",
    )  # fmt: skip
    port = free_port()
    gcs = f"127.0.0.1:{port}"
    head = node = None
    try:
        head = _up(
            ["--head", "--port", str(port), "--include-dashboard", "false", "--temp-dir", head_dir,
             *_ports("--ray-client-server-port", "--dashboard-port"), *_node_args()],
            env, head_dir, gcs, 1,
        )  # fmt: skip
        node = _up(["--address", gcs, "--temp-dir", node_dir, *_node_args()], env, node_dir, gcs, 2)
        print("cluster: head + 1 node on 127.0.0.1, 2 CPUs each", flush=True)
        sets = {
            "train.placement_strategy": "SPREAD",
            "train.cpus_per_worker": 1,
            "train.max_failures": 3,
            "train.checkpoint_every": CHECKPOINT_EVERY,
        }

        def kill(driver: subprocess.Popen) -> str:
            os.kill(_raylet_of(node_dir), signal.SIGKILL)
            return "the second node's raylet"

        watch = KillAfterCheckpoint(work / "runs" / "demo" / "latest.json", kill)
        denv = {**env, "HOME": str(work), "AIM_DATA_CACHE": str(work / "cache")}
        rc, wall, console = _console([*_demo(work, sets), "--address", gcs], denv, watch)
    finally:
        for proc, folder in ((node, node_dir), (head, head_dir)):
            if proc is not None:
                _stop_head(proc, folder)
        shutil.rmtree(head_dir, ignore_errors=True)
        shutil.rmtree(node_dir, ignore_errors=True)
    print(f"{watch.summary()}; exit {rc} after {wall:.1f} s", flush=True)
    run = _local_run(work)
    failed, resumed = check_restart(console, watch.kill, run, rc, node_lost=True)
    assert run is not None
    data = check_data(run, _train_rows(work / "cache"))
    fault = (
        "lost node (2-node loopback cluster, 2 CPUs each, token auth, SPREAD, 1 CPU a worker; "
        "the second node's raylet SIGKILLed; `max_failures=3`)"
    )
    return [restart_row(fault, console, watch.kill, failed, resumed, data, test)]


def killed_worker(work: Path, test: str) -> list[FaultRow]:
    """Embedded Ray: one ``ray::RayTrainWorker`` of this driver's own Ray SIGKILLed."""
    import psutil

    def kill(driver: subprocess.Popen) -> str:
        tree = psutil.Process(driver.pid).children(recursive=True)
        workers = sorted(p.pid for p in tree if "RayTrainWorker" in " ".join(p.cmdline()))
        if not workers:
            raise RuntimeError("no ray::RayTrainWorker under the driver")
        os.kill(workers[-1], signal.SIGKILL)
        return f"training worker {workers[-1]} (of {len(workers)})"

    env = _env(RAY_AUTH_MODE="disabled", AIM_DATA_CACHE=str(work / "cache"))
    watch = KillAfterCheckpoint(work / "runs" / "demo" / "latest.json", kill)
    sets = {"train.max_failures": 1, "train.checkpoint_every": CHECKPOINT_EVERY}
    rc, wall, console = _console(_demo(work, sets), env, watch)
    print(f"{watch.summary()}; exit {rc} after {wall:.1f} s", flush=True)
    run = _local_run(work)
    failed, resumed = check_restart(console, watch.kill, run, rc, node_lost=False)
    assert run is not None
    data = check_data(run, _train_rows(work / "cache"))
    fault = (
        "killed training worker (SIGKILL of one `ray::RayTrainWorker`, embedded Ray, "
        "`train.max_failures=1`)"
    )
    return [restart_row(fault, console, watch.kill, failed, resumed, data, test)]


def half_checkpoint(work: Path, test: str) -> list[FaultRow]:
    """The demo for 20 steps; then a checkpoint that crashed half way (rank 0's train state
    and a partial ``.metadata``, no shards, never named by ``latest.json``) beside it; then the
    same config by name for 30 steps."""
    env = _env(RAY_AUTH_MODE="disabled", AIM_DATA_CACHE=str(work / "cache"))
    sets: dict[str, object] = {"train.checkpoint_every": 10, "train.val_every": 10}
    first, second = HALF_STEPS
    rc1, t1, console1 = _console(_demo(work, {**sets, "train.steps": first}), env)
    run_dir = work / "runs" / "demo"
    latest_path = run_dir / "latest.json"
    latest = json.loads(latest_path.read_text())["step"] if latest_path.exists() else 0
    require(rc1 == 0 and latest == first, f"setup: first run exit {rc1}, latest.json step {latest}")
    half = run_dir / f"checkpoint_{HALF_PLANTED:08d}"
    half.mkdir()
    state = {"step": HALF_PLANTED, "epoch": 9, "data_seed": 0}
    (half / "train_state.json").write_text(json.dumps(state))
    (half / ".metadata").write_bytes(b"partial")
    planted = (half / "train_state.json").exists() and (
        json.loads(latest_path.read_text())["step"] == first
    )
    print(f"PLANTED {half.name} (train state at step {HALF_PLANTED}, no shards); latest.json "
          f"{latest_path.read_text()}")  # fmt: skip
    rc2, t2, console2 = _console(_demo(work, {**sets, "train.steps": second}), env)
    print(f"SUMMARY: first run {t1:.1f} s (exit {rc1}), second {t2:.1f} s (exit {rc2})")
    run = _local_run(work)
    resumed = check_half_checkpoint(rc1, latest, planted, console2, rc2, run)
    assert run is not None
    data = check_data(run, _train_rows(work / "cache"))
    reached = max((int(s) for s in STEP.findall(console1)), default=0)
    start = console_lines(console2, r"pre-training \w+:", RESUMING.pattern)
    return [
        FaultRow(
            fault=(
                "half-written checkpoint (a save that crashed: rank 0's `train_state.json` at "
                f"step {HALF_PLANTED} and a partial `.metadata`, no shards, never named by "
                "`latest.json`), then the same config by name"
            ),
            console=[*start, *console_lines(console2, rf": step {second}/\d+", FINAL)],
            steps_redone=(
                f"{reached - resumed} (first run reached step {reached}, "
                f"`train/resumed_from_step` {resumed}; the planted step {HALF_PLANTED} never "
                f"loaded) plus a start-up: {t2:.0f} s for the second run"
            ),
            data_lost=data,
            test=test,
        )
    ]


def killed_ingest(work: Path, test: str) -> list[FaultRow]:
    """``aimctl ingest`` of 600 photos SIGKILLed (with its Ray) once 20 groups are done, run
    again, then a clean ingest of the same photos for the time it takes."""
    import pyarrow.parquet as pq

    env = _env(RAY_AUTH_MODE="disabled", AIM_DATA_CACHE=str(work / "cache"))

    def ingest(dest: Path) -> list[str]:
        return [str(BIN / "aimctl"), "ingest", "builtin:photos", str(dest), "--num-photos",
                str(PHOTOS), "--shard-size-mb", "0.3", "--val-fraction", "0.1"]  # fmt: skip

    dest = work / "photos"
    markers = dest / "_progress"

    def kill_after_groups(driver: subprocess.Popen, groups: int = 20) -> IngestKill:
        while driver.poll() is None and len(list(markers.glob("*/group-*.json"))) < groups:
            time.sleep(0.05)
        done = len(list(markers.glob("*/group-*.json")))
        progress = markers.is_dir()
        finished = driver.poll() is not None or (dest / "_manifest.json").exists()
        if driver.poll() is None:
            os.killpg(driver.pid, signal.SIGKILL)  # the CLI and the Ray it started
        return IngestKill(done, progress, finished)

    t0 = time.monotonic()
    proc = subprocess.Popen(
        ingest(dest), cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True, start_new_session=True,
    )  # fmt: skip
    kill = kill_after_groups(proc)
    assert proc.stdout is not None
    for line in proc.stdout:
        print(f"[ before kill] {line.rstrip()}", flush=True)
    proc.wait()
    t_kill = time.monotonic() - t0
    check_ingest_kill(kill)
    killed = _say(t_kill, f"KILLED the ingest and its Ray: {kill.groups} group(s) were done")
    time.sleep(3)  # a worker mid-task may still finish its group
    groups = len(list(markers.glob("*/group-*.json")))
    print(f"{groups} group(s) done once the killed ingest's workers stopped", flush=True)
    rc, t_again, console = _console(ingest(dest), env)
    require(rc == 0, f"exit: the ingest run again exited {rc}")
    manifest = json.loads((dest / "_manifest.json").read_text())
    ids = [i for s in ("train", "val") for i in pq.read_table(dest / s).column("id").to_pylist()]
    rc_clean, t_clean, _ = _console(ingest(work / "clean"), env)
    clean = json.loads((work / "clean" / "_manifest.json").read_text()) if rc_clean == 0 else {}
    print(
        f"SUMMARY: killed after {t_kill:.1f} s; run again {t_again:.1f} s (exit {rc}), "
        f"resumed_groups {manifest.get('resumed_groups')}, counts {manifest['counts']}, "
        f"{len(ids)} ids ({len(set(ids))} distinct, {PHOTOS} expected); a clean ingest "
        f"{t_clean:.1f} s (exit {rc_clean}): time lost {t_kill + t_again - t_clean:.1f} s",
        flush=True,
    )
    data = check_ingest_again(rc, manifest, ids, PHOTOS, markers.exists(), rc_clean, clean)
    return [
        FaultRow(
            fault=(
                f"killed ingest (`aimctl ingest builtin:photos`, {PHOTOS} photos, SIGKILL of "
                f"the CLI and its Ray once {kill.groups} groups were written), run again"
            ),
            console=[killed, *console_lines(console, r": written;")],
            steps_redone=(
                f"{manifest['resumed_groups']} groups kept, the rest written again: killed at "
                f"{t_kill:.1f} s + {t_again:.1f} s again against {t_clean:.1f} s for a clean "
                "ingest"
            ),
            data_lost=data,
            test=test,
        )
    ]


def _fault_kinds(entries: list[str]) -> str:
    """``faulted_paths`` entries (``kind METHOD path``) grouped: data reads, checkpoint
    uploads, other run files, ingest writes."""

    def what(entry: str) -> str:
        _, method, path = entry.split(" ", 2)
        if "/runs/" in path:
            if "checkpoint_" in path and method in ("PUT", "POST"):
                return "checkpoint upload"
            return f"run files {method}"
        return f"data {method}"

    return ", ".join(f"{k} {n}" for k, n in sorted(Counter(map(what, entries)).items())) or "none"


def s3(work: Path, test: str, rate: float, kinds: str, read_timeout: float) -> list[FaultRow]:
    """Ingest + demo with data and checkpoints on S3 (moto) through the fault proxy, at 0%,
    then from scratch at ``rate``."""
    import boto3
    from s3_fault_proxy import FaultProxy

    creds = {"aws_access_key_id": "testing", "aws_secret_access_key": "testing"}
    env = _env(
        RAY_AUTH_MODE="disabled", AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing",
        AWS_DEFAULT_REGION="us-east-1", AIM_DATA_CACHE=str(work / "cache"),
    )  # fmt: skip
    store = f"http://127.0.0.1:{free_port()}"
    log = open(work / "moto.log", "w")  # noqa: SIM115 - closed below
    moto = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", store.rsplit(":", 1)[1]],
        env=env, stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    client = boto3.client("s3", endpoint_url=store, region_name="us-east-1", **creds)

    def read(key: str) -> dict[str, Any]:
        try:
            return json.loads(client.get_object(Bucket="aim", Key=key)["Body"].read())
        except client.exceptions.NoSuchKey:
            return {}

    rows: list[FaultRow] = []
    try:
        for _ in range(60):
            try:
                client.create_bucket(Bucket="aim")
                break
            except Exception:  # noqa: BLE001 - not up yet
                time.sleep(1)
        else:
            raise RuntimeError(f"moto did not start: {(work / 'moto.log').read_text()[-2000:]}")
        proxy = FaultProxy(store, kinds=kinds.split(","), seed=3)
        proxy.start()
        opts = json.dumps({"endpoint_url": proxy.url, "read_timeout": read_timeout})
        print(f"S3: moto at {store}, fault proxy {proxy.url}, storage options {opts}", flush=True)
        manifests: dict[str, Any] = {}
        runs: dict[str, RunFacts] = {}
        for name, r in (("clean", 0.0), ("faulty", rate)):
            proxy.configure(rate=r)
            print(f"--- {name}: {r:.0%} of all S3 requests fail ({kinds})", flush=True)
            before: dict[str, Any] = proxy.stats()
            seen = len(before["faulted_paths"])
            data = f"s3://aim/{name}/digits"
            ingest = [str(BIN / "aimctl"), "ingest", "builtin:digits", data, "--image-size", "64",
                      "--val-fraction", "0.05", "--shard-size-mb", "0.5", "--storage-options", opts]  # fmt: skip
            rc_i, t_i, console_i = _console(ingest, env)
            stats: dict[str, Any] = proxy.stats()
            ingest_faults = stats["faulted_paths"][seen:]
            requests_i = stats["requests"] - before["requests"]
            sets = {
                "name": name,
                "data.sources.0.url": data,
                "data.storage_options": opts,
                "train.storage_path": "s3://aim/runs",
                "train.storage_options": opts,
            }
            rc_p, t_p, console_p = _console(_demo(work, sets), env)
            stats = proxy.stats()
            run_faults = stats["faulted_paths"][seen + len(ingest_faults) :]
            manifest = read(f"{name}/digits/_manifest.json")
            manifests[name] = manifest
            latest = read(f"runs/{name}/latest.json").get("checkpoint", "none")
            keys = client.list_objects_v2(Bucket="aim", Prefix=f"runs/{name}/checkpoint_")
            per_ckpt = Counter(o["Key"].split("/")[2] for o in keys.get("Contents", []))
            requests_p = stats["requests"] - before["requests"] - requests_i
            print(
                f"SUMMARY {name} ({r:.0%}): ingest {t_i:.1f} s (exit {rc_i}), counts "
                f"{manifest.get('counts')}, {len(ingest_faults)} faults ({_fault_kinds(ingest_faults)}); "
                f"pretrain {t_p:.1f} s (exit {rc_p}), {len(run_faults)} faults "
                f"({_fault_kinds(run_faults)}); requests: ingest {requests_i}, pretrain "
                f"{requests_p}; faults so far {stats['faults']}; latest {latest}; files per "
                f"checkpoint {dict(per_ckpt)}",
                flush=True,
            )  # fmt: skip
            saved = read(f"runs/{name}/mlflow_run_id.json")
            run = read_run(saved["tracking_uri"], saved["run_id"]) if saved else None
            print(run.line() if run else "MLFLOW: no run", flush=True)
            faults = len(ingest_faults) + len(run_faults)
            run = check_s3_half(name, r, rc_i, rc_p, faults, latest, run)
            require(bool(manifest), f"{name}: no _manifest.json after the ingest")
            data_lost = check_data(run, int(manifest["counts"]["train"]))
            runs[name] = run
            rows.append(
                FaultRow(
                    fault=(
                        f"S3 through the fault proxy at {r:.0%} failed requests ({kinds}; data "
                        "and checkpoints on S3: moto on loopback, `read_timeout` "
                        f"{read_timeout:g} s)" + (", from scratch" if r else "")
                    ),
                    console=[
                        *console_lines(console_i, r": written;"),
                        *console_lines(console_p, rf": step {DEMO_STEPS}/\d+", FINAL),
                    ],
                    steps_redone=(
                        f"none; ingest {t_i:.0f} s ({len(ingest_faults)} faults in {requests_i} "
                        f"requests), pre-training {t_p:.0f} s ({len(run_faults)} faults in "
                        f"{requests_p} requests: {_fault_kinds(run_faults)})"
                    ),
                    data_lost=data_lost + (", curves equal the 0% run's" if r else ""),
                    test=test if r else f"{test} (first half, 0%)",
                )
            )
        check_s3_pair(manifests, runs)
        print("SUMMARY: faulty manifest counts and shards and curves equal the clean ones")
        proxy.stop()
    finally:
        moto.terminate()
        moto.wait(timeout=30)
        log.close()
    return rows


def conclude(drill: Callable[[], list[FaultRow]]) -> int:
    """Run ``drill``: exit code 1 and one ``DRILL FAILED`` line when a check fails, else
    record its rows (``fault_rows.record``) and 0."""
    try:
        rows = drill()
    except CheckFailed as exc:
        print(f"DRILL FAILED: {exc}", flush=True)
        return 1
    for row in rows:
        print(f"DRILL PASSED: row recorded in {record(row)}", flush=True)
    return 0


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    drills = ["killed-worker", "lost-node", "s3", "half-checkpoint", "killed-ingest"]
    ap.add_argument("drill", choices=drills)
    ap.add_argument("--rate", type=float, default=0.1, help="s3: fraction of requests that fail")
    ap.add_argument("--kinds", default="slowdown,reset,cut,timeout", help="s3: fault kinds")
    ap.add_argument("--read-timeout", type=float, default=5.0, help="s3: read_timeout option")
    a = ap.parse_args(argv)
    test = f"{DRILL} {shlex.join(argv)}"
    work = Path(tempfile.mkdtemp(prefix=f"drill-{a.drill}-"))
    print(f"work folder: {work}", flush=True)
    runs: dict[str, Callable[[], list[FaultRow]]] = {
        "half-checkpoint": lambda: half_checkpoint(work, test),
        "killed-ingest": lambda: killed_ingest(work, test),
        "lost-node": lambda: lost_node(work, test),
        "killed-worker": lambda: killed_worker(work, test),
        "s3": lambda: s3(work, test, a.rate, a.kinds, a.read_timeout),
    }
    sys.exit(conclude(runs[a.drill]))


if __name__ == "__main__":
    main()
