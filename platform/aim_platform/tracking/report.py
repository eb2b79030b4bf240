"""What tracking delayed or lost over a job, as the summary says it and as result metrics."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from aim_platform.outbox import OutboxStatus

if TYPE_CHECKING:
    from aim_platform.tracking.tracker import Tracker

#: The metric that counts writes dropped because the queue was full.
DROPPED_METRIC = "tracking/dropped_writes"
#: The result metric that counts artifacts the artifact store refused for good.
REFUSED_ARTIFACTS_METRIC = "tracking/refused_artifacts"
#: Refused artifacts named in the summary; the count covers the rest.
_NAMED = 5


@dataclass(frozen=True)
class TrackingReport:
    """What tracking delayed or lost over a whole job: rank 0's queue (each incarnation, if
    workers were restarted) and the driver's, which also took rank 0's leftovers.

    Attributes:
        outages: Times the server became unreachable (one outage seen by rank 0 and then by
            the driver, which took over rank 0's writes while it lasted, counts once).
        first_down: When the first outage began (``time.time()``).
        last_up: When the server answered again after the last outage that ended.
        dropped: Writes dropped because the queue was full.
        failed: Writes the server refused (see ``last_error``), artifacts included.
        lost: Writes still queued in a rank 0 that was replaced (a worker failure).
        unwritten: Writes still queued when the end's flush ran out of time.
        down_since: The server unreachable at the end: since when.
        last_error: The last error seen, one line.
        refused: Artifacts the store refused for good (a 4xx): each named once, with the
            store's answer (``plot.png (HTTP 413 Request Entity Too Large)``).
    """

    outages: int = 0
    first_down: float | None = None
    last_up: float | None = None
    dropped: int = 0
    failed: int = 0
    lost: int = 0
    unwritten: int = 0
    down_since: float | None = None
    last_error: str = ""
    refused: tuple[str, ...] = ()

    @classmethod
    def of(
        cls, replaced: Sequence[OutboxStatus], ranks: Sequence[OutboxStatus], end: OutboxStatus
    ) -> TrackingReport:
        """Combine the statuses of replaced rank-0 queues, the last rank 0's (its leftovers
        went to the driver) and the driver's queue at the end."""
        every = [*replaced, *ranks, end]
        errors = [s.last_error for s in every if s.last_error]
        outages = sum(s.outages for s in every)
        if end.outages and any(s.down for s in ranks):  # the driver's first one continued it
            outages -= 1
        down_since = end.down_since  # still down at the end: since rank 0 first saw it
        if down_since is not None:
            down_since = min([down_since, *(s.down_since for s in ranks if s.down)])
        downs = [s.first_down for s in every if s.first_down is not None]
        ups = [s.last_up for s in every if s.last_up is not None]
        return cls(
            outages=outages,
            first_down=min(downs) if downs else None,
            last_up=max(ups) if ups else None,
            dropped=sum(s.dropped for s in every),
            failed=sum(s.failed for s in every),
            lost=sum(s.buffered for s in replaced),
            unwritten=end.buffered,
            down_since=down_since,
            last_error=errors[-1] if errors else "",
            refused=tuple(name for s in every for name in s.refused),
        )

    def metrics(self) -> dict[str, int]:
        """The report as a job's result metrics (what a study trial reports)."""
        return {
            DROPPED_METRIC: self.dropped,
            "tracking/unwritten_writes": self.unwritten + self.lost + self.failed,
            REFUSED_ARTIFACTS_METRIC: len(self.refused),
        }

    @property
    def complete(self) -> bool:
        """Everything logged is in the run."""
        return not (self.dropped or self.failed or self.lost or self.unwritten)

    def lines(self, uri: str, flush_timeout: float) -> list[str]:
        """What the summary says (nothing when there was nothing to say)."""
        out = []
        if self.outages and self.down_since is None:
            span = f"between {_clock(self.first_down)} and {_clock(self.last_up)}"
            out.append(
                f"MLflow was unreachable {self.outages} time(s), {span}; training went on"
                + (", and every buffered write went in afterwards" if self.complete else "")
            )
        if self.dropped:
            out.append(
                f"MLflow: {self.dropped} writes dropped, the buffer being full "
                f"(tracking.buffer_size); counted as {DROPPED_METRIC}"
            )
        if self.lost:
            out.append(f"MLflow: {self.lost} buffered writes lost with a replaced worker")
        if self.refused:
            named = ", ".join(self.refused[:_NAMED])
            more = f" and {len(self.refused) - _NAMED} more" if len(self.refused) > _NAMED else ""
            out.append(
                f"MLflow: {len(self.refused)} artifact(s) refused by the artifact store, "
                f"not retried: {named}{more}"
            )
        others = self.failed - len(self.refused)
        if others > 0:
            out.append(f"MLflow: {others} writes refused by the server ({self.last_error})")
        if self.unwritten:
            out.append(
                f"MLflow at {uri} unreachable since {_clock(self.down_since)}: "
                f"{self.unwritten} writes not written after waiting {flush_timeout:g}s "
                "(tracking.flush_timeout_s); the run may show RUNNING there"
            )
        return out


def end_run(
    tracker: Tracker,
    run_id: str,
    step: int,
    status: str,
    *,
    ranks: Sequence[OutboxStatus] = (),
    replaced: Sequence[OutboxStatus] = (),
    wait: bool = True,
) -> TrackingReport:
    """A job's last writes into its run (the count of dropped writes at ``step``, then its
    status), one flush of ``tracker`` within its time limit (none when ``wait`` is False: a
    flush already ran out of time), and the report of everything tracking delayed or lost
    (``ranks``/``replaced``: rank 0's queues, see :meth:`TrackingReport.of`)."""
    dropped = sum(s.dropped for s in [*ranks, *replaced]) + tracker.status().dropped
    tracker.log_metrics(run_id, {DROPPED_METRIC: dropped}, step=step)
    tracker.finish(run_id, status)
    end, _ = tracker.close(None if wait else 0)
    return TrackingReport.of(replaced, ranks, end)


def format_metric(value: Any) -> str:
    """A metric for the console: integers as integers (``best_block 3``), floats to 4 places."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return str(value)
    if isinstance(value, int):
        return str(value)
    return f"{value:.4f}"


def _clock(t: float | None) -> str:
    return time.strftime("%H:%M:%S", time.localtime(t if t is not None else time.time()))
