"""Small model configs and inputs shared by the model-level tests."""

from __future__ import annotations

import torch

from aim_platform.config import ModelConfig

TINY = dict(
    size="aim-tiny", embed_dim=32, num_blocks=2, num_heads=4, head={"num_blocks": 1, "width": 32}
)


def tiny(**kw) -> ModelConfig:
    """aim-tiny's 32 px / patch 4 grid at width 32, 2 blocks, a 1-block head (overridable)."""
    return ModelConfig(**{**TINY, **kw})


def random_pixels(b: int, cfg: ModelConfig, seed: int = 0) -> torch.Tensor:
    """(b, K, P) random uint8 patches from a seeded generator (same seed, same patches)."""
    gen = torch.Generator().manual_seed(seed)
    shape = (b, cfg.num_patches, cfg.patch_dim)
    return torch.randint(0, 256, shape, dtype=torch.uint8, generator=gen)
