"""Fast decode, RandomResizedCrop, flip, bicubic resize and patchify to uint8 (no Ray).

The training view of an image is RandomResizedCrop (torchvision's sampling: scale (0.4, 1)
and ratio (3/4, 4/3) by default, as in the AIM paper), a horizontal flip with p=0.5 and a
bicubic resize to the model's image size; the evaluation view (validation, probes, ``embed``:
:func:`eval_view`) is the official AIM code's: the shorter side resized bicubically to
``ceil(size / 0.875)`` (256 for 224), then a centre crop of ``size``. Both are cut into raster-ordered patches, values within a patch
ordered (row, col, channel) exactly as :func:`aim_platform.models.layers.patchify`, and kept
in uint8: (K, p*p*3).

Speed: the crop box is sampled from the header's size before any pixel is decoded, so a
JPEG is decoded in draft mode at the smallest DCT scale (1/2, 1/4, 1/8) that still leaves
the crop at least as large as the output; then crop and resize happen in one Pillow call.

All randomness of a sample comes from a generator seeded by (seed, epoch, hash(id), repeat),
so the same seed gives the same crops in any process and any order.
"""

from __future__ import annotations

import hashlib
import io
import math
import struct
import warnings
import zlib
from collections.abc import Iterable, Sequence

import numpy as np
from PIL import Image, UnidentifiedImageError

from aim_platform.config import MAX_PIXELS

DEFAULT_MAX_PIXELS = MAX_PIXELS  # one home: aim_platform.config


# What a broken or hostile file makes Pillow raise: these mean "reject or drop this image";
# anything else (a TypeError, a NameError) is a bug and must not pass as a dropped image.
DECODE_ERRORS: tuple[type[BaseException], ...] = (
    OSError,  # truncated data, decoder errors ("image file is truncated", "broken data stream")
    ValueError,  # bad modes, sizes, tiles; our ImageRejected
    SyntaxError,  # Pillow's parsers signal malformed headers this way
    EOFError,
    struct.error,
    zlib.error,
    Image.DecompressionBombError,
)


# Pillow opens PostScript (EPS) by running Ghostscript, an interpreter of the file: hostile
# input must never reach it. WMF needs the OS's renderer, BUFR/GRIB/HDF5 external handlers.
# Every other format Pillow knows is decoded by Pillow itself.
Image.init()
NOT_DECODED = frozenset({"EPS", "WMF", "BUFR", "GRIB", "HDF5"})
DECODED_FORMATS = tuple(sorted(set(Image.OPEN) - NOT_DECODED))


class ImageRejected(ValueError):
    """An image that cannot be used; the message is the reason (recorded by ingest)."""


def id_hash(sample_id: str, salt: str = "") -> int:
    """A stable 64-bit hash of a sample id (same value in every process and run)."""
    digest = hashlib.blake2b(f"{salt}{sample_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little")


def hash_unit(sample_id: str, salt: str = "") -> float:
    """A stable number in [0, 1) derived from a sample id (for splits and sampling)."""
    return id_hash(sample_id, salt) / 2.0**64


def choose_labelled(rows: Iterable[tuple[str, int]], per_class: int, seed: int) -> set[str]:
    """Ids of ``per_class`` rows per label among ``(id, label)`` rows, chosen by a seeded hash
    of the id (the probes' labelled subset: the same rows whatever the order they come in).
    Rows with a negative label (unlabelled) are never chosen."""
    by_label: dict[int, list[tuple[int, str]]] = {}
    for sid, label in rows:
        if label >= 0:
            by_label.setdefault(label, []).append((id_hash(sid, f"labels-{seed}"), sid))
    return {sid for chosen in by_label.values() for _, sid in sorted(chosen)[:per_class]}


def sample_rng(seed: int, epoch: int, sample_id: str, repeat: int = 0) -> np.random.Generator:
    """The generator for one sample's augmentation in one epoch."""
    return np.random.default_rng([seed & 0xFFFFFFFF, epoch, id_hash(sample_id), repeat])


def random_resized_crop_box(
    width: int,
    height: int,
    rng: np.random.Generator,
    scale: tuple[float, float] = (0.4, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
) -> tuple[int, int, int, int]:
    """Sample a crop as torchvision's ``RandomResizedCrop.get_params`` does.

    Args:
        width: Image width W.
        height: Image height H.
        rng: The sample's generator.
        scale: Range of the crop's area as a fraction of W*H.
        ratio: Range of the crop's aspect ratio w/h (sampled log-uniformly).

    Returns:
        (left, top, w, h) in pixels of the original image.
    """
    area = width * height
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(10):
        target = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_lo, log_hi))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            return left, top, w, h
    # Fallback: the largest centred crop whose ratio lies in range.
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        h, w = height, int(round(height * ratio[1]))
    else:
        w, h = width, height
    return (width - w) // 2, (height - h) // 2, w, h


