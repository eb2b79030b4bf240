"""Building blocks of the AIM trunk and heads: patchify, position embedding, masks, blocks.

Notation in shape comments: B batch, K patches in the sequence, P = patch*patch*3 values per
patch, D width, H heads, Dh = D / H.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention

AttentionKind = Literal["prefix_causal", "causal", "bidirectional"]


def patchify(images: torch.Tensor, patch_size: int) -> torch.Tensor:
    """Cut images into raster-ordered, flattened patches.

    Args:
        images: (B, C, H, W), H and W divisible by ``patch_size``.
        patch_size: Side p of a square patch.

    Returns:
        (B, K, p*p*C) with K = (H/p)*(W/p); within a patch values are ordered (row, col, channel).
    """
    b, c, h, w = images.shape
    gh, gw = h // patch_size, w // patch_size
    x = images.reshape(b, c, gh, patch_size, gw, patch_size)  # (B, C, gh, p, gw, p)
    x = x.permute(0, 2, 4, 3, 5, 1)  # (B, gh, gw, p, p, C)
    return x.reshape(b, gh * gw, patch_size * patch_size * c)  # (B, K, P)


def unpatchify(patches: torch.Tensor, patch_size: int, channels: int = 3) -> torch.Tensor:
    """Inverse of :func:`patchify` for square images: (B, K, p*p*C) -> (B, C, H, W)."""
    b, k, _ = patches.shape
    g = int(round(k**0.5))
    if g * g != k:
        raise ValueError(f"unpatchify needs a square grid, got K={k}")
    x = patches.reshape(b, g, g, patch_size, patch_size, channels)  # (B, gh, gw, p, p, C)
    x = x.permute(0, 5, 1, 3, 2, 4)  # (B, C, gh, p, gw, p)
    return x.reshape(b, channels, g * patch_size, g * patch_size)


def sincos_pos_embed_2d(grid_size: int, dim: int) -> torch.Tensor:
    """Fixed 2-D sine-cosine position embedding, identical to the official AIM v1 code.

    The first half of the channels encodes the column, the second half the row; each half is
    ``[sin(pos * omega), cos(pos * omega)]`` with ``omega_i = 10000^(-i / (dim/4))``.

    Returns:
        (K, dim) float32, K = grid_size**2 in raster order.
    """
    if dim % 4:
        raise ValueError(f"sine-cosine embedding needs dim divisible by 4, got {dim}")
    coords = torch.arange(grid_size, dtype=torch.float32)
    rows, cols = torch.meshgrid(coords, coords, indexing="ij")  # (g, g) each

    def embed_1d(pos: torch.Tensor) -> torch.Tensor:
        quarter = dim // 4
        omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float32) / quarter)  # (D/4,)
        angles = pos.reshape(-1, 1) * omega.reshape(1, -1)  # (K, D/4)
        return torch.cat([angles.sin(), angles.cos()], dim=1)  # (K, D/2)

    return torch.cat([embed_1d(cols), embed_1d(rows)], dim=1)  # (K, D)


def may_attend(
    q_idx: torch.Tensor, kv_idx: torch.Tensor, prefix_len: torch.Tensor | int
) -> torch.Tensor:
    """The attention rule, elementwise: query i may attend key j iff ``j <= i or j < S``.

    The one predicate behind both :func:`attention_mask` (dense boolean masks for SDPA) and
    :func:`flex_block_mask` (FlexAttention's ``mask_mod``). ``S = 0`` gives plain causal.
    Arguments broadcast against each other.
    """
    return (kv_idx <= q_idx) | (kv_idx < prefix_len)


def _needs_mask(kind: AttentionKind, prefix_len: torch.Tensor | None) -> bool:
    """False for bidirectional attention; raises on an unknown kind or a missing prefix."""
    if kind == "bidirectional":
        return False
    if kind not in ("causal", "prefix_causal"):
        raise ValueError(f"unknown attention kind {kind!r}")
    if kind == "prefix_causal" and prefix_len is None:
        raise ValueError("prefix_causal attention needs prefix_len (one length per sample)")
    return True


def attention_mask(
    kind: AttentionKind,
    num_tokens: int,
    prefix_len: torch.Tensor | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor | None:
    """Boolean attention mask (True = may attend) for :func:`F.scaled_dot_product_attention`.

    - ``bidirectional``: None (every token sees every token).
    - ``causal``: token i sees tokens j <= i; (K, K).
    - ``prefix_causal``: token i sees j <= i, and also every j < S_b (its sample's prefix), so
      the first S_b tokens attend to each other bidirectionally and the rest causally;
      (B, 1, K, K). Nothing ever sees a token after the prefix that lies ahead of it.

    Args:
        kind: Attention kind.
        num_tokens: K.
        prefix_len: (B,) integer prefix lengths S, required for ``prefix_causal``.
        device: Where to build the mask (default: ``prefix_len``'s device, else the CPU), so
            that no mask is copied between devices.
    """
    if not _needs_mask(kind, prefix_len):
        return None
    if device is None:
        device = prefix_len.device if prefix_len is not None else "cpu"
    idx = torch.arange(num_tokens, device=device)  # (K,)
    if kind == "causal":
        return may_attend(idx.view(-1, 1), idx.view(1, -1), 0)  # (K, K)
    prefix = prefix_len.to(device).view(-1, 1, 1, 1)  # (B, 1, 1, 1)
    return may_attend(idx.view(1, 1, -1, 1), idx.view(1, 1, 1, -1), prefix)  # (B, 1, K, K)


def flex_block_mask(
    kind: AttentionKind,
    num_tokens: int,
    prefix_len: torch.Tensor | None = None,
    device: torch.device | str | None = None,
) -> BlockMask | None:
    """The same mask as :func:`attention_mask`, as a FlexAttention :class:`BlockMask`.

    Built from :func:`may_attend` per (sample, query, key); blocks that are fully masked are
    skipped by the kernel, so prefix-causal attention costs about what causal attention does.

    Args:
        kind: Attention kind (``bidirectional`` gives None: no mask needed).
        num_tokens: K.
        prefix_len: (B,) integer prefix lengths S, required for ``prefix_causal``.
        device: Where the block mask lives (default: ``prefix_len``'s device, else the CPU).
    """
    if not _needs_mask(kind, prefix_len):
        return None
    if device is None:
        device = prefix_len.device if prefix_len is not None else "cpu"
    if kind == "causal":
        batch = None

        def mask_mod(b: torch.Tensor, h: torch.Tensor, q: torch.Tensor, kv: torch.Tensor):
            return may_attend(q, kv, 0)

    else:
        prefix = prefix_len.to(device)  # (B,)
        batch = prefix.shape[0]

        def mask_mod(b: torch.Tensor, h: torch.Tensor, q: torch.Tensor, kv: torch.Tensor):
            return may_attend(q, kv, prefix[b])

    return create_block_mask(mask_mod, batch, None, num_tokens, num_tokens, device=device)


_compiled_flex: Callable[..., torch.Tensor] | None = None


def compiled_flex_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_mask: BlockMask
) -> torch.Tensor:
    """:func:`flex_attention` under ``torch.compile`` (compiled once per process, lazily).

    Eager FlexAttention is a slow reference that materializes every score; the compiled one
    generates a fused kernel (Triton on GPUs, C++ on CPUs).
    """
    if torch.compiler.is_compiling():  # inside a compiled block: trace into its graph
        return flex_attention(q, k, v, block_mask=block_mask)  # (B, H, K, Dh)
    global _compiled_flex
    if _compiled_flex is None:
        _compiled_flex = torch.compile(flex_attention, dynamic=False)
    return _compiled_flex(q, k, v, block_mask=block_mask)  # (B, H, K, Dh)


class PatchEmbed(nn.Module):
    """Linear embedding of flattened patches, then LayerNorm (the official conv, as a matmul).

    The official strided ``Conv2d(3, D, p, stride=p)`` is a linear map on each patch; holding
    it as ``nn.Linear(P, D)`` lets the model consume the uint8 patch sequences the data
    pipeline delivers without re-assembling images. Weights convert with
    :func:`conv_weight_to_linear`.
    """

    def __init__(self, patch_dim: int, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.proj = nn.Linear(patch_dim, dim, bias=True)
        self.norm = nn.LayerNorm(dim, eps=eps)

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        return self.norm(self.proj(patches))  # (B, K, P) -> (B, K, D)


def conv_weight_to_linear(weight: torch.Tensor) -> torch.Tensor:
    """(D, C, p, p) conv kernel -> (D, p*p*C) linear weight in :func:`patchify` order."""
    d = weight.shape[0]
    return weight.permute(0, 2, 3, 1).reshape(d, -1)


class Attention(nn.Module):
    """Multi-head self-attention without biases.

    The mask picks the kernel: a boolean tensor (or None) runs
    :func:`F.scaled_dot_product_attention`; a :class:`BlockMask` runs FlexAttention.
    """

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.proj = nn.Linear(dim, dim, bias=False)

    def forward(
        self, x: torch.Tensor, mask: torch.Tensor | BlockMask | None = None
    ) -> torch.Tensor:
        b, k, d = x.shape
        qkv = self.qkv(x).reshape(b, k, 3, self.num_heads, d // self.num_heads)  # (B,K,3,H,Dh)
        q, key, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # 3 x (B, H, K, Dh)
        if isinstance(mask, BlockMask):
            out = compiled_flex_attention(q, key, v, mask)  # (B, H, K, Dh)
        else:
            out = F.scaled_dot_product_attention(q, key, v, attn_mask=mask)  # (B, H, K, Dh)
        out = out.transpose(1, 2).reshape(b, k, d)  # (B, K, D)
        return self.proj(out)


class MLP(nn.Module):
    """Two bias-free linear maps with GELU in between."""

    def __init__(self, dim: int, hidden: int, bias: bool = False) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden, bias=bias)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm_1(x)), then x + mlp(norm_2(x))."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, eps: float = 1e-6):
        super().__init__()
        self.norm_1 = nn.LayerNorm(dim, eps=eps)
        self.attn = Attention(dim, num_heads)
        self.norm_2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = MLP(dim, int(dim * mlp_ratio))

    def forward(
        self, x: torch.Tensor, mask: torch.Tensor | BlockMask | None = None
    ) -> torch.Tensor:
        x = x + self.attn(self.norm_1(x), mask)  # (B, K, D)
        return x + self.mlp(self.norm_2(x))  # (B, K, D)


class ResidualMLPBlock(nn.Module):
    """Pre-norm residual MLP applied to each token independently (pixel-head block)."""

    def __init__(self, dim: int, mlp_ratio: float = 4.0, eps: float = 1e-6) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim, eps=eps)
        self.mlp = MLP(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.mlp(self.norm(x))  # (B, K, W)


# Input normalization of the official AIM v1 code (ImageNet statistics).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@functools.cache
def _imagenet_stats(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """ImageNet mean and std, (3,) float32 on ``device``, made once per device.

    ``torch.tensor(..., device="cuda")`` is a blocking host-to-device copy (it synchronizes the
    stream); built per step it would stall the host behind the GPU twice every step.
    """
    with torch.inference_mode(False):
        mean = torch.tensor(IMAGENET_MEAN, device=device)  # (3,)
        std = torch.tensor(IMAGENET_STD, device=device)  # (3,)
    return mean, std


def pixels_to_input(patches: torch.Tensor) -> torch.Tensor:
    """uint8 patch sequences -> normalized float model input.

    Args:
        patches: (B, K, p*p*3) uint8 (or float in [0, 255]), channel last within a patch.

    Returns:
        (B, K, p*p*3) float32: ``(x / 255 - mean_c) / std_c`` per colour channel.
    """
    b, k, pdim = patches.shape
    x = patches.float().reshape(b, k, pdim // 3, 3) / 255.0  # (B, K, p*p, 3)
    mean, std = _imagenet_stats(x.device)  # (3,) each
    return ((x - mean) / std).reshape(b, k, pdim)  # (B, K, P)
