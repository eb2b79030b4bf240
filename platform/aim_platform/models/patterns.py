"""Autoregression patterns (paper Table 3b): the order in which patches are predicted.

A pattern is a permutation ``order`` of the raster patch indices: sequence position k holds
patch ``order[k]``. The same permutation is applied to the tokens, their position embeddings
and the targets, so every patch keeps its own position embedding wherever it lands.
"""

from __future__ import annotations

import torch

PATTERNS = ("raster", "spiral", "checkerboard", "random")


def raster_order(grid_size: int) -> torch.Tensor:
    """Row by row, left to right: the identity permutation. (K,) int64."""
    return torch.arange(grid_size * grid_size)


def spiral_order(grid_size: int) -> torch.Tensor:
    """Outward from the centre: right, down, left, up with run lengths 1, 1, 2, 2, 3, 3, ...

    Cells outside the grid are skipped, so every grid size gives a full permutation. (K,) int64.
    """
    g = grid_size
    r = c = (g - 1) // 2
    steps = [(0, 1), (1, 0), (0, -1), (-1, 0)]
    order = [r * g + c]
    run, turn = 1, 0
    while len(order) < g * g:
        for _ in range(2):
            dr, dc = steps[turn % 4]
            for _ in range(run):
                r, c = r + dr, c + dc
                if 0 <= r < g and 0 <= c < g:
                    order.append(r * g + c)
            turn += 1
        run += 1
    return torch.tensor(order, dtype=torch.int64)


def checkerboard_order(grid_size: int) -> torch.Tensor:
    """All cells of one colour (row + col even) in raster order, then the other colour."""
    idx = torch.arange(grid_size * grid_size)
    colour = (idx // grid_size + idx % grid_size) % 2  # (K,)
    return torch.cat([idx[colour == 0], idx[colour == 1]])


def random_order(grid_size: int, seed: int = 0) -> torch.Tensor:
    """A fixed random permutation, the same for every sample and step (seeded)."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randperm(grid_size * grid_size, generator=gen)


def pattern_order(name: str, grid_size: int, seed: int = 0) -> torch.Tensor:
    """The permutation of patch indices for a named pattern. (K,) int64 on the CPU."""
    if name == "raster":
        return raster_order(grid_size)
    if name == "spiral":
        return spiral_order(grid_size)
    if name == "checkerboard":
        return checkerboard_order(grid_size)
    if name == "random":
        return random_order(grid_size, seed)
    raise ValueError(f"unknown pattern {name!r}; known: {', '.join(PATTERNS)}")
