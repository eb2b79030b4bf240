"""Image sources for ingest: folders (ImageFolder labels), WebDataset tars, Parquet, built-ins.

Listing happens on the driver and yields small :class:`Item` locators (no image bytes);
:func:`load_item` fetches or generates one item's encoded bytes inside a Ray task, so the
bytes never pass through the driver. Sources made of ``.tar`` or ``.parquet`` files can be
listed by file (``by_file=True``, what ingest does by default): one item per file, which the
ingest task opens and reads front to back with :func:`iter_file` (one sequential read a file,
not one request an image), so the driver lists files, never the images inside them (a 2B-image
set in 200k tars is 200k items on the driver).

- folder: every non-hidden file under the URL; when the root holds only sub-folders, the
  first path component is the class (ImageFolder), labels in sorted class order, or as a
  label map says (``label_map``: folder name -> class index and name, e.g. ImageNet's
  ``LOC_synset_mapping.txt``; see :func:`read_label_map`).
- WebDataset ``.tar`` shards (uncompressed): one ``.tar``, a folder holding only tars, or
  a pattern (``shards-{0000..0146}.tar``, ``/data/*.tar``, braces and globs). Each image
  member is an item read by byte range (by file: read in stream); members are grouped by
  their ``__key__`` (the path
  up to the first dot of the file name) and ``key.cls`` gives the label of the sample;
  ``.txt``/``.json`` members are skipped. With several tars, ids are ``<tar stem>/<member>``.
- Parquet (Hugging Face ``datasets`` style): one file, a folder holding only ``.parquet``
  files, or a pattern. The image column is a struct ``{bytes, path}`` (the HF ``Image``
  feature) or plain binary (found by name/type, or ``image_column``); the label column is
  ``label`` (or ``label_column``), class names from the HF ``ClassLabel`` metadata. Ids
  are ``<file stem>/<row number>``.
- split folders (``split_folders=True``): a folder holding ``train/`` and ``val/`` (or
  ``test/``), each a folder of class folders (ImageNet's train/val trees, CIFAR-10 as JPEG
  folders): the images of each go to that split, with one class index over both; ids keep
  the split folder (``train/cat/0001.jpg``), ``options["val_prefix"]`` names the val one.
- ``builtin:digits``: scikit-learn's 1797 real handwritten digits (labelled 0-9), upscaled
  bicubically to ``image_size`` and stored as grayscale PNG.
- ``builtin:photos``: the real photos scikit-learn and matplotlib ship (china, flower,
  grace_hopper), cut into ``num_photos`` random crops resized to web size (1024x768 or
  768x1024) and stored as JPEG quality 90; for throughput work.

Over 400 lines on purpose: every source users have (folders and label maps, WebDataset tars,
Hugging Face Parquet, built-ins), each a lister and a loader behind one interface.
"""

from __future__ import annotations

import io
import json
import re
import tarfile
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, replace
from functools import lru_cache
from pathlib import Path
from typing import Any

import bracex
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from aim_platform import storage
from aim_platform.data.safety import require_plain_columns
from aim_platform.errors import DataError

BUILTINS = ("builtin:digits", "builtin:photos")
_META_EXT = (".cls", ".txt", ".json")
FILE_KINDS = ("tarfile", "parquetfile")  # items that stand for a whole file of images
_READ_BLOCK = 16 * 2**20  # bytes per request when a file is read front to back


@dataclass(frozen=True)
class Item:
    """Where one image comes from (no bytes): what ingest tasks receive."""

    id: str
    kind: str  # "file", "tar", "parquet" (start: row group, index: row), "digits", "photos",
    # or one of FILE_KINDS (id: the file's id prefix, size: the file's bytes)
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
    by_file: bool = False  # items are whole files (FILE_KINDS), opened by the ingest tasks


