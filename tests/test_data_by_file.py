"""Sources of files (WebDataset tars, Parquet) are listed by file: the driver never opens them,
each ingest task reads its files front to back (one sequential read a file, not one request
an image), and the result is the same rows the image-by-image listing gives."""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from data_helpers import add_tar_member, jpeg
from fsspec.implementations.local import LocalFileSystem

from aim_platform.data import sources
from aim_platform.data.shards import write_group
from aim_platform.data.sources import list_source
from aim_platform.errors import DataError

TARS, PER_TAR = 4, 30


def write_class_per_tar(root: Path) -> dict[str, int]:
    """Tars written class by class (tar t holds class t): key.jpg + key.cls + key.json."""
    root.mkdir(parents=True)
    labels = {}
    for t in range(TARS):
        with tarfile.open(root / f"part-{t:03d}.tar", "w") as tar:
            for i in range(PER_TAR):
                key = f"s{t}{i:04d}"
                add_tar_member(tar, f"{key}.jpg", jpeg(20, 24, seed=100 * t + i))
                add_tar_member(tar, f"{key}.cls", str(t).encode())
                add_tar_member(tar, f"{key}.json", b"{}")
                labels[f"part-{t:03d}/{key}.jpg"] = t
    return labels


def run_group(listing: sources.Listing, dest: Path) -> dict[str, np.ndarray]:
    """One ingest task, in this process: all the listing's items as group 0."""
    payload = json.dumps([it.to_dict() for it in listing.items])
    batch = {"group": np.array([0]), "items": np.array([payload], dtype=object)}
    return write_group(
        batch,
        dest=str(dest),
        storage_options=None,
        source="wds",
        options=listing.options,
        val_fraction=0.0,
        max_pixels=10**8,
        fingerprint="f" * 64,
        split_bytes=2**20 if listing.by_file else 0,
        shuffle_seed=0 if listing.by_file else None,
    )


def test_task_reads_each_tar_once_not_each_image(tmp_path: Path, monkeypatch) -> None:
    labels = write_class_per_tar(tmp_path / "wds")
    reads: dict[str, list[str]] = {"open": [], "cat_file": []}
    real_open, real_cat = LocalFileSystem._open, LocalFileSystem.cat_file

    def counted_open(self, path, *args, **kwargs):
        if str(path).endswith(".tar"):
            reads["open"].append(str(path))
        return real_open(self, path, *args, **kwargs)

    def counted_cat(self, path, *args, **kwargs):
        if str(path).endswith(".tar"):
            reads["cat_file"].append(str(path))
        return real_cat(self, path, *args, **kwargs)

    monkeypatch.setattr(LocalFileSystem, "_open", counted_open)
    monkeypatch.setattr(LocalFileSystem, "cat_file", counted_cat)

    by_file = list_source(str(tmp_path / "wds"), by_file=True)
    assert by_file.by_file and [it.kind for it in by_file.items] == ["tarfile"] * TARS
    assert reads == {"open": [], "cat_file": []}  # listing by file opens no tar
    out = run_group(by_file, tmp_path / "a")
    assert len(reads["open"]) == TARS and not reads["cat_file"]  # one stream a tar
    rows = pq.read_table(tmp_path / "a" / "train").to_pylist()
    assert {r["id"]: r["label"] for r in rows} == labels
    assert list(out["rows"]) == [TARS * PER_TAR] and not any(out["reason"])
    ids = pq.read_table(tmp_path / "a" / "train" / "part-00000.parquet")["id"].to_pylist()
    assert ids != sorted(ids)  # rows hashed within the shard: the tars' classes interleave

    reads["open"].clear()
    per_image = list_source(str(tmp_path / "wds"))  # the driver reads every tar's headers
    reads["open"].clear()
    run_group(per_image, tmp_path / "b")
    assert len(reads["cat_file"]) == TARS * PER_TAR  # one ranged request an image
    again = pq.read_table(tmp_path / "b" / "train").to_pylist()
    assert {r["id"]: (r["label"], r["image"]) for r in again} == {
        r["id"]: (r["label"], r["image"]) for r in rows
    }


def test_broken_tar_keeps_its_images_before_the_damage(tmp_path: Path) -> None:
    write_class_per_tar(tmp_path / "wds")
    whole = (tmp_path / "wds" / "part-001.tar").read_bytes()
    (tmp_path / "wds" / "part-001.tar").write_bytes(whole[: len(whole) // 2])
    out = run_group(list_source(str(tmp_path / "wds"), by_file=True), tmp_path / "out")
    reasons = [r for r in out["reason"] if r]
    assert len(reasons) == 1 and reasons[0].startswith("unreadable file")
    assert "part-001" in [i for i, r in zip(out["id"], out["reason"], strict=True) if r]
    kept = pq.read_table(tmp_path / "out" / "train")["id"].to_pylist()
    from_broken = [i for i in kept if i.startswith("part-001/")]
    assert 0 < len(from_broken) < PER_TAR and sum(out["rows"]) == len(kept)


@pytest.mark.usefixtures("ray_session")
def test_ingest_by_file_splits_big_tars_and_matches_per_image(tmp_path: Path, monkeypatch) -> None:
    from aim_platform.jobs.ingest import ingest

    labels = write_class_per_tar(tmp_path / "wds")

    def no_listing_on_the_driver(*args, **kwargs):
        raise AssertionError("the driver opened a tar")

    with monkeypatch.context() as patch:
        patch.setattr(sources, "_list_tar", no_listing_on_the_driver)
        # 15 KB shards: every tar (about 30 KB of JPEGs) is split into parts
        m = ingest(
            str(tmp_path / "wds"), str(tmp_path / "out"), val_fraction=0.2, shard_size_mb=0.015
        )
    assert m["settings"]["order"] == "files" and not m["rejected"]
    assert m["counts"]["listed"] == m["counts"]["train"] + m["counts"]["val"] == len(labels)
    paths = [s["path"] for split in ("train", "val") for s in m["shards"][split]]
    assert any(p.endswith("-001.parquet") for p in paths)  # a tar larger than a shard
    got = {}
    for p in paths:
        t = pq.read_table(tmp_path / "out" / p)
        got.update(zip(t["id"].to_pylist(), t["label"].to_pylist(), strict=True))
        assert t.num_rows == next(
            s["rows"] for split in m["shards"].values() for s in split if s["path"] == p
        )
    assert got == labels  # every image once, with its sample's label

    hashed = ingest(
        str(tmp_path / "wds"),
        str(tmp_path / "hashed"),
        val_fraction=0.2,
        order="hash",
        shard_size_mb=0.015,
    )
    assert hashed["settings"]["order"] == "hash"
    assert hashed["counts"]["train"] == m["counts"]["train"]  # the same split by id hash

    empty = tmp_path / "empty"
    empty.mkdir()
    with tarfile.open(empty / "only-meta.tar", "w") as tar:
        add_tar_member(tar, "x.json", b"{}")
    with pytest.raises(DataError, match="holds no images"):
        ingest(str(empty / "only-meta.tar"), str(tmp_path / "none"))
    folder = tmp_path / "folder" / "cat"
    folder.mkdir(parents=True)
    (folder / "a.jpg").write_bytes(jpeg(8, 8))
    with pytest.raises(DataError, match="order: files needs"):
        ingest(str(folder.parent), str(tmp_path / "none"), order="files")
