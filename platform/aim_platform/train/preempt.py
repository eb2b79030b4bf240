"""Preemption: SIGTERM (a Kubernetes pod deleted, a spot node reclaimed, ``ray job stop``)
stops a run at the next step boundary with a checkpoint, within ``train.preempt_grace_s``.

Who hears the signal and how the ranks agree:

- the driver (``aimctl pretrain``, a submitted job's entrypoint): :class:`DriverPreemption`
  replaces the handler ``ray.init`` installs (``sys.exit``) with one that only records the
  request; a thread of the driver posts it to a :class:`StopBoard` actor;
- a Ray Train worker process: Ray's worker installs a handler that exits the process
  (``SystemExit`` on its main thread); :func:`install_worker_handler` replaces it, from the
  worker's main thread, with one that sets a flag of this module (a second SIGTERM still
  exits the old way);
- at every step boundary each rank says whether it was signalled (rank 0 adds whether the
  driver asked, read without waiting from the board) and one tiny all-reduce
  (:class:`StepVote`) gives every rank the same answer: all of them checkpoint at the same
  step, ``latest.json`` is written as usual (after every rank's upload), and the loop ends
  without exporting a final trunk.

The driver then reports "preempted" (console line, MLflow status ``KILLED`` with the tag
``preempted=true``, exit code :data:`EXIT_CODE`). If the checkpoint is not done within
``preempt_grace_s`` of the signal (a slow upload), the driver says so and stops anyway
(:class:`GaveUp`): ``latest.json`` still names the previous complete checkpoint.
"""

from __future__ import annotations

import _thread
import asyncio
import contextlib
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from aim_platform.errors import PlatformError

#: Exit status of a preempted run: ``EX_TEMPFAIL`` of sysexits.h ("try again later"), distinct
#: from a failure (1), a bad input (2) and a death by SIGTERM without a word (143).
EXIT_CODE = 75
#: The MLflow status of a preempted run: stopped from outside, neither completed (FINISHED)
#: nor crashed (FAILED); a run resumed by name continues it and ends FINISHED.
MLFLOW_STATUS = "KILLED"
POLL_S = 0.5

_signalled = threading.Event()  # this process got SIGTERM (worker side)


class GaveUp(KeyboardInterrupt):  # noqa: N818 - a stop, like Ctrl+C, not an error
    """Raised in the driver's main thread when the checkpoint of a preemption did not finish
    within ``train.preempt_grace_s`` (or a second SIGTERM came): the run stops without it.

    A ``KeyboardInterrupt``: no ``except Exception`` on the way out of ``fit`` mistakes it
    for a failed training to restart, and a ``ray.get`` that waits in the main thread turns
    what a signal handler raises into a plain ``KeyboardInterrupt`` (anything else it drops):
    catch ``KeyboardInterrupt`` and read :attr:`DriverPreemption.gave_up`.
    """


class Preempted(PlatformError):
    """The run stopped because of SIGTERM; the message is the console line (where it
    stopped, whether the checkpoint is in, the step a run of the same config resumes from).

    Attributes:
        result: What the run produced up to the stop (a
            :class:`~aim_platform.jobs.pretrain_outputs.PretrainResult`).
    """

    def __init__(self, line: str, result: Any) -> None:
        super().__init__(line)
        self.result = result


def signalled() -> bool:
    """Whether this process received SIGTERM (see :func:`install_worker_handler`)."""
    return _signalled.is_set()


def _install_here() -> None:
    """Replace this process's SIGTERM handler (main thread only): the first signal sets the
    flag, a second one goes to the previous handler (Ray's: the worker exits)."""
    previous = signal.getsignal(signal.SIGTERM)

    def on_sigterm(signum: int, frame: Any) -> None:
        if _signalled.is_set() and callable(previous):
            previous(signum, frame)
            return
        _signalled.set()

    signal.signal(signal.SIGTERM, on_sigterm)


