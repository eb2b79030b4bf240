"""Pre-training loss vs downstream accuracy (paper Fig. 4): coefficients, tables and plots.

Within a run, each probed checkpoint pairs its ``val/loss`` with its probe accuracy (both
logged at that step in the pre-training run); across runs, each run contributes its last
pair. Pearson and Spearman coefficients (``scipy.stats``) and a plot go to MLflow. Over
several runs of one recipe (seeds), :func:`correlate_within` gives each run's own coefficients
and their mean with a 95% interval over the runs: the paper's finding (lower loss, higher
accuracy) is a coefficient below 0 whose interval excludes 0.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import stats

from aim_platform.eval.paired import PairedDifference, paired_difference
from aim_platform.tracking import Tracker

LOSS_KEY = "val/loss"
ACC_KEY = "probe/attentive/top1"
PROBE_KEYS = {"attentive": ACC_KEY, "linear": "probe/linear/top1"}
MIN_POINTS = 3  # two points always correlate perfectly: a run needs three to count


def _pair(x: Sequence[float], y: Sequence[float]) -> tuple[np.ndarray, np.ndarray] | None:
    """The two series as float arrays, or None when no coefficient is defined for them
    (fewer than 2 points or a constant series)."""
    a, b = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    if len(a) != len(b):
        raise ValueError(f"series differ in length: {len(a)} vs {len(b)}")
    if len(a) < 2 or np.ptp(a) == 0 or np.ptp(b) == 0:
        return None
    return a, b


def pearson(x: Sequence[float], y: Sequence[float]) -> float:
    """Pearson's r (:func:`scipy.stats.pearsonr`); NaN when fewer than 2 points or a constant
    series."""
    pair = _pair(x, y)
    return float("nan") if pair is None else float(stats.pearsonr(*pair).statistic)


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman's rank correlation (:func:`scipy.stats.spearmanr`: Pearson on average ranks,
    ties sharing theirs); NaN when fewer than 2 points or a constant series."""
    pair = _pair(x, y)
    return float("nan") if pair is None else float(stats.spearmanr(*pair).statistic)


@dataclass
class Correlation:
    """Paired points (one per checkpoint or per run) and their coefficients."""

    labels: list[str]
    losses: list[float]
    accuracies: list[float]

    @property
    def pearson(self) -> float:
        return pearson(self.losses, self.accuracies)

    @property
    def spearman(self) -> float:
        return spearman(self.losses, self.accuracies)

    def table(self) -> str:
        """A Markdown table of the points and the coefficients."""
        rows = ["| point | val loss | probe top-1 |", "| --- | --- | --- |"]
        rows += [
            f"| {n} | {loss:.4f} | {acc:.4f} |"
            for n, loss, acc in zip(self.labels, self.losses, self.accuracies, strict=True)
        ]
        rows.append(f"\nPearson {self.pearson:.3f}, Spearman {self.spearman:.3f}")
        return "\n".join(rows)


def run_points(tracker: Tracker, run_id: str, acc_key: str = ACC_KEY) -> Correlation:
    """Pairs (val loss, probe accuracy) at every step where a run logged both."""
    losses = dict(tracker.metric_history(run_id, LOSS_KEY))
    accs = dict(tracker.metric_history(run_id, acc_key))
    steps = sorted(set(losses) & set(accs))
    return Correlation(
        [f"step {s}" for s in steps], [losses[s] for s in steps], [accs[s] for s in steps]
    )


