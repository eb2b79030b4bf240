"""The probe job: block outputs of a frozen trunk computed per batch by a Ray Data actor pool
and streamed into a sharded cache of the averaged inputs the probes read
(:class:`~aim_platform.eval.cache.FeatureCache`), attentive and linear probes (and LoRA)
trained on it (:mod:`aim_platform.eval`), one MLflow run per probe."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import torch

from aim_platform.config import DataConfig, DataSource, ProbeConfig
from aim_platform.errors import DataError
from aim_platform.eval.cache import FeatureCache
from aim_platform.eval.features import block_outputs, load_trunk, sequence_order
from aim_platform.eval.lora import fit_lora_probe
from aim_platform.eval.probe import ProbeReport, probe_cached, probe_inputs, report_metrics
from aim_platform.tracking import Tracker


class FeatureActor:
    """Ray Data callable class: holds one frozen trunk, maps ``patches`` to block outputs.

    The trunk runs in its own pre-training order (:func:`sequence_order`): a causal probe
    of a spiral trunk sees patches as the spiral did. Rows whose image failed to decode (``valid`` False) and, when ``keep_ids`` is given,
    rows whose ``id`` is not in it are dropped here rather than by a separate ``filter``
    (a filter is its own 1-CPU task that may never be scheduled beside the actor on a small
    machine). Output columns: ``features`` float16 (L, K, D) per row, ``label`` and ``id``.
    """

    def __init__(
        self,
        trunk_path: str,
        layers: Sequence[int],
        attention: str,
        storage_options: dict[str, Any] | None = None,
        threads: int = 1,
        keep_ids: set[str] | None = None,
    ) -> None:
        torch.set_num_threads(threads)
        self.trunk, cfg = load_trunk(trunk_path, storage_options)
        self.order = sequence_order(cfg)  # (K,) or None (raster)
        self.layers = list(layers)
        self.attention = attention
        self.keep_ids = keep_ids

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        keep = np.asarray(batch["valid"], dtype=bool)  # (B,)
        if self.keep_ids is not None:
            keep &= np.array([str(i) in self.keep_ids for i in batch["id"]], dtype=bool)
        pixels = torch.from_numpy(np.stack(batch["patches"])[keep])  # (B', K, P) uint8
        with torch.no_grad():
            feats = block_outputs(self.trunk, pixels, self.layers, self.attention, self.order)
        return {
            "features": feats.to(torch.float16).numpy(),  # (B', L, K, D)
            "label": np.asarray(batch["label"])[keep],
            "id": np.asarray(batch["id"])[keep],
        }


def iter_features(
    ds: Any,
    trunk_path: str,
    layers: Sequence[int],
    attention: str = "bidirectional",
    storage_options: dict[str, Any] | None = None,
    batch_size: int = 64,
    actors: int = 1,
    cpus_per_actor: float = 0.5,
    keep_ids: set[str] | None = None,
) -> Iterator[dict[str, np.ndarray]]:
    """Block outputs of every valid row (with an id in ``keep_ids``, if given) of a Ray
    Dataset with columns ``patches``, ``valid``, ``label`` and ``id``, computed by an actor
    pool holding the trunk and streamed: one batch in memory at a time, whatever N is.

    Yields:
        ``{"features": (B, L, K, D) float16, "label": (B,) int64, "id": (B,)}`` in the
        dataset's order (empty batches skipped).
    """
    from ray.data import ActorPoolStrategy

    out = ds.map_batches(
        FeatureActor,
        fn_constructor_kwargs={
            "trunk_path": trunk_path,
            "layers": list(layers),
            "attention": attention,
            "storage_options": storage_options,
            "threads": max(1, int(cpus_per_actor)),
            "keep_ids": keep_ids,
        },
        batch_size=batch_size,
        batch_format="numpy",
        compute=ActorPoolStrategy(size=actors),
        num_cpus=cpus_per_actor,
    )
    for batch in out.iter_batches(batch_size=batch_size, batch_format="numpy"):
        if len(batch["label"]):
            yield {
                "features": batch["features"],
                "label": np.asarray(batch["label"]).astype(np.int64),
                "id": batch["id"],
            }


def _materialize(ds: Any, keep_ids: set[str] | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, K, P) uint8 patches and (N,) labels of the valid (and kept) rows."""
    pixels, labels = [], []
    for batch in ds.iter_batches(batch_size=1024, batch_format="numpy"):
        keep = np.asarray(batch["valid"], dtype=bool)
        if keep_ids is not None:
            keep &= np.array([str(i) in keep_ids for i in batch["id"]], dtype=bool)
        pixels.append(np.stack(batch["patches"])[keep])
        labels.append(np.asarray(batch["label"])[keep])
    return torch.from_numpy(np.concatenate(pixels)), torch.from_numpy(np.concatenate(labels))