def install_worker_handler() -> None:
    """From a Ray Train worker's training thread: install the flag-setting SIGTERM handler on
    the worker's main thread (signal handlers can only be set there; Ray Train runs the
    training function in another thread and keeps the main thread free for its own calls).

    Ray Train's worker actor runs a function on its main thread with ``execute``; calling it
    on this very actor from the training thread does that.
    """
    import ray

    if threading.current_thread() is threading.main_thread():
        _install_here()
        return
    actor = ray.get_runtime_context().current_actor
    ray.get(actor.execute.remote(_install_here))


class StopBoard:
    """Ray actor body (an async actor): the driver's stop request and rank 0's account of
    the stop.

    Rank 0 learns of the request without asking at every step: it calls
    :meth:`wait_for_request` once, and the answer arrives when the driver asks to stop; at
    each step boundary it only looks whether that answer is there (``ray.wait``, no wait).
    """

    def __init__(self) -> None:
        self.requested = asyncio.Event()
        self.stop: dict[str, Any] = {}

    async def request(self) -> None:
        """The driver got SIGTERM."""
        self.requested.set()

    async def wait_for_request(self) -> bool:
        """Returns (True) once the driver asked to stop."""
        await self.requested.wait()
        return True

    async def stopping(self, step: int, who: str) -> None:
        """Rank 0: every rank agreed to stop after ``step`` (``who`` got the signal)."""
        self.stop = {"step": step, "who": who, "since": time.time()}

    async def saved(self, step: int, seconds: float) -> None:
        """Rank 0: the checkpoint of ``step`` is complete and ``latest.json`` names it."""
        self.stop.update(saved_step=step, seconds=seconds)

    async def get(self) -> dict[str, Any]:
        return dict(self.stop)


