"""Small real images in every mode and every kind of bad input, for the data tests."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image


def _encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def rgb_array(h: int, w: int, seed: int = 0) -> np.ndarray:
    """A smooth random RGB image (gradients + noise) that compresses like a photo."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    base = np.stack(
        [x * 255 // max(w - 1, 1), y * 255 // max(h - 1, 1), (x + y) * 127 // max(h + w, 1)], -1
    )
    noise = rng.integers(0, 40, (h, w, 3))
    return np.clip(base + noise, 0, 255).astype(np.uint8)  # (H, W, 3)


def jpeg(h: int = 48, w: int = 64, seed: int = 0, quality: int = 90) -> bytes:
    return _encode(Image.fromarray(rgb_array(h, w, seed)), "JPEG", quality=quality)


def png(h: int = 48, w: int = 64, seed: int = 0) -> bytes:
    return _encode(Image.fromarray(rgb_array(h, w, seed)), "PNG")


def mode_images() -> dict[str, bytes]:
    """One image per awkward mode: CMYK, grayscale, palette (+transparency), RGBA, 16-bit."""
    rgb = Image.fromarray(rgb_array(40, 56, 3))
    gray16 = (rgb_array(40, 56, 4)[..., 0].astype(np.uint16) * 257).astype(np.uint16)
    pal_t = rgb.convert("P")
    return {
        "cmyk.jpg": _encode(rgb.convert("CMYK"), "JPEG"),
        "gray.jpg": _encode(rgb.convert("L"), "JPEG"),
        "gray.png": _encode(rgb.convert("L"), "PNG"),
        "palette.png": _encode(rgb.convert("P"), "PNG"),
        "palette_transparent.png": _encode(pal_t, "PNG", transparency=0),
        "rgba.png": _encode(rgb.convert("RGBA"), "PNG"),
        "la.png": _encode(rgb.convert("LA"), "PNG"),
        "gray16.png": _encode(Image.fromarray(gray16), "PNG"),
        "rgb.gif": _encode(rgb, "GIF"),
        "rgb.bmp": _encode(rgb, "BMP"),
    }


def bad_images() -> dict[str, tuple[bytes, str]]:
    """Bad inputs and the start of the reason each must be rejected with."""
    good = jpeg(64, 64, 7)
    bomb = _encode(Image.new("1", (10_000, 9_000)), "PNG")  # 90M pixels, a few kB
    return {
        "empty.jpg": (b"", "empty file"),
        "truncated.jpg": (good[: len(good) // 2], "corrupt or truncated image"),
        "header_only.jpg": (good[:200], "corrupt"),
        "notes.txt": (b"these are not the pixels you are looking for\n" * 10, "not an image"),
        "garbage.jpg": (b"\xff\xd8\xff\xe0" + bytes(range(256)) * 4, "not an image"),
        "bomb.png": (bomb, "decompression bomb"),
    }


def write_image_folder(root: Path, per_class: int = 4, classes=("cat", "dog")) -> list[str]:
    """An ImageFolder tree of small JPEGs and PNGs; returns the relative ids written."""
    ids = []
    for c, name in enumerate(classes):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            fn = f"{name}/{i:03d}.jpg" if i % 2 == 0 else f"{name}/{i:03d}.png"
            data = jpeg(40 + i, 60, seed=10 * c + i) if i % 2 == 0 else png(44, 52, 10 * c + i)
            (root / fn).write_bytes(data)
            ids.append(fn)
    return sorted(ids)


def write_class_sorted_folder(root: Path, classes: int = 100, per_class: int = 20) -> list[str]:
    """An ImageFolder of ``classes`` x ``per_class`` tiny 8x8 PNGs (class-sorted ids)."""
    ids = []
    for c in range(classes):
        (root / f"c{c:03d}").mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            fn = f"c{c:03d}/{i:03d}.png"
            (root / fn).write_bytes(png(8, 8, seed=c * per_class + i))
            ids.append(fn)
    return sorted(ids)


def add_tar_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    """Append a regular file ``name`` holding ``data`` to an open tar."""
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))
