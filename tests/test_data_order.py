"""Class-sorted sources: ingest writes rows in a seeded hashed order, so batches mix classes."""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from data_helpers import write_class_sorted_folder

from aim_platform.config import DataConfig, ModelConfig
from aim_platform.data.pipeline import build_train_dataset
from aim_platform.jobs.ingest import ingest

pytestmark = pytest.mark.usefixtures("ray_session")
CLASSES, PER_CLASS, BATCH = 100, 20, 32


@pytest.fixture(scope="module")
def sorted_source(ray_session, tmp_path_factory: pytest.TempPathFactory) -> Path:
    src = tmp_path_factory.mktemp("order") / "sorted"
    write_class_sorted_folder(src, CLASSES, PER_CLASS)
    return src


def entropy(labels: list[int]) -> float:
    n = len(labels)
    return -sum(c / n * math.log(c / n) for c in Counter(labels).values())


def shard_ids(dest: Path) -> list[list[str]]:
    files = sorted((dest / "train").glob("part-*.parquet"))
    return [pq.read_table(f).column("id").to_pylist() for f in files]


def test_batches_mix_classes_every_epoch(sorted_source: Path, tmp_path: Path) -> None:
    dest = tmp_path / "ingested"
    m = ingest(str(sorted_source), str(dest), val_fraction=0.0, shard_size_mb=0.05)
    assert m["settings"]["order"] == "hash" and len(m["shards"]["train"]) >= 4
    for ids in shard_ids(dest):  # every shard is a sample of the whole source
        assert len({i.split("/")[0] for i in ids}) > 0.5 * min(len(ids), CLASSES)
    data = DataConfig(sources=[{"url": str(dest)}], preserve_order=True)
    model = ModelConfig(size="aim-tiny")
    ds = build_train_dataset(data, model, seed=1, epochs=2)
    batches = list(ds.iter_batches(batch_size=BATCH, batch_format="numpy", drop_last=True))
    top = math.log(min(BATCH, CLASSES))
    for epoch in (0, 1):
        ent = [entropy(b["label"].tolist()) for b in batches if b["epoch"][0] == epoch]
        assert len(ent) >= CLASSES * PER_CLASS // BATCH - 2
        assert sum(ent) / len(ent) >= 0.9 * top, (epoch, sum(ent) / len(ent) / top)
        assert min(ent) >= 0.7 * top  # class-sorted rows would give <= log(2) / log(32) = 0.2
    again = build_train_dataset(data, model, seed=1, epochs=2)
    first = [i for b in batches for i in b["id"]]
    assert [
        i for b in again.iter_batches(batch_size=BATCH, drop_last=True) for i in b["id"]
    ] == first


def test_order_is_seeded(sorted_source: Path, tmp_path: Path) -> None:
    kw = {"val_fraction": 0.0, "shard_size_mb": 0.05}
    ingest(str(sorted_source), str(tmp_path / "a"), **kw)
    ingest(str(sorted_source), str(tmp_path / "b"), **kw)
    ingest(str(sorted_source), str(tmp_path / "c"), order_seed=7, **kw)
    src = ingest(str(sorted_source), str(tmp_path / "d"), order="source", **kw)
    a, b, c, d = (shard_ids(tmp_path / x) for x in "abcd")
    assert a == b  # same seed, same shards, same rows, same order
    assert a != c and sorted(sum(a, [])) == sorted(sum(c, []))
    assert sum(d, []) == sorted(sum(d, []))  # "source": the listing's (class-sorted) order
    assert src["settings"]["order"] == "source"


def test_old_class_sorted_ingest_warns(sorted_source: Path, tmp_path: Path) -> None:
    import json
    import warnings

    from aim_platform.config import DataSource
    from aim_platform.data.pipeline import source_shards

    dest = tmp_path / "old"
    ingest(str(sorted_source), str(dest), val_fraction=0.0, shard_size_mb=0.2)
    manifest = json.loads((dest / "_manifest.json").read_text())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        source_shards(DataSource(url=str(dest)), "train")  # a current manifest: no warning
    del manifest["settings"]["order"]  # what ingest wrote before the hashed order
    (dest / "_manifest.json").write_text(json.dumps(manifest))
    with pytest.warns(UserWarning, match="hashed order"):
        source_shards(DataSource(url=str(dest)), "train")


def test_tiny_shards_share_tasks() -> None:
    from aim_platform.data.pipeline import MAX_BLOCKS, MIN_BLOCKS, Shards, num_blocks

    def items(n: int) -> list[dict]:
        return [{"epoch": 0, "source": 0, "path": f"p{i}"} for i in range(n)]

    def shards(n: int, rows: int) -> list[Shards]:
        return [Shards("s", 1.0, [f"p{i}" for i in range(n)], rows, None)]

    assert num_blocks(items(50), shards(50, 5000)) == 50  # few shards: one task each
    assert num_blocks(items(5000), shards(5000, 5000)) == MIN_BLOCKS  # 1-row shards packed
    assert num_blocks(items(2000), shards(2000, 2000 * 2500)) == 2000  # big shards: one each
    assert num_blocks(items(9000), shards(9000, 9000 * 2500)) == MAX_BLOCKS
