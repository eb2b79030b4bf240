"""Ray Data datasets: Parquet shards -> uint8 patch sequences for Ray Train workers.

Use::

    train_ds = build_train_dataset(cfg.data, cfg.model, seed=cfg.seed, epochs=E)
    val_ds = build_val_dataset(cfg.data, cfg.model)
    TorchTrainer(..., datasets={"train": train_ds, "val": val_ds},
                 dataset_config=ray.train.DataConfig(
                     datasets_to_split=["train"], execution_options=execution_options(cfg.data)))
    # in each worker (aim_platform.data.batches):
    shard = ray.train.get_dataset_shard("train")
    for batch in train_batches(shard, cfg.data, batch_size=B):
        ...  # batch["patches"]: (B, K, P) uint8; batch["valid"]: (B,) bool

Rows: ``id`` (str), ``patches`` (K, P) uint8, ``valid`` (bool; False: the image failed to
decode, its patches are zeros), ``epoch`` (int32), ``label`` (int32, -1 when none),
``source`` (str), and the provenance columns of :mod:`aim_platform.data.consumed` (``item``,
``epoch_items``, ``item_rows``, ``key``). Strings cannot become tensors, so consume with
:data:`aim_platform.data.batches.collate_patches` (what :func:`~aim_platform.data.batches.
train_batches` passes to ``iter_torch_batches``).

How it reads: the driver turns the manifests into work items (epoch, source, shard path),
each epoch's shards of all sources interleaved in an order seeded by (seed, epoch); one
task-based ``map_batches`` operator reads each shard with pyarrow through the source's
filesystem (:func:`aim_platform.storage.pyarrow_filesystem`: local, or S3 with the
endpoint override) in chunks of ``decode_batch_size`` rows and decodes them. We do not use
``ray.data.read_parquet`` here (the tests use it to read shards back): in Ray 2.60 it adds a
``ListFiles`` task that takes a whole CPU (it waits forever when training workers leave
less than one free), packs files into read tasks of up to 128 MiB (fewer, larger tasks: the
first batch comes late), and a multi-epoch stream would need one read chain per epoch (a union whose
start-up grows with the number of epochs). Measured in BENCHMARKS.md.

Knobs (:class:`aim_platform.config.DataConfig`):

- ``cpus_per_task``: logical CPUs each read+decode task reserves (default 0.5). Tasks, not
  an actor pool (which can starve on a small Ray), and nothing else in the pipeline needs a
  CPU: keep ``num_workers * cpus_per_worker + cpus_per_task <= CPUs`` (the demo: 2 workers
  x 0.5 + 0.5 on 2 cores).
- ``decode_concurrency``: cap on decode tasks at once (None: as many as CPUs allow).
- ``decode_batch_size``: rows read and decoded at a time in a task (memory: about this
  many encoded images plus their patches); each chunk streams out as soon as it is done.
- ``prefetch_batches``: batches the consumer prefetches (``iter_torch_batches``).
- ``local_shuffle_buffer``: consumer-side shuffle buffer in rows (0: off); on top of the
  per-epoch shard order and the per-chunk row permutation that the pipeline applies.
- ``preserve_order``: deterministic order (same seed, same order); Ray Train replaces a
  dataset's execution options, so pass :func:`execution_options` to ``DataConfig``.

Epochs: :func:`build_train_dataset` returns one dataset spanning all epochs (each epoch with
its own seeded shard order, row order, mixture draw and crops), so Ray Data starts once:
worker processes, imports, the first shard read and decode (several seconds on a busy
2-core machine) are paid at the start of the run, not at every epoch, and epoch e+1's
shards are decoded while epoch e is consumed. Iterating a fresh dataset per epoch would pay
that start-up every epoch.

Mixtures: source i with weight w_i contributes w_i / sum(w) of ``samples_per_epoch`` rows in
expectation; each row is repeated ``floor(r_i)`` or ``floor(r_i) + 1`` times (r_i = rows
wanted / rows available, the extra draw a stable hash of (seed, epoch, source, id)), so
small sources are oversampled and large ones subsampled without a global shuffle; shards
of all sources are interleaved, so batches mix sources.
"""