def source_name(src: str) -> str:
    """Default ``source`` column value: the built-in's name or the URL's last part."""
    if src.startswith("builtin:"):
        return src.removeprefix("builtin:")
    name = src.rstrip("/").rsplit("/", 1)[-1]
    name = re.sub(r"[*?\[{].*", "", name).rstrip("-_.")  # pattern: its fixed prefix
    return name.removesuffix(".tar").removesuffix(".parquet") or "images"


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
    by_file: bool = False,
    split_folders: bool = False,
) -> Listing:
    """List a source's items (sorted by id).

    Args:
        src: Folder URL, ``.tar`` URL, ``builtin:digits`` or ``builtin:photos``.
        storage_options: fsspec options for remote sources.
        image_size: Side of the upscaled digits (``builtin:digits``).
        num_photos: Number of crops (``builtin:photos``).
        photo_seed: Seed of the crops (``builtin:photos``).
        by_file: Sources of ``.tar`` or ``.parquet`` files: one item per file (only the
            files are listed; ``listing.by_file`` says it happened). Other sources ignore it.
        split_folders: ``src`` is a folder of ``train/`` and ``val/`` or ``test/`` image
            folders that give the splits (see the module docstring).

    Raises:
        ValueError: unknown built-in, missing path, compressed tar, or nothing to ingest.
    """
    name = source_name(src)
    if src == "builtin:digits":
        if image_size < 8:
            raise DataError(f"image_size: {image_size} is smaller than the digits' 8 px")
        targets = _digits()[1]
        items = [
            Item(f"digits/{i:05d}", "digits", size=image_size**2, label=int(t), index=i)
            for i, t in enumerate(targets)
        ]
        return Listing(name, items, [str(d) for d in range(10)], {"image_size": image_size})
    if src == "builtin:photos":
        if num_photos < 1:
            raise DataError(f"num_photos: {num_photos} must be at least 1")
        items = [
            Item(f"photos/{i:05d}", "photos", size=150_000, index=i) for i in range(num_photos)
        ]
        return Listing(name, items, [], {"num_photos": num_photos, "photo_seed": photo_seed})
    if src.startswith("builtin:"):
        raise DataError(f"source: unknown built-in {src!r}; known: {', '.join(BUILTINS)}")
    fs, path = storage.filesystem(src, storage_options)
    if split_folders:
        return _list_split_folders(fs, path, name, label_map, storage_options)
    if any(ch in path for ch in "*?[{") and not fs.exists(path):
        files = expand_pattern(fs, path)
        if not files:
            raise DataError(f"source: {src!r} matches no files")
        return _list_files(fs, files, name, src, image_column, label_column, by_file)
    if not fs.exists(path):
        raise DataError(f"source: {src!r} does not exist")
    if fs.isfile(path):
        return _list_files(fs, [path], name, src, image_column, label_column, by_file)
    shard_files = _shard_files(fs, path)
    if shard_files:
        return _list_files(fs, shard_files, name, src, image_column, label_column, by_file)
    return _list_folder(fs, path, name, label_map, storage_options)


def expand_pattern(fs: Any, pattern: str) -> list[str]:
    """Files matching a brace list and/or glob (``shards-{000..009}.tar``, ``*.parquet``)."""
    out: set[str] = set()
    for p in expand_braces(pattern):
        if any(ch in p for ch in "*?["):
            out.update(f for f in fs.glob(p) if fs.isfile(f))
        elif fs.exists(p):
            out.add(p)
    return sorted(out)


def expand_braces(text: str) -> list[str]:
    """Shell-style brace expansion (bash's rules, by ``bracex``): ``a{0..2}b``, ``{x,y}``,
    zero padding kept (``{08..11}``), nested lists; a brace that expands to nothing (``{x}``,
    an unbalanced ``{``) stays as written, so the pattern then matches no file."""
    # keep_escapes: a backslash is left for the glob that follows; limit 0: no cap on the
    # number of paths (a DFN-scale pattern names hundreds of thousands of shards)
    return bracex.expand(text, keep_escapes=True, limit=0)


def _shard_files(fs: Any, root: str) -> list[str]:
    """A folder's ``.tar`` or ``.parquet`` files when it holds only such shards, else []."""
    files = [
        f
        for f in fs.find(root)
        if not any(part.startswith((".", "_")) for part in f[len(root) :].split("/"))
    ]
    if files and all(f.endswith(".tar") for f in files):
        return sorted(files)
    if files and all(f.endswith(".parquet") for f in files):
        return sorted(files)
    return []


