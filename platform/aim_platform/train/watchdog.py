"""Hung ranks end: a rank that makes no step for ``train.step_timeout_s`` ends its process.

A rank stuck in a read that never returns (a stuck NFS mount, a dead NIC) leaves the other
ranks waiting in a collective, by default for the backend's 30-minute timeout, with nothing on
the console. Every rank runs a :class:`StepWatchdog`: the training loop beats when a batch
arrives and when a step is done, and pauses it around validation, checkpoints and the final
export (which have no step rhythm). A rank whose last beat is older than the timeout reports
itself (rank, node, the step it was in, when it last beat) to the driver's progress board,
waits a few seconds and ends its process: Ray Train sees a failed worker, the other ranks'
collectives fail at once (their peer is gone), and the job restarts from its last checkpoint
(``train.max_failures``).

When one rank hangs, the others block in the step's collectives soon after, and their
watchdogs would fire too, at nearly the same moment: naming the first to fire could point a
user at a healthy rank (a fresh-clone run did: rank 0, blocked waiting for a sleeping rank 1,
fired first because its handle to the board was already warm). So each beat says where the
rank is going next: to read its next batch (``holding_batch=False``: a stuck read hangs
here) or into a step with its batch in hand (``holding_batch=True``: from here it waits only
on its peers' collectives). A rank in a step waits ``defer_s`` longer before it fires, long
enough for the rank that hung to report and end (which fails the waiting rank's collective
anyway); the board prefers a report from a rank that was reading over one from a rank in a
step, and of two alike, the older last beat. Every rank warms its handle to the board when it
starts (:func:`aim_platform.train.loop._watchdog`), so a report is not slowed by a first call.

Fault drills and tests make a rank hang with ``AIM_FAULT_HANG=RANK:STEP:MARKER`` in the job's
environment (:func:`maybe_hang`): that rank sleeps at that step once (while ``MARKER`` does
not exist; it is created first).
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

EXIT_HUNG = 124  # the worker process's exit code when its watchdog ends it
HANG_ENV = "AIM_FAULT_HANG"
REPORT_TIMEOUT_S = 10.0  # how long a rank waits for the board to take its report
READING = "waiting for its next batch"  # where a stuck read (NFS, a dead NIC) hangs
IN_STEP = "in a step, waiting on the other ranks"  # batch in hand: only collectives block


class StepWatchdog:
    """Ends this process when no beat came for ``timeout_s`` seconds while armed.

    Args:
        timeout_s: ``train.step_timeout_s``.
        report: Called once, before the process ends, with what happened (rank, node,
            step, seconds, when it last beat): the driver's console line.
        grace_s: How long to wait after reporting before ending (at most half the timeout).
        defer_s: How much longer a rank in a step (its batch in hand) waits before it fires:
            by default long enough for a rank that hung reading to report and end first
            (at most the timeout).
        end: What ends the process (``os._exit``; a test passes its own).
    """

    def __init__(
        self,
        timeout_s: float,
        report: Callable[[dict[str, Any]], None],
        grace_s: float = 5.0,
        defer_s: float | None = None,
        end: Callable[[int], None] = os._exit,
    ) -> None:
        self.timeout_s = timeout_s
        self.report = report
        self.grace_s = min(grace_s, timeout_s / 2)
        default_defer = REPORT_TIMEOUT_S + 2 * self.grace_s
        self.defer_s = min(timeout_s, default_defer if defer_s is None else defer_s)
        self.step = 0
        self._holding = False  # since the last beat: in a step (True) or reading (False)
        self._last: float | None = None  # None: paused
        self._last_wall = 0.0
        self._end = end
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="aim-watchdog", daemon=True)
        self._thread.start()

    def beat(self, step: int, holding_batch: bool = False) -> None:
        """Progress at ``step``: the timer starts again. ``holding_batch``: a batch arrived
        and the rank goes into its step; otherwise it goes to read its next batch."""
        self.step = step
        self._holding = holding_batch
        self._last = time.monotonic()
        self._last_wall = time.time()

    def pause(self) -> None:
        """No step rhythm from here (validation, a checkpoint) until the next beat."""
        self._last = None

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _watch(self) -> None:
        poll = min(1.0, self.timeout_s / 10)
        while not self._stop.wait(poll):
            last, holding = self._last, self._holding
            limit = self.timeout_s + (self.defer_s if holding else 0.0)
            if last is None or time.monotonic() - last <= limit:
                continue
            what = {
                "step": self.step,
                "seconds": self.timeout_s,
                "last_beat": self._last_wall,
                "where": IN_STEP if holding else READING,
            }
            with contextlib.suppress(Exception):  # ending is what matters
                self.report(what)
                time.sleep(self.grace_s)  # the other ranks' reports of this moment arrive
            print(
                f"no step for {self.timeout_s:g} s after step {self.step} "
                "(train.step_timeout_s): ending this rank",
                file=sys.stderr,
                flush=True,
            )
            self._end(EXIT_HUNG)
            return


def maybe_hang(rank: int, step: int) -> None:
    """Fault injection for drills and tests: sleep here for an hour when ``AIM_FAULT_HANG``
    is ``RANK:STEP:MARKER`` for this rank and step and ``MARKER`` does not exist yet."""
    spec = os.environ.get(HANG_ENV)
    if not spec:
        return
    want_rank, want_step, marker = spec.split(":", 2)
    if (int(want_rank), int(want_step)) != (rank, step) or Path(marker).exists():
        return
    Path(marker).touch()
    time.sleep(3600)
