"""Matplotlib figures logged to MLflow (Agg backend: no display needed).

Every figure has a title and labelled axes; steps, chunks and blocks get integer ticks; the
axes leave room around the points (markers and labels stay inside the frame); a series of a
single point is drawn on a padded axis with its value written beside it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.axes import Axes  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

Points = Sequence[tuple[int, float]]


def _frame(ax: Axes, xs: Sequence[float], title: str, xlabel: str, ylabel: str) -> None:
    """Title, labels, integer x ticks and margins; one distinct x gets a padded range."""
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.margins(x=0.08, y=0.15)
    distinct = sorted(set(xs))
    if len(distinct) == 1:
        x = distinct[0]
        ax.set_xlim(x - 1, x + 1)
        ax.set_xticks([x])
    ax.grid(alpha=0.3)


def _label_single(ax: Axes, points: Points, fmt: str = "{:.3f}") -> None:
    """Write the value beside a series that has only one point."""
    if len(points) == 1:
        ((x, y),) = points
        ax.annotate(fmt.format(y), (x, y), xytext=(6, 6), textcoords="offset points")


def chunk_loss_figure(history: Mapping[int, Points]) -> Figure:
    """Validation loss per chunk of the patch sequence (paper Fig. 7), one line per step.

    Args:
        history: chunk index -> ``(step, value)`` points.
    """
    by_step: dict[int, dict[int, float]] = {}
    for chunk, points in history.items():
        for step, value in points:
            by_step.setdefault(step, {})[chunk] = value
    fig, ax = plt.subplots(figsize=(7, 4.5))
    steps = sorted(by_step)
    cmap = plt.get_cmap("viridis")
    for i, step in enumerate(steps):
        chunks = sorted(by_step[step])
        colour = cmap(i / max(1, len(steps) - 1))
        ax.plot(
            chunks,
            [by_step[step][c] for c in chunks],
            marker="o",
            color=colour,
            label=f"step {step}",
        )
    _frame(
        ax,
        list(history),
        "Validation loss per chunk of the sequence",
        "chunk of the patch sequence (raster order)",
        "validation loss",
    )
    ax.legend(fontsize="small", title="pre-training", ncol=1 + len(steps) // 8)
    fig.tight_layout()
    return fig


def loss_vs_probe_figure(loss: Points, main: Points, blocks: Mapping[str, Points]) -> Figure:
    """Validation loss (left axis) and probe accuracy per block (right) against the step."""
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    if loss:
        s, v = zip(*sorted(loss), strict=True)
        ax.plot(s, v, color="black", marker="o", label="val loss")
        _label_single(ax, loss)
    xs = [p[0] for p in loss] + [p[0] for p in main]
    xs += [p[0] for points in blocks.values() for p in points]
    _frame(
        ax,
        xs,
        "Pre-training loss vs downstream accuracy",
        "pre-training step",
        "validation loss",
    )
    right = ax.twinx()
    for name, points in blocks.items():
        if points:
            s, v = zip(*sorted(points), strict=True)
            right.plot(s, v, marker=".", linestyle="--", label=f"probe {name.replace('_', ' ')}")
    if main:
        s, v = zip(*sorted(main), strict=True)
        right.plot(s, v, marker="s", color="tab:red", label="probe (main layers)")
        _label_single(right, main)
    right.set_ylabel("probe top-1 accuracy")
    right.margins(y=0.15)
    handles = ax.get_legend_handles_labels()[0] + right.get_legend_handles_labels()[0]
    labels = ax.get_legend_handles_labels()[1] + right.get_legend_handles_labels()[1]
    # below the axes: a legend inside would hide points
    fig.legend(handles, labels, fontsize="small", loc="lower center", ncol=min(4, len(labels)))
    fig.tight_layout(rect=(0, 0.06 * (1 + (len(labels) - 1) // 4), 1, 1))
    return fig


def scatter_figure(labels: Sequence[str], losses: Sequence[float], accs: Sequence[float]) -> Figure:
    """Probe accuracy against validation loss, one labelled point per run."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.scatter(losses, accs, zorder=3)
    for name, x, y in zip(labels, losses, accs, strict=True):
        ax.annotate(name, (x, y), xytext=(5, 5), textcoords="offset points", fontsize="small")
    ax.set_title("Probe accuracy vs validation loss, one point per run")
    ax.set_xlabel("validation loss (last probed checkpoint)")
    ax.set_ylabel("probe top-1 accuracy")
    ax.margins(x=0.25, y=0.2)  # room for the labels right of the points
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def accuracy_per_block_figure(per_block: Mapping[str, Mapping[int, float]]) -> Figure:
    """Probe top-1 per trunk block (paper Table 7), one line per probe kind."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    blocks_seen: list[int] = []
    for kind, scores in per_block.items():
        blocks = sorted(scores)
        blocks_seen += blocks
        ax.plot(blocks, [scores[b] for b in blocks], marker="o", label=kind)
        _label_single(ax, [(b, scores[b]) for b in blocks])
    _frame(ax, blocks_seen, "Probe accuracy per trunk block", "trunk block", "probe top-1 accuracy")
    ax.legend(fontsize="small", title="probe")
    fig.tight_layout()
    return fig


def chunk_curves_figure(curves: Mapping[str, Sequence[float]]) -> Figure:
    """Final validation loss per chunk of the sequence, one line per trial (paper Fig. 7)."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    xs: list[int] = []
    for name, values in curves.items():
        ax.plot(range(len(values)), values, marker="o", label=name)
        xs += list(range(len(values)))
    _frame(
        ax,
        xs,
        "Final validation loss per chunk, one line per trial",
        "chunk of the patch sequence (raster order)",
        "validation loss",
    )
    ax.legend(fontsize="small", title="variant")
    fig.tight_layout()
    return fig