def _list_files(
    fs: Any,
    files: list[str],
    name: str,
    src: str,
    image_column: str | None,
    label_column: str | None,
    by_file: bool = False,
) -> Listing:
    """WebDataset ``.tar`` shards or Parquet files (one kind per source)."""
    for f in files:
        if f.endswith((".tar.gz", ".tgz", ".tar.bz2", ".tar.xz")):
            raise DataError(f"source: {f!r} is compressed; only uncompressed .tar is supported")
    if all(f.endswith(".parquet") for f in files):
        return _list_parquet(fs, files, name, image_column, label_column, by_file)
    others = [f for f in files if not f.endswith(".tar")]
    if others:
        raise DataError(f"source: {others[0]!r} is neither a .tar nor a .parquet file")
    if by_file:
        stems = [f.rsplit("/", 1)[-1].removesuffix(".tar") for f in files]
        items = _file_items(fs, files, stems, "tarfile")
        return Listing(name, items, [], {"prefixed": len(files) > 1}, by_file=True)
    items: list[Item] = []
    for f in files:
        prefix = "" if len(files) == 1 else f.rsplit("/", 1)[-1].removesuffix(".tar") + "/"
        items.extend(_list_tar(fs, f, prefix))
    if not items:
        raise DataError(f"source: {src!r} holds no image members")
    return Listing(name, sorted(items, key=lambda it: it.id))


def read_label_map(text: str, where: str) -> dict[str, tuple[int, str]]:
    """Parse a label map: folder name -> (class index, class name).

    Accepted forms:

    - JSON object: ``{"n01440764": 0}``, ``{"n01440764": {"index": 0, "name": "tench"}}``
      or ``{"n01440764": [0, "tench"]}``;
    - JSON list of folder names (index = position);
    - text, one class a line: ``n01440764 tench, Tinca tinca`` (ImageNet's
      ``LOC_synset_mapping.txt``: index = line number) or ``n01440764 0 tench``.

    Raises:
        ValueError: unparseable entries or duplicate indices (names ``where``).
    """
    out: dict[str, tuple[int, str]] = {}
    stripped = text.lstrip()
    if stripped.startswith(("{", "[")):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise DataError(f"label_map: {where} is not valid JSON: {exc}") from None
        if isinstance(data, list):
            data = dict(zip(map(str, data), range(len(data)), strict=True))
        for folder, v in data.items():
            if isinstance(v, int):
                out[folder] = (v, folder)
            elif isinstance(v, dict) and isinstance(v.get("index"), int):
                out[folder] = (v["index"], str(v.get("name", folder)))
            elif isinstance(v, list) and v and isinstance(v[0], int):
                out[folder] = (v[0], str(v[1]) if len(v) > 1 else folder)
            else:
                raise DataError(f"label_map: {where}: entry {folder!r} has no class index")
    else:
        lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.startswith("#")]
        for i, ln in enumerate(lines):
            parts = ln.split(None, 2)
            if len(parts) > 1 and parts[1].lstrip("-").isdigit():
                out[parts[0]] = (int(parts[1]), parts[2] if len(parts) > 2 else parts[0])
            else:
                out[parts[0]] = (i, ln.split(None, 1)[1] if len(parts) > 1 else parts[0])
    seen: dict[int, str] = {}
    for folder, (idx, _) in out.items():
        if idx < 0 or idx in seen:
            raise DataError(f"label_map: {where}: index {idx} of {folder!r} is negative or taken")
        seen[idx] = folder
    return out


def _list_folder(
    fs: Any,
    root: str,
    name: str,
    label_map: str | None = None,
    storage_options: dict[str, Any] | None = None,
) -> Listing:
    found = fs.find(root, detail=True)
    rel: dict[str, int] = {}
    for full, info in found.items():
        r = full[len(root) :].lstrip("/")
        if any(part.startswith((".", "_")) for part in r.split("/")):
            continue  # hidden files, _manifest.json and the like
        rel[r] = int(info.get("size") or 0)
    if not rel:
        raise DataError(f"source: {root!r} holds no files")
    image_folder = all("/" in r for r in rel)
    folders = sorted({r.split("/", 1)[0] for r in rel}) if image_folder else []
    if label_map:
        if not image_folder:
            raise DataError(f"label_map: {root!r} is not a folder of class folders")
        mfs, mpath = storage.filesystem(label_map, storage_options)
        if not mfs.exists(mpath):
            raise DataError(f"label_map: {label_map!r} does not exist")
        mapping = read_label_map(mfs.cat_file(mpath).decode(), label_map)
        missing = [f for f in folders if f not in mapping]
        if missing:
            raise DataError(
                f"label_map: {len(missing)} class folder(s) not in {label_map!r}, "
                f"e.g. {', '.join(missing[:3])}"
            )
        index = {f: mapping[f][0] for f in folders}
        classes = [""] * (max(i for i, _ in mapping.values()) + 1)
        for i, label_name in mapping.values():
            classes[i] = label_name
    else:
        index = {c: i for i, c in enumerate(folders)}
        classes = folders
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


