"""Image sources for ingest: folders (ImageFolder labels), ``.tar`` files, built-ins.

Listing happens on the driver and yields small :class:`Item` locators (no image bytes);
:func:`load_item` fetches or generates one item's encoded bytes inside a Ray task, so the
bytes never pass through the driver.

- folder: every non-hidden file under the URL; when the root holds only sub-folders, the
  first path component is the class (ImageFolder), labels in sorted class order.
- ``.tar`` (uncompressed, WebDataset-style): each member is an item read by byte range;
  ``key.cls`` members give the label of the sample ``key.*``; ``.txt``/``.json`` metadata
  members are skipped.
- ``builtin:digits``: scikit-learn's 1797 real handwritten digits (labelled 0-9), upscaled
  bicubically to ``image_size`` and stored as grayscale PNG.
- ``builtin:photos``: the real photos scikit-learn and matplotlib ship (china, flower,
  grace_hopper), cut into ``num_photos`` random crops resized to web size (1024x768 or
  768x1024) and stored as JPEG quality 90; for throughput work.
"""

from __future__ import annotations

import io
import tarfile
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from typing import Any

import numpy as np
from PIL import Image

from aim_platform.data import storage

BUILTINS = ("builtin:digits", "builtin:photos")
_META_EXT = (".cls", ".txt", ".json")


@dataclass(frozen=True)
class Item:
    """Where one image comes from (no bytes): what ingest tasks receive."""

    id: str
    kind: str  # "file", "tar", "digits" or "photos"
    path: str = ""
    start: int = 0
    size: int = 0  # bytes (an estimate for generated items)
    label: int | None = None
    index: int = 0

    def to_dict(self) -> dict[str, Any]:
        """Plain dict (JSON-safe)."""
        return asdict(self)


@dataclass
class Listing:
    """A listed source: its name, items sorted by id, class names, generation options."""

    name: str
    items: list[Item]
    label_names: list[str] = field(default_factory=list)
    options: dict[str, Any] = field(default_factory=dict)
    ordered_reads: bool = False  # items are cheap only in listing order (Parquet row groups)


def source_name(src: str) -> str:
    """Default ``source`` column value: the built-in's name or the URL's last part."""
    if src.startswith("builtin:"):
        return src.removeprefix("builtin:")
    name = src.rstrip("/").rsplit("/", 1)[-1]
    return name.removesuffix(".tar") or "images"


def list_source(
    src: str,
    storage_options: dict[str, Any] | None = None,
    *,
    image_size: int = 64,
    num_photos: int = 1000,
    photo_seed: int = 0,
    label_map: str | None = None,
    image_column: str | None = None,
    label_column: str | None = None,
) -> Listing:
    """List a source's items (sorted by id).

    Args:
        src: Folder URL, ``.tar`` URL, ``builtin:digits`` or ``builtin:photos``.
        storage_options: fsspec options for remote sources.
        image_size: Side of the upscaled digits (``builtin:digits``).
        num_photos: Number of crops (``builtin:photos``).
        photo_seed: Seed of the crops (``builtin:photos``).

    Raises:
        ValueError: unknown built-in, missing path, compressed tar, or nothing to ingest.
    """
    name = source_name(src)
    if src == "builtin:digits":
        if image_size < 8:
            raise ValueError(f"image_size: {image_size} is smaller than the digits' 8 px")
        targets = _digits()[1]
        items = [
            Item(f"digits/{i:05d}", "digits", size=image_size**2, label=int(t), index=i)
            for i, t in enumerate(targets)
        ]
        return Listing(name, items, [str(d) for d in range(10)], {"image_size": image_size})
    if src == "builtin:photos":
        if num_photos < 1:
            raise ValueError(f"num_photos: {num_photos} must be at least 1")
        items = [
            Item(f"photos/{i:05d}", "photos", size=150_000, index=i) for i in range(num_photos)
        ]
        return Listing(name, items, [], {"num_photos": num_photos, "photo_seed": photo_seed})
    if src.startswith("builtin:"):
        raise ValueError(f"source: unknown built-in {src!r}; known: {', '.join(BUILTINS)}")
    fs, path = storage.filesystem(src, storage_options)
    if not fs.exists(path):
        raise ValueError(f"source: {src!r} does not exist")
    if fs.isfile(path):
        if path.endswith((".tar.gz", ".tgz", ".tar.bz2", ".tar.xz")):
            raise ValueError(f"source: {src!r} is compressed; only uncompressed .tar is supported")
        if not path.endswith(".tar"):
            raise ValueError(f"source: {src!r} is a file but not a .tar")
        return _list_tar(fs, path, name)
    return _list_folder(fs, path, name)


