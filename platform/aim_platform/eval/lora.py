"""LoRA (paper Table 8): rank-r adapters on the trunk's attention projections, trained
together with the attentive probe while every original trunk weight stays frozen."""

from __future__ import annotations

import math

import torch
from torch import nn

from aim_platform.config import ProbeConfig
from aim_platform.models.aim import AIMTrunk
from aim_platform.models.heads import AttentiveProbe


class LoRALinear(nn.Module):
    """``base(x) + scale * x A^T B^T`` with a frozen ``base``; B starts at zero."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float | None = None) -> None:
        super().__init__()
        self.base = base.requires_grad_(False)
        self.scale = (alpha if alpha is not None else rank) / rank
        self.lora_a = nn.Parameter(torch.empty(rank, base.in_features))
        self.lora_b = nn.Parameter(torch.zeros(base.out_features, rank))
        nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        update = (x @ self.lora_a.t()) @ self.lora_b.t()  # (..., in) -> (..., r) -> (..., out)
        return self.base(x) + self.scale * update

    def merged(self) -> nn.Linear:
        """A plain Linear with the adapter folded into its weight."""
        out = nn.Linear(
            self.base.in_features, self.base.out_features, bias=self.base.bias is not None
        )
        with torch.no_grad():
            out.weight.copy_(self.base.weight + self.scale * self.lora_b @ self.lora_a)
            if self.base.bias is not None:
                out.bias.copy_(self.base.bias)
        return out


def add_lora(trunk: AIMTrunk, rank: int) -> list[nn.Parameter]:
    """Freeze the trunk and wrap every block's ``attn.qkv`` and ``attn.proj`` with LoRA.

    Returns:
        The adapter parameters (the only trainable trunk parameters afterwards).
    """
    trunk.requires_grad_(False)
    params: list[nn.Parameter] = []
    for block in trunk.blocks:
        for name in ("qkv", "proj"):
            wrapped = LoRALinear(getattr(block.attn, name), rank)
            setattr(block.attn, name, wrapped)
            params += [wrapped.lora_a, wrapped.lora_b]
    return params


def merge_lora(trunk: AIMTrunk) -> AIMTrunk:
    """Fold every adapter into its projection, in place (plain Linears again)."""
    for block in trunk.blocks:
        for name in ("qkv", "proj"):
            layer = getattr(block.attn, name)
            if isinstance(layer, LoRALinear):
                setattr(block.attn, name, layer.merged())
    return trunk


def trained_fraction(trunk: AIMTrunk) -> float:
    """Adapter parameters over the original trunk parameters."""
    lora = sum(p.numel() for n, p in trunk.named_parameters() if "lora_" in n)
    base = sum(p.numel() for n, p in trunk.named_parameters() if "lora_" not in n)
    return lora / base


def fit_lora_probe(
    trunk: AIMTrunk,
    layers: list[int],
    train: tuple[torch.Tensor, torch.Tensor],
    val: tuple[torch.Tensor, torch.Tensor],
    num_classes: int,
    cfg: ProbeConfig,
) -> dict[str, float]:
    """Train adapters + attentive probe on uint8 patches; top-1/top-5 and trained fraction."""
    from aim_platform.eval.features import block_outputs
    from aim_platform.eval.probe import train_classifier

    torch.manual_seed(cfg.seed)
    adapters = add_lora(trunk, cfg.lora_rank or 8)
    probe = AttentiveProbe(trunk.embed_dim, num_classes, trunk.blocks[0].attn.num_heads)

    def logits_of(pixels: torch.Tensor) -> torch.Tensor:
        feats = block_outputs(trunk, pixels, layers, cfg.attention).mean(1)  # (B, K, D)
        return probe(feats)

    (tx, ty), (vx, vy) = train, val
    score = train_classifier(
        probe,
        logits_of,
        [*adapters, *probe.parameters()],
        tx,
        ty,
        vx,
        vy,
        steps=cfg.steps,
        batch_size=cfg.batch_size,
        lr=cfg.lr,
        weight_decay=cfg.weight_decay,
        seed=cfg.seed,
        eval_batch=256,
    )
    return {"top1": score.top1, "top5": score.top5, "trained_fraction": trained_fraction(trunk)}
