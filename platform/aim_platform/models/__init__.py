"""The AIM model library: plain PyTorch, importable without Ray."""

from aim_platform.models.aim import (
    AIMClassifier,
    AIMForPretraining,
    AIMTrunk,
    build_trunk,
    count_parameters,
    pixels_to_input,
    sample_prefix_lengths,
)
from aim_platform.models.heads import AttentiveProbe, LinearProbe, PixelHead
from aim_platform.models.layers import attention_mask, patchify, unpatchify
from aim_platform.models.losses import chunk_losses, next_patch_loss, normalize_patches
from aim_platform.models.patterns import PATTERNS, pattern_order
from aim_platform.models.sizes import SIZES, SizeSpec

__all__ = [
    "AIMClassifier",
    "AIMForPretraining",
    "AIMTrunk",
    "AttentiveProbe",
    "LinearProbe",
    "PATTERNS",
    "PixelHead",
    "SIZES",
    "SizeSpec",
    "attention_mask",
    "build_trunk",
    "chunk_losses",
    "count_parameters",
    "next_patch_loss",
    "normalize_patches",
    "patchify",
    "pattern_order",
    "pixels_to_input",
    "sample_prefix_lengths",
    "unpatchify",
]
