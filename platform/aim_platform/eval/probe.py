"""Probes on a frozen trunk: attentive (paper eq. 4) and linear, per block and on the mean
of the chosen blocks (Table 7), trained on features an actor pool computed.

The job that feeds them (labelled rows, augmented views, block outputs by Ray, one MLflow
run per probe) is :mod:`aim_platform.jobs.probe`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from aim_platform.config import ProbeConfig
from aim_platform.models.heads import AttentiveProbe, LinearProbe


@dataclass
class ProbeScore:
    """Accuracy of one probe on the validation split."""

    top1: float
    top5: float


@dataclass
class ProbeReport:
    """Everything one probe job measured.

    Attributes:
        layers: Blocks the main probe averaged.
        main: kind -> score of the probe on the mean of ``layers``.
        per_block: kind -> block -> score (empty without a sweep).
        train_images: Labelled training images used (before augmentation).
        val_images: Validation images.
        lora: Score and trained fraction of the LoRA run, when asked for.
    """

    layers: list[int]
    main: dict[str, ProbeScore] = field(default_factory=dict)
    per_block: dict[str, dict[int, ProbeScore]] = field(default_factory=dict)
    train_images: int = 0
    val_images: int = 0
    lora: dict[str, float] | None = None

    def best_block(self, kind: str = "attentive") -> tuple[int, ProbeScore] | None:
        """The block with the highest top-1 (None without a sweep)."""
        blocks = self.per_block.get(kind) or {}
        if not blocks:
            return None
        b = max(blocks, key=lambda i: blocks[i].top1)
        return b, blocks[b]


def make_probe(kind: str, dim: int, num_classes: int, num_heads: int) -> nn.Module:
    """An attentive or linear probe head."""
    if kind == "attentive":
        return AttentiveProbe(dim, num_classes, num_heads=num_heads)
    if kind == "linear":
        return LinearProbe(dim, num_classes)
    raise ValueError(f"unknown probe kind {kind!r}; known: attentive, linear")


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> ProbeScore:
    """Top-1 and top-5 accuracy (top-5 is top-k with k = min(5, classes))."""
    k = min(5, logits.shape[1])
    top = logits.topk(k, dim=1).indices  # (N, k)
    hit = top == labels.view(-1, 1)
    return ProbeScore(float(hit[:, 0].float().mean()), float(hit.any(1).float().mean()))


def train_classifier(
    head: nn.Module,
    logits_of: Callable[[torch.Tensor], torch.Tensor],
    params: list[torch.Tensor],
    train_x: torch.Tensor,
    train_y: torch.Tensor,
    val_x: torch.Tensor,
    val_y: torch.Tensor,
    *,
    steps: int,
    batch_size: int,
    lr: float,
    weight_decay: float,
    seed: int,
    eval_batch: int = 512,
) -> ProbeScore:
    """The probes' training loop: cross-entropy, AdamW, cosine decay to zero, seeded batches.

    Args:
        head: The probe head: put in train mode for training and eval mode (BatchNorm's
            running statistics) for validation.
        logits_of: Inputs (a batch of ``train_x``/``val_x`` rows) -> (B, C) logits.
        params: What AdamW updates (the head's, plus adapters for LoRA).
    """
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps))
    )
    n = train_x.shape[0]
    head.train()
    for _ in range(steps):
        idx = torch.randint(0, n, (min(batch_size, n),), generator=gen)
        loss = F.cross_entropy(logits_of(train_x[idx]), train_y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    head.eval()
    with torch.no_grad():
        chunks = [logits_of(val_x[i : i + eval_batch]) for i in range(0, len(val_x), eval_batch)]
    return accuracy(torch.cat(chunks), val_y)


def fit_probe(
    probe: nn.Module,
    train_x: torch.Tensor,
    train_y: torch.Tensor,
    val_x: torch.Tensor,
    val_y: torch.Tensor,
    **budget: Any,
) -> ProbeScore:
    """Train ``probe`` on (N, K, D) features (float16 as stored: upcast per batch); score it.

    ``budget``: ``steps``, ``batch_size``, ``lr``, ``weight_decay``, ``seed``.
    """
    return train_classifier(
        probe,
        lambda x: probe(x.float()),
        list(probe.parameters()),
        train_x,
        train_y,
        val_x,
        val_y,
        **budget,
    )


def probe_features(
    train: np.ndarray,
    train_y: np.ndarray,
    val: np.ndarray,
    val_y: np.ndarray,
    blocks: list[int],
    cfg: ProbeConfig,
    layers: list[int],
    num_classes: int,
    num_heads: int,
) -> ProbeReport:
    """Train every probe the config asks for on precomputed block outputs.

    Args:
        train: (N, L, K, D) outputs of ``blocks`` for the training views.
        val: (M, L, K, D) for the validation view.
        blocks: The block index of each of the L slices.
        layers: Blocks the main probe averages (a subset of ``blocks``).
    """
    tx, vx = torch.from_numpy(train), torch.from_numpy(val)
    ty, vy = torch.from_numpy(train_y), torch.from_numpy(val_y)
    kinds = ["attentive", "linear"] if cfg.kind == "both" else [cfg.kind]
    report = ProbeReport(layers=layers, train_images=0, val_images=len(vy))
    pos = [blocks.index(b) for b in layers]
    dim = tx.shape[-1]
    budget = dict(
        steps=cfg.steps,
        batch_size=cfg.batch_size,
        lr=cfg.lr,
        weight_decay=cfg.weight_decay,
        seed=cfg.seed,
    )
    for kind in kinds:
        torch.manual_seed(cfg.seed)
        probe = make_probe(kind, dim, num_classes, num_heads)
        report.main[kind] = fit_probe(
            probe, tx[:, pos].float().mean(1), ty, vx[:, pos].float().mean(1), vy, **budget
        )
        if cfg.sweep:
            report.per_block[kind] = {}
            for i, b in enumerate(blocks):
                torch.manual_seed(cfg.seed)  # same initialization and batches for every block
                probe = make_probe(kind, dim, num_classes, num_heads)
                report.per_block[kind][b] = fit_probe(probe, tx[:, i], ty, vx[:, i], vy, **budget)
    return report


def report_metrics(report: ProbeReport) -> dict[str, float]:
    """Flat metric names: ``probe/{kind}/top1``, ``probe/{kind}/block_{b}/top1``, ..."""
    out: dict[str, float] = {}
    for kind, score in report.main.items():
        out[f"probe/{kind}/top1"] = score.top1
        out[f"probe/{kind}/top5"] = score.top5
    for kind, blocks in report.per_block.items():
        for b, score in blocks.items():
            out[f"probe/{kind}/block_{b}/top1"] = score.top1
        best = report.best_block(kind)
        if best is not None:
            out[f"probe/{kind}/best_block"] = best[0]  # an int: printed as one
            out[f"probe/{kind}/best_block_top1"] = best[1].top1
    if report.lora:
        for key, value in report.lora.items():
            out[f"probe/lora/{key}"] = value
    return out
