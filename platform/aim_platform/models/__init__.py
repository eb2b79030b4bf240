"""The AIM model library: plain PyTorch, importable without Ray."""

import importlib
from typing import Any

# Names are imported on first use (PEP 562), so that `aim_platform.models.sizes` (pure data,
# read by the configuration) loads without torch.
_HOMES = {
    "AIMClassifier": "aim_platform.models.aim",
    "AIMForPretraining": "aim_platform.models.aim",
    "AIMTrunk": "aim_platform.models.aim",
    "build_trunk": "aim_platform.models.aim",
    "count_parameters": "aim_platform.models.aim",
    "pixels_to_input": "aim_platform.models.layers",
    "sample_mask": "aim_platform.models.aim",
    "sample_prefix_lengths": "aim_platform.models.aim",
    "AttentiveProbe": "aim_platform.models.heads",
    "LinearProbe": "aim_platform.models.heads",
    "PixelHead": "aim_platform.models.heads",
    "attention_mask": "aim_platform.models.layers",
    "patchify": "aim_platform.models.layers",
    "unpatchify": "aim_platform.models.layers",
    "chunk_losses": "aim_platform.models.losses",
    "masked_patch_loss": "aim_platform.models.losses",
    "masked_token_loss": "aim_platform.models.losses",
    "next_patch_loss": "aim_platform.models.losses",
    "next_token_loss": "aim_platform.models.losses",
    "normalize_patches": "aim_platform.models.losses",
    "PATTERNS": "aim_platform.models.patterns",
    "pattern_order": "aim_platform.models.patterns",
    "SIZES": "aim_platform.models.sizes",
    "SizeSpec": "aim_platform.models.sizes",
    "Tokenizer": "aim_platform.models.tokenizer",
    "assign_tokens": "aim_platform.models.tokenizer",
    "fit_tokenizer_from_arrays": "aim_platform.models.tokenizer",
    "kmeans": "aim_platform.models.tokenizer",
}


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module 'aim_platform.models' has no attribute {name!r}")
    return getattr(importlib.import_module(home), name)


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