def run_lora_probe(
    trunk_path: str,
    cfg: ProbeConfig,
    train_ds: Any,
    val_ds: Any,
    layers: list[int],
    num_classes: int,
    storage_options: dict[str, Any] | None = None,
    keep_ids: set[str] | None = None,
) -> dict[str, float]:
    """LoRA + attentive probe on the probe job's datasets (materialized: small label sets)."""

    trunk, model_cfg = load_trunk(trunk_path, storage_options)
    train, val = _materialize(train_ds, keep_ids), _materialize(val_ds, None)
    return fit_lora_probe(
        trunk, layers, train, val, num_classes, cfg, order=sequence_order(model_cfg)
    )


def select_labelled(
    url: str, n_per_class: int | None, seed: int, storage_options: dict[str, Any] | None = None
) -> set[str] | None:
    """Ids of ``n_per_class`` training rows per label, chosen by a seeded hash (None: all).

    Reads only the ``id`` and ``label`` columns of the train shards.
    """
    if n_per_class is None:
        return None
    import pyarrow.parquet as pq

    from aim_platform.data.pipeline import source_shards
    from aim_platform.data.safety import require_plain_columns
    from aim_platform.data.transforms import choose_labelled

    shards = source_shards(DataSource(url=url), "train", storage_options)
    rows: list[tuple[str, int]] = []
    for path in shards.paths:
        table = pq.read_table(path, columns=["id", "label"], filesystem=shards.filesystem)
        require_plain_columns(table.schema, path)  # a pickled column is refused, never read
        for sid, label in zip(table["id"].to_pylist(), table["label"].to_pylist(), strict=True):
            rows.append((sid, -1 if label is None else label))
    chosen = choose_labelled(rows, n_per_class, seed)
    if not chosen:
        raise DataError(f"dataset: {url} has no labelled training rows")
    return chosen


def probe_datasets(cfg: ProbeConfig, model_cfg: Any, dataset: str) -> tuple[Any, Any]:
    """Ray datasets for a probe: ``views`` augmented passes over the labelled training rows,
    and the fixed centre-crop view of the validation split."""
    from aim_platform.data.pipeline import build_train_dataset, build_val_dataset

    data = DataConfig(sources=[DataSource(url=dataset)], storage_options=cfg.storage_options)
    train = build_train_dataset(data, model_cfg, seed=cfg.seed, epochs=cfg.views)
    return train, build_val_dataset(data, model_cfg)