from __future__ import annotations

import math
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from aim_platform import storage
from aim_platform.config import DataConfig, DataSource, ModelConfig
from aim_platform.data.consumed import ResumePlan
from aim_platform.data.shards import read_manifest
from aim_platform.data.tasks import read_and_decode
from aim_platform.data.transforms import id_hash
from aim_platform.errors import DataError
from aim_platform.security import check_relative

if TYPE_CHECKING:
    import ray.data

BLOCK_BYTES = 16 * 2**20  # Ray Data output block size: batches stream out sooner
MAX_BLOCKS = 4096  # work-item blocks (a task each); more items share a task
MIN_BLOCKS = 64  # below this many blocks, one work item (shard) per task
MIN_TASK_ROWS = 512  # tiny shards: pack several into one task (per-task overhead ~10 ms+)
# Built-in source URL -> (what is ingested, ingest settings). ``digits-half`` holds out half
# of the digits (880 images) so that probe accuracies are not counted on 90 images.
BUILTIN_INGEST: dict[str, tuple[str, dict[str, Any]]] = {
    "builtin:digits": (
        "builtin:digits",
        {"image_size": 64, "val_fraction": 0.05, "shard_size_mb": 0.5},
    ),
    "builtin:digits-half": (
        "builtin:digits",
        {"image_size": 64, "val_fraction": 0.5, "shard_size_mb": 0.5},
    ),
    "builtin:photos": (
        "builtin:photos",
        {"num_photos": 1000, "val_fraction": 0.05, "shard_size_mb": 16},
    ),
}


@dataclass
class Shards:
    """One source's shard files of one split and the filesystem to read them with."""

    name: str
    weight: float
    paths: list[str]  # inside ``filesystem``
    rows: int
    filesystem: Any  # pyarrow.fs.FileSystem
    shard_rows: list[int] = field(default_factory=list)  # rows of each of ``paths``


def cache_dir() -> Path:
    """Where built-in sources are ingested (``$AIM_DATA_CACHE`` or ``~/.cache/aim-platform``)."""
    root = os.environ.get("AIM_DATA_CACHE") or Path.home() / ".cache" / "aim-platform" / "data"
    return Path(root)


def resolve_url(url: str) -> str:
    """The ingest root of ``url``: a built-in's folder in :func:`cache_dir` (ingested there by
    :func:`aim_platform.jobs.ingest.prepare_sources`, which jobs call first), else ``url``."""
    if url not in BUILTIN_INGEST:
        return url
    return str(cache_dir() / url.removeprefix("builtin:"))


def source_shards(
    source: DataSource, split: str, storage_options: dict[str, Any] | None = None
) -> Shards:
    """Read a source's manifest and list its shards of ``split`` (``train`` or ``val``).

    Raises:
        DataError: no manifest at the URL (message names the URL).
    """
    url = resolve_url(source.url)
    manifest = read_manifest(url, storage_options)
    if manifest is None and source.url in BUILTIN_INGEST:
        raise DataError(
            f"sources: {source.url} is not ingested yet into {url!r}; jobs do it first "
            "(aim_platform.jobs.ingest.prepare_sources)"
        )
    if manifest is None:
        raise DataError(
            f"sources: no _manifest.json at {storage.public_url(url)!r}; run `aimctl ingest`"
        )
    settings = manifest.get("settings") or {}
    if split == "train" and "order" not in settings and manifest.get("label_names"):
        warnings.warn(
            f"sources: {storage.public_url(url)!r} was ingested before rows were written in "
            "hashed order: its shards may hold one class each (batches of one or two "
            "classes); run `aimctl ingest ... --force` again",
            stacklevel=2,
        )
    fs, root = storage.pyarrow_filesystem(url, storage_options)
    shards = manifest["shards"][split]
    return Shards(
        name=source.source_name,
        weight=source.weight,
        # A manifest is input too: its shard paths must stay under the dataset's root.
        paths=[
            storage.join(root, check_relative(s["path"], field="manifest shard")) for s in shards
        ],
        rows=sum(int(s["rows"]) for s in shards),
        filesystem=fs,
        shard_rows=[int(s["rows"]) for s in shards],
    )


