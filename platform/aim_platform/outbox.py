"""A bounded, ordered outbox drained by one background thread: writes to a service that may be
down (MLflow) leave the caller at once, and none is lost without being counted.

- :meth:`Outbox.put` never blocks: the write joins the queue or, when ``capacity`` writes are
  already waiting, is dropped and counted (``essential`` writes, e.g. a run's end, are never
  dropped).
- One thread applies the writes in order. A write that fails with a *transient* error (the
  service unreachable) is tried again, the same write first, after a back-off that doubles
  from ``min_wait`` to ``max_wait`` seconds; from the first such failure the outbox is *down*
  (since when, how much is buffered) until a write gets through. A write the service refuses
  for good is counted as failed and skipped, so that one bad write cannot hold up the rest;
  ``describe`` names it (e.g. an artifact's path and the store's answer), once, in
  :attr:`OutboxStatus.refused`.
- :meth:`close` waits for the queue to empty, up to a time limit, stops the thread and returns
  what is left, so that the caller can say what could not be written, or hand it on.

Writes must be idempotent (MLflow's are: a metric point carries its own timestamp, params,
tags and artifacts overwrite with the same value), since a write whose answer was lost is
tried again.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

W = TypeVar("W")


@dataclass(frozen=True)
class OutboxStatus:
    """What an outbox has done so far, and what it holds.

    Attributes:
        buffered: Writes waiting (the one being tried included).
        written: Writes that got through.
        dropped: Writes refused because ``capacity`` writes were waiting.
        failed: Writes the service refused for good (see ``last_error``).
        down_since: Wall-clock time (``time.time()``) of the first failed try of the current
            outage; None while the service answers.
        outages: How many times the service became unreachable.
        down_seconds: Total time of the outages that ended.
        first_down: When the first outage began (``time.time()``), None if none did.
        last_up: When the last outage that ended, ended.
        last_error: The last error, one line.
        refused: The writes refused for good that ``describe`` named, each once, in order.
        waiting: A copy of the writes waiting, in order, when :meth:`Outbox.status` was asked
            for it and they were few enough (else empty): what another process makes should
            this one end before it can hand its queue over.
    """

    buffered: int = 0
    written: int = 0
    dropped: int = 0
    failed: int = 0
    down_since: float | None = None
    outages: int = 0
    down_seconds: float = 0.0
    first_down: float | None = None
    last_up: float | None = None
    last_error: str = ""
    refused: tuple[str, ...] = ()
    waiting: tuple[Any, ...] = ()

    @property
    def down(self) -> bool:
        return self.down_since is not None

    @property
    def unwritten(self) -> int:
        """Writes that did not get through: left in the queue, dropped or refused."""
        return self.buffered + self.dropped + self.failed


def one_line(exc: BaseException, limit: int = 300) -> str:
    """``Type: first line of the message`` (cut to ``limit`` characters)."""
    first = (str(exc).strip().splitlines() or [""])[0]
    text = f"{type(exc).__name__}: {first}" if first else type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


class Outbox(Generic[W]):
    """A queue of writes of type ``W`` applied in order by a daemon thread.

    Args:
        apply: Performs one write (raises when it does not get through).
        transient: Whether an error means "try the same write again later" (unreachable,
            timed out, busy) rather than "refused for good".
        capacity: Most writes waiting at once; more are dropped and counted.
        min_wait: First back-off after a transient failure, seconds.
        max_wait: Longest back-off, seconds (how soon a returning service is noticed).
        name: The thread's name.
        describe: Names a write refused for good, from the write and its error (None: it is
            counted in ``failed`` only).
    """

    def __init__(
        self,
        apply: Callable[[W], None],
        *,
        transient: Callable[[BaseException], bool],
        capacity: int = 10_000,
        min_wait: float = 0.5,
        max_wait: float = 5.0,
        name: str = "outbox",
        describe: Callable[[W, BaseException], str | None] | None = None,
    ) -> None:
        if capacity < 1:
            raise ValueError(f"capacity: {capacity} must be at least 1")
        self._apply = apply
        self._transient = transient
        self._describe = describe
        self._refused: list[str] = []
        self.capacity = capacity
        self._min_wait, self._max_wait = min_wait, max_wait
        self._queue: deque[W] = deque()
        self._cond = threading.Condition()
        self._closed = False
        self._written = self._dropped = self._failed = self._outages = 0
        self._down_since: float | None = None
        self._first_down: float | None = None
        self._last_up: float | None = None
        self._down_seconds = 0.0
        self._last_error = ""
        self._thread = threading.Thread(target=self._drain, name=name, daemon=True)
        self._thread.start()

    def put(self, write: W, *, essential: bool = False) -> bool:
        """Queue ``write``; False when it was dropped (the queue full, or closed)."""
        with self._cond:
            if self._closed or (len(self._queue) >= self.capacity and not essential):
                self._dropped += 1
                return False
            self._queue.append(write)
            self._cond.notify_all()
            return True

    def status(self, copy: int = 0) -> OutboxStatus:
        """A snapshot of the counters (cheap; safe from any thread), with a copy of the waiting
        writes when there are at most ``copy`` of them."""
        with self._cond:
            return OutboxStatus(
                buffered=len(self._queue),
                written=self._written,
                dropped=self._dropped,
                failed=self._failed,
                down_since=self._down_since,
                outages=self._outages,
                down_seconds=self._down_seconds,
                first_down=self._first_down,
                last_up=self._last_up,
                last_error=self._last_error,
                refused=tuple(self._refused),
                waiting=tuple(self._queue) if len(self._queue) <= copy else (),
            )

    def flush(self, timeout: float, *, until_down: bool = False) -> bool:
        """Wait until every queued write got through or was refused, at most ``timeout``
        seconds (``until_down``: or until the service is found unreachable); True when the
        queue is empty."""
        with self._cond:
            self._cond.wait_for(
                lambda: (
                    not self._queue or self._closed or (until_down and self._down_since is not None)
                ),
                timeout=timeout,
            )
            return not self._queue

    def close(self, timeout: float) -> tuple[OutboxStatus, list[W]]:
        """Flush for at most ``timeout`` seconds, then stop: no write is tried after this.

        Returns:
            The final status and the writes that did not get through, in order (a write
            being tried at that moment is among them: it may still land, harmlessly, since
            writes are idempotent).
        """
        self.flush(timeout)
        with self._cond:
            self._closed = True
            left = list(self._queue)
            self._cond.notify_all()
        return self.status(), left

    def _drain(self) -> None:
        wait = self._min_wait
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._queue or self._closed)
                if self._closed:
                    return
                write = self._queue[0]
            try:
                self._apply(write)
            except Exception as exc:  # noqa: BLE001 - every failure is counted, none escapes
                transient = self._transient(exc)
                label = None if transient or self._describe is None else self._describe(write, exc)
                with self._cond:
                    self._last_error = one_line(exc)
                    if self._closed:
                        return
                    if transient:
                        if self._down_since is None:
                            self._down_since = time.time()
                            self._first_down = self._first_down or self._down_since
                            self._outages += 1
                        self._cond.notify_all()
                        self._cond.wait_for(lambda: self._closed, timeout=wait)
                    else:
                        self._queue.popleft()
                        self._failed += 1
                        if label:
                            self._refused.append(label)
                        self._cond.notify_all()
                if transient:
                    wait = min(2 * wait, self._max_wait)
                continue
            with self._cond:
                if self._closed:  # handed back by close(): the caller owns it now
                    return
                self._queue.popleft()
                self._written += 1
                if self._down_since is not None:
                    self._last_up = time.time()
                    self._down_seconds += self._last_up - self._down_since
                    self._down_since = None
                self._cond.notify_all()
            wait = self._min_wait
