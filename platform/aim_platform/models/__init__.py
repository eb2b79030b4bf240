"""The AIM model library: plain PyTorch, importable without Ray."""

from aim_platform.models.aim import (
    AIMClassifier,
    AIMForPretraining,
    AIMTrunk,
    build_trunk,
    count_parameters,
    pixels_to_input,
    sample_mask,
    sample_prefix_lengths,
)
from aim_platform.models.heads import AttentiveProbe, LinearProbe, PixelHead
from aim_platform.models.layers import attention_mask, patchify, unpatchify
from aim_platform.models.losses import (
    chunk_losses,
    masked_patch_loss,
    masked_token_loss,
    next_patch_loss,
    next_token_loss,
    normalize_patches,
)
from aim_platform.models.patterns import PATTERNS, pattern_order
from aim_platform.models.sizes import SIZES, SizeSpec
from aim_platform.models.tokenizer import (
    Tokenizer,
    assign_tokens,
    fit_tokenizer,
    fit_tokenizer_from_arrays,
    kmeans,
)

__all__ = [
    "AIMClassifier",
    "AIMForPretraining",
    "AIMTrunk",
    "AttentiveProbe",
    "LinearProbe",
    "Tokenizer",
    "PATTERNS",
    "PixelHead",
    "SIZES",
    "SizeSpec",
    "assign_tokens",
    "attention_mask",
    "build_trunk",
    "chunk_losses",
    "count_parameters",
    "fit_tokenizer",
    "fit_tokenizer_from_arrays",
    "kmeans",
    "masked_patch_loss",
    "masked_token_loss",
    "next_patch_loss",
    "next_token_loss",
    "normalize_patches",
    "patchify",
    "pattern_order",
    "pixels_to_input",
    "sample_mask",
    "sample_prefix_lengths",
    "unpatchify",
]
