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