VAL_FOLDERS = ("val", "test")


def _list_split_folders(
    fs: Any, root: str, name: str, label_map: str | None, storage_options: dict[str, Any] | None
) -> Listing:
    """``root/train`` and ``root/val`` (or ``root/test``) image folders as the two splits."""
    if not fs.isdir(root):
        raise DataError(f"source: {root!r} is not a folder (--split-folders needs one)")
    subs = sorted(
        p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(root, detail=False) if fs.isdir(p)
    )
    subs = [s for s in subs if not s.startswith((".", "_"))]
    val = [s for s in subs if s in VAL_FOLDERS]
    if "train" not in subs or len(val) != 1 or len(subs) != 2:
        raise DataError(
            f"source: {root!r} must hold exactly train/ and one of val/ or test/ for "
            f"--split-folders (it holds {', '.join(subs) or 'no folders'})"
        )
    train = _list_folder(fs, f"{root}/train", name, label_map, storage_options)
    held = _list_folder(fs, f"{root}/{val[0]}", name, label_map, storage_options)
    if not train.label_names or not held.label_names:
        raise DataError(f"source: {root!r}: train/ and {val[0]}/ must be folders of class folders")
    index = {c: i for i, c in enumerate(train.label_names) if c}
    unknown = sorted(set(held.label_names) - set(index))
    if unknown and not label_map:
        raise DataError(
            f"source: {root!r}: {val[0]}/ has classes train/ lacks: {', '.join(unknown[:3])}"
        )
    items = [replace(it, id=f"train/{it.id}") for it in train.items]
    for it in held.items:
        label = it.label if label_map else index[held.label_names[it.label]]  # type: ignore[index]
        items.append(replace(it, id=f"{val[0]}/{it.id}", label=label))
    return Listing(
        name, sorted(items, key=lambda it: it.id), train.label_names, {"val_prefix": f"{val[0]}/"}
    )


def _sample_key(member: str) -> tuple[str, str]:
    """WebDataset ``__key__`` and extension: ``dir/abc.seg.png`` -> (``dir/abc``, ``seg.png``)."""
    folder, _, base = member.rpartition("/")
    stem, _, ext = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), ext.lower()


def _list_tar(fs: Any, path: str, prefix: str = "") -> list[Item]:
    """One tar's image members; ``key.cls`` gives the label of every member of sample ``key``."""
    labels: dict[str, int] = {}
    members: list[tarfile.TarInfo] = []
    with fs.open(path, "rb") as f, tarfile.open(fileobj=f, mode="r:") as tar:
        for m in tar:
            if not m.isfile():
                continue
            key, ext = _sample_key(m.name)
            if ext == "cls":
                text = tar.extractfile(m).read().decode().strip()  # type: ignore[union-attr]
                if text.lstrip("-").isdigit():
                    labels[key] = int(text)
            elif not m.name.endswith(_META_EXT) and not key.startswith("_"):
                members.append(m)
    return [
        Item(
            prefix + m.name,
            "tar",
            path=fs.unstrip_protocol(path),
            start=m.offset_data,
            size=m.size,
            label=labels.get(_sample_key(m.name)[0]),
        )
        for m in members
    ]


_IMAGE_COLUMNS = ("image", "img", "jpg", "jpeg", "png", "webp", "image_bytes")
_LABEL_COLUMNS = ("label", "labels", "cls", "class")


def _image_bytes_type(t: pa.DataType) -> bool:
    if pa.types.is_binary(t) or pa.types.is_large_binary(t):
        return True
    return pa.types.is_struct(t) and any(t.field(i).name == "bytes" for i in range(t.num_fields))


def _file_items(fs: Any, files: list[str], ids: list[str], kind: str) -> list[Item]:
    """One item per file, its size from one listing of each parent folder (no request a file)."""
    sizes: dict[str, int] = {}
    for parent in sorted({f.rsplit("/", 1)[0] for f in files}):
        for info in fs.ls(parent, detail=True):
            sizes[fs._strip_protocol(info["name"])] = int(info.get("size") or 0)
    return [
        Item(i, kind, path=fs.unstrip_protocol(f), size=sizes.get(f) or int(fs.size(f) or 0))
        for f, i in sorted(zip(files, ids, strict=True), key=lambda fi: fi[1])
    ]


