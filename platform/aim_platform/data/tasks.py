"""Bodies of the pipeline's Ray Data tasks (no Ray, no torch: cheap to import in workers).

Each new Ray worker process imports the module of the function it runs; keeping these
functions away from :mod:`aim_platform.data.pipeline` (which imports Ray Data, pydantic and,
through the config, torch) saves about a second of start-up per worker.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np
import pyarrow as pa

from aim_platform.data.consumed import row_keys
from aim_platform.data.safety import require_plain_columns
from aim_platform.data.transforms import decode_batch, hash_unit, id_hash

log = logging.getLogger(__name__)
READ_ATTEMPTS = 5  # whole-shard reopenings, on top of each request's own retries
READ_BACKOFF_S = 2.0  # first wait before reopening; doubles each time


def draw_counts(
    ids: Iterable[str], rate: float, *, seed: int, epoch: int, source: str
) -> np.ndarray:
    """How many times each row is drawn this epoch: floor(rate) or floor(rate)+1.

    The extra draw is a stable hash of (seed, epoch, source, id), so the result does not
    depend on which task or in which order rows are seen.

    Returns:
        (N,) int64 counts.
    """
    base = math.floor(rate)
    frac = rate - base
    salt = f"mix:{seed}:{epoch}:{source}:"
    extra = [hash_unit(i, salt) < frac for i in ids]
    return base + np.asarray(extra, dtype=np.int64)


def decode_train_table(
    table: pa.Table,
    *,
    source: str,
    rate: float,
    model: dict[str, int],
    seed: int,
    epoch: int,
    aug: dict[str, Any],
    item: tuple[int, int, int] = (0, 0, 0),
    skip: frozenset[int] = frozenset(),
) -> dict[str, np.ndarray]:
    """Train view of one chunk of a shard: draw mixture counts, permute, decode+crop+flip+patchify.

    Args:
        item: (the shard's identity, shards in the epoch, rows the shard gives this epoch):
            the provenance columns of :mod:`aim_platform.data.consumed`.
        skip: Occurrence keys already consumed (resuming mid-epoch): left out, not decoded.

    Returns:
        Columns ``id``, ``patches`` (M, K, P) uint8, ``valid``, ``epoch``, ``label``,
        ``source``, ``item``, ``epoch_items``, ``item_rows`` (int32) and ``key`` (int64).
    """
    ids = table.column("id").to_pylist()
    labels = table.column("label").fill_null(-1).to_numpy(zero_copy_only=False).astype(np.int32)
    counts = draw_counts(ids, rate, seed=seed, epoch=epoch, source=source)  # (N,)
    index = np.repeat(np.arange(len(ids)), counts)  # (M,)
    repeats = np.concatenate([np.arange(c) for c in counts]) if len(index) else index
    if len(index):
        rng = np.random.default_rng([seed & 0xFFFFFFFF, epoch, id_hash(ids[0]), 1])
        order = rng.permutation(len(index))
        index, repeats = index[order], repeats[order]
    keys = row_keys((id_hash(f"{source}/{ids[j]}") for j in index), repeats)  # (M,) int64
    if skip:  # the same draw and order as before the restart, minus what was trained
        kept = np.fromiter((int(k) not in skip for k in keys), dtype=bool, count=len(keys))
        index, repeats, keys = index[kept], repeats[kept], keys[kept]
    images = table.column("image").to_pylist()
    patches, valid = decode_batch(
        [f"{source}/{ids[j]}" for j in index],
        [images[j] for j in index],
        img_size=model["img_size"],
        patch_size=model["patch_size"],
        train=True,
        seed=seed,
        epoch=epoch,
        repeats=repeats,
        **aug,
    )
    return {
        "id": np.asarray([ids[j] for j in index], dtype=object),
        "patches": patches,  # (M, K, P) uint8
        "valid": valid,
        "epoch": np.full(len(index), epoch, np.int32),
        "label": labels[index],
        "source": np.full(len(index), source, dtype=object),
        "item": np.full(len(index), item[0], np.int64),
        "epoch_items": np.full(len(index), item[1], np.int32),
        "item_rows": np.full(len(index), item[2], np.int32),
        "key": keys,
    }


def decode_val_table(
    table: pa.Table, *, source: str, model: dict[str, int], max_pixels: int
) -> dict[str, np.ndarray]:
    """Validation view of one chunk of a shard: resize + centre crop + patchify, order kept."""
    ids = table.column("id").to_pylist()
    patches, valid = decode_batch(
        ids,
        table.column("image").to_pylist(),
        img_size=model["img_size"],
        patch_size=model["patch_size"],
        train=False,
        max_pixels=max_pixels,
    )
    labels = table.column("label").fill_null(-1).to_numpy(zero_copy_only=False)
    return {
        "id": np.asarray(ids, dtype=object),
        "patches": patches,  # (B, K, P) uint8
        "valid": valid,
        "epoch": np.zeros(len(ids), np.int32),
        "label": labels.astype(np.int32),
        "source": np.full(len(ids), source, dtype=object),
        "item": np.zeros(len(ids), np.int64),
        "epoch_items": np.zeros(len(ids), np.int32),
        "item_rows": np.zeros(len(ids), np.int32),
        "key": np.zeros(len(ids), np.int64),
    }


def read_and_decode(
    batch: dict[str, np.ndarray],
    *,
    sources: list[tuple[str, float, Any]],
    train: bool,
    model: dict[str, int],
    seed: int,
    chunk_rows: int,
    aug: dict[str, Any],
) -> Iterator[dict[str, np.ndarray]]:
    """Ray task body: read each (epoch, source, shard) work item and yield decoded chunks.

    Args:
        batch: Work items: ``epoch``, ``source`` (index into ``sources``), ``path``; train
            items also ``item`` (index in the epoch's order), ``epoch_items`` and ``skip``
            (occurrence keys already trained, comma-separated; empty when none).
        sources: (name, draw rate, pyarrow filesystem) per source.
        train: Training view (augmented, mixture draws) or validation view.
        model: ``img_size`` and ``patch_size``.
        seed: Job seed.
        chunk_rows: Rows read and decoded at a time (a generator output each).
        aug: RandomResizedCrop/flip options and ``max_pixels``.

    Yields:
        Row batches with the pipeline's columns.
    """
    for n, (epoch, src, path) in enumerate(
        zip(batch["epoch"], batch["source"], batch["path"], strict=True)
    ):
        name, rate, fs = sources[int(src)]
        try:
            if train:
                rows = shard_draws(fs, str(path), rate, seed=seed, epoch=int(epoch), source=name)
                item = (int(batch["item"][n]), int(batch["epoch_items"][n]), rows)
                skip = frozenset(int(k) for k in str(batch["skip"][n]).split(",") if k)
            for table in read_chunks(fs, str(path), chunk_rows):
                if train:
                    yield decode_train_table(
                        table, source=name, rate=rate, model=model, seed=seed,
                        epoch=int(epoch), aug=aug, item=item, skip=skip,
                    )  # fmt: skip
                else:
                    yield decode_val_table(
                        table, source=name, model=model, max_pixels=aug["max_pixels"]
                    )
        except Exception as exc:  # which shard: the one thing the error itself may not say
            exc.add_note(f"reading shard {path}")
            raise


def shard_draws(fs: Any, path: str, rate: float, *, seed: int, epoch: int, source: str) -> int:
    """Rows a shard gives this epoch: its row count (from the footer) at a draw rate of
    exactly 1, else the sum of the mixture's draws over its ids (the ``id`` column read)."""
    import pyarrow.parquet as pq

    with fs.open_input_file(path) as f:
        reader = pq.ParquetFile(f)
        require_plain_columns(reader.schema_arrow, path)  # no pickled columns
        if rate == 1.0:
            return int(reader.metadata.num_rows)
        ids = reader.read(columns=["id"]).column("id").to_pylist()
    return int(draw_counts(ids, rate, seed=seed, epoch=epoch, source=source).sum())


def read_chunks(
    fs: Any,
    path: str,
    chunk_rows: int,
    *,
    attempts: int = READ_ATTEMPTS,
    backoff_s: float = READ_BACKOFF_S,
) -> Iterator[pa.Table]:
    """A shard's ``id``, ``image``, ``label`` columns in chunks of ``chunk_rows`` rows.

    A read that fails with an I/O error (the store throttled, reset or timed out past the
    client's own retries) reopens the shard and goes on after the last chunk handed out:
    no row is lost or repeated. After ``attempts`` failures the error is raised (the task,
    then the dataset, fails: an error, never silently missing rows).
    """
    import pyarrow.parquet as pq

    done = 0  # chunks handed out
    for attempt in range(1, attempts + 1):
        try:
            with fs.open_input_file(path) as f:
                reader = pq.ParquetFile(f)
                require_plain_columns(reader.schema_arrow, path)  # no pickled columns
                batches = reader.iter_batches(
                    batch_size=chunk_rows, columns=["id", "image", "label"]
                )
                for i, rb in enumerate(batches):
                    if i >= done:
                        yield pa.Table.from_batches([rb])
                        done += 1
            return
        except OSError as exc:
            if attempt == attempts:
                raise
            wait = backoff_s * 2 ** (attempt - 1)
            log.warning(
                "reading %s failed after %d chunks (%s); reopening in %.0f s (attempt %d of %d)",
                path, done, exc, wait, attempt + 1, attempts,
            )  # fmt: skip
            time.sleep(wait)
