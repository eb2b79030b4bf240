"""Matplotlib figures logged to MLflow (Agg backend: no display needed)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402


def chunk_loss_figure(history: Mapping[int, Sequence[Any]]) -> Figure:
    """Validation loss per chunk of the patch sequence (paper Fig. 7), one line per step.

    Args:
        history: chunk index -> MLflow metric history (objects with ``step`` and ``value``).
    """
    by_step: dict[int, dict[int, float]] = {}
    for chunk, points in history.items():
        for p in points:
            by_step.setdefault(p.step, {})[chunk] = p.value
    fig, ax = plt.subplots(figsize=(6, 4))
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
    ax.set_xlabel("chunk of the patch sequence (raster order)")
    ax.set_ylabel("validation loss")
    ax.set_title("Loss per chunk of the sequence")
    ax.legend(fontsize="small")
    fig.tight_layout()
    return fig


def loss_vs_probe_figure(
    loss: Sequence[tuple[int, float]],
    main: Sequence[tuple[int, float]],
    blocks: Mapping[str, Sequence[tuple[int, float]]],
) -> Figure:
    """Validation loss (left axis) and probe accuracy per block (right) against the step."""
    fig, ax = plt.subplots(figsize=(7, 4))
    if loss:
        s, v = zip(*sorted(loss), strict=True)
        ax.plot(s, v, color="black", marker="o", label="val loss")
    ax.set_xlabel("pre-training step")
    ax.set_ylabel("validation loss")
    right = ax.twinx()
    for name, points in blocks.items():
        if points:
            s, v = zip(*sorted(points), strict=True)
            right.plot(s, v, marker=".", linestyle="--", label=f"probe {name}")
    if main:
        s, v = zip(*sorted(main), strict=True)
        right.plot(s, v, marker="s", color="tab:red", label="probe (main layers)")
    right.set_ylabel("probe top-1 accuracy")
    handles = ax.get_legend_handles_labels()[0] + right.get_legend_handles_labels()[0]
    labels = ax.get_legend_handles_labels()[1] + right.get_legend_handles_labels()[1]
    ax.legend(handles, labels, fontsize="small", loc="center right")
    ax.set_title("Pre-training loss vs downstream accuracy")
    fig.tight_layout()
    return fig


def scatter_figure(labels: Sequence[str], losses: Sequence[float], accs: Sequence[float]) -> Figure:
    """Probe accuracy against validation loss, one labelled point per run."""
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.scatter(losses, accs)
    for name, x, y in zip(labels, losses, accs, strict=True):
        ax.annotate(name, (x, y), fontsize="small")
    ax.set_xlabel("validation loss")
    ax.set_ylabel("probe top-1 accuracy")
    fig.tight_layout()
    return fig


def accuracy_per_block_figure(per_block: Mapping[str, Mapping[int, float]]) -> Figure:
    """Probe top-1 per trunk block (paper Table 7), one line per probe kind."""
    fig, ax = plt.subplots(figsize=(6, 4))
    for kind, scores in per_block.items():
        blocks = sorted(scores)
        ax.plot(blocks, [scores[b] for b in blocks], marker="o", label=kind)
    ax.set_xlabel("trunk block")
    ax.set_ylabel("probe top-1 accuracy")
    ax.legend()
    fig.tight_layout()
    return fig


def chunk_curves_figure(curves: Mapping[str, Sequence[float]]) -> Figure:
    """Final validation loss per chunk of the sequence, one line per trial (paper Fig. 7)."""
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, values in curves.items():
        ax.plot(range(len(values)), values, marker="o", label=name)
    ax.set_xlabel("chunk of the patch sequence")
    ax.set_ylabel("validation loss")
    ax.set_title("Loss per chunk")
    ax.legend(fontsize="small")
    fig.tight_layout()
    return fig
