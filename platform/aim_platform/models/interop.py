"""Load official AIM v1 checkpoints (apple/ml-aim, ``aim-v1``) without the official package.

The official layout (``aim.v1.torch.models._aim``):
``preprocessor.patchifier.proj`` (Conv2d with bias) + ``preprocessor.patchifier.norm``,
``trunk.blocks.{i}.{norm_1,attn.qkv,attn.proj,norm_2,mlp.fc1,mlp.fc2}``,
``trunk.post_trunk_norm``, and the attentive probe ``head.{cls_token,k,v,linear,bn}``; the probe
reads the mean of the raw outputs of the last ``probe_layers`` blocks.
"""

from __future__ import annotations

import inspect
import pickle
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from aim_platform.errors import MissingInput, UnsafeFile
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


def read_weights(path: str | Path) -> Any:
    """``torch.load`` with ``weights_only=True``: tensors, numbers, strings and plain
    containers only, so that loading can never run code (a pickle can: its ``__reduce__``
    names any callable). Anything else is refused before it is built.

    Raises:
        MissingInput: ``path`` does not exist.
        UnsafeFile: the file holds other objects, or is no torch checkpoint at all; the
            message is one line naming the file.
    """
    if not Path(path).is_file():
        raise MissingInput(f"{path}: no such file")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        detail = _unpickler_detail(exc)
        if detail is None:  # not a pickle at all ("invalid load key")
            raise UnsafeFile(f"{path}: not a torch checkpoint ({_first_line(exc)})") from None
        raise UnsafeFile(
            f"{path}: refused: it holds Python objects, not just weights, and loading it "
            f"could run code ({detail}); only weights-only files are loaded"
        ) from None
    except Exception as exc:  # noqa: BLE001 - a torn or foreign file: torch raises anything
        raise UnsafeFile(f"{path}: not a torch checkpoint ({_first_line(exc)})") from None


def _first_line(exc: BaseException, limit: int = 200) -> str:
    text = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _unpickler_detail(exc: pickle.UnpicklingError) -> str | None:
    """torch's weights-only refusal in a few words (``Unsupported global: GLOBAL
    posix.system``), or None when the error is not such a refusal."""
    text = str(exc)
    if "Weights only load failed" not in text:
        return None
    for line in text.splitlines():
        if "WeightsUnpickler error:" in line:
            detail = line.split("WeightsUnpickler error:", 1)[1].strip()
            return detail.split(" was not an allowed global")[0][:160]
    return "objects outside the weights-only allow-list"


_BUILDER_ARGS = {
    name
    for name, p in inspect.signature(build_classifier).parameters.items()
    if p.kind is inspect.Parameter.KEYWORD_ONLY
}
_SHAPES = ("img_size", "patch_size", "embed_dim", "num_blocks", "num_heads")


def builder_args(path: str | Path, raw: Any) -> dict[str, Any]:
    """Check an ``ml_aim_config`` read from ``path``: a mapping of known builder arguments
    with positive integer shapes; a bad one raises :class:`UnsafeFile` (one line)."""
    if not isinstance(raw, Mapping):
        raise UnsafeFile(
            f"{path}: ml_aim_config must be a mapping of builder arguments, not "
            f"{type(raw).__name__}"
        )
    config = dict(raw)
    unknown = sorted(str(k) for k in config if k not in _BUILDER_ARGS)
    if unknown:
        raise UnsafeFile(
            f"{path}: ml_aim_config has unknown keys {unknown} (known: {sorted(_BUILDER_ARGS)})"
        )
    missing = [k for k in _SHAPES if k not in config]
    if missing:
        raise UnsafeFile(f"{path}: ml_aim_config lacks {missing}")
    for key in (*_SHAPES, "num_classes", "num_channels"):
        value = config.get(key, 1)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise UnsafeFile(
                f"{path}: ml_aim_config.{key} must be a positive integer, not {value!r}"
            )
    layers = config.get("probe_layers", 6)
    if isinstance(layers, list):
        config["probe_layers"] = layers = tuple(layers)
    if not (isinstance(layers, int) and not isinstance(layers, bool)) and not (
        isinstance(layers, tuple) and all(type(i) is int for i in layers)
    ):
        raise UnsafeFile(f"{path}: ml_aim_config.probe_layers must be an int or a list of ints")
    return config


def _build(path: str | Path, config: dict[str, Any], state_dict: Any) -> AIMClassifier:
    """:func:`load_ml_aim_v1` with every failure one line naming ``path``."""
    if not isinstance(state_dict, Mapping) or not all(
        isinstance(v, torch.Tensor) for v in state_dict.values()
    ):
        raise UnsafeFile(f"{path}: state_dict must map names to tensors")
    try:
        return load_ml_aim_v1(state_dict, **config)
    except (KeyError, ValueError, TypeError, RuntimeError, IndexError) as exc:
        raise UnsafeFile(
            f"{path}: the weights do not fit ml_aim_config {config} ({_first_line(exc)})"
        ) from None


def convert_file(src: str | Path, dst: str | Path) -> Path:
    """``aimctl convert-ml-aim``: read an official checkpoint, write ours.

    ``src`` holds a dict with ``state_dict`` (the official keys) and ``ml_aim_config`` (the
    official builder arguments); it is read weights-only (:func:`read_weights`). The output is
    a weights-only ``torch.save`` dict with our ``state_dict``, the ``ml_aim_config`` and a
    format tag; read it with :func:`load_converted`.

    Raises:
        UnsafeFile: ``src`` is refused or malformed (one line naming it).
    """
    blob = read_weights(src)
    if not isinstance(blob, dict) or "state_dict" not in blob or "ml_aim_config" not in blob:
        raise UnsafeFile(
            f"{src}: expected a dict with 'state_dict' and 'ml_aim_config' (the official "
            "builder arguments: img_size, patch_size, embed_dim, num_blocks, num_heads, ...)"
        )
    config = builder_args(src, blob["ml_aim_config"])
    model = _build(src, config, blob["state_dict"])
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"format": FORMAT, "ml_aim_config": config, "state_dict": model.state_dict()}, dst)
    return dst


FORMAT = "aim-platform/classifier-v1"


def load_converted(path: str | Path) -> AIMClassifier:
    """Load a file written by :func:`convert_file` (weights only, no pickled code)."""
    blob = read_weights(path)
    if not isinstance(blob, dict) or blob.get("format") != FORMAT:
        raise UnsafeFile(f"{path}: not a converted AIM classifier ({FORMAT})")
    config = builder_args(path, blob.get("ml_aim_config"))
    model = build_classifier(**config)
    state = blob.get("state_dict")
    if not isinstance(state, Mapping):
        raise UnsafeFile(f"{path}: state_dict must map names to tensors")
    try:
        model.load_state_dict(state)
    except (RuntimeError, KeyError, TypeError) as exc:
        raise UnsafeFile(
            f"{path}: the weights do not fit its ml_aim_config ({_first_line(exc)})"
        ) from None
    return model.eval()