def train_size(data: DataConfig) -> int:
    """Rows per epoch of :func:`build_train_dataset`: ``samples_per_epoch`` if set, else the
    sources' train rows in total (with several sources or ``samples_per_epoch``, the number
    drawn per epoch varies around this by the mixture's random draws)."""
    if data.samples_per_epoch:
        return data.samples_per_epoch
    return sum(source_shards(s, "train", data.storage_options).rows for s in data.sources)


def mixture_rates(rows: list[int], weights: list[float], total: int) -> list[float]:
    """Expected draws per available row of each source so that source i gives w_i/sum(w)."""
    wsum = float(sum(weights))
    return [(w / wsum) * total / max(n, 1) for n, w in zip(rows, weights, strict=True)]


def _model_args(model: ModelConfig) -> dict[str, int]:
    return {"img_size": model.img_size, "patch_size": model.patch_size}


def epoch_items(
    shards: list[Shards],
    seed: int,
    epoch: int,
    resume: ResumePlan | None = None,
    exclude: frozenset[str] = frozenset(),
) -> list[dict[str, Any]]:
    """One epoch's work items (source index, shard path), all sources' shards interleaved
    in an order seeded by (seed, epoch); ``item`` identifies the shard (a stable hash of its
    path), ``epoch_items`` counts the epoch's shards (those of ``exclude`` left out).

    Args:
        resume: Shards to leave out and rows to skip (what a checkpoint says was trained).
        exclude: Shard paths the run skips (``data.skip_bad_shards``).
    """
    items = [
        {"epoch": epoch, "source": i, "path": p} for i, s in enumerate(shards) for p in s.paths
    ]
    rng = np.random.default_rng([seed & 0xFFFFFFFF, epoch, 0])
    ordered = [items[j] for j in rng.permutation(len(items))]  # the same with or without
    ordered = [it for it in ordered if it["path"] not in exclude]  # a bad shard left out
    leave_out = resume.leave_out.get(epoch, set()) if resume else set()
    skip = resume.skip.get(epoch, {}) if resume else {}
    out = []
    for it in ordered:
        item = shard_item(it["path"])
        if item in leave_out:
            continue
        keys = ",".join(map(str, sorted(skip.get(item, ()))))
        out.append({**it, "item": item, "epoch_items": len(ordered), "skip": keys})
    return out


def shard_item(path: str) -> int:
    """A shard's identity in the record of trained rows: a stable 62-bit hash of its path."""
    return id_hash(path, "shard:") >> 2


def num_blocks(items: list[dict[str, Any]], shards: list[Shards]) -> int:
    """Blocks (tasks) for the work items: one shard each, except that many tiny shards share
    tasks (at least ``MIN_TASK_ROWS`` rows a task, never fewer than ``MIN_BLOCKS`` blocks)."""
    per_shard = [s.rows / max(len(s.paths), 1) for s in shards]
    rows = sum(per_shard[int(it["source"])] for it in items)
    packed = max(MIN_BLOCKS, math.ceil(rows / MIN_TASK_ROWS))
    return max(1, min(len(items), MAX_BLOCKS, packed))


def _decode_dataset(
    items: list[dict[str, Any]],
    shards: list[Shards],
    rates: list[float],
    data: DataConfig,
    model: ModelConfig,
    *,
    train: bool,
    seed: int,
) -> ray.data.Dataset:
    """One task-based ``map_batches`` operator over the work items: read + decode."""
    import ray.data

    ds = ray.data.from_items(items, override_num_blocks=num_blocks(items, shards))
    ds = ds.map_batches(
        read_and_decode,
        batch_size=1,
        num_cpus=data.cpus_per_task,
        concurrency=data.decode_concurrency,
        fn_kwargs={
            "sources": [(s.name, r, s.filesystem) for s, r in zip(shards, rates, strict=True)],
            "train": train,
            "model": _model_args(model),
            "seed": seed,
            "chunk_rows": data.decode_batch_size,
            "aug": data.crop_args(),
        },
    )
    ds.context.target_max_block_size = BLOCK_BYTES
    ds.context.execution_options.preserve_order = data.preserve_order if train else True
    return ds


