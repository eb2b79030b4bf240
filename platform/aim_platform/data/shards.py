"""The layout of an ingest root and the pieces of an ingest that need no Ray.

Layout of DEST (any fsspec URL)::

    DEST/_manifest.json
    DEST/train/part-00000.parquet ...
    DEST/val/part-00000.parquet ...

Columns: ``id`` (string, unique), ``image`` (binary, the original encoded bytes, never
re-encoded), ``label`` (int32, null when unlabelled), ``source`` (string), ``width`` and
``height`` (int32).

The ingest job (:mod:`aim_platform.jobs.ingest`) lists the source, orders the items
(:func:`order_items`: a seeded hash of their ids, so every shard mixes classes), cuts them
into groups (:func:`group_items`) and runs :func:`write_group` on each in a Ray Data task:
it reads and validates each image (an item may be a whole ``.tar`` or ``.parquet`` file,
read front to back), writes the group's ``train`` and ``val`` shards, then a marker
``_progress/<fingerprint>/group-NNNNN.json`` with the group's results
(:func:`finished_groups` reads them back, so an interrupted ingest resumes).
:func:`build_manifest` and :func:`remove_stale` finish it. The split is deterministic: an
image goes to ``val`` when ``hash(id) < val_fraction`` (:func:`split_of`)."""

from __future__ import annotations

import hashlib
import io
import json
import os
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from aim_platform import storage
from aim_platform.data.sources import FILE_KINDS, Item, Listing, iter_file, load_item
from aim_platform.data.transforms import (
    ImageRejected,
    hash_unit,
    id_hash,
    inspect_image,
)

SCHEMA_VERSION = 1
MANIFEST = "_manifest.json"
SPLITS = ("train", "val")
SPLIT_SALT = "aim-split:"
ORDER_SALT = "aim-order:"
ORDERS = ("auto", "hash", "source", "files")
PROGRESS = "_progress"  # DEST/_progress/<fingerprint>/group-NNNNN.json: finished groups
SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("image", pa.binary()),
        ("label", pa.int32()),
        ("source", pa.string()),
        ("width", pa.int32()),
        ("height", pa.int32()),
    ]
)
# Result rows of a group: a shard written (shard, rows, nbytes) or an image rejected (id, reason).
RESULT_COLUMNS = ("id", "split", "shard", "reason", "rows", "nbytes")


def split_of(sample_id: str, val_fraction: float, val_prefix: str | None = None) -> str:
    """``"val"`` when the id's stable hash falls below ``val_fraction``, else ``"train"``;
    with ``val_prefix`` (split folders) the id's folder decides instead."""
    if val_prefix is not None:
        return "val" if sample_id.startswith(val_prefix) else "train"
    return "val" if hash_unit(sample_id, SPLIT_SALT) < val_fraction else "train"


def order_items(items: list[Item], order: str, seed: int) -> list[Item]:
    """Items in the order ingest writes them: ``"hash"`` sorts by a seeded hash of the id
    (every shard then holds a random sample of the source: classes mixed, even when the
    source lists them class by class); ``"source"`` keeps the listing's order."""
    if order == "source":
        return list(items)
    salt = f"{ORDER_SALT}{seed}:"
    return sorted(items, key=lambda it: (id_hash(it.id, salt), it.id))


def group_items(items: list[Item], shard_bytes: int) -> list[list[Item]]:
    """Cut the ordered items into consecutive groups of about ``shard_bytes`` of input."""
    groups: list[list[Item]] = []
    current: list[Item] = []
    total = 0
    for item in items:
        current.append(item)
        total += max(item.size, 1)
        if total >= shard_bytes:
            groups.append(current)
            current, total = [], 0
    if current:
        groups.append(current)
    return groups


def shard_path(split: str, group: int, part: int = 0) -> str:
    """Relative path of one group's shard of one split (``part``: past the first)."""
    if part:
        return f"{split}/part-{group:05d}-{part:03d}.parquet"
    return f"{split}/part-{group:05d}.parquet"


def read_manifest(dest: str, storage_options: dict[str, Any] | None = None) -> dict | None:
    """The manifest at ``dest``, or None when there is none."""
    fs, root = storage.filesystem(dest, storage_options)
    path = storage.join(root, MANIFEST)
    if not fs.exists(path):
        return None
    return storage.read_json(fs, path, "an ingest manifest")


def fingerprint_of(listing: Listing, settings: dict[str, Any]) -> str:
    h = hashlib.sha256()
    h.update(json.dumps(settings, sort_keys=True).encode())
    h.update(json.dumps(listing.options, sort_keys=True).encode())
    for it in listing.items:
        h.update(f"{it.id}\0{it.size}\0{it.label}\0{it.start}\n".encode())
    return h.hexdigest()


