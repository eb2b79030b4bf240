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
it reads and validates each image, writes the group's ``train`` and ``val`` shard, then a
marker ``_progress/<fingerprint>/group-NNNNN.json`` with the group's results
(:func:`finished_groups` reads them back, so an interrupted ingest resumes).
:func:`build_manifest` and :func:`remove_stale` finish it. The split is deterministic: an
image goes to ``val`` when ``hash(id) < val_fraction`` (:func:`split_of`)."""

from __future__ import annotations

import hashlib
import io
import json
import os
import time
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from aim_platform.data import storage
from aim_platform.data.sources import Item, Listing, load_item
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
ORDERS = ("auto", "hash", "source")
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
RESULT_COLUMNS = ("id", "split", "shard", "reason", "label", "width", "height", "nbytes")


def split_of(sample_id: str, val_fraction: float) -> str:
    """``"val"`` when the id's stable hash falls below ``val_fraction``, else ``"train"``."""
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


def shard_path(split: str, group: int) -> str:
    """Relative path of one group's shard of one split."""
    return f"{split}/part-{group:05d}.parquet"


def read_manifest(dest: str, storage_options: dict[str, Any] | None = None) -> dict | None:
    """The manifest at ``dest``, or None when there is none."""
    fs, root = storage.filesystem(dest, storage_options)
    path = storage.join(root, MANIFEST)
    if not fs.exists(path):
        return None
    return json.loads(fs.cat_file(path))


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
) -> dict[str, np.ndarray]:
    """Ray task body: read, validate and write one group's shards; one result row per item.

    Once the shards are written, a marker with the group's result rows lands under
    ``_progress/``: an interrupted ingest resumes from these markers.
    """
    fs, root = storage.filesystem(dest, storage_options)
    out: dict[str, list] = {c: [] for c in RESULT_COLUMNS}
    for group, payload in zip(batch["group"], batch["items"], strict=True):
        rows: dict[str, dict[str, list]] = {s: {n: [] for n in SCHEMA.names} for s in SPLITS}
        mine: dict[str, list] = {c: [] for c in RESULT_COLUMNS}
        for d in json.loads(payload):
            item = Item(**d)
            split = split_of(item.id, val_fraction)
            reason, width, height, data = "", 0, 0, b""
            try:
                data = load_item(item, storage_options, options)
                width, height = inspect_image(data, max_pixels)
            except ImageRejected as exc:
                reason = str(exc)
            except Exception as exc:  # noqa: BLE001 - an unreadable file is a reason too
                reason = f"unreadable: {type(exc).__name__}: {exc}"
            if not reason:
                r = rows[split]
                for name, value in zip(
                    SCHEMA.names, (item.id, data, item.label, source, width, height), strict=True
                ):
                    r[name].append(value)
            values = (
                item.id,
                split,
                "" if reason else shard_path(split, int(group)),
                reason,
                -1 if item.label is None else item.label,
                width,
                height,
                len(data) if not reason else 0,
            )
            for name, value in zip(RESULT_COLUMNS, values, strict=True):
                mine[name].append(value)
        for split in SPLITS:
            path = storage.join(root, shard_path(split, int(group)))
            if rows[split]["id"]:
                _write_shard(fs, path, pa.table(rows[split], schema=SCHEMA))
            elif fs.exists(path):
                fs.rm(path)  # an earlier run put rows here; now this group has none
        marker = {"fingerprint": fingerprint, "group": int(group), "results": mine}
        write_atomic(
            fs,
            storage.join(root, progress_path(fingerprint, int(group))),
            json.dumps(marker).encode(),
        )
        for c in RESULT_COLUMNS:
            out[c].extend(mine[c])
    return _result_arrays(out)


def _result_arrays(out: dict[str, list]) -> dict[str, np.ndarray]:
    return {
        c: np.asarray(out[c], dtype=object if c in RESULT_COLUMNS[:4] else np.int64)
        for c in RESULT_COLUMNS
    }


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
    results.sort(key=lambda r: r["id"])
    shards: dict[str, dict[str, dict[str, int]]] = {s: {} for s in SPLITS}
    rejected = []
    for r in results:
        if r["reason"]:
            rejected.append({"id": r["id"], "reason": r["reason"]})
            continue
        s = shards[r["split"]].setdefault(r["shard"], {"rows": 0, "bytes": 0})
        s["rows"] += 1
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
            "listed": len(listing.items),
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
