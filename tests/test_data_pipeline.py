"""Ray Data pipeline: uint8 patch rows, seeded epochs, validation view, mixtures, bad
images at training time, and progress while training-worker-like actors hold CPUs."""

from __future__ import annotations

import time
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from data_helpers import write_image_folder

from aim_platform.config import DataConfig, ModelConfig
from aim_platform.data import transforms as T
from aim_platform.data.batches import collate_patches, train_batches
from aim_platform.data.pipeline import build_train_dataset, build_val_dataset, train_size
from aim_platform.jobs.ingest import ingest

pytestmark = pytest.mark.usefixtures("ray_session")
MODEL = ModelConfig(size="aim-tiny")  # 32 px, patch 4: K = 64, P = 48


@pytest.fixture(scope="module")
def dataset(ray_session, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(source folder, ingest root): 2 classes x 12 images, several small shards."""
    base = tmp_path_factory.mktemp("pipe")
    src = base / "pets"
    write_image_folder(src, per_class=12)
    dest = base / "pets-ingested"
    ingest(str(src), str(dest), val_fraction=0.25, shard_size_mb=0.01)
    return src, dest


def rows_of(ds) -> list[dict]:
    return list(ds.iter_rows())


def test_train_rows_are_reproducible_uint8_patch_sequences(dataset) -> None:
    src, dest = dataset
    data = DataConfig(sources=[{"url": str(dest)}], decode_batch_size=8)
    train_ids = set(pq.read_table(dest / "train").column("id").to_pylist())
    assert train_size(data) == len(train_ids)
    rows = rows_of(build_train_dataset(data, MODEL, seed=3, epochs=2))
    assert {k for k in rows[0]} == {
        *("id", "patches", "valid", "epoch", "label", "source"),
        *("item", "epoch_items", "item_rows", "key"),  # what was trained: data/consumed.py
    }
    for r in rows:
        assert r["patches"].shape == (MODEL.num_patches, MODEL.patch_dim) == (64, 48)
        assert r["patches"].dtype == np.uint8 and r["valid"]
        assert r["label"] == ["cat", "dog"].index(r["id"].split("/")[0])
        assert r["source"] == "pets-ingested"
    for epoch in (0, 1):  # every train image exactly once per epoch
        ids = [r["id"] for r in rows if r["epoch"] == epoch]
        assert sorted(ids) == sorted(train_ids)
    assert [r["epoch"] for r in rows] == sorted(r["epoch"] for r in rows)

    again = rows_of(build_train_dataset(data, MODEL, seed=3, epochs=2))
    assert [r["id"] for r in again] == [r["id"] for r in rows]  # same seed, same order
    assert all(np.array_equal(a["patches"], b["patches"]) for a, b in zip(rows, again, strict=True))

    by_epoch = {(r["epoch"], r["id"]): r["patches"] for r in rows}
    differ = [not np.array_equal(by_epoch[(0, i)], by_epoch[(1, i)]) for i in train_ids]
    assert all(differ)  # new crops every epoch
    order = [[r["id"] for r in rows if r["epoch"] == e] for e in (0, 1)]
    assert order[0] != order[1]  # and a new order

    other = {
        r["id"]: r["patches"] for r in rows_of(build_train_dataset(data, MODEL, seed=4, epochs=1))
    }
    assert any(not np.array_equal(other[i], by_epoch[(0, i)]) for i in train_ids)

    # A row is patchify(RandomResizedCrop+flip of its image) with (seed, epoch, id) randomness.
    r = rows[5]
    img = T.train_image(
        (src / r["id"]).read_bytes(), 32, T.sample_rng(3, r["epoch"], f"pets-ingested/{r['id']}")
    )
    assert np.array_equal(r["patches"], T.patchify_hwc(img, 4))

    resumed = rows_of(build_train_dataset(data, MODEL, seed=3, epochs=2, start_epoch=1))
    assert [(r["id"], r["epoch"]) for r in resumed] == [
        (r["id"], 1) for r in rows if r["epoch"] == 1
    ]
    assert all(np.array_equal(a["patches"], by_epoch[(1, a["id"])]) for a in resumed)
    with pytest.raises(ValueError, match="epochs"):
        build_train_dataset(data, MODEL, seed=0, epochs=1, start_epoch=1)


def test_val_stream_is_fixed_centre_crop(dataset) -> None:
    src, dest = dataset
    data = DataConfig(sources=[{"url": str(dest)}])
    val_ids = pq.read_table(dest / "val").column("id").to_pylist()
    rows = rows_of(build_val_dataset(data, MODEL))
    assert sorted(r["id"] for r in rows) == sorted(val_ids) and len(rows) >= 2
    assert [r["id"] for r in rows] == [r["id"] for r in rows_of(build_val_dataset(data, MODEL))]
    for r in rows:
        ref = T.patchify_hwc(T.val_image((src / r["id"]).read_bytes(), 32), 4)
        assert np.array_equal(r["patches"], ref) and r["valid"] and r["epoch"] == 0


def test_missing_manifest_is_a_clear_error(tmp_path) -> None:
    data = DataConfig(sources=[{"url": str(tmp_path / "nothing")}])
    with pytest.raises(ValueError, match="no _manifest.json"):
        build_train_dataset(data, MODEL, seed=0, epochs=1)


def test_corrupt_image_at_training_time_is_dropped_and_counted(dataset, tmp_path) -> None:
    _, dest = dataset
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(dest, broken)
    shard = sorted((broken / "train").glob("*.parquet"))[0]
    table = pq.read_table(shard)
    images = table.column("image").to_pylist()
    images[0] = images[0][: len(images[0]) // 3]  # bit rot after ingest
    bad_id = table.column("id")[0].as_py()
    pq.write_table(table.set_column(1, "image", pa.array(images, pa.binary())), shard)

    data = DataConfig(sources=[{"url": str(broken)}])
    ds = build_train_dataset(data, MODEL, seed=0, epochs=2)
    dropped, kept = 0, 0
    for batch in train_batches(ds, data, batch_size=8, drop_last=False):
        patches = batch["patches"][batch["valid"]]  # what the training loop keeps
        assert patches.dtype == torch.uint8 and patches.shape[1:] == (64, 48)
        kept += patches.shape[0]
        dropped += int((~batch["valid"]).sum())
    n_train = pq.read_table(broken / "train").num_rows
    assert dropped == 2  # once per epoch
    assert kept == 2 * (n_train - 1)
    invalid = [r for r in rows_of(ds) if not r["valid"]]
    assert {r["id"] for r in invalid} == {bad_id} and not any(r["patches"].any() for r in invalid)


def test_mixture_shares_end_to_end(tmp_path) -> None:
    roots = []
    for name, n in (("big", 30), ("small", 10)):
        src = tmp_path / name
        write_image_folder(src, per_class=n // 2, classes=(f"{name}_a", f"{name}_b"))
        roots.append(tmp_path / f"{name}-ing")
        ingest(str(src), str(roots[-1]), val_fraction=0.0)
    data = DataConfig(
        sources=[
            {"url": str(roots[0]), "weight": 0.25, "name": "big"},
            {"url": str(roots[1]), "weight": 0.75, "name": "small"},
        ],
        samples_per_epoch=300,
    )
    rows = [
        {k: r[k] for k in ("id", "source", "epoch")}
        for r in build_train_dataset(data, MODEL, seed=0, epochs=1).iter_rows()
    ]
    share = Counter(r["source"] for r in rows)
    assert abs(len(rows) - 300) < 45
    assert abs(share["small"] / len(rows) - 0.75) < 0.1, share
    per_id = Counter(r["id"] for r in rows if r["source"] == "small")
    assert len(per_id) == 10 and min(per_id.values()) >= 20  # small source oversampled ~22x


@pytest.mark.parametrize("worker_cpus", [0.5, 0.75])
def test_progress_while_training_workers_hold_cpus(dataset, worker_cpus: float) -> None:
    """Demo resources: 2 CPUs, 2 training workers holding 0.5 CPU each (the default), or
    0.75 each, which leaves the data tasks exactly their 0.5 CPU."""
    import ray

    _, dest = dataset
    data = DataConfig(sources=[{"url": str(dest)}], cpus_per_task=0.5, decode_batch_size=4)

    @ray.remote(num_cpus=worker_cpus)
    class Worker:
        def consume(self, shard) -> tuple[int, int, list[int]]:
            kept, dropped, epochs = 0, 0, set()
            for batch in shard.iter_torch_batches(batch_size=4, collate_fn=collate_patches):
                epochs.update(batch["epoch"].tolist())
                valid = batch["valid"].bool()
                kept += int(valid.sum())
                dropped += int((~valid).sum())
            return kept, dropped, sorted(epochs)

    workers = [Worker.remote() for _ in range(2)]
    ds = build_train_dataset(data, MODEL, seed=0, epochs=2)
    shards = ds.streaming_split(2, equal=False)
    start = time.monotonic()
    results = ray.get(
        [w.consume.remote(s) for w, s in zip(workers, shards, strict=True)], timeout=240
    )
    n_train = pq.read_table(dest / "train").num_rows
    assert sum(r[0] for r in results) == 2 * n_train and sum(r[1] for r in results) == 0
    assert {e for r in results for e in r[2]} == {0, 1}
    assert time.monotonic() - start < 240
    for w in workers:
        ray.kill(w)


def test_default_config_uses_builtin_digits(tmp_path, monkeypatch) -> None:
    """``JobConfig()``'s data section works out of the box: digits ingested once into a cache
    (by the jobs, before they build datasets)."""
    from aim_platform.jobs.ingest import prepare_sources

    monkeypatch.setenv("AIM_DATA_CACHE", str(tmp_path))
    data = DataConfig()
    prepare_sources([s.url for s in data.sources])
    rows = build_val_dataset(data, MODEL).take_all()
    assert (tmp_path / "digits" / "_manifest.json").is_file()
    assert 40 < len(rows) < 150 and all(r["valid"] and 0 <= r["label"] <= 9 for r in rows)
    assert train_size(data) == 1797 - len(rows)