def _list_parquet(
    fs: Any,
    files: list[str],
    name: str,
    image_column: str | None,
    label_column: str | None,
    by_file: bool = False,
) -> Listing:
    """Parquet files with an image-bytes column (HF ``Image``: struct {bytes, path}; or binary).

    Ids are ``<file stem>/<row number>``; items keep the file order (row groups are read
    once each when consecutive items share them). By file, only the first file's schema is
    read here."""
    first = pq.ParquetFile(fs.open(files[0], "rb"))
    schema = first.schema_arrow
    require_plain_columns(schema, files[0])  # before a value is read: no pickled columns
    if image_column is None:
        named = [c for c in _IMAGE_COLUMNS if c in schema.names]
        typed = [f.name for f in schema if _image_bytes_type(f.type)]
        candidates = [c for c in named if _image_bytes_type(schema.field(c).type)] or typed
        if not candidates:
            raise DataError(
                f"image_column: no binary or {{bytes, path}} column in {files[0]!r}; "
                f"columns: {', '.join(schema.names)}"
            )
        image_column = candidates[0]
    elif image_column not in schema.names:
        raise DataError(f"image_column: {image_column!r} not in {', '.join(schema.names)}")
    if not _image_bytes_type(schema.field(image_column).type):
        raise DataError(f"image_column: {image_column!r} holds no image bytes")
    if label_column is None:
        label_column = next((c for c in _LABEL_COLUMNS if c in schema.names), None)
    elif label_column not in schema.names:
        raise DataError(f"label_column: {label_column!r} not in {', '.join(schema.names)}")
    label_names = _hf_class_names(schema, label_column) if label_column else []
    stems = [f.rsplit("/", 1)[-1].removesuffix(".parquet") for f in files]
    if len(set(stems)) < len(stems):
        stems = [f.removesuffix(".parquet").replace("/", "_") for f in files]
    if by_file:
        options = {"image_column": image_column, "label_column": label_column}
        items = _file_items(fs, files, stems, "parquetfile")
        return Listing(name, items, label_names, options, by_file=True)
    items: list[Item] = []
    for f, stem in zip(files, stems, strict=True):
        with fs.open(f, "rb") as fh:
            pf = pq.ParquetFile(fh)
            require_plain_columns(pf.schema_arrow, f)
            row = 0
            for g in range(pf.num_row_groups):
                meta = pf.metadata.row_group(g)
                n = meta.num_rows
                size = meta.total_byte_size // max(n, 1)
                labels: list[Any] = [None] * n
                if label_column:
                    labels = pf.read_row_group(g, columns=[label_column]).column(0).to_pylist()
                for i in range(n):
                    lab = labels[i]
                    items.append(
                        Item(
                            f"{stem}/{row + i:08d}",
                            "parquet",
                            path=fs.unstrip_protocol(f),
                            start=g,
                            size=size,
                            label=int(lab) if isinstance(lab, int) and lab >= 0 else None,
                            index=i,
                        )
                    )
                row += n
    options = {"image_column": image_column}
    return Listing(name, items, label_names, options)


def _hf_class_names(schema: pa.Schema, label_column: str) -> list[str]:
    """Class names of a Hugging Face ``ClassLabel`` column, from the schema metadata."""
    meta = (schema.metadata or {}).get(b"huggingface")
    if not meta:
        return []
    try:
        feature = json.loads(meta)["info"]["features"][label_column]
    except (KeyError, TypeError, ValueError):
        return []
    names = feature.get("names") if isinstance(feature, dict) else None
    return [str(n) for n in names] if isinstance(names, list) else []


@lru_cache(maxsize=1)
def _digits() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's digits, read from the CSV file it ships: ``import sklearn`` (scipy with
    it) costs a fresh process about 2 s of CPU, which every ``aimctl pretrain`` of the demo
    paid; the values equal ``load_digits()``'s (tests/test_data_sources.py)."""
    import gzip
    import importlib.util

    spec = importlib.util.find_spec("sklearn")  # finds the package without running it
    roots = list(spec.submodule_search_locations or []) if spec else []
    csv = Path(roots[0], "datasets", "data", "digits.csv.gz") if roots else None
    if csv is None or not csv.is_file():  # another layout: scikit-learn's own loader
        from sklearn.datasets import load_digits

        d = load_digits()
        return d.images, d.target
    with gzip.open(csv, "rt") as f:
        data = np.loadtxt(f, delimiter=",")  # (N, 65): 64 pixels, then the class
    return data[:, :-1].reshape(-1, 8, 8), data[:, -1].astype(int)  # (N, 8, 8) 0..16, (N,)


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
    if item.kind in FILE_KINDS:
        raise ValueError(f"{item.id!r} is a whole file: read it with iter_file")
    if item.kind == "digits":
        return digit_png(item.index, int(options["image_size"]))
    if item.kind == "photos":
        return photo_jpeg(item.index, int(options.get("photo_seed", 0)))
    if item.kind == "parquet":
        return _parquet_cell(
            item.path, item.start, item.index, options["image_column"], storage_options
        )
    fs, path = storage.filesystem(item.path, storage_options)
    if item.kind == "tar":
        return fs.cat_file(path, start=item.start, end=item.start + item.size)
    return fs.cat_file(path)