@dataclass
class WithinRuns:
    """Each run's own loss-vs-accuracy coefficients (one row per run and probe kind) and,
    per probe kind and coefficient, their mean with a 95% t interval over the runs that have
    at least :data:`MIN_POINTS` points."""

    names: list[str]
    points: dict[str, list[int]]  # probe kind -> points per run
    pearsons: dict[str, list[float]]
    spearmans: dict[str, list[float]]

    def usable(self, probe: str) -> list[int]:
        """Indices of the runs with enough points for ``probe``."""
        return [i for i, n in enumerate(self.points[probe]) if n >= MIN_POINTS]

    def interval(self, probe: str, coefficient: str) -> PairedDifference | None:
        """Mean and 95% interval of one coefficient over the usable runs (None: none)."""
        values = self.pearsons if coefficient == "pearson" else self.spearmans
        picked = [values[probe][i] for i in self.usable(probe)]
        return paired_difference(picked, [0.0] * len(picked)) if picked else None

    def verdict(self, probe: str, coefficient: str) -> str:
        """``agrees`` (interval wholly below 0: lower loss came with higher accuracy, as in
        the paper), ``opposite`` (wholly above 0) or ``inconclusive`` (holds 0, one run, or
        none usable)."""
        d = self.interval(probe, coefficient)
        if d is None or not d.excludes_zero:
            return "inconclusive"
        return "agrees" if d.mean < 0 else "opposite"

    def table(self) -> str:
        """Markdown: a row per run, then the mean [95% CI] and the verdict per column."""
        kinds = list(self.points)
        head = ["run"] + [f"{c} ({k})" for k in kinds for c in ("points", "Pearson", "Spearman")]
        rows = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
        for i, name in enumerate(self.names):
            cells = [name]
            for k in kinds:
                cells += [
                    str(self.points[k][i]),
                    f"{self.pearsons[k][i]:+.3f}",
                    f"{self.spearmans[k][i]:+.3f}",
                ]
            rows.append("| " + " | ".join(cells) + " |")
        mean, verdict = ["mean [95% CI]"], ["verdict"]
        for k in kinds:
            mean.append(f"{len(self.usable(k))} runs")
            verdict.append("")
            for c in ("pearson", "spearman"):
                d = self.interval(k, c)
                if d is None:
                    mean.append("-")
                elif d.n < 2:
                    mean.append(f"{d.mean:+.3f} [one run]")
                else:  # a coefficient lies in [-1, 1]: so does the interval shown
                    low, high = max(d.low, -1.0), min(d.high, 1.0)
                    mean.append(f"{d.mean:+.3f} [{low:+.3f}, {high:+.3f}]")
                verdict.append(self.verdict(k, c))
        rows += ["| " + " | ".join(mean) + " |", "| " + " | ".join(verdict) + " |"]
        rows.append(
            f"\nThe paper (Fig. 4): lower validation loss, higher probe accuracy, i.e. a "
            f"coefficient below 0; agrees when the interval over runs excludes 0 below it. "
            f"A run needs {MIN_POINTS} probed checkpoints with a validation loss to count."
        )
        return "\n".join(rows)


def correlate_within(tracker: Tracker, run_ids: Sequence[str]) -> WithinRuns:
    """Each run correlated within itself (as :func:`correlate_run`, which also logs its
    coefficients, table and plot into the run), summarized over the runs."""
    if not run_ids:
        raise ValueError("correlate_within needs at least one run")
    names: list[str] = []
    points: dict[str, list[int]] = {k: [] for k in PROBE_KEYS}
    pearsons: dict[str, list[float]] = {k: [] for k in PROBE_KEYS}
    spearmans: dict[str, list[float]] = {k: [] for k in PROBE_KEYS}
    for rid in run_ids:
        correlate_run(tracker, rid)
        names.append(tracker.run_name(rid))
        for kind in PROBE_KEYS:
            corr = run_points(tracker, rid, PROBE_KEYS[kind])
            points[kind].append(len(corr.losses))
            pearsons[kind].append(corr.pearson)
            spearmans[kind].append(corr.spearman)
    return WithinRuns(names, points, pearsons, spearmans)


def _log_coefficients(tracker: Tracker, run_id: str, corr: Correlation) -> None:
    if len(corr.losses) >= 2:
        tracker.log_metrics(
            run_id, {"corr/pearson": corr.pearson, "corr/spearman": corr.spearman}, step=0
        )


def correlate_run(tracker: Tracker, run_id: str) -> Correlation:
    """Compute and log ``corr/pearson``, ``corr/spearman``, a table and the Fig. 4 analogue
    plot (validation loss and probe accuracy per block against the step) into the run."""
    from aim_platform.plots import loss_vs_probe_figure

    corr = run_points(tracker, run_id)
    _log_coefficients(tracker, run_id, corr)
    tracker.log_text(run_id, corr.table(), "correlation.md")
    keys = [k for k in tracker.metric_keys(run_id) if k.startswith("probe/attentive/block_")]
    blocks = {key.split("/")[2]: tracker.metric_history(run_id, key) for key in keys}
    loss = tracker.metric_history(run_id, LOSS_KEY)
    main = tracker.metric_history(run_id, ACC_KEY)
    tracker.log_figure(run_id, loss_vs_probe_figure(loss, main, blocks), "loss_vs_probe.png")
    return corr


def correlate_runs(
    tracker: Tracker, run_ids: Sequence[str], log_to: str | None = None
) -> Correlation:
    """Across runs (e.g. a study's trials): each run's last probed step is one point."""
    from aim_platform.plots import scatter_figure

    labels, losses, accs = [], [], []
    for rid in run_ids:
        points = run_points(tracker, rid)
        if points.losses:
            labels.append(tracker.run_name(rid))
            losses.append(points.losses[-1])
            accs.append(points.accuracies[-1])
    corr = Correlation(labels, losses, accs)
    if log_to:
        _log_coefficients(tracker, log_to, corr)
        tracker.log_text(log_to, corr.table(), "correlation_across_runs.md")
        if len(corr.losses) >= 2:  # one point says nothing about a correlation
            tracker.log_figure(
                log_to,
                scatter_figure(corr.labels, corr.losses, corr.accuracies),
                "loss_vs_probe_across_runs.png",
            )
    return corr