EVAL_CROP_RATIO = 0.875  # crop / resize: 224 from 256, as apple/ml-aim's ``val_transforms``


def eval_resize_size(size: int, crop_ratio: float = EVAL_CROP_RATIO) -> int:
    """Shorter side before the centre crop: ``ceil(size / crop_ratio)`` (224 -> 256)."""
    if not 0 < crop_ratio <= 1:
        raise ValueError(f"crop_ratio must be in (0, 1], got {crop_ratio}")
    return math.ceil(size / crop_ratio)


def eval_view(img: Image.Image, size: int, crop_ratio: float = EVAL_CROP_RATIO) -> np.ndarray:
    """The evaluation view of a PIL image, as torchvision's ``Resize(r, BICUBIC)`` then
    ``CenterCrop(size)`` with r = :func:`eval_resize_size` (the official AIM transform).

    The one evaluation transform: validation (:func:`val_image`), probes and ``embed`` use it.

    Returns:
        (size, size, 3) uint8.
    """
    img = to_rgb(img)
    width, height = img.size
    short = eval_resize_size(size, crop_ratio)
    if width <= height:  # torchvision: the long side truncated, int(short * long / short_in)
        new_w, new_h = short, int(short * height / width)
    else:
        new_w, new_h = int(short * width / height), short
    if (new_w, new_h) != (width, height):
        img = img.resize((new_w, new_h), Image.BICUBIC)
    left, top = int(round((new_w - size) / 2)), int(round((new_h - size) / 2))
    return np.asarray(img.crop((left, top, left + size, top + size)))  # (S, S, 3)