def run_probe(
    trunk_path: str,
    cfg: ProbeConfig,
    *,
    dataset: str,
    storage_options: dict[str, Any] | None = None,
    on_phase: Callable[[str], None] | None = None,
) -> ProbeReport:
    """The whole probe job on one trunk. Needs Ray running.

    Block outputs are computed per batch by an actor pool (Ray Data) and streamed into a
    :class:`FeatureCache` (``cfg.cache_dir``, or a temporary folder) holding only the averaged
    inputs the probes read; the probes then train on shards read back a few at a time.
    Driver and actor memory stay bounded by the batch and shard sizes, whatever N is.
    """
    from aim_platform.jobs.ingest import prepare_sources

    prepare_sources([dataset], cfg.storage_options)
    trunk, model_cfg = load_trunk(trunk_path, storage_options)
    n_blocks = len(trunk.blocks)
    inputs = probe_inputs(cfg, n_blocks)
    blocks = sorted({b for chosen in inputs.values() for b in chosen})
    train_ds, val_ds = probe_datasets(cfg, model_cfg, dataset)
    chosen = select_labelled(dataset, cfg.labels_per_class, cfg.seed, cfg.storage_options)
    tmp = None if cfg.cache_dir else tempfile.mkdtemp(prefix="aim-probe-cache-")
    cache = FeatureCache(cfg.cache_dir or tmp, cfg.storage_options if cfg.cache_dir else None)
    cache.remove()  # a stale cache of another trunk must not be read
    max_label = -1
    try:
        phase = on_phase or (lambda text: None)
        for split, ds, keep in (("train", train_ds, chosen), ("val", val_ds, None)):
            phase(f"features of the frozen trunk: {split} split")
            for batch in iter_features(
                ds, trunk_path, blocks, cfg.attention, storage_options, keep_ids=keep
            ):
                if (batch["label"] < 0).any():
                    raise DataError(f"dataset: {dataset} has unlabelled rows; probes need labels")
                max_label = max(max_label, int(batch["label"].max()))
                cache.add(split, batch["features"], batch["label"], blocks, inputs)
        if not cache.rows.get("train") or not cache.rows.get("val"):
            raise DataError(f"dataset: {dataset} has no valid train or val rows to probe")
        phase(f"training {len(probe_inputs(cfg, n_blocks))} probe input(s) x {cfg.kind}")
        report = probe_cached(cache, cfg, n_blocks, max_label + 1, trunk.blocks[0].attn.num_heads)
        report.train_images = cache.rows["train"] // cfg.views
    finally:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)
    if cfg.lora_rank:
        if on_phase:
            on_phase(f"LoRA rank {cfg.lora_rank} with the attentive probe")
        report.lora = run_lora_probe(
            trunk_path,
            cfg,
            train_ds,
            val_ds,
            report.layers,
            max_label + 1,
            storage_options,
            chosen,
        )
    return report


def log_probe(
    tracker: Tracker,
    report: ProbeReport,
    cfg: ProbeConfig,
    *,
    experiment: str,
    run_name: str,
    trunk_path: str,
    dataset: str,
    parent_run_id: str | None = None,
    step: int | None = None,
) -> str:
    """Log a probe as its own MLflow run (nested under ``parent_run_id``), and its metrics
    into the parent at ``step`` so that the parent can correlate loss and accuracy."""
    from aim_platform.config import flatten
    from aim_platform.plots import accuracy_per_block_figure
    from aim_platform.security import redact
    from aim_platform.tracking import log_datasets

    params = flatten(redact({"probe": cfg.model_dump(mode="json")}))
    params.update(
        {
            "trunk": trunk_path,
            "dataset": dataset,
            "probe.layers_used": report.layers,
            "train_images": report.train_images,
            "val_images": report.val_images,
        }
    )
    run_id = tracker.start_run(
        experiment,
        run_name,
        params,
        {"kind": "probe", "pretrain_step": str(step)},
        parent_run_id,
        defer=True,  # MLflow down: the run is created once it answers (background trackers)
    )
    log_datasets(tracker, run_id, [dataset], cfg.storage_options, context="probe")
    metrics = report_metrics(report)
    tracker.log_metrics(run_id, metrics, step=step or 0)
    if report.per_block:
        per_block = {k: {b: s.top1 for b, s in v.items()} for k, v in report.per_block.items()}
        tracker.log_figure(run_id, accuracy_per_block_figure(per_block), "accuracy_per_block.png")
    tracker.finish(run_id)
    if parent_run_id and step is not None:
        tracker.log_metrics(parent_run_id, metrics, step=step)
    return run_id
