"""Live training progress from rank 0 to the driver.

Ray Train runs its controller as an actor, so the driver that called ``fit()`` hears nothing
until the end. Rank 0 posts a small snapshot after every optimizer step to a
:class:`ProgressBoard` actor (zero CPUs, fire-and-forget calls); the driver polls it to draw
its progress display (:mod:`aim_platform.console`).

Rank 0 also posts the state of its tracking queue (:class:`~aim_platform.outbox.OutboxStatus`:
MLflow down since when, how much is buffered, dropped), so that the console can say when the
server stops answering, and at the end hands the board the writes it could not make, for the
driver to make (:meth:`ProgressBoard.hand_over`).
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from typing import Any

from aim_platform.outbox import OutboxStatus
from aim_platform.train.watchdog import IN_STEP

#: Metrics the display shows, besides the step (all optional in a snapshot).
SHOWN = ("train/loss", "perf/images_per_s", "perf/mfu", "perf/data_wait_fraction", "val/loss")


@dataclass
class Snapshot:
    """What the driver knows of a run: the newest step and the newest logged metrics."""

    step: int = 0
    total: int = 0
    start_step: int = 0
    metrics: dict[str, float] = field(default_factory=dict)
    updated: float = 0.0
    phase: str = "starting"
    tracking: OutboxStatus | None = None  # rank 0's tracking queue
    tracking_replaced: list[OutboxStatus] = field(default_factory=list)  # of replaced rank 0s
    hung: dict[str, Any] | None = None  # a rank's watchdog ended it: rank, node, step, seconds


class ProgressBoard:
    """Ray actor body: holds the latest :class:`Snapshot` of one run."""

    def __init__(self, total: int) -> None:
        self.snap = Snapshot(total=total)
        self.leftover: list[Any] = []

    def started(self, step: int) -> None:
        """The workers are up; training continues from ``step`` (0, or a checkpoint's)."""
        if self.snap.tracking is not None:  # a restart: the last rank 0's queue died with it
            self.snap.tracking_replaced.append(self.snap.tracking)
            self.snap.tracking = None
        self.snap.step = self.snap.start_step = step
        self.snap.hung = None
        self.snap.phase = "training"
        self.snap.updated = time.time()

    def step(
        self,
        step: int,
        metrics: dict[str, float] | None = None,
        tracking: OutboxStatus | None = None,
    ) -> None:
        """One optimizer step done (``metrics`` at logging steps; ``tracking``: rank 0's
        tracking queue)."""
        self.snap.step = step
        if metrics:
            self.snap.metrics.update({k: float(v) for k, v in metrics.items() if k in SHOWN})
        if tracking is not None:
            self.snap.tracking = tracking
        self.snap.updated = time.time()

    def hung(self, what: dict[str, Any]) -> None:
        """A rank made no step for ``train.step_timeout_s`` and ends its process
        (:mod:`aim_platform.train.watchdog`): what the driver's console says. Of the reports
        of an attempt, the one that stands is the rank that hung, not one blocked waiting for
        it: a rank that was reading its next batch before one that was in a step (its
        collectives wait on the others), then the older last beat."""
        if self.snap.hung is None or _hung_order(what) < _hung_order(self.snap.hung):
            self.snap.hung = what

    def ping(self) -> None:
        """Nothing: a rank calls it once at start so that its handle is warm when it reports."""

    def hand_over(self, tracking: OutboxStatus, writes: list[Any]) -> None:
        """Rank 0 is done: its queue's final state, and the writes it could not make."""
        # the driver has them
        self.snap.tracking = dataclasses.replace(tracking, buffered=0, waiting=())
        self.leftover.extend(writes)

    def take_leftover(self) -> list[Any]:
        """The writes rank 0 handed over (once). Without a hand-over (rank 0 ended first, as
        when Ray Train ends it with a failed peer), the copy of the writes its last report
        still held: some may have gone in since, harmlessly, as writes are idempotent; they
        are no longer counted as lost with it."""
        tracking, out, self.leftover = self.snap.tracking, self.leftover, []
        if tracking is not None and tracking.waiting:
            out = [*tracking.waiting, *out]
            left = tracking.buffered - len(tracking.waiting)
            self.snap.tracking = dataclasses.replace(tracking, buffered=left, waiting=())
        return out

    def get(self) -> Snapshot:
        return self.snap


def _hung_order(what: dict[str, Any]) -> tuple[bool, float]:
    """Sort key of hung reports: reading before in a step, then the older last beat."""
    return (what.get("where") == IN_STEP, what["last_beat"])


def create_board(total: int) -> Any:
    """A :class:`ProgressBoard` actor on this driver's node (no CPU reserved): it lives as
    long as the driver, whatever node is lost."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=True)
    return ray.remote(num_cpus=0, scheduling_strategy=here)(ProgressBoard).remote(total)


def read_board(board: Any, timeout: float = 5.0) -> Snapshot | None:
    """The board's snapshot, or None when it cannot answer in ``timeout`` seconds."""
    import ray
    from ray.exceptions import GetTimeoutError, RayActorError

    try:
        return ray.get(board.get.remote(), timeout=timeout)
    except (GetTimeoutError, RayActorError):  # a slow or gone board: skip this refresh
        return None


@dataclass
class Handover:
    """What the board holds of rank 0's tracking at the end (see :func:`take_handover`).

    Attributes:
        ranks: The last rank 0's queue status (empty when it never reported).
        replaced: The queues of rank 0 processes replaced after a failure (their buffered
            writes died with them, but for those the driver took from their last report).
        writes: The writes rank 0 handed over, to be made by the driver.
    """

    ranks: list[OutboxStatus] = field(default_factory=list)
    replaced: list[OutboxStatus] = field(default_factory=list)
    writes: list[Any] = field(default_factory=list)


def take_handover(board: Any, timeout: float = 60.0) -> Handover:
    """Rank 0's tracking state and unwritten writes from ``board`` (the writes once); an
    empty :class:`Handover` when there is no board or it does not answer."""
    import ray

    if board is None:
        return Handover()
    try:
        writes = ray.get(board.take_leftover.remote(), timeout=timeout)
        snap = ray.get(board.get.remote(), timeout=timeout)
    except Exception:  # noqa: BLE001 - a board gone with the cluster: nothing to take
        return Handover()
    ranks = [snap.tracking] if snap.tracking is not None else []
    return Handover(ranks, list(snap.tracking_replaced), writes)
