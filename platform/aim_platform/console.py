"""What a person sees in the terminal: one progress display per phase, then a summary.

Everything else a run prints (Ray's worker logs, Ray Data plans, library warnings, the C++
core's lines on file descriptor 2) goes to a log file whose path is printed;
``--verbose`` shows it live instead. In a terminal the display redraws in place (rich); in a
log (a Ray job, CI) it prints one line per logged step instead.
"""

from __future__ import annotations

import contextlib
import io
import os
import sys
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from rich.console import Console
from rich.live import Live
from rich.table import Table

# Library warnings we cannot fix at their source, silenced by exact message (our own
# warnings are fixed where they are raised).
LIBRARY_WARNINGS = (
    # FSDP2 on a root whose forward returns a view of a Linear's output: nothing modifies it.
    r"FSDP2-wrapped module .* returned a view",
)


def filter_library_warnings() -> None:
    """Silence :data:`LIBRARY_WARNINGS` in this process (and, inherited, in Ray workers)."""
    for message in LIBRARY_WARNINGS:
        warnings.filterwarnings("ignore", message=message)


def _terminal_stream() -> IO[str]:
    """A stream to what stdout is now, that survives redirecting file descriptors 1 and 2."""
    try:
        fd = sys.stdout.fileno()
    except (AttributeError, io.UnsupportedOperation, ValueError):
        return sys.stdout  # an in-memory stdout (a test runner): it is not a descriptor
    return os.fdopen(os.dup(fd), "w", buffering=1, closefd=True)


@contextlib.contextmanager
def captured_output(log_file: Path | None) -> Iterator[Console]:
    """Send this process's stdout and stderr (Python and file descriptors) to ``log_file``;
    yield a :class:`Console` that still writes to the terminal.

    Args:
        log_file: where the rest goes; None (``--verbose``) leaves everything on screen.
    """
    if log_file is None:
        yield Console(soft_wrap=True)
        return
    log_file.parent.mkdir(parents=True, exist_ok=True)
    term = _terminal_stream()
    console = Console(file=term, soft_wrap=True)
    sys.stdout.flush()
    sys.stderr.flush()
    saved_fds = [os.dup(1), os.dup(2)]
    saved_streams = (sys.stdout, sys.stderr)
    with open(log_file, "a", buffering=1) as log:
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
        # Streams over the descriptors, not the log file itself: a logging handler made in
        # here (Ray makes one on import) keeps its stream, which must not be a file that is
        # closed below; these follow descriptors 1 and 2 back to the terminal.
        out = open(1, "w", buffering=1, closefd=False)  # never closed
        err = open(2, "w", buffering=1, closefd=False)
        sys.stdout, sys.stderr = out, err
        try:
            yield console
        finally:
            out.flush()
            err.flush()
            log.flush()
            sys.stdout, sys.stderr = saved_streams
            for fd, saved in zip((1, 2), saved_fds, strict=True):
                os.dup2(saved, fd)
                os.close(saved)
            if term is not saved_streams[0]:
                term.flush()


def log_path(folder: Path, kind: str) -> Path:
    """``<folder>/logs/<kind>-<YYYYmmdd-HHMMSS>.log``."""
    return folder / "logs" / f"{kind}-{time.strftime('%Y%m%d-%H%M%S')}.log"


