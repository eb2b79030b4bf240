"""Features from a frozen trunk: the Python API and the Ray Data actor that computes them.

A trunk is found by path: a folder written by pre-training (``trunk.safetensors`` +
``config.yaml``) or a file written by ``aimctl convert-ml-aim``. Images go in as PIL images,
uint8 arrays (N, H, W, 3) already at the model's size, uint8 patch sequences (N, K, P), or a
Ray Dataset with a ``patches`` column; features come out per block (bidirectional attention).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from aim_platform.config import ModelConfig
from aim_platform.models.aim import AIMTrunk, pixels_to_input
from aim_platform.models.layers import AttentionKind, attention_mask, patchify
from aim_platform.models.patterns import pattern_order


def load_trunk(
    path: str, storage_options: dict[str, Any] | None = None
) -> tuple[AIMTrunk, ModelConfig]:
    """A frozen float32 trunk (eval mode, no gradients) and its model config."""
    if path.endswith(".pt"):
        from aim_platform.models.interop import load_converted

        clf = load_converted(path)
        trunk = clf.trunk
        d = trunk.embed_dim
        grid = int(round(trunk.num_patches**0.5))
        patch = int(round((trunk.patch_embed.proj.in_features / 3) ** 0.5))
        cfg = ModelConfig(
            size=None,
            img_size=grid * patch,
            patch_size=patch,
            embed_dim=d,
            num_blocks=len(trunk.blocks),
            num_heads=trunk.blocks[0].attn.num_heads,
        )
    else:
        from aim_platform.models.trunk_file import read_trunk

        trunk, job = read_trunk(path, storage_options)
        cfg = job.model
    trunk.eval().requires_grad_(False)
    return trunk, cfg


def sequence_order(cfg: ModelConfig) -> torch.Tensor | None:
    """The trunk's pre-training order: (K,) raster index of each sequence position, None for
    raster (the identity). A causal probe must run in this order (paper Table 3b)."""
    if cfg.pattern == "raster":
        return None
    return pattern_order(cfg.pattern, cfg.grid_size, cfg.pattern_seed)


def block_outputs(
    trunk: AIMTrunk,
    pixels: torch.Tensor,
    layers: Sequence[int],
    attention: AttentionKind = "bidirectional",
    order: torch.Tensor | None = None,
) -> torch.Tensor:
    """Raw outputs of the chosen blocks for uint8 patch sequences.

    With ``order`` the trunk runs in its pre-training sequence order, as in pre-training:
    patches and their position embeddings permuted by ``order`` and, for ``causal``, the mask
    over that order (a spiral trunk's first position sees only the spiral's first patch). The
    outputs come back in raster order either way, so token k is always raster patch k.

    Args:
        trunk: A trunk (frozen or not).
        pixels: (B, K, P) uint8 patch sequences in raster order.
        layers: Block indices (ascending, non-negative).
        attention: ``bidirectional`` (downstream default) or ``causal`` (Tables 3b, 3d).
        order: (K,) raster index of each sequence position (:func:`sequence_order`); None:
            raster.

    Returns:
        (B, L, K, D) with L = len(layers), tokens in raster order.
    """
    x = pixels_to_input(pixels)  # (B, K, P) float, raster order
    if order is not None:
        order = order.to(x.device)
        x = x[:, order]  # (B, K, P) in sequence order
    mask = attention_mask(attention, x.shape[1])
    mask = None if mask is None else mask.to(x.device)
    _, outs = trunk(x, mask=mask, positions=order, num_blocks=max(layers) + 1)
    feats = torch.stack([outs[i] for i in layers], dim=1)  # (B, L, K, D) in sequence order
    if order is None:
        return feats
    return feats[:, :, torch.argsort(order)]  # (B, L, K, D) back in raster order


def _to_patches(images: Any, cfg: ModelConfig) -> torch.Tensor:
    """PIL images, (N, H, W, 3) uint8 images or (N, K, P) patches -> (N, K, P) uint8."""
    from PIL import Image

    from aim_platform.data.transforms import eval_view, patchify_hwc

    if isinstance(images, torch.Tensor):
        images = images.numpy()
    if isinstance(images, np.ndarray) and images.ndim == 3:
        if images.shape[1:] != (cfg.num_patches, cfg.patch_dim):
            raise ValueError(
                f"patches must be (N, {cfg.num_patches}, {cfg.patch_dim}), got {images.shape}"
            )
        return torch.from_numpy(np.ascontiguousarray(images, dtype=np.uint8))
    if isinstance(images, np.ndarray) and images.ndim == 4:
        if images.shape[1:] != (cfg.img_size, cfg.img_size, 3):
            raise ValueError(
                f"images must be (N, {cfg.img_size}, {cfg.img_size}, 3) uint8, got {images.shape}"
            )
        x = torch.from_numpy(np.ascontiguousarray(images, dtype=np.uint8)).permute(0, 3, 1, 2)
        return patchify(x, cfg.patch_size)  # (N, K, P)
    out = []
    for img in images:
        if not isinstance(img, Image.Image):
            raise TypeError(f"expected PIL images, uint8 arrays or patches, got {type(img)}")
        view = eval_view(img, cfg.img_size)  # (S, S, 3), the validation pipeline's view
        out.append(patchify_hwc(view, cfg.patch_size))
    return torch.from_numpy(np.stack(out))


def embed(
    trunk: AIMTrunk,
    cfg: ModelConfig,
    images: Any,
    layers: Sequence[int] = (-1,),
    pool: bool = True,
    batch_size: int = 64,
) -> torch.Tensor:
    """Features of images: the mean of the chosen blocks' outputs, mean-pooled over patches.

    Args:
        trunk: From :func:`load_trunk`.
        cfg: Its model config.
        images: PIL images (any size: the evaluation view of
            :func:`aim_platform.data.transforms.eval_view`, resize to 256/224 of the model's
            size then centre crop), (N, H, W, 3) uint8 arrays already at the
            model's size, or (N, K, P) uint8 patch sequences. For a Ray Dataset use
            :func:`iter_features`.
        layers: Blocks to average (negative counts from the end).
        pool: Mean over patches -> (N, D); False keeps tokens -> (N, K, D).
    """
    n = len(trunk.blocks)
    idx = sorted({i % n for i in layers})
    patches = _to_patches(images, cfg)
    outs = []
    with torch.no_grad():
        for start in range(0, len(patches), batch_size):
            batch = patches[start : start + batch_size]  # (B, K, P)
            feats = block_outputs(trunk, batch, idx, order=sequence_order(cfg)).mean(1)
            outs.append(feats.mean(1) if pool else feats)  # (B, D) or (B, K, D)
    return torch.cat(outs)
