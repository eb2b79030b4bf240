"""What a finished pre-training leaves: its result, the probes of its trunks, the artifacts
logged at the end, and the console summary (:mod:`.pretrain` runs the training itself)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from aim_platform import tracking
from aim_platform.config import JobConfig
from aim_platform.models.losses import VAL_CHUNKS
from aim_platform.train.paths import RunPaths


@dataclass
class PretrainResult:
    """What a finished (or failed) pre-training produced."""

    name: str
    storage: str
    run_id: str | None
    tracking_uri: str | None
    steps: int = 0
    final_trunk: str | None = None
    checkpoint: str | None = None
    metrics: dict[str, Any] = field(default_factory=dict)
    error: str | None = None
    tracking: tracking.TrackingReport | None = None  # what MLflow delayed or lost
    flush_timeout: float = 0.0  # the end's wait for MLflow (tracking.flush_timeout_s)
    notes: list[str] = field(default_factory=list)  # what could not be made, and why
    probes: list[str] = field(default_factory=list)  # one line a probed trunk, then the Fig. 4 line


def probe_checkpoints(
    job: JobConfig,
    result: PretrainResult,
    tracker: tracking.Tracker,
    paths: RunPaths,
    say: Callable[[str], None] = lambda text: None,
) -> dict[str, float]:
    """Probe every exported trunk (``probe.at_steps`` and the final one), log each probe as
    a nested run and into the pre-training run at its step, then correlate loss and accuracy.
    ``say`` gets a line as each probe starts and ends; ``result.probes`` keeps the results
    and the correlation for the summary.

    Returns:
        The final trunk's probe metrics (``probe/attentive/top1``, ...).
    """
    from aim_platform.eval.correlation import MIN_POINTS, PROBE_KEYS, correlate_run, run_points
    from aim_platform.eval.probe import report_metrics
    from aim_platform.jobs.probe import log_probe, run_probe

    assert job.probe is not None and result.run_id
    dataset = job.probe.dataset or job.data.sources[0].url
    trunks = {s: paths.trunk_at(s) for s in job.probe.at_steps if s < result.steps}
    trunks[result.steps] = paths.final
    for i, (step, path) in enumerate(sorted(trunks.items()), start=1):
        say(f"probing the trunk of step {step} ({i} of {len(trunks)}, {job.probe.kind})")
        report = run_probe(
            path, job.probe, dataset=dataset, storage_options=job.train.storage_options
        )
        log_probe(
            tracker,
            report,
            job.probe,
            experiment=job.tracking.experiment,
            run_name=tracking.probe_run_name(path, dataset),
            trunk_path=path,
            dataset=dataset,
            parent_run_id=result.run_id,
            step=step,
        )
        scores = ", ".join(f"{kind} {100 * s.top1:.1f}%" for kind, s in report.main.items())
        line = f"step {step}: top-1 {scores}"
        say(line)
        result.probes.append(line)
    try:
        correlate_run(tracker, result.run_id)
        for kind, key in PROBE_KEYS.items():
            corr = run_points(tracker, result.run_id, key)
            if len(corr.losses) >= MIN_POINTS:
                result.probes.append(
                    f"val loss vs {kind} top-1 over {len(corr.losses)} checkpoints: Pearson "
                    f"{corr.pearson:+.3f}, Spearman {corr.spearman:+.3f} (negative: the loss "
                    "tracks accuracy, as in the paper's Fig. 4)"
                )
    except tracking.TrackingUnavailable as exc:  # the probes are logged once it answers
        result.notes.append(f"no loss-vs-accuracy correlation: {exc}")
    return report_metrics(report)


def log_outputs(tracker: tracking.Tracker, run_id: str, result: PretrainResult) -> None:
    """Final trunk location, per-chunk validation loss plot."""
    from aim_platform.plots import chunk_loss_figure

    tracker.set_tags(
        run_id, {"final_trunk": result.final_trunk, "last_checkpoint": result.checkpoint}
    )
    if result.final_trunk:
        tracker.log_text(run_id, result.final_trunk + "\n", "final_trunk.txt")
    history = {}
    for i in range(VAL_CHUNKS):
        points = tracker.metric_history(run_id, f"val/loss_chunk_{i}")
        if points:
            history[i] = points
    if history:
        tracker.log_figure(run_id, chunk_loss_figure(history), "val_loss_per_chunk.png")


def summary(result: PretrainResult) -> list[str]:
    """A one-screen summary of a finished run: steps, loss start -> end, throughput, where."""
    lines = [f"run {result.name}: {result.steps} steps, storage {result.storage}"]
    tracker = None
    reachable = result.tracking is None or result.tracking.down_since is None
    if result.tracking_uri and result.run_id and reachable:
        tracker = tracking.Tracker(result.tracking_uri)
        try:
            losses = tracker.metric_history(result.run_id, "train/loss")
        except tracking.TrackingUnavailable:
            losses, tracker = [], None
        if losses:
            (s0, v0), (s1, v1) = losses[0], losses[-1]
            lines.append(f"train/loss {v0:.4f} (step {s0}) -> {v1:.4f} (step {s1})")
    m = result.metrics
    if "val/loss" in m:
        lines.append(f"val/loss {m['val/loss']:.4f}")
    if "perf/images_per_s" in m:
        mfu = f", MFU {100 * m['perf/mfu']:.1f}%" if "perf/mfu" in m else ""
        lines.append(f"{m['perf/images_per_s']:.1f} images/s{mfu}")
    lines += result.probes
    if result.final_trunk:
        lines.append(f"final trunk: {result.final_trunk}")
    if result.tracking_uri:
        lines.append(f"MLflow run {result.run_id}: {tracking.ui_command(result.tracking_uri)}")
        if tracker and result.run_id:
            with contextlib.suppress(tracking.TrackingUnavailable):
                lines.append(f"then open {tracking.ui_url(tracker, result.run_id)}")
        if result.tracking is not None:
            lines += result.tracking.lines(result.tracking_uri, result.flush_timeout)
        lines += result.notes
    if result.error:
        lines.append(f"error: {result.error}")
    return lines
