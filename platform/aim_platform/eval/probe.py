"""Probes on a frozen trunk: attentive (paper eq. 4) and linear, on the mean of the chosen
blocks, on every block and on every window of ``window`` consecutive blocks (Table 7), trained
on features an actor pool computed.

The job that feeds them (labelled rows, augmented views, block outputs streamed from Ray into
a sharded cache of the averaged inputs, one MLflow run per probe) is
:mod:`aim_platform.jobs.probe`; memory is bounded whatever the number of images.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from aim_platform.config import ProbeConfig
from aim_platform.eval.cache import FeatureCache
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
        per_window: kind -> ``"a-b"`` (blocks a..b averaged) -> score (empty without a sweep).
        train_images: Labelled training images used (before augmentation).
        val_images: Validation images.
        lora: Score and trained fraction of the LoRA run, when asked for.
    """

    layers: list[int]
    main: dict[str, ProbeScore] = field(default_factory=dict)
    per_block: dict[str, dict[int, ProbeScore]] = field(default_factory=dict)
    per_window: dict[str, dict[str, ProbeScore]] = field(default_factory=dict)
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

    def best_window(self, kind: str = "attentive") -> tuple[str, ProbeScore] | None:
        """The window of blocks with the highest top-1 (None without a sweep)."""
        windows = self.per_window.get(kind) or {}
        if not windows:
            return None
        w = max(windows, key=lambda i: windows[i].top1)
        return w, windows[w]


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


def random_batches(
    x: torch.Tensor, y: torch.Tensor, batch_size: int, seed: int
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Endless seeded batches of in-memory rows (drawn with replacement)."""
    gen = torch.Generator().manual_seed(seed)
    n = x.shape[0]
    while True:
        idx = torch.randint(0, n, (min(batch_size, n),), generator=gen)
        yield x[idx], y[idx]


def chunks(
    x: torch.Tensor, y: torch.Tensor, size: int
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """In-memory rows in order, ``size`` at a time (for validation)."""
    for i in range(0, len(x), size):
        yield x[i : i + size], y[i : i + size]


def train_classifier(
    head: nn.Module,
    logits_of: Callable[[torch.Tensor], torch.Tensor],
    params: list[torch.Tensor],
    train: Iterator[tuple[torch.Tensor, torch.Tensor]],
    val: Iterable[tuple[torch.Tensor, torch.Tensor]],
    *,
    steps: int,
    lr: float,
    weight_decay: float,
) -> ProbeScore:
    """The probes' training loop: cross-entropy, AdamW, cosine decay to zero.

    Args:
        head: The probe head: put in train mode for training and eval mode (BatchNorm's
            running statistics) for validation.
        logits_of: Inputs (a batch of ``train``/``val`` rows) -> (B, C) logits.
        params: What AdamW updates (the head's, plus adapters for LoRA).
        train: Batches (inputs, labels), at least ``steps`` of them (streamed or in memory).
        val: Validation batches, each row once.
    """
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps))
    )
    head.train()
    for _, (x, y) in zip(range(steps), train, strict=False):
        loss = F.cross_entropy(logits_of(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    head.eval()
    logits, labels = [], []
    with torch.no_grad():
        for x, y in val:
            logits.append(logits_of(x))
            labels.append(y)
    return accuracy(torch.cat(logits), torch.cat(labels))


def fit_probe(
    probe: nn.Module,
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
) -> ProbeScore:
    """Train ``probe`` on in-memory (N, K, D) features (float16 as stored: upcast per
    batch); score it."""
    return train_classifier(
        probe,
        lambda x: probe(x.float()),
        list(probe.parameters()),
        random_batches(train_x, train_y, batch_size, seed),
        chunks(val_x, val_y, 512),
        steps=steps,
        lr=lr,
        weight_decay=weight_decay,
    )


def probe_inputs(cfg: ProbeConfig, num_blocks: int) -> dict[str, list[int]]:
    """What each probe reads: ``main`` (the mean of ``cfg.layers``) and, with a sweep,
    ``block_{b}`` for every block and ``window_{a}-{b}`` for every run of ``cfg.window``
    consecutive blocks (Table 7: single blocks and the official 6-block averages)."""
    inputs = {"main": cfg.resolved_layers(num_blocks)}
    if cfg.sweep:
        inputs.update({f"block_{b}": [b] for b in range(num_blocks)})
        inputs.update({f"window_{w[0]}-{w[-1]}": w for w in cfg.windows(num_blocks)})
    return inputs


def probe_cached(
    cache: FeatureCache, cfg: ProbeConfig, num_blocks: int, num_classes: int, num_heads: int
) -> ProbeReport:
    """Train every probe the config asks for on the cache's ``train`` shards (streamed) and
    score it on its ``val`` shards."""
    kinds = ["attentive", "linear"] if cfg.kind == "both" else [cfg.kind]
    inputs = probe_inputs(cfg, num_blocks)
    report = ProbeReport(layers=inputs["main"], val_images=cache.rows.get("val", 0))
    dim = None
    for kind in kinds:
        for name in inputs:
            torch.manual_seed(cfg.seed)  # same initialization and batches for every input
            train = cache.batches("train", name, cfg.batch_size, cfg.seed)
            first = next(train)
            dim = first[0].shape[-1]
            probe = make_probe(kind, dim, num_classes, num_heads)
            score = train_classifier(
                probe,
                lambda x, p=probe: p(x.float()),
                list(probe.parameters()),
                itertools.chain([first], train),
                cache.iterate("val", name),
                steps=cfg.steps,
                lr=cfg.lr,
                weight_decay=cfg.weight_decay,
            )
            if name == "main":
                report.main[kind] = score
            elif name.startswith("block_"):
                report.per_block.setdefault(kind, {})[int(name[6:])] = score
            else:
                report.per_window.setdefault(kind, {})[name[7:]] = score
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
    for kind, windows in report.per_window.items():
        for w, score in windows.items():
            out[f"probe/{kind}/window_{w}/top1"] = score.top1
        best_w = report.best_window(kind)
        if best_w is not None:
            out[f"probe/{kind}/best_window_first"] = int(best_w[0].split("-")[0])
            out[f"probe/{kind}/best_window_top1"] = best_w[1].top1
    if report.lora:
        for key, value in report.lora.items():
            out[f"probe/lora/{key}"] = value
    return out
