"""Heads: pixel heads for pre-training (paper Table 3e/4) and probes for downstream (eq. 4)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from aim_platform.models.layers import Block, ResidualMLPBlock, attention_mask


class PixelHead(nn.Module):
    """Maps trunk features to patch pixels, each position predicting the next patch.

    ``patch_dim`` is the output width P: pixels per patch, or the codebook size V when the
    target is discrete tokens (the head then outputs logits). For the masked objective each
    position predicts its own patch and the transformer head attends bidirectionally
    (``causal=False``).

    Kinds:
        ``none``: one linear map D -> P.
        ``mlp``: linear D -> W, ``num_blocks`` residual pre-norm MLP blocks (ratio 4) applied to
            each patch independently, LayerNorm, linear W -> P (paper default 12 x 2048).
        ``transformer``: linear D -> W, ``num_blocks`` causal (or bidirectional) transformer
            blocks of width W, LayerNorm, linear W -> P.
    """

    def __init__(
        self,
        kind: str,
        in_dim: int,
        patch_dim: int,
        num_blocks: int = 12,
        width: int = 2048,
        mlp_ratio: float = 4.0,
        num_heads: int = 8,
        eps: float = 1e-6,
        causal: bool = True,
    ) -> None:
        super().__init__()
        self.kind = kind
        self.causal = causal
        if kind == "none":
            self.proj_in = nn.Identity()
            self.blocks = nn.ModuleList()
            self.norm = nn.Identity()
            self.out = nn.Linear(in_dim, patch_dim, bias=True)
            return
        if kind == "mlp":
            blocks = [ResidualMLPBlock(width, mlp_ratio, eps) for _ in range(num_blocks)]
        elif kind == "transformer":
            blocks = [Block(width, num_heads, mlp_ratio, eps) for _ in range(num_blocks)]
        else:
            raise ValueError(f"unknown pixel head kind {kind!r}; known: none, mlp, transformer")
        self.proj_in = nn.Linear(in_dim, width, bias=False)
        self.blocks = nn.ModuleList(blocks)
        self.norm = nn.LayerNorm(width, eps=eps)
        self.out = nn.Linear(width, patch_dim, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.proj_in(x)  # (B, K, D) -> (B, K, W)
        if self.kind == "transformer":
            kind = "causal" if self.causal else "bidirectional"
            mask = attention_mask(kind, x.shape[1], device=x.device)  # (K, K) or None
            for block in self.blocks:
                x = block(x, mask)  # (B, K, W)
        else:
            for block in self.blocks:
                x = block(x)  # (B, K, W), each patch independently
        return self.out(self.norm(x))  # (B, K, P)


class AttentiveProbe(nn.Module):
    """Attention pooling classifier (paper eq. 4; the official ``AttentionPoolingClassifier``).

    BatchNorm without affine over channels, one learned query attending over the tokens with
    bias-free key and value maps (multi-head), then a bias-free linear classifier. Parameters:
    2*D^2 (keys, values) + D (query) + D*C (classifier).
    """

    def __init__(
        self, dim: int, num_classes: int, num_heads: int = 12, use_batch_norm: bool = True
    ) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.bn = nn.BatchNorm1d(dim, affine=False, eps=1e-6) if use_batch_norm else nn.Identity()
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim) * 0.02)
        self.k = nn.Linear(dim, dim, bias=False)
        self.v = nn.Linear(dim, dim, bias=False)
        self.linear = nn.Linear(dim, num_classes, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        h, dh = self.num_heads, d // self.num_heads
        x = self.bn(x.transpose(1, 2)).transpose(1, 2)  # (B, N, D), normalized per channel
        q = self.cls_token.expand(b, -1, -1).reshape(b, 1, h, dh).transpose(1, 2)  # (B, H, 1, Dh)
        k = self.k(x).reshape(b, n, h, dh).transpose(1, 2)  # (B, H, N, Dh)
        v = self.v(x).reshape(b, n, h, dh).transpose(1, 2)  # (B, H, N, Dh)
        pooled = F.scaled_dot_product_attention(q, k, v)  # (B, H, 1, Dh)
        pooled = pooled.transpose(1, 2).reshape(b, d)  # (B, D)
        return self.linear(pooled)  # (B, C)


class LinearProbe(nn.Module):
    """Mean-pooled tokens, BatchNorm without affine, then a linear classifier."""

    def __init__(self, dim: int, num_classes: int) -> None:
        super().__init__()
        self.bn = nn.BatchNorm1d(dim, affine=False, eps=1e-6)
        self.linear = nn.Linear(dim, num_classes, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(self.bn(x.mean(dim=1)))  # (B, N, D) -> (B, D) -> (B, C)