_ROW_GROUP: dict[str, Any] = {}  # the last row group read in this process (items come in order)


def _parquet_cell(
    url: str, group: int, row: int, column: str, storage_options: dict[str, Any] | None
) -> bytes:
    key = f"{url}\0{group}\0{column}"
    if _ROW_GROUP.get("key") != key:
        fs, path = storage.filesystem(url, storage_options)
        with fs.open(path, "rb") as f:
            pf = pq.ParquetFile(f)
            require_plain_columns(pf.schema_arrow, url)
            table = pf.read_row_group(group, columns=[column])
        _ROW_GROUP.clear()
        _ROW_GROUP.update(key=key, values=table.column(0))
    value = _ROW_GROUP["values"][row].as_py()
    if isinstance(value, dict):
        value = value.get("bytes")
    if not value:
        raise DataError(f"row {row} of row group {group} has no image bytes")
    return bytes(value)


def iter_file(
    item: Item, storage_options: dict[str, Any] | None, options: dict[str, Any]
) -> Iterator[tuple[str, int | None, bytes]]:
    """``(id, label, encoded bytes)`` of each image in a whole-file item, read front to back.

    Ids are those the per-image listing gives: ``<member>`` (``<stem>/<member>`` when
    ``options["prefixed"]``: a source of several tars) and ``<stem>/<row number>`` for Parquet. A tar
    is read as a stream in blocks of 16 MiB; a sample's label is the ``key.cls`` member
    next to its image (WebDataset keeps a sample's members together).
    """
    fs, path = storage.filesystem(item.path, storage_options)
    if item.kind == "parquetfile":
        with fs.open(path, "rb") as f:
            pf = pq.ParquetFile(f)
            require_plain_columns(pf.schema_arrow, item.path)
            image_col, label_col = options["image_column"], options.get("label_column")
            columns = [image_col] + ([label_col] if label_col else [])
            row = 0
            for g in range(pf.num_row_groups):
                table = pf.read_row_group(g, columns=columns)
                labels = table.column(1).to_pylist() if label_col else [None] * table.num_rows
                for value, lab in zip(table.column(0).to_pylist(), labels, strict=True):
                    data = value.get("bytes") if isinstance(value, dict) else value
                    label = int(lab) if isinstance(lab, int) and lab >= 0 else None
                    yield f"{item.id}/{row:08d}", label, bytes(data or b"")
                    row += 1
        return
    prefix = f"{item.id}/" if options.get("prefixed") else ""
    key, label, pending = None, None, []  # the current sample's images
    with (
        fs.open(path, "rb", block_size=_READ_BLOCK) as f,
        tarfile.open(fileobj=f, mode="r|") as tar,
    ):
        for m in tar:
            if not m.isfile():
                continue
            k, ext = _sample_key(m.name)
            if k != key:
                yield from ((i, label, d) for i, d in pending)
                key, label, pending = k, None, []
            data = tar.extractfile(m).read()  # type: ignore[union-attr]
            if ext == "cls":
                text = data.decode(errors="replace").strip()
                label = int(text) if text.lstrip("-").isdigit() else None
            elif not m.name.endswith(_META_EXT) and not k.startswith("_"):
                pending.append((prefix + m.name, data))
        end = tar.offset  # after the last member; a whole tar has 2 zero blocks after it
    yield from ((i, label, d) for i, d in pending)
    if item.size and end + 2 * tarfile.BLOCKSIZE > item.size:
        # tarfile ends quietly at a cut header: say so, or the rest would vanish unseen
        raise DataError(f"{item.path}: truncated after {end} of {item.size} bytes")
