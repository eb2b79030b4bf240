"""``aimctl ingest SRC DEST``: images -> Parquet shards + ``_manifest.json``, a Ray Data job.

The driver lists the source (small locators, no bytes), puts the items in a seeded hashed
order of their ids (``order="hash"``: every shard is a random sample of the source, so
batches mix classes even when the source lists them class by class) and cuts the list into
groups of about ``shard_size_mb`` of input; one Ray Data task per group runs
:func:`aim_platform.data.shards.write_group`. Sources of ``.tar`` or ``.parquet`` files are
listed by file by default (``order="files"``): the driver lists only the files (a 2B-image
set in 200k tars: 200k locators), the files go in a seeded hashed order into groups, and each
task reads its files front to back (one sequential read a file, not one request an image)
and writes each shard's rows in a hashed order. ``order="hash"`` lists such a source image
by image on the driver (for tars written class by class). The driver receives one result
row per shard and per rejected image, never one per image. An
interrupted ingest, run again with the same source and options, keeps the groups that left
a marker (their shards are not rewritten) and does only the rest; the markers are deleted
once the manifest is written. Shard names derive from the group number, so a re-run into the
same DEST rewrites the same files (stale shards from an earlier, larger run are deleted) and
never duplicates rows; when the manifest's fingerprint (source listing and options) matches,
the ingest is skipped. Bad images never stop an ingest: each lands in the manifest's
``rejected`` list with its reason.

Built-in sources (``builtin:digits`` ...) are ingested once into a local cache by
:func:`prepare_sources`, which every job calls before it reads them.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np

from aim_platform import storage
from aim_platform.data.pipeline import BUILTIN_INGEST, resolve_url
from aim_platform.data.shards import (
    MANIFEST,
    ORDERS,
    PROGRESS,
    RESULT_COLUMNS,
    SCHEMA_VERSION,
    SPLITS,
    build_manifest,
    fingerprint_of,
    finished_groups,
    group_items,
    order_items,
    read_manifest,
    remove_stale,
    write_atomic,
    write_group,
)
from aim_platform.data.sources import list_source
from aim_platform.data.transforms import DEFAULT_MAX_PIXELS
from aim_platform.errors import DataError


def prepare_sources(
    urls: Iterable[str | None], storage_options: dict[str, Any] | None = None
) -> None:
    """Ingest each built-in source among ``urls`` into its cache folder (a no-op when it is
    up to date); other URLs are left alone."""
    for url in dict.fromkeys(u for u in urls if u):
        if url in BUILTIN_INGEST:
            src, settings = BUILTIN_INGEST[url]
            ingest(src, resolve_url(url), **settings)


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
    progress: Callable[[int, int | None], None] | None = None,
    order: str = "auto",
    order_seed: int = 0,
    label_map: str | None = None,
    image_column: str | None = None,
    label_column: str | None = None,
    split_folders: bool = False,
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
        progress: Called as ``progress(done, total)`` while images complete (``total``
            None when files are listed, not the images in them).
        order: Row order across shards: ``"hash"`` (a seeded hash of the id: every shard
            mixes classes), ``"source"`` (the listing's order), ``"files"`` (``.tar`` or
            ``.parquet`` sources: files in a hashed order, read whole by the tasks, rows
            hashed within each shard) or ``"auto"`` (``files`` for such sources, else
            ``hash``).
        order_seed: Seed of the ``hash`` and ``files`` orders.
        label_map: ImageNet-style folders: a file mapping folder names to class indices
            and names (see :func:`aim_platform.data.sources.read_label_map`).
        image_column: Parquet sources: the image column (default: found by name/type).
        label_column: Parquet sources: the label column (default: ``label`` if present).
        split_folders: ``src`` holds ``train/`` and ``val/`` (or ``test/``) image folders
            that are the splits; ``val_fraction`` is then unused.

    Returns:
        The manifest (also written to ``DEST/_manifest.json``), with ``"skipped": True``
        in the returned dict when DEST was already up to date.

    Raises:
        ValueError: bad arguments or an unusable source (named in the message).
    """
    import ray

    if not 0 <= val_fraction < 1:
        raise DataError(f"val_fraction: {val_fraction} must lie in [0, 1)")
    if shard_size_mb <= 0:
        raise DataError(f"shard_size_mb: {shard_size_mb} must be positive")
    if order not in ORDERS:
        raise DataError(f"order: {order!r} is not one of {', '.join(ORDERS)}")
    listing = list_source(
        src,
        storage_options,
        image_size=image_size,
        num_photos=num_photos,
        photo_seed=photo_seed,
        label_map=label_map,
        image_column=image_column,
        label_column=label_column,
        by_file=order in ("auto", "files"),
        split_folders=split_folders,
    )
    if split_folders:
        val_fraction = 0.0  # the folders decide (recorded as such in the manifest)
    if order == "files" and not listing.by_file:
        raise DataError(f"order: files needs a source of .tar or .parquet files, not {src!r}")
    if order == "auto":
        order = "files" if listing.by_file else "hash"
    name = source or listing.name
    settings = {
        "schema_version": SCHEMA_VERSION,
        "val_fraction": val_fraction,
        "shard_size_mb": shard_size_mb,
        "max_pixels": max_pixels,
        "source": name,
        "order": order,
        "order_seed": order_seed,
        **({"splits": "folders"} if split_folders else {}),
    }
    fingerprint = fingerprint_of(listing, settings)
    old = read_manifest(dest, storage_options)
    fs, root = storage.filesystem(dest, storage_options)
    if old and not force and old.get("fingerprint") == fingerprint:
        paths = [s["path"] for split in SPLITS for s in old["shards"][split]]
        if all(fs.exists(storage.join(root, p)) for p in paths):
            return {**old, "skipped": True}
    if force and fs.exists(storage.join(root, PROGRESS)):
        fs.rm(storage.join(root, PROGRESS), recursive=True)

    shard_bytes = int(shard_size_mb * 2**20)
    groups = group_items(order_items(listing.items, order, order_seed), shard_bytes)
    finished = finished_groups(fs, root, fingerprint)
    results: list[dict[str, Any]] = []
    for g, earlier in list(finished.items()):
        shard_files = {r["shard"] for r in earlier if r["shard"]}
        if g < len(groups) and all(fs.exists(storage.join(root, p)) for p in shard_files):
            results.extend(earlier)
        else:
            del finished[g]  # a shard went missing: redo the group
    rows = [
        {"group": g, "items": json.dumps([it.to_dict() for it in items])}
        for g, items in enumerate(groups)
        if g not in finished
    ]
    total = None if listing.by_file else len(listing.items)  # images in files: not listed
    done = sum(_images_in(r) for r in results)
    if progress:
        progress(done, total)
    if rows:
        ds = ray.data.from_items(rows, override_num_blocks=len(rows)).map_batches(
            write_group,
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
                # a whole file can exceed a shard: split its rows; listed images were sized
                "split_bytes": shard_bytes if listing.by_file else 0,
                "shuffle_seed": order_seed if order == "files" else None,
            },
            **_remote_env(src, dest),
        )
        for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
            n = len(batch["id"])
            new = [{c: _py(batch[c][i]) for c in RESULT_COLUMNS} for i in range(n)]
            results.extend(new)
            done += sum(_images_in(r) for r in new)
            if progress:
                progress(done, total)

    manifest = build_manifest(src, name, listing, results, settings, fingerprint)
    if manifest["counts"]["listed"] == 0:
        raise DataError(f"source: {src!r} holds no images")
    manifest["resumed_groups"] = len(finished)
    remove_stale(fs, root, manifest)
    write_atomic(fs, storage.join(root, MANIFEST), json.dumps(manifest, indent=1).encode())
    if fs.exists(storage.join(root, PROGRESS)):
        fs.rm(storage.join(root, PROGRESS), recursive=True)
    return manifest


def _images_in(result: dict[str, Any]) -> int:
    return int(result["rows"]) if result["shard"] else 1  # a shard's rows, or one rejected


def _py(value: Any) -> Any:
    return value.item() if isinstance(value, np.generic) else value


def _remote_env(*urls: str) -> dict[str, Any]:
    """Forward the driver's AWS_* variables to the tasks (in memory, never to disk)."""
    if not any(storage.is_remote(u) for u in urls):
        return {}
    env = {k: v for k, v in os.environ.items() if k.startswith("AWS_")}
    return {"runtime_env": {"env_vars": env}} if env else {}
