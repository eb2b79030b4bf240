"""Load official AIM v1 checkpoints (apple/ml-aim, ``aim-v1``) without the official package.

The official layout (``aim.v1.torch.models._aim``):
``preprocessor.patchifier.proj`` (Conv2d with bias) + ``preprocessor.patchifier.norm``,
``trunk.blocks.{i}.{norm_1,attn.qkv,attn.proj,norm_2,mlp.fc1,mlp.fc2}``,
``trunk.post_trunk_norm``, and the attentive probe ``head.{cls_token,k,v,linear,bn}``; the probe
reads the mean of the raw outputs of the last ``probe_layers`` blocks.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from aim_platform.models.aim import AIMClassifier, AIMTrunk
from aim_platform.models.heads import AttentiveProbe
from aim_platform.models.layers import conv_weight_to_linear

_PREFIX_MAP = {
    "preprocessor.patchifier.norm.": "trunk.patch_embed.norm.",
    "trunk.": "trunk.",
    "head.": "probe.",
}


def convert_ml_aim_v1_state_dict(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename (and reshape the patch kernel of) an official state dict into ours."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        if key == "preprocessor.patchifier.proj.weight":
            out["trunk.patch_embed.proj.weight"] = conv_weight_to_linear(value)
            continue
        if key == "preprocessor.patchifier.proj.bias":
            out["trunk.patch_embed.proj.bias"] = value
            continue
        for old, new in _PREFIX_MAP.items():
            if key.startswith(old):
                out[new + key[len(old) :]] = value
                break
        else:
            raise KeyError(f"unexpected key in AIM v1 state dict: {key!r}")
    return out


def build_classifier(
    *,
    img_size: int,
    patch_size: int,
    embed_dim: int,
    num_blocks: int,
    num_heads: int,
    probe_layers: int | tuple[int, ...] = 6,
    num_classes: int = 1000,
    num_channels: int = 3,
    **unused: Any,
) -> AIMClassifier:
    """An (untrained) trunk + attentive probe with the shapes of the official ``_aim(...)``."""
    if unused:
        raise ValueError(f"unsupported AIM v1 builder arguments: {sorted(unused)}")
    layers = (
        tuple(range(num_blocks - probe_layers, num_blocks))
        if isinstance(probe_layers, int)
        else tuple(probe_layers)
    )
    trunk = AIMTrunk(
        patch_dim=patch_size * patch_size * num_channels,
        grid_size=img_size // patch_size,
        embed_dim=embed_dim,
        num_blocks=num_blocks,
        num_heads=num_heads,
    )
    probe = AttentiveProbe(embed_dim, num_classes, num_heads=num_heads)
    return AIMClassifier(trunk, probe, layers, patch_size)


def load_ml_aim_v1(state_dict: Mapping[str, torch.Tensor], **config: Any) -> AIMClassifier:
    """Build our trunk + attentive probe from an official AIM v1 state dict.

    Args:
        state_dict: The official model's ``state_dict()``.
        **config: The official ``_aim(...)`` builder arguments (``img_size``, ``patch_size``,
            ``embed_dim``, ``num_blocks``, ``num_heads``, ``probe_layers``, ``num_classes``).

    Raises:
        ValueError: unknown builder arguments, or a state dict that does not fit the shapes
            (missing or unexpected keys are listed).
    """
    model = build_classifier(**config)
    converted = convert_ml_aim_v1_state_dict(state_dict)
    missing, unexpected = model.load_state_dict(converted, strict=False)
    if missing or unexpected:
        raise ValueError(
            f"AIM v1 state dict does not fit: missing {missing}, unexpected {unexpected}"
        )
    return model.eval()


def convert_file(src: str | Path, dst: str | Path) -> Path:
    """``aimctl convert-ml-aim``: read an official checkpoint, write ours.

    ``src`` holds a dict with ``state_dict`` (the official keys) and ``ml_aim_config`` (the
    official builder arguments). The output is a weights-only ``torch.save`` dict with our
    ``state_dict``, the ``ml_aim_config`` and a format tag; read it with :func:`load_converted`.
    """
    blob = torch.load(src, map_location="cpu", weights_only=False)
    if not isinstance(blob, dict) or "state_dict" not in blob or "ml_aim_config" not in blob:
        raise ValueError(
            f"{src}: expected a dict with 'state_dict' and 'ml_aim_config' (the official "
            "builder arguments: img_size, patch_size, embed_dim, num_blocks, num_heads, ...)"
        )
    config = dict(blob["ml_aim_config"])
    model = load_ml_aim_v1(blob["state_dict"], **config)
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"format": FORMAT, "ml_aim_config": config, "state_dict": model.state_dict()}, dst)
    return dst


FORMAT = "aim-platform/classifier-v1"


def load_converted(path: str | Path) -> AIMClassifier:
    """Load a file written by :func:`convert_file` (weights only, no pickled code)."""
    blob = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(blob, dict) or blob.get("format") != FORMAT:
        raise ValueError(f"{path}: not a converted AIM classifier ({FORMAT})")
    model = build_classifier(**blob["ml_aim_config"])
    model.load_state_dict(blob["state_dict"])
    return model.eval()