def _duration(seconds: float) -> str:
    seconds = int(max(0, seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


@dataclass
class _Rate:
    """Steps per second since training (not start-up) began, for the ETA."""

    t0: float | None = None
    step0: int = 0

    def eta(self, step: int, total: int) -> float | None:
        now = time.monotonic()
        if self.t0 is None:
            self.t0, self.step0 = now, step
            return None
        done = step - self.step0
        if done <= 0:
            return None
        return (total - step) * (now - self.t0) / done


class TrainDisplay:
    """Pre-training progress: step/total, loss, images/s, MFU, data wait, ETA.

    Call :meth:`update` with each :class:`~aim_platform.train.progress.Snapshot` (from any
    thread); :meth:`close` at the end. In a terminal a live line redraws in place; elsewhere
    a line is printed each time new logged metrics arrive.
    """

    def __init__(
        self, console: Console, name: str, total: int, tracking_uri: str | None = None
    ) -> None:
        self.console, self.name, self.total = console, name, total
        self.started = time.monotonic()
        self.rate = _Rate()
        self.last_printed: tuple[int, tuple[Any, ...]] | None = None
        self.live: Live | None = None
        self.snap: Any = None
        self.tracking = TrackingNotices(console, tracking_uri)
        if console.is_terminal:
            self.live = Live(
                self._render(),
                console=console,
                refresh_per_second=4,
                redirect_stdout=False,  # other output goes to the log, not above the bar
                redirect_stderr=False,
            )
            self.live.start()

    def line(self) -> str:
        """The progress line for the latest snapshot."""
        snap = self.snap
        if snap is None or snap.phase == "starting":
            return f"{self.name}: starting Ray workers and the data pipeline " + (
                f"({_duration(time.monotonic() - self.started)})"
            )
        m = snap.metrics
        parts = [f"step {snap.step}/{snap.total}"]
        if "train/loss" in m:
            parts.append(f"loss {m['train/loss']:.4f}")
        if "val/loss" in m:
            parts.append(f"val {m['val/loss']:.4f}")
        if "perf/images_per_s" in m:
            parts.append(f"{m['perf/images_per_s']:.0f} img/s")
        if "perf/mfu" in m:
            parts.append(f"MFU {100 * m['perf/mfu']:.1f}%")
        if "perf/data_wait_fraction" in m:
            parts.append(f"data wait {100 * m['perf/data_wait_fraction']:.0f}%")
        eta = self.rate.eta(snap.step, snap.total)
        if eta is not None and snap.step < snap.total:
            parts.append(f"ETA {_duration(eta)}")
        status = getattr(snap, "tracking", None)
        if status is not None and status.down:
            parts.append(
                f"MLflow down since {_clock(status.down_since)}, {status.buffered} buffered"
            )
        return f"{self.name}: " + " | ".join(parts)

    def _render(self) -> Table:
        from rich.progress_bar import ProgressBar

        grid = Table.grid(padding=(0, 1))
        snap = self.snap
        done = snap.step if snap is not None else 0
        grid.add_row(ProgressBar(total=max(1, self.total), completed=done, width=30), self.line())
        return grid

    def update(self, snap: Any) -> None:
        self.snap = snap
        self.tracking.update(getattr(snap, "tracking", None))
        if self.live is not None:
            self.live.update(self._render())
            return
        key = (snap.step, tuple(sorted(snap.metrics.items())))
        if (
            snap.phase == "training"
            and snap.metrics
            and (self.last_printed is None or key[1] != self.last_printed[1])
        ):
            self.console.print(self.line(), markup=False, highlight=False)
            self.last_printed = key

    def notice(self, text: str) -> None:
        """A line about the run outside the steps (a lost node, a restart), kept on screen."""
        self.console.print(f"{self.name}: {text}", markup=False, highlight=False)

    def close(self) -> None:
        if self.live is not None:
            self.live.update(self._render())
            self.live.stop()
            self.live = None


def _clock(t: float | None) -> str:
    return time.strftime("%H:%M:%S", time.localtime(t if t is not None else time.time()))


def _reason(error: str) -> str:
    """A short why from a client's error line (MLflow's name the whole request)."""
    for needle, reason in (
        ("refused", "connection refused"),
        ("timed out", "timed out"),
        ("timeout", "timed out"),
        ("Max retries", "no answer"),
    ):
        if needle in error:
            return reason
    return error[:120]


class TrackingNotices:
    """One line when MLflow stops answering (since when, how much is buffered), one when it
    answers again, one when the buffer starts dropping: said once each, above the progress
    display, whatever the terminal.

    Args:
        console: Where to print.
        uri: The tracking server, named in the lines (None: not named).
    """

    def __init__(self, console: Console, uri: str | None = None) -> None:
        self.console = console
        self.where = f"MLflow at {uri}" if uri else "MLflow"
        self.down_since: float | None = None
        self.dropped = 0

    def update(self, status: Any) -> None:
        """``status``: rank 0's :class:`~aim_platform.outbox.OutboxStatus`, or None."""
        if status is None:
            return
        if status.down and self.down_since != status.down_since:
            self.down_since = status.down_since
            self._say(
                f"{self.where} unreachable since {_clock(status.down_since)} "
                f"({_reason(status.last_error)}): training goes on; {status.buffered} writes "
                "buffered so far, written in order once it answers"
            )
        elif not status.down and self.down_since is not None:
            back = status.last_up or time.time()
            took = _duration(back - self.down_since)
            self.down_since = None
            rest = (
                f"{status.buffered} buffered writes still going in, in order"
                if status.buffered
                else "every buffered write went in, in order"
            )
            self._say(f"{self.where} answers again since {_clock(back)} (down {took}): {rest}")
        if status.dropped and not self.dropped:
            self._say(
                f"{self.where}: the buffer is full, writes are being dropped "
                f"({status.dropped} so far; counted as tracking/dropped_writes)"
            )
        self.dropped = status.dropped

    def _say(self, text: str) -> None:
        self.console.print(text, markup=False, highlight=False)


class StudyDisplay:
    """A study's trials, one row each: variant, state, step, loss, probe accuracy.

    :meth:`trial` is called by the study (from Tune's driver loop) on every state change and
    result. In a terminal the table redraws in place; elsewhere (a log, a submitted job) each
    state change is a line, and so is a running trial's first result past each quarter of the
    steps.
    """

    COLUMNS = ("trial", "state", "step", "train/loss", "val/loss", "linear", "attentive")

    def __init__(self, console: Console, name: str, variants: list[str], total_steps: int):
        self.console, self.name, self.total = console, name, total_steps
        self.rows: dict[str, dict[str, Any]] = {v: {"state": "pending"} for v in variants}
        self.quarters: dict[str, int] = {}  # the last quarter of the steps printed, per trial
        self.live: Live | None = None
        if console.is_terminal:
            self.live = Live(
                self.table(),
                console=console,
                refresh_per_second=2,
                redirect_stdout=False,
                redirect_stderr=False,
            )
            self.live.start()

    def table(self) -> Table:
        table = Table(title=f"study {self.name}", title_justify="left")
        for col in self.COLUMNS:
            table.add_column(col, justify="left" if col in ("trial", "state") else "right")
        for variant, row in self.rows.items():
            table.add_row(variant, *self._cells(row))
        return table

    def _cells(self, row: dict[str, Any]) -> list[str]:
        def num(key: str, fmt: str) -> str:
            value = row.get(key)
            return format(value, fmt) if isinstance(value, int | float) else "-"

        def pct(key: str) -> str:
            value = row.get(key)
            return f"{100 * value:.1f}%" if isinstance(value, int | float) else "-"

        step = f"{int(row['step'])}/{self.total}" if "step" in row else "-"
        return [
            row["state"],
            step,
            num("train/loss", ".4f"),
            num("val/loss", ".4f"),
            pct("probe/linear/top1"),
            pct("probe/attentive/top1"),
        ]

    def trial(self, variant: str, state: str, metrics: dict[str, Any] | None = None) -> None:
        row = self.rows.setdefault(variant, {"state": "pending"})
        changed = state != row["state"]
        row["state"] = state
        row.update({k: v for k, v in (metrics or {}).items() if isinstance(v, int | float)})
        quarter = int(4 * row["step"] / self.total) if "step" in row and self.total > 0 else 0
        further = state == "running" and 0 < quarter < 4 and quarter > self.quarters.get(variant, 0)
        if self.live is not None:
            self.live.update(self.table())
        elif changed or further:
            self.quarters[variant] = quarter
            cells = dict(zip(self.COLUMNS[1:], self._cells(row), strict=True))
            shown = ", ".join(f"{k} {v}" for k, v in cells.items() if v != "-" and k != "state")
            text = f"trial {variant}: {state}" + (f" ({shown})" if shown else "")
            self.console.print(text, markup=False, highlight=False)

    def close(self) -> None:
        if self.live is not None:
            self.live.update(self.table())
            self.live.stop()
            self.live = None


class PhaseDisplay:
    """One line per phase of a job (``features: train split``, ``training probes``, ...):
    a spinner whose text changes in a terminal, a printed line per phase elsewhere."""

    def __init__(self, console: Console, first: str) -> None:
        self.console = console
        self.status = console.status(first) if console.is_terminal else None
        if self.status is not None:
            self.status.start()
        else:
            console.print(first, markup=False, highlight=False)

    def phase(self, text: str) -> None:
        if self.status is not None:
            self.status.update(text)
        else:
            self.console.print(text, markup=False, highlight=False)

    def close(self) -> None:
        if self.status is not None:
            self.status.stop()
            self.status = None
