"""``aimctl ingest SRC DEST``: images -> Parquet shards + ``_manifest.json`` (Ray Data).

Layout of DEST (any fsspec URL)::

    DEST/_manifest.json
    DEST/train/part-00000.parquet ...
    DEST/val/part-00000.parquet ...

Columns: ``id`` (string, unique), ``image`` (binary, the original encoded bytes, never
re-encoded), ``label`` (int32, null when unlabelled), ``source`` (string), ``width`` and
``height`` (int32).

How it runs: the driver lists the source (small locators, no bytes), puts the items in a
seeded hashed order of their ids (``order="hash"``: every shard is a random sample of the
source, so batches mix classes even when the source lists them class by class; Parquet
sources keep their order by default, see :func:`ingest`) and cuts the list into groups of
about ``shard_size_mb`` of input; one Ray Data task per group reads or generates each
image, validates it by decoding it once, writes that group's ``train`` and ``val`` shard,
then a marker ``_progress/<fingerprint>/group-NNNNN.json`` with the group's results. An
interrupted ingest, run again with the same source and options, keeps the groups that have
a marker (their shards are not rewritten) and does only the rest; the markers are deleted
once the manifest is written. Shard names derive from the group number, so a re-run into
the same DEST rewrites the same files (stale shards from an earlier, larger run are
deleted) and never duplicates rows; when the manifest's fingerprint (source listing and
options) matches, the ingest is skipped. The split is deterministic: an image goes to
``val`` when ``hash(id) < val_fraction``. Bad images never stop an ingest: each lands in
the manifest's ``rejected`` list with its reason.

Over 400 lines on purpose: ingest is one job (listing, grouping, resumable markers, shard
writing, the manifest); sources live in :mod:`.sources`, decoding in :mod:`.transforms`.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from aim_platform.data import storage
from aim_platform.data.sources import Item, Listing, list_source, load_item
from aim_platform.data.transforms import (
    DEFAULT_MAX_PIXELS,
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
_RESULT_COLUMNS = ("id", "split", "shard", "reason", "label", "width", "height", "nbytes")


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


def _fingerprint(listing: Listing, settings: dict[str, Any]) -> str:
    h = hashlib.sha256()
    h.update(json.dumps(settings, sort_keys=True).encode())
    h.update(json.dumps(listing.options, sort_keys=True).encode())
    for it in listing.items:
        h.update(f"{it.id}\0{it.size}\0{it.label}\0{it.start}\n".encode())
    return h.hexdigest()


def progress_path(fingerprint: str, group: int) -> str:
    """Relative path of the marker a finished group leaves (its result rows)."""
    return f"{PROGRESS}/{fingerprint[:16]}/group-{group:05d}.json"


def _ingest_group(
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
    out: dict[str, list] = {c: [] for c in _RESULT_COLUMNS}
    for group, payload in zip(batch["group"], batch["items"], strict=True):
        rows: dict[str, dict[str, list]] = {s: {n: [] for n in SCHEMA.names} for s in SPLITS}
        mine: dict[str, list] = {c: [] for c in _RESULT_COLUMNS}
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
            for name, value in zip(_RESULT_COLUMNS, values, strict=True):
                mine[name].append(value)
        for split in SPLITS:
            path = storage.join(root, shard_path(split, int(group)))
            if rows[split]["id"]:
                _write_shard(fs, path, pa.table(rows[split], schema=SCHEMA))
            elif fs.exists(path):
                fs.rm(path)  # an earlier run put rows here; now this group has none
        marker = {"fingerprint": fingerprint, "group": int(group), "results": mine}
        _write_atomic(
            fs,
            storage.join(root, progress_path(fingerprint, int(group))),
            json.dumps(marker).encode(),
        )
        for c in _RESULT_COLUMNS:
            out[c].extend(mine[c])
    return _result_arrays(out)


def _result_arrays(out: dict[str, list]) -> dict[str, np.ndarray]:
    return {
        c: np.asarray(out[c], dtype=object if c in _RESULT_COLUMNS[:4] else np.int64)
        for c in _RESULT_COLUMNS
    }


def _finished_groups(fs: Any, root: str, fingerprint: str) -> dict[int, list[dict[str, Any]]]:
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
        done[int(marker["group"])] = [{c: res[c][i] for c in _RESULT_COLUMNS} for i in range(n)]
    return done


def _write_shard(fs: Any, path: str, table: pa.Table) -> None:
    buf = io.BytesIO()
    pq.write_table(table, buf, row_group_size=128, compression="none")  # JPEG/PNG: no gain
    _write_atomic(fs, path, buf.getvalue())


def _write_atomic(fs: Any, path: str, data: bytes) -> None:
    """Readers see the old file or the new one, never half of one (an S3 PUT is atomic)."""
    fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
    if storage.is_remote(fs.unstrip_protocol(path)):
        fs.pipe_file(path, data)
        return
    tmp = f"{path}.tmp-{os.getpid()}-{time.monotonic_ns()}"
    fs.pipe_file(tmp, data)
    fs.mv(tmp, path)


def ingest(
    src: str,
    dest: str,
    *,
    val_fraction: float = 0.05,
    shard_size_mb: float = 256.0,
    storage_options: dict[str, Any] | None = None,
    image_size: int = 64,
    num_photos: int = 1000,
    photo_seed: int = 0,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    source: str | None = None,
    cpus_per_task: float = 1.0,
    force: bool = False,
    progress: Callable[[int, int], None] | None = None,
    order: str = "auto",
    order_seed: int = 0,
    label_map: str | None = None,
    image_column: str | None = None,
    label_column: str | None = None,
) -> dict[str, Any]:
    """Ingest ``src`` into Parquet shards under ``dest`` and write ``_manifest.json``.

    Args:
        src: Image folder, ``.tar`` or ``builtin:digits`` / ``builtin:photos`` (any fsspec URL).
        dest: Destination root (local folder or ``s3://bucket/prefix``).
        val_fraction: Share of ids (by stable hash) that go to the ``val`` split.
        shard_size_mb: Target input bytes per group (one train and one val shard each).
        storage_options: fsspec options for both ends (e.g. ``{"endpoint_url": ...}``);
            never written anywhere.
        image_size: Side of ``builtin:digits`` images.
        num_photos: Number of ``builtin:photos`` crops.
        photo_seed: Seed of the ``builtin:photos`` crops.
        max_pixels: Images with more pixels are rejected as decompression bombs.
        source: Value of the ``source`` column; default the source's name.
        cpus_per_task: Logical CPUs each ingest task reserves.
        force: Re-ingest even when the manifest says DEST is up to date.
        progress: Called as ``progress(done, total)`` while images complete.
        order: Row order across shards: ``"hash"`` (a seeded hash of the id: every shard
            mixes classes), ``"source"`` (the listing's order), or ``"auto"`` (``source``
            for Parquet sources, whose rows are read by row group, else ``hash``).
        order_seed: Seed of the ``hash`` order.
        label_map: ImageNet-style folders: a file mapping folder names to class indices
            and names (see :func:`aim_platform.data.sources.read_label_map`).
        image_column: Parquet sources: the image column (default: found by name/type).
        label_column: Parquet sources: the label column (default: ``label`` if present).

    Returns:
        The manifest (also written to ``DEST/_manifest.json``), with ``"skipped": True``
        in the returned dict when DEST was already up to date.

    Raises:
        ValueError: bad arguments or an unusable source (named in the message).
    """
    import ray

    if not 0 <= val_fraction < 1:
        raise ValueError(f"val_fraction: {val_fraction} must lie in [0, 1)")
    if shard_size_mb <= 0:
        raise ValueError(f"shard_size_mb: {shard_size_mb} must be positive")
    if order not in ORDERS:
        raise ValueError(f"order: {order!r} is not one of {', '.join(ORDERS)}")
    listing = list_source(
        src,
        storage_options,
        image_size=image_size,
        num_photos=num_photos,
        photo_seed=photo_seed,
        label_map=label_map,
        image_column=image_column,
        label_column=label_column,
    )
    if order == "auto":
        order = "source" if listing.ordered_reads else "hash"
    name = source or listing.name
    settings = {
        "schema_version": SCHEMA_VERSION,
        "val_fraction": val_fraction,
        "shard_size_mb": shard_size_mb,
        "max_pixels": max_pixels,
        "source": name,
        "order": order,
        "order_seed": order_seed,
    }
    fingerprint = _fingerprint(listing, settings)
    old = read_manifest(dest, storage_options)
    fs, root = storage.filesystem(dest, storage_options)
    if old and not force and old.get("fingerprint") == fingerprint:
        paths = [s["path"] for split in SPLITS for s in old["shards"][split]]
        if all(fs.exists(storage.join(root, p)) for p in paths):
            return {**old, "skipped": True}
    if force and fs.exists(storage.join(root, PROGRESS)):
        fs.rm(storage.join(root, PROGRESS), recursive=True)

    groups = group_items(order_items(listing.items, order, order_seed), int(shard_size_mb * 2**20))
    finished = _finished_groups(fs, root, fingerprint)
    results: list[dict[str, Any]] = []
    for g, done in list(finished.items()):
        shard_files = {r["shard"] for r in done if r["shard"]}
        if g < len(groups) and all(fs.exists(storage.join(root, p)) for p in shard_files):
            results.extend(done)
        else:
            del finished[g]  # a shard went missing: redo the group
    rows = [
        {"group": g, "items": json.dumps([it.to_dict() for it in items])}
        for g, items in enumerate(groups)
        if g not in finished
    ]
    total = len(listing.items)
    if progress:
        progress(len(results), total)
    if rows:
        ds = ray.data.from_items(rows, override_num_blocks=len(rows)).map_batches(
            _ingest_group,
            batch_size=1,
            num_cpus=cpus_per_task,
            fn_kwargs={
                "dest": dest,
                "storage_options": storage_options,
                "source": name,
                "options": listing.options,
                "val_fraction": val_fraction,
                "max_pixels": max_pixels,
                "fingerprint": fingerprint,
            },
            **_remote_env(src, dest),
        )
        for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
            n = len(batch["id"])
            results.extend({c: _py(batch[c][i]) for c in _RESULT_COLUMNS} for i in range(n))
            if progress:
                progress(len(results), total)

    manifest = _build_manifest(src, name, listing, results, settings, fingerprint)
    manifest["resumed_groups"] = len(finished)
    _remove_stale(fs, root, manifest)
    _write_atomic(fs, storage.join(root, MANIFEST), json.dumps(manifest, indent=1).encode())
    if fs.exists(storage.join(root, PROGRESS)):
        fs.rm(storage.join(root, PROGRESS), recursive=True)
    return manifest


def _py(value: Any) -> Any:
    return value.item() if isinstance(value, np.generic) else value


def _remote_env(*urls: str) -> dict[str, Any]:
    """Forward the driver's AWS_* variables to the tasks (in memory, never to disk)."""
    if not any(storage.is_remote(u) for u in urls):
        return {}
    env = {k: v for k, v in os.environ.items() if k.startswith("AWS_")}
    return {"runtime_env": {"env_vars": env}} if env else {}


def _build_manifest(
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


def _remove_stale(fs: Any, root: str, manifest: dict[str, Any]) -> None:
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