def progress_path(fingerprint: str, group: int) -> str:
    """Relative path of the marker a finished group leaves (its result rows)."""
    return f"{PROGRESS}/{fingerprint[:16]}/group-{group:05d}.json"


def write_group(
    batch: dict[str, np.ndarray],
    *,
    dest: str,
    storage_options: dict[str, Any] | None,
    source: str,
    options: dict[str, Any],
    val_fraction: float,
    max_pixels: int,
    fingerprint: str,
    split_bytes: int = 0,
    shuffle_seed: int | None = None,
) -> dict[str, np.ndarray]:
    """Ray task body: read, validate and write one group's shards; returns its result rows.

    A group's rows of one split go to ``part-GGGGG.parquet`` and, with ``split_bytes`` and
    past it, on to ``part-GGGGG-KKK.parquet`` (a whole-file item can be larger than a shard). With
    ``shuffle_seed`` each shard's rows are written in a seeded hashed order of their ids
    (whole-file items: the images of a file then spread over the shard). Result rows
    (:data:`RESULT_COLUMNS`) are one per shard written (``rows``, ``nbytes``) and one per
    rejected image (``id``, ``reason``): the driver holds counts, not a row per image. Once
    the shards are written, a marker with the group's result rows lands under
    ``_progress/``: an interrupted ingest resumes from these markers.
    """
    fs, root = storage.filesystem(dest, storage_options)
    out: dict[str, list] = {c: [] for c in RESULT_COLUMNS}
    for group, payload in zip(batch["group"], batch["items"], strict=True):
        writer = _GroupShards(fs, root, int(group), split_bytes, shuffle_seed)
        for d in json.loads(payload):
            for sample_id, label, data, reason in _images(Item(**d), storage_options, options):
                split = split_of(sample_id, val_fraction, options.get("val_prefix"))
                width = height = 0
                if not reason:
                    try:
                        width, height = inspect_image(data, max_pixels)
                    except ImageRejected as exc:
                        reason = str(exc)
                    except Exception as exc:  # noqa: BLE001 - a bad image never stops an ingest
                        reason = f"unreadable: {type(exc).__name__}: {exc}"
                if reason:
                    writer.reject(sample_id, split, reason)
                else:
                    writer.add(split, (sample_id, data, label, source, width, height))
        mine = writer.close()
        marker = {"fingerprint": fingerprint, "group": int(group), "results": mine}
        write_atomic(
            fs,
            storage.join(root, progress_path(fingerprint, int(group))),
            json.dumps(marker).encode(),
        )
        for c in RESULT_COLUMNS:
            out[c].extend(mine[c])
    return {
        c: np.asarray(out[c], dtype=object if c in RESULT_COLUMNS[:4] else np.int64)
        for c in RESULT_COLUMNS
    }


def _images(
    item: Item, storage_options: dict[str, Any] | None, options: dict[str, Any]
) -> Iterator[tuple[str, int | None, bytes, str]]:
    """``(id, label, bytes, reason)`` of each image an item stands for; a read that fails
    gives a reason (a whole file that breaks half way: its images so far, then one row
    with the file's id and the reason)."""
    if item.kind not in FILE_KINDS:
        try:
            yield item.id, item.label, load_item(item, storage_options, options), ""
        except Exception as exc:  # noqa: BLE001 - an unreadable file is a reason too
            yield item.id, item.label, b"", f"unreadable: {type(exc).__name__}: {exc}"
        return
    try:
        for sample_id, label, data in iter_file(item, storage_options, options):
            yield sample_id, label, data, "" if data else "empty: no image bytes"
    except Exception as exc:  # noqa: BLE001 - a broken tar or Parquet file
        yield item.id, None, b"", f"unreadable file: {type(exc).__name__}: {exc}"


