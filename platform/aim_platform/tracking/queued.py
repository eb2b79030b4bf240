"""The queue a tracker's writes wait in: how a write is queued, applied, flushed and handed on.

A background tracker puts each write in a bounded, ordered :class:`~aim_platform.outbox.Outbox`
drained by a thread, so that a write returns at once whether or not the server answers; while
it does not, the writes wait (and the thread tries again), a full queue drops and counts, and
:meth:`QueuedWriter.close` ends with a time limit and says what could not be written. A
synchronous call (a read, a run's creation) first waits for the queue, and fails with one line
at once while the server is known to be down.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, TypeVar

from aim_platform.outbox import Outbox, OutboxStatus, one_line
from aim_platform.tracking.faults import TrackingUnavailable, is_unreachable, use_client_defaults

#: Writes a background tracker holds while the server does not answer; more are dropped and
#: counted (a job's ``tracking.buffer_size`` overrides it).
BUFFER_SIZE = 10_000
#: How long the end of a command waits for the queued writes (``tracking.flush_timeout_s``).
FLUSH_TIMEOUT_S = 60.0

T = TypeVar("T")


@dataclass(frozen=True)
class Write:
    """One queued write: ``Tracker._<method>(*args)``, applied by the outbox's thread. Plain
    data, so that rank 0 can hand what it could not write to the driver."""

    method: str
    args: tuple[Any, ...]


class QueuedWriter:
    """Writes as :class:`Write` records, applied now or queued; reads after the queue.

    Args:
        uri: The tracking URI (named in errors).
        background: Queue every write in an :class:`~aim_platform.outbox.Outbox` drained by a
            thread; otherwise apply it at once.
        buffer_size: Most writes queued at once (background only).
        flush_timeout: Longest wait for the queue, before a read and in :meth:`close`.
    """

    def __init__(
        self,
        uri: str,
        *,
        background: bool = False,
        buffer_size: int = BUFFER_SIZE,
        flush_timeout: float = FLUSH_TIMEOUT_S,
    ) -> None:
        use_client_defaults()
        self.uri = uri
        self.flush_timeout = flush_timeout
        self._outbox: Outbox[Write] | None = None
        if background:
            self._outbox = Outbox(
                self._apply,
                transient=is_unreachable,
                capacity=buffer_size,
                name="aim-mlflow",
                describe=self._describe,
            )

    def _apply(self, write: Write) -> None:
        """Perform one write (a subclass method named by ``write.method``)."""
        getattr(self, write.method)(*write.args)

    def _describe(self, write: Write, exc: BaseException) -> str | None:
        """The name of a write refused for good, for the summary (None: counted only)."""
        return None

    def _write(self, method: str, *args: Any, essential: bool = False) -> None:
        write = Write(method, args)
        if self._outbox is None:
            self._apply(write)
        else:
            self._outbox.put(write, essential=essential)

    def enqueue(self, writes: Iterable[Write]) -> None:
        """Queue writes handed over by another process (rank 0's leftovers), never dropped."""
        for write in writes:
            if self._outbox is None:
                self._apply(write)
            else:
                self._outbox.put(write, essential=True)

    def status(self, copy: int = 0) -> OutboxStatus:
        """The queue's counters (all zero for a synchronous tracker), with a copy of the
        waiting writes when there are at most ``copy`` of them."""
        return self._outbox.status(copy) if self._outbox is not None else OutboxStatus()

    def flush(self, timeout: float | None = None) -> bool:
        """Wait up to ``timeout`` seconds (default ``flush_timeout``) for the queued writes;
        True when every one got through (or was refused)."""
        if self._outbox is None:
            return True
        return self._outbox.flush(self.flush_timeout if timeout is None else timeout)

    def close(self, timeout: float | None = None) -> tuple[OutboxStatus, list[Write]]:
        """Wait up to ``timeout`` seconds (default ``flush_timeout``) for the queued writes,
        then stop the queue.

        Returns:
            The queue's final status and the writes that did not get through, in order.
        """
        if self._outbox is None:
            return OutboxStatus(), []
        return self._outbox.close(self.flush_timeout if timeout is None else timeout)

    def _call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """A synchronous call to MLflow: after this tracker's queued writes; an unreachable
        server raises :class:`TrackingUnavailable` (one line) instead of MLflow's error."""
        if self._outbox is not None and not self._outbox.flush(self.flush_timeout, until_down=True):
            raise self._unavailable(self._outbox.status())
        try:
            return fn(*args, **kwargs)
        except TrackingUnavailable:
            raise
        except Exception as exc:
            if is_unreachable(exc):
                raise TrackingUnavailable(
                    f"MLflow at {self.uri} does not answer ({one_line(exc, 160)}); start it "
                    "(`aimctl services up`) or set tracking.tracking_uri / MLFLOW_TRACKING_URI"
                ) from None
            raise

    def _unavailable(self, state: OutboxStatus) -> TrackingUnavailable:
        since = time.strftime("%H:%M:%S", time.localtime(state.down_since or time.time()))
        return TrackingUnavailable(
            f"MLflow at {self.uri} unreachable since {since} ({state.buffered} writes waiting)"
        )
