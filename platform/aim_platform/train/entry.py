"""What ``TorchTrainer`` is handed: :class:`LoopArgs` and the per-worker entry point.

Light on purpose: Ray Train's controller unpickles both (the function by reference), so it
imports this module, not :mod:`aim_platform.train.loop` with torch and DCP (about 2 s of CPU
in one more process at every start of training). The workers import the loop when they run.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from aim_platform.train.paths import RunPaths


@dataclass(frozen=True)
class LoopArgs:
    """What the pre-training job hands every worker (``TorchTrainer(train_loop_config=...)``).

    Attributes:
        job: The :class:`JobConfig` as a JSON-able dict (validated again on the worker).
        paths: The run's folder: ``latest.json``, exported and final trunks.
        tracking_uri: Where rank 0 logs metrics (None: no tracking).
        run_id: The MLflow run rank 0 writes to (None: no tracking).
        progress: A :class:`~aim_platform.train.progress.ProgressBoard` actor for the driver's
            display, or None.
        resume_from: The checkpoint ``latest.json`` named when this training started (a
            URL), or None. It is what every restart resumes from, before Ray Train's own
            record: the job builds the data stream from that checkpoint's record of trained
            rows, and Ray's snapshot of its checkpoints can lag ``latest.json`` (a job stopped
            after a preemption's checkpoint was committed, before Ray's snapshot: seen in the
            stop-and-resubmit journey, the model resumed at step 10, the data at step 14).
        stop_board: A :class:`~aim_platform.train.preempt.StopBoard` actor: the driver's
            SIGTERM reaches rank 0 through it, and rank 0 says there where the run stopped.
    """

    job: dict[str, Any]
    paths: RunPaths
    tracking_uri: str | None = None
    run_id: str | None = None
    progress: Any = None
    resume_from: str | None = None
    stop_board: Any = None


def train_loop_per_worker(args: LoopArgs) -> None:
    """Entry point given to ``TorchTrainer`` with the job's :class:`LoopArgs`."""
    from aim_platform.train import loop

    loop.train_loop_per_worker(args)
