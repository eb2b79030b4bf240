"""The registry of AIM sizes: trunk shapes (paper Table 1) and their pixel-head defaults.

Pure data, so that both :mod:`aim_platform.config` and the model code can read it.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class SizeSpec:
    """Shapes of one registered AIM variant.

    Attributes:
        img_size: Square input resolution in pixels.
        patch_size: Side of a square patch in pixels.
        embed_dim: Trunk width d.
        num_blocks: Trunk depth L.
        num_heads: Attention heads per trunk block.
        head_blocks: Residual MLP blocks in the default pixel head.
        head_width: Width of the default pixel head.
    """

    img_size: int
    patch_size: int
    embed_dim: int
    num_blocks: int
    num_heads: int
    head_blocks: int
    head_width: int


SIZES: dict[str, SizeSpec] = {
    # Paper Table 1 (patch 14 at 224 px -> 256 patches); pixel head: 12 blocks of width 2048.
    "aim-600M": SizeSpec(224, 14, 1536, 24, 12, 12, 2048),
    "aim-1B": SizeSpec(224, 14, 2048, 24, 16, 12, 2048),
    "aim-3B": SizeSpec(224, 14, 3072, 24, 24, 12, 2048),
    "aim-7B": SizeSpec(224, 14, 4096, 32, 32, 12, 2048),
    # CPU variants for tests and the demo.
    "aim-tiny": SizeSpec(32, 4, 128, 4, 4, 2, 256),
    "aim-small": SizeSpec(64, 8, 256, 6, 4, 4, 512),
}
