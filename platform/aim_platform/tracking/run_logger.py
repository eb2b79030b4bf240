"""Rank 0's writer: metrics into one existing run, and the run's system metrics."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from aim_platform.outbox import OutboxStatus
from aim_platform.tracking.queued import BUFFER_SIZE, Write
from aim_platform.tracking.system_metrics import SystemMetrics
from aim_platform.tracking.tracker import Tracker

#: Up to this many waiting writes ride along in each :meth:`RunLogger.status` (a step's metrics
#: are one or two): should rank 0 end before it hands its queue over, the driver makes them.
#: More are waiting only while MLflow is down; they are then counted as lost with the process.
STATUS_COPY = 16


class RunLogger:
    """Metrics into one existing run (rank 0 only), optionally with system metrics, through a
    background tracker: :meth:`log_metrics` never waits for the server."""

    def __init__(
        self,
        tracking_uri: str,
        run_id: str,
        *,
        system_metrics: bool = False,
        interval: float = 10.0,
        buffer_size: int = BUFFER_SIZE,
    ) -> None:
        self.tracker = Tracker(tracking_uri, background=True, buffer_size=buffer_size)
        self.run_id = run_id
        self.step = 0
        self._system = (
            SystemMetrics(tracking_uri, run_id, self.tracker.status, interval)
            if system_metrics
            else None
        )

    def log_metrics(self, metrics: Mapping[str, Any], step: int) -> None:
        self.step = step
        self.tracker.log_metrics(self.run_id, metrics, step)

    def status(self) -> OutboxStatus:
        """The queue's counters (down since when, buffered, dropped) and, when there are at
        most :data:`STATUS_COPY`, a copy of the writes waiting."""
        return self.tracker.status(copy=STATUS_COPY)

    def close(self, timeout: float | None = None) -> tuple[OutboxStatus, list[Write]]:
        """Stop the system-metrics sampling, wait up to ``timeout`` seconds for the queue;
        return its status and the writes left (to be handed on, e.g. to the driver)."""
        if self._system is not None:
            self._system.stop()
            self._system = None
        return self.tracker.close(timeout)