def build_train_dataset(
    data: DataConfig,
    model: ModelConfig,
    *,
    seed: int,
    epochs: int,
    start_epoch: int = 0,
    resume: ResumePlan | None = None,
    exclude: frozenset[str] = frozenset(),
) -> ray.data.Dataset:
    """The training stream: epochs ``start_epoch .. epochs-1`` of augmented patch sequences.

    Every epoch lists each source's train shards in an order seeded by (seed, epoch), all
    sources interleaved; one task-based ``map_batches`` operator reads each shard (pyarrow,
    with the source's filesystem) in chunks of ``decode_batch_size`` rows, draws each source's
    rows for its mixture weight, permutes them, and decodes with RandomResizedCrop + flip +
    bicubic resize + patchify. Per-sample randomness comes from (seed, epoch, source/id,
    repeat), so the same seed gives the same crops.

    Args:
        data: The data section (sources, weights, augmentation, CPU budget).
        model: Gives the image size and patch size (K = model.num_patches, P = model.patch_dim).
        seed: Job seed.
        epochs: One past the last epoch to produce.
        start_epoch: First epoch (resuming a run).
        resume: What the checkpoint says was trained (:meth:`DataState.resume_plan`): its
            start epoch overrides ``start_epoch``, its shards are left out and its rows skipped.
        exclude: Shard paths left out of every epoch (bad shards the run skips).

    Returns:
        A dataset with columns ``id``, ``patches`` (K, P) uint8, ``valid``, ``epoch`` (int32),
        ``label`` (int32, -1 when none), ``source``.

    Raises:
        ValueError: no epochs to produce, or a source without a manifest or train rows.
    """
    if resume is not None:
        start_epoch = resume.start_epoch
    if not 0 <= start_epoch < epochs:
        raise DataError(f"epochs: need 0 <= start_epoch ({start_epoch}) < epochs ({epochs})")
    shards = [source_shards(s, "train", data.storage_options) for s in data.sources]
    for s in shards:
        if not s.rows:
            raise DataError(f"sources: {s.name!r} has no train rows")
    total = data.samples_per_epoch or sum(s.rows for s in shards)
    rates = mixture_rates([s.rows for s in shards], [s.weight for s in shards], total)
    items = [
        it
        for e in range(start_epoch, epochs)
        for it in epoch_items(shards, seed, e, resume, exclude)
    ]
    return _decode_dataset(items, shards, rates, data, model, train=True, seed=seed)


def build_val_dataset(data: DataConfig, model: ModelConfig) -> ray.data.Dataset:
    """The validation stream: resize + centre crop of every ``val`` row, fixed order.

    Reads the ``val`` split of ``data.val_url`` when set, else of every source; with
    ``data.val_limit`` only its first rows (ingest writes rows in a hashed order: a sample).

    Returns:
        Same columns as :func:`build_train_dataset` (``epoch`` is 0, ``valid`` as there).

    Raises:
        ValueError: no validation rows.
    """
    sources = [DataSource(url=data.val_url)] if data.val_url else data.sources
    shards = [source_shards(s, "val", data.storage_options) for s in sources]
    if not sum(s.rows for s in shards):
        raise DataError("val_url: no validation rows (ingest with --val-fraction > 0)")
    items = [{"epoch": 0, "source": i, "path": p} for i, s in enumerate(shards) for p in s.paths]
    rates = [1.0] * len(shards)
    ds = _decode_dataset(items, shards, rates, data, model, train=False, seed=0)
    return ds.limit(data.val_limit) if data.val_limit else ds


def execution_options(data: DataConfig) -> Any:
    """Ray Data execution options to pass to ``ray.train.DataConfig(execution_options=...)``.

    Ray Train replaces each dataset's options with these (its default drops
    ``preserve_order``); resource limits are left to Ray Train (it excludes the workers').
    """
    from ray.data import DataContext, ExecutionOptions

    ctx = DataContext.get_current()
    return ExecutionOptions(
        resource_limits=ctx.execution_options.resource_limits,
        preserve_order=data.preserve_order,
    )
