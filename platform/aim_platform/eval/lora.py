"""LoRA (paper Table 8): rank-r adapters on the trunk's attention projections, trained
together with the attentive probe while every original trunk weight stays frozen.

The paper states only "LoRA (rank=8)" and "0.1% of the trunk parameters"; the placement
and scale follow apple/ml-aim's ``LoraAttention`` (loralib): adapters on q and v of the fused
qkv projection and on the output projection, scale alpha/r with loralib's default alpha 1.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import torch
from torch import nn

from aim_platform.config import ProbeConfig
from aim_platform.models.aim import AIMTrunk
from aim_platform.models.heads import AttentiveProbe


class LoRALinear(nn.Module):
    """``base(x) + scale * [x A_j^T B_j^T for each enabled output part j]``, ``base`` frozen.

    The output features split into ``len(enabled)`` equal parts (q, k, v for a fused qkv);
    each enabled part has its own rank-r pair (A_j, B_j), as loralib's ``MergedLinear``;
    disabled parts get no update. A starts Kaiming-uniform, B at zero (the wrapped layer
    starts equal to ``base``); ``scale = alpha / rank``.
    """

    def __init__(
        self,
        base: nn.Linear,
        rank: int,
        alpha: float | None = None,
        enabled: Sequence[bool] = (True,),
    ) -> None:
        super().__init__()
        if base.out_features % len(enabled) or not any(enabled):
            raise ValueError(f"enabled={list(enabled)} does not split {base.out_features}")
        self.base = base.requires_grad_(False)
        self.scale = (alpha if alpha is not None else rank) / rank
        self.parts = len(enabled)
        self.enabled = [j for j, on in enumerate(enabled) if on]
        m, part = len(self.enabled), base.out_features // self.parts
        self.lora_a = nn.Parameter(torch.empty(m, rank, base.in_features))  # (m, r, in)
        self.lora_b = nn.Parameter(torch.zeros(m, part, rank))  # (m, out/parts, r)
        for a in self.lora_a:
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))

    def delta_weight(self) -> torch.Tensor:
        """(out, in) update ``scale * B_j A_j`` in the enabled parts' rows, zeros elsewhere."""
        part = self.base.out_features // self.parts
        delta = self.lora_a.new_zeros(self.parts, part, self.base.in_features)
        delta[self.enabled] = self.lora_b @ self.lora_a  # (m, out/parts, in)
        return self.scale * delta.reshape(self.base.out_features, self.base.in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        low = torch.einsum("...i,mri->...mr", x, self.lora_a)  # (..., m, r)
        upd = torch.einsum("...mr,mor->...mo", low, self.lora_b)  # (..., m, out/parts)
        full = upd.new_zeros(*upd.shape[:-2], self.parts, upd.shape[-1])
        full[..., self.enabled, :] = upd  # (..., parts, out/parts)
        return self.base(x) + self.scale * full.flatten(-2)  # (..., out)

    def merged(self) -> nn.Linear:
        """A plain Linear with the adapter folded into its weight."""
        out = nn.Linear(
            self.base.in_features, self.base.out_features, bias=self.base.bias is not None
        )
        with torch.no_grad():
            out.weight.copy_(self.base.weight + self.delta_weight())
            if self.base.bias is not None:
                out.bias.copy_(self.base.bias)
        return out


LoRAPlacement = Literal["official", "qkv_proj"]

# Which output parts of each attention projection carry an adapter. official: apple/ml-aim's
# LoraAttention (loralib MergedLinear on qkv with enable_lora=[True, False, True], i.e. q and
# v but not k, and loralib Linear on proj); qkv_proj: one adapter over the whole qkv + proj.
PLACEMENTS: dict[str, dict[str, tuple[bool, ...]]] = {
    "official": {"qkv": (True, False, True), "proj": (True,)},
    "qkv_proj": {"qkv": (True,), "proj": (True,)},
}


def default_alpha(placement: str, rank: int) -> float:
    """1 for ``official`` (loralib's default: scale 1/r), r for ``qkv_proj`` (scale 1)."""
    return 1.0 if placement == "official" else float(rank)


def add_lora(
    trunk: AIMTrunk, rank: int, placement: LoRAPlacement = "official", alpha: float | None = None
) -> list[nn.Parameter]:
    """Freeze the trunk and wrap every block's attention projections with LoRA.

    Args:
        trunk: The trunk (modified in place).
        rank: r.
        placement: ``official`` (q, v and proj; scale 1/r by default, as apple/ml-aim with
            loralib's default alpha 1) or ``qkv_proj`` (q, k, v and proj; scale 1).
        alpha: Scale numerator; None: the placement's default.

    Returns:
        The adapter parameters (the only trainable trunk parameters afterwards).
    """
    if placement not in PLACEMENTS:
        raise ValueError(f"unknown lora_placement {placement!r}; known: {sorted(PLACEMENTS)}")
    alpha = default_alpha(placement, rank) if alpha is None else alpha
    trunk.requires_grad_(False)
    params: list[nn.Parameter] = []
    for block in trunk.blocks:
        for name, enabled in PLACEMENTS[placement].items():
            wrapped = LoRALinear(getattr(block.attn, name), rank, alpha, enabled)
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
    order: torch.Tensor | None = None,
) -> dict[str, float]:
    """Train adapters + attentive probe on uint8 patches; top-1/top-5 and trained fraction.

    ``order``: the trunk's pre-training sequence order (None: raster), see
    :func:`aim_platform.eval.features.block_outputs`."""
    from aim_platform.eval.features import block_outputs
    from aim_platform.eval.probe import chunks, random_batches, train_classifier

    torch.manual_seed(cfg.seed)
    adapters = add_lora(trunk, cfg.lora_rank or 8, cfg.lora_placement, cfg.lora_alpha)
    probe = AttentiveProbe(trunk.embed_dim, num_classes, trunk.blocks[0].attn.num_heads)

    def logits_of(pixels: torch.Tensor) -> torch.Tensor:
        feats = block_outputs(trunk, pixels, layers, cfg.attention, order).mean(1)  # (B, K, D)
        return probe(feats)

    (tx, ty), (vx, vy) = train, val
    score = train_classifier(
        probe,
        logits_of,
        [*adapters, *probe.parameters()],
        random_batches(tx, ty, cfg.batch_size, cfg.seed),
        chunks(vx, vy, 256),
        steps=cfg.steps,
        lr=cfg.lr,
        weight_decay=cfg.weight_decay,
    )
    return {"top1": score.top1, "top5": score.top5, "trained_fraction": trained_fraction(trunk)}