class _GroupShards:
    """One group's shard writer: rows buffered per split, flushed every ``split_bytes`` (0:
    once, at the end)."""

    def __init__(
        self, fs: Any, root: str, group: int, split_bytes: int, shuffle_seed: int | None
    ) -> None:
        self.fs, self.root, self.group = fs, root, group
        self.split_bytes, self.shuffle_seed = split_bytes, shuffle_seed
        self.rows: dict[str, list[tuple]] = {s: [] for s in SPLITS}
        self.bytes = dict.fromkeys(SPLITS, 0)
        self.parts = dict.fromkeys(SPLITS, 0)
        self.results: dict[str, list] = {c: [] for c in RESULT_COLUMNS}

    def add(self, split: str, row: tuple) -> None:
        self.rows[split].append(row)
        self.bytes[split] += len(row[1])
        if self.split_bytes and self.bytes[split] >= self.split_bytes:
            self._flush(split)

    def reject(self, sample_id: str, split: str, reason: str) -> None:
        for name, value in zip(RESULT_COLUMNS, (sample_id, split, "", reason, 0, 0), strict=True):
            self.results[name].append(value)

    def close(self) -> dict[str, list]:
        for split in SPLITS:
            self._flush(split)
        return self.results

    def _flush(self, split: str) -> None:
        rows = self.rows[split]
        if not rows:
            return
        if self.shuffle_seed is not None:
            salt = f"{ORDER_SALT}{self.shuffle_seed}:"
            rows.sort(key=lambda r: (id_hash(r[0], salt), r[0]))
        path = shard_path(split, self.group, self.parts[split])
        columns = {name: [r[i] for r in rows] for i, name in enumerate(SCHEMA.names)}
        _write_shard(self.fs, storage.join(self.root, path), pa.table(columns, schema=SCHEMA))
        values = ("", split, path, "", len(rows), self.bytes[split])
        for name, value in zip(RESULT_COLUMNS, values, strict=True):
            self.results[name].append(value)
        self.rows[split], self.bytes[split] = [], 0
        self.parts[split] += 1


def finished_groups(fs: Any, root: str, fingerprint: str) -> dict[int, list[dict[str, Any]]]:
    """Result rows of the groups an earlier, interrupted run of this ingest finished."""
    folder = storage.join(root, progress_path(fingerprint, 0).rsplit("/", 1)[0])
    if not fs.exists(folder):
        return {}
    done: dict[int, list[dict[str, Any]]] = {}
    for path in fs.find(folder):
        if not path.endswith(".json"):
            continue  # a temporary file of a write that was cut short
        try:
            marker = json.loads(fs.cat_file(path))
        except (ValueError, OSError):
            continue  # unreadable: redo that group
        if marker.get("fingerprint") != fingerprint:
            continue
        res = marker["results"]
        if set(res) != set(RESULT_COLUMNS):
            continue  # written by an older version: redo that group
        n = len(res["id"])
        done[int(marker["group"])] = [{c: res[c][i] for c in RESULT_COLUMNS} for i in range(n)]
    return done


def _write_shard(fs: Any, path: str, table: pa.Table) -> None:
    buf = io.BytesIO()
    pq.write_table(table, buf, row_group_size=128, compression="none")  # JPEG/PNG: no gain
    write_atomic(fs, path, buf.getvalue())


def write_atomic(fs: Any, path: str, data: bytes) -> None:
    """Readers see the old file or the new one, never half of one (an S3 PUT is atomic)."""
    fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
    if storage.is_remote(fs.unstrip_protocol(path)):
        fs.pipe_file(path, data)
        return
    tmp = f"{path}.tmp-{os.getpid()}-{time.monotonic_ns()}"
    fs.pipe_file(tmp, data)
    fs.mv(tmp, path)


def build_manifest(
    src: str,
    name: str,
    listing: Listing,
    results: list[dict[str, Any]],
    settings: dict[str, Any],
    fingerprint: str,
) -> dict[str, Any]:
    results.sort(key=lambda r: (r["id"], r["shard"]))
    shards: dict[str, dict[str, dict[str, int]]] = {s: {} for s in SPLITS}
    rejected = []
    for r in results:
        if r["reason"]:
            rejected.append({"id": r["id"], "reason": r["reason"]})
            continue
        s = shards[r["split"]].setdefault(r["shard"], {"rows": 0, "bytes": 0})
        s["rows"] += r["rows"]
        s["bytes"] += r["nbytes"]
    counts = {split: sum(s["rows"] for s in shards[split].values()) for split in SPLITS}
    return {
        "schema_version": SCHEMA_VERSION,
        "source": storage.public_url(src),
        "name": name,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "fingerprint": fingerprint,
        "settings": settings,
        "options": listing.options,
        "columns": {f.name: str(f.type) for f in SCHEMA},
        "counts": {
            "listed": counts["train"] + counts["val"] + len(rejected),
            "train": counts["train"],
            "val": counts["val"],
            "rejected": len(rejected),
        },
        "shards": {
            split: [{"path": p, **v} for p, v in sorted(shards[split].items())] for split in SPLITS
        },
        "label_names": listing.label_names,
        "rejected": rejected,
    }


def remove_stale(fs: Any, root: str, manifest: dict[str, Any]) -> None:
    """Delete shard files under DEST that the new manifest does not list."""
    keep = {storage.join(root, s["path"]) for split in SPLITS for s in manifest["shards"][split]}
    for split in SPLITS:
        folder = storage.join(root, split)
        if not fs.exists(folder):
            continue
        for path in fs.find(folder):
            name = path.rsplit("/", 1)[-1]
            if name.startswith("part-") and ".parquet" in name and path not in keep:
                fs.rm(path)