def create_stop_board() -> Any:
    """A :class:`StopBoard` actor on this driver's node (no CPU reserved)."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=True)
    return ray.remote(num_cpus=0, scheduling_strategy=here)(StopBoard).remote()


@dataclass
class Stop:
    """What the ranks agreed at a step boundary: who asked to stop."""

    driver: bool = False
    ranks: list[int] = field(default_factory=list)

    def who(self) -> str:
        """``the driver``, ``rank 1``, ``the driver, rank 0``: who got SIGTERM."""
        parts = (["the driver"] if self.driver else []) + [f"rank {r}" for r in self.ranks]
        return ", ".join(parts)


class StepVote:
    """At each step boundary: should the run stop? Collective: every rank calls it once per
    step, and every rank gets the same answer.

    Rank 0 looks, without waiting, whether the driver's request has come (the answer to its
    one :meth:`StopBoard.wait_for_request` call); each rank adds its own SIGTERM flag; one
    all-reduce of ``world + 1`` numbers gives everyone the result (a few microseconds on
    GPUs, well under a millisecond on gloo).
    """

    def __init__(self, board: Any, rank: int, world: int, device: Any) -> None:
        self.board = board if rank == 0 else None
        self.rank, self.world, self.device = rank, world, device
        self._pending: Any = None
        self._driver_asked = False

    def _driver(self) -> bool:
        if self.board is None or self._driver_asked:
            return self._driver_asked
        import ray

        if self._pending is None:
            self._pending = self.board.wait_for_request.remote()
        ready, _ = ray.wait([self._pending], timeout=0)
        if ready:
            try:
                self._driver_asked = bool(ray.get(self._pending))
            except Exception:  # noqa: BLE001 - a board gone: no request will come from it
                self.board = None
        return self._driver_asked

    def __call__(self) -> Stop | None:
        from aim_platform.train.trainer import all_reduce_sum

        flags = [0.0] * (self.world + 1)  # one slot a rank, the last one the driver's
        flags[self.rank] = 1.0 if signalled() else 0.0
        flags[self.world] = 1.0 if self._driver() else 0.0
        flags = all_reduce_sum(flags, self.device)
        if not any(flags):
            return None
        return Stop(driver=flags[-1] > 0, ranks=[r for r in range(self.world) if flags[r] > 0])


class DriverPreemption:
    """The driver's side: its SIGTERM handler, and a thread that passes the request to the
    workers (through the :class:`StopBoard`) and enforces ``grace_s``.

    Args:
        grace_s: How long the checkpoint may take from the signal (from rank 0's account of
            the stop when only a worker was signalled).
        say: Where the lines for the user go (the console).
    """

    def __init__(self, grace_s: float, say: Callable[[str], None]) -> None:
        self.grace_s, self.say = grace_s, say
        self.board: Any = None
        self.requested_at: float | None = None  # monotonic time of the driver's SIGTERM
        self.stop: dict[str, Any] = {}  # rank 0's account (see StopBoard)
        self.gave_up: str | None = None  # why the run stops without a checkpoint
        self._done = threading.Event()
        self._wake = threading.Event()  # the watcher looks now (a signal, the end)
        self._handler = False  # the SIGTERM handler is this object's (in the main thread)
        self._previous: Any = None
        self._thread: threading.Thread | None = None

    @property
    def active(self) -> bool:
        """A preemption is under way (the driver or a worker got SIGTERM)."""
        return self.requested_at is not None or bool(self.stop)

    def _on_sigterm(self, signum: int, frame: Any) -> None:
        if self.gave_up:  # the watcher's interrupt: leave fit() now
            raise GaveUp(self.gave_up)
        if self.requested_at is not None:  # a second SIGTERM: stop now, without waiting
            self.gave_up = "a second SIGTERM"
            raise GaveUp(self.gave_up)
        self.requested_at = time.monotonic()
        self._wake.set()

    def start(self) -> None:
        """Handle SIGTERM from now on (the handler only from the main thread) until
        :meth:`close`."""
        self._handler = threading.current_thread() is threading.main_thread()
        if self._handler:
            self._previous = signal.signal(signal.SIGTERM, self._on_sigterm)
        self._thread = threading.Thread(target=self._watch, name="aim-preempt", daemon=True)
        self._thread.start()

    def close(self) -> None:
        """Stop watching; the SIGTERM handler before :meth:`start` is back."""
        self._done.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        if self._handler:
            signal.signal(signal.SIGTERM, self._previous)
            self._handler = False

    def refresh(self) -> dict[str, Any]:
        """Rank 0's account of the stop, read from the board (kept when it does not answer)."""
        if self.board is None:
            return self.stop
        import ray

        with contextlib.suppress(Exception):  # a board gone: what was read before stands
            self.stop = ray.get(self.board.get.remote(), timeout=5) or self.stop
        return self.stop

    def _watch(self) -> None:
        told = seen = False
        while not self._done.is_set():
            self._wake.wait(POLL_S)
            self._wake.clear()
            if self._done.is_set():
                return
            if self.requested_at is not None and not told:
                told = True
                if self.board is not None:
                    self.board.request.remote()
                self.say(
                    f"SIGTERM: saving a checkpoint at the next step boundary (within "
                    f"{self.grace_s:g} s, train.preempt_grace_s), then stopping"
                )
            stop = self.refresh()
            if stop and not seen:
                seen = True
                if self.requested_at is None:  # only a worker got it
                    self.say(
                        f"SIGTERM to {stop['who']}: saving a checkpoint of step {stop['step']} "
                        f"(within {self.grace_s:g} s, train.preempt_grace_s), then stopping"
                    )
            if "saved_step" in stop:
                continue  # the checkpoint is in: fit() returns on its own
            since = self.requested_at
            if since is None and stop:  # only a worker got the signal: from rank 0's word
                since = time.monotonic() - max(0.0, time.time() - stop["since"])
            if since is not None and time.monotonic() - since > self.grace_s:
                if self._done.is_set() or not self._handler:  # (a Tune trial: its own)
                    return
                self.gave_up = f"checkpoint not finished within {self.grace_s:g} s"
                _thread.interrupt_main(signal.SIGTERM)  # -> _on_sigterm raises GaveUp
                return

    def attach(self, board: Any) -> None:
        """The :class:`StopBoard` of the training about to start (a new one per restart)."""
        self.board = board
        if self.requested_at is not None:
            board.request.remote()