def _list_folder(fs: Any, root: str, name: str) -> Listing:
    found = fs.find(root, detail=True)
    rel: dict[str, int] = {}
    for full, info in found.items():
        r = full[len(root) :].lstrip("/")
        if any(part.startswith((".", "_")) for part in r.split("/")):
            continue  # hidden files, _manifest.json and the like
        rel[r] = int(info.get("size") or 0)
    if not rel:
        raise ValueError(f"source: {root!r} holds no files")
    image_folder = all("/" in r for r in rel)
    classes = sorted({r.split("/", 1)[0] for r in rel}) if image_folder else []
    index = {c: i for i, c in enumerate(classes)}
    items = [
        Item(
            r,
            "file",
            path=fs.unstrip_protocol(f"{root}/{r}"),
            size=size,
            label=index[r.split("/", 1)[0]] if image_folder else None,
        )
        for r, size in sorted(rel.items())
    ]
    return Listing(name, items, classes)


def _list_tar(fs: Any, path: str, name: str) -> Listing:
    labels: dict[str, int] = {}
    members: list[tarfile.TarInfo] = []
    with fs.open(path, "rb") as f, tarfile.open(fileobj=f, mode="r:") as tar:
        for m in tar:
            if not m.isfile():
                continue
            if m.name.endswith(".cls"):
                text = tar.extractfile(m).read().decode().strip()  # type: ignore[union-attr]
                if text.lstrip("-").isdigit():
                    labels[m.name[: -len(".cls")]] = int(text)
            elif not m.name.endswith(_META_EXT):
                members.append(m)
    if not members:
        raise ValueError(f"source: {path!r} holds no image members")
    items = [
        Item(
            m.name,
            "tar",
            path=fs.unstrip_protocol(path),
            start=m.offset_data,
            size=m.size,
            label=labels.get(m.name.rsplit(".", 1)[0]),
        )
        for m in sorted(members, key=lambda m: m.name)
    ]
    return Listing(name, items)


@lru_cache(maxsize=1)
def _digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    d = load_digits()
    return d.images, d.target  # (N, 8, 8) values 0..16, (N,)


@lru_cache(maxsize=1)
def _photos() -> tuple[Image.Image, ...]:
    import matplotlib.cbook as cbook
    from sklearn.datasets import load_sample_images

    photos = [Image.fromarray(a) for a in load_sample_images().images]  # china, flower
    with cbook.get_sample_data("grace_hopper.jpg") as f:
        photos.append(Image.open(f).convert("RGB"))
    return tuple(photos)


def digit_png(index: int, image_size: int) -> bytes:
    """Digit ``index`` upscaled bicubically to ``image_size`` pixels, as grayscale PNG."""
    img = (_digits()[0][index] * (255.0 / 16.0)).round().astype(np.uint8)  # (8, 8)
    out = Image.fromarray(img, "L").resize((image_size, image_size), Image.BICUBIC)
    buf = io.BytesIO()
    out.save(buf, format="PNG")
    return buf.getvalue()


def photo_jpeg(index: int, seed: int = 0, size: tuple[int, int] = (1024, 768)) -> bytes:
    """A random crop of one shipped photo, resized to web size, as JPEG quality 90."""
    rng = np.random.default_rng([seed, index])
    photos = _photos()
    src = photos[int(rng.integers(len(photos)))]
    w_out, h_out = size if rng.random() < 0.75 else size[::-1]  # mostly landscape
    aspect = w_out / h_out
    frac = rng.uniform(0.35, 1.0)  # area fraction of the largest crop with this aspect
    w_max = min(src.width, src.height * aspect)
    w = max(16, int(w_max * np.sqrt(frac)))
    h = max(16, int(w / aspect))
    left = int(rng.integers(0, src.width - w + 1))
    top = int(rng.integers(0, src.height - h + 1))
    img = src.resize((w_out, h_out), Image.BICUBIC, box=(left, top, left + w, top + h))
    if rng.random() < 0.5:
        img = img.transpose(Image.FLIP_LEFT_RIGHT)
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def load_item(item: Item, storage_options: dict[str, Any] | None, options: dict[str, Any]) -> bytes:
    """The encoded bytes of one item (read by range, or generated for built-ins)."""
    if item.kind == "digits":
        return digit_png(item.index, int(options["image_size"]))
    if item.kind == "photos":
        return photo_jpeg(item.index, int(options.get("photo_seed", 0)))
    fs, path = storage.filesystem(item.path, storage_options)
    if item.kind == "tar":
        return fs.cat_file(path, start=item.start, end=item.start + item.size)
    return fs.cat_file(path)