def open_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Open encoded bytes lazily (header only), refusing empty data and bombs.

    Raises:
        ImageRejected: empty data, not an image, or more than ``max_pixels`` pixels.
    """
    if not data:
        raise ImageRejected("empty file")
    try:
        with warnings.catch_warnings():  # our own limit decides; Pillow's warning is noise
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data), formats=DECODED_FORMATS)
    except Image.DecompressionBombError as exc:
        raise ImageRejected(f"decompression bomb: {exc}") from None
    except UnidentifiedImageError:
        raise ImageRejected("not an image: format not recognised") from None
    except DECODE_ERRORS as exc:  # any other header failure: a corrupt image
        raise ImageRejected(f"corrupt image header: {exc}") from None
    w, h = img.size
    if w * h > max_pixels:
        raise ImageRejected(f"decompression bomb: {w}x{h} = {w * h} pixels > limit {max_pixels}")
    if w < 1 or h < 1:
        raise ImageRejected(f"empty image: {w}x{h}")
    return img


def to_rgb(img: Image.Image) -> Image.Image:
    """Any Pillow mode to 8-bit RGB: 16-bit scaled down, transparency over white."""
    if img.mode == "RGB":
        return img
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        arr = np.asarray(img).astype(np.int64)  # (H, W), 0..65535
        if arr.max(initial=0) > 255 or img.mode != "I":
            arr = arr >> 8
        return Image.fromarray(arr.clip(0, 255).astype(np.uint8), "L").convert("RGB")
    if img.mode == "F":
        arr = np.asarray(img).clip(0, 255).astype(np.uint8)
        return Image.fromarray(arr, "L").convert("RGB")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (
        img.mode == "P" and "transparency" in img.info
    ):
        rgba = img.convert("RGBA")
        out = Image.new("RGB", rgba.size, (255, 255, 255))
        out.paste(rgba, mask=rgba.getchannel("A"))
        return out
    return img.convert("RGB")


def _decode_box(
    img: Image.Image, box: tuple[int, int, int, int], size: int
) -> tuple[Image.Image, tuple[float, float, float, float]]:
    """Decode ``img`` (draft mode for JPEG) and map ``box`` into the decoded pixels.

    Returns:
        (RGB image, (x0, y0, x1, y1) box in the decoded image's coordinates).
    """
    left, top, w, h = box
    width, height = img.size
    if img.format == "JPEG":
        # Smallest decode at which the crop still has >= size pixels along each side.
        want = (max(1, math.ceil(width * size / w)), max(1, math.ceil(height * size / h)))
        img.draft("RGB", want)
    sx, sy = img.size[0] / width, img.size[1] / height
    img = to_rgb(img)  # loads the pixels
    return img, (left * sx, top * sy, (left + w) * sx, (top + h) * sy)


def patchify_hwc(image: np.ndarray, patch_size: int) -> np.ndarray:
    """(S, S, 3) uint8 -> (K, p*p*3) raster-ordered patches, (row, col, channel) inside.

    The same layout as :func:`aim_platform.models.layers.patchify` on (3, S, S).
    """
    h, w, c = image.shape
    gh, gw = h // patch_size, w // patch_size
    x = image.reshape(gh, patch_size, gw, patch_size, c)  # (gh, p, gw, p, C)
    x = x.transpose(0, 2, 1, 3, 4)  # (gh, gw, p, p, C)
    return np.ascontiguousarray(x).reshape(gh * gw, patch_size * patch_size * c)  # (K, P)


def train_image(
    data: bytes,
    size: int,
    rng: np.random.Generator,
    *,
    scale: tuple[float, float] = (0.4, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    flip_prob: float = 0.5,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> np.ndarray:
    """Training view: RandomResizedCrop + flip + bicubic resize, as (size, size, 3) uint8."""
    img = open_image(data, max_pixels)
    box = random_resized_crop_box(*img.size, rng, scale, ratio)
    flip = rng.random() < flip_prob
    img, fbox = _decode_box(img, box, size)
    out = img.resize((size, size), Image.BICUBIC, box=fbox)
    if flip:
        out = out.transpose(Image.FLIP_LEFT_RIGHT)
    return np.asarray(out)  # (S, S, 3)


def val_image(data: bytes, size: int, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Evaluation view of encoded bytes: :func:`eval_view`, (size, size, 3) uint8.

    A JPEG is decoded in draft mode at the smallest DCT scale whose shorter side still
    reaches the resize target (so only the pixels' decoding is approximated, not the crop).
    """
    img = open_image(data, max_pixels)
    if img.format == "JPEG":
        short = eval_resize_size(size)
        width, height = img.size
        scale = short / min(width, height)
        img.draft("RGB", (max(1, math.ceil(width * scale)), max(1, math.ceil(height * scale))))
    return eval_view(img, size)  # (S, S, 3)


def inspect_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[int, int]:
    """Fully decode once to validate (ingest); returns (width, height).

    Raises:
        ImageRejected: with the reason (empty, not an image, bomb, truncated/corrupt).
    """
    img = open_image(data, max_pixels)
    width, height = img.size
    try:
        if img.format == "JPEG":
            img.draft(img.mode, (max(1, width // 8), max(1, height // 8)))  # still reads it all
        img.load()
        to_rgb(img)
    except DECODE_ERRORS as exc:  # every decoder failure is a reason
        raise ImageRejected(f"corrupt or truncated image: {exc}") from None
    return width, height


def decode_batch(
    ids: Sequence[str],
    images: Sequence[bytes | None],
    *,
    img_size: int,
    patch_size: int,
    train: bool,
    seed: int = 0,
    epoch: int = 0,
    repeats: Sequence[int] | None = None,
    scale: tuple[float, float] = (0.4, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    flip_prob: float = 0.5,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> tuple[np.ndarray, np.ndarray]:
    """Decode a batch into uint8 patch sequences; failures give zeros and ``valid=False``.

    Returns:
        (patches (B, K, P) uint8, valid (B,) bool).
    """
    k = (img_size // patch_size) ** 2
    patches = np.zeros((len(ids), k, patch_size * patch_size * 3), np.uint8)  # (B, K, P)
    valid = np.zeros(len(ids), bool)
    for i, (sid, data) in enumerate(zip(ids, images, strict=True)):
        try:
            if train:
                rng = sample_rng(seed, epoch, sid, 0 if repeats is None else int(repeats[i]))
                img = train_image(
                    data or b"",
                    img_size,
                    rng,
                    scale=scale,
                    ratio=ratio,
                    flip_prob=flip_prob,
                    max_pixels=max_pixels,
                )
            else:
                img = val_image(data or b"", img_size, max_pixels=max_pixels)
        except DECODE_ERRORS:  # a bad image is dropped and counted, never fatal
            continue
        patches[i] = patchify_hwc(img, patch_size)  # (K, P)
        valid[i] = True
    return patches, valid
