"""Live training progress from rank 0 to the driver.

Ray Train runs its controller as an actor, so the driver that called ``fit()`` hears nothing
until the end. Rank 0 posts a small snapshot after every optimizer step to a
:class:`ProgressBoard` actor (zero CPUs, fire-and-forget calls); the driver polls it to draw
its progress display (:mod:`aim_platform.console`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

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


class ProgressBoard:
    """Ray actor body: holds the latest :class:`Snapshot` of one run."""

    def __init__(self, total: int) -> None:
        self.snap = Snapshot(total=total)

    def started(self, step: int) -> None:
        """The workers are up; training continues from ``step`` (0, or a checkpoint's)."""
        self.snap.step = self.snap.start_step = step
        self.snap.phase = "training"
        self.snap.updated = time.time()

    def step(self, step: int, metrics: dict[str, float] | None = None) -> None:
        """One optimizer step done (``metrics`` at logging steps)."""
        self.snap.step = step
        if metrics:
            self.snap.metrics.update({k: float(v) for k, v in metrics.items() if k in SHOWN})
        self.snap.updated = time.time()

    def get(self) -> Snapshot:
        return self.snap


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
