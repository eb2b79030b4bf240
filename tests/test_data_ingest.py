"""``aimctl ingest``: Parquet shards + manifest from folders, tars and built-ins (Ray Data)."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from data_helpers import bad_images, jpeg, mode_images, png, write_image_folder
from PIL import Image

from aim_platform.data.shards import SCHEMA, split_of
from aim_platform.jobs.ingest import ingest

pytestmark = pytest.mark.usefixtures("ray_session")


def all_rows(dest: Path) -> pa.Table:
    """Every row of every Parquet file under DEST (listed or not: catches duplicates)."""
    files = sorted(dest.glob("*/*.parquet"))
    return pa.concat_tables([pq.read_table(f) for f in files]) if files else SCHEMA.empty_table()


@pytest.fixture(scope="module")
def messy_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("messy")
    write_image_folder(root, per_class=4)
    (root / "modes").mkdir()
    for name, data in mode_images().items():
        (root / "modes" / name).write_bytes(data)
    for name, (data, _) in bad_images().items():
        (root / "cat" / f"bad_{name}").write_bytes(data)
    (root / "dog" / ".DS_Store").write_bytes(b"\0\1")  # hidden: ignored
    return root


def test_folder_ingest_labels_rejects_and_original_bytes(messy_folder: Path, tmp_path) -> None:
    dest = tmp_path / "out"
    m = ingest(str(messy_folder), str(dest), val_fraction=0.3, shard_size_mb=1)
    bad = bad_images()
    good = [
        p.relative_to(messy_folder).as_posix()
        for p in messy_folder.rglob("*")
        if p.is_file() and not p.name.startswith((".", "bad_"))
    ]
    assert m["label_names"] == ["cat", "dog", "modes"]
    assert (
        m["counts"]["train"] + m["counts"]["val"] == len(good) == m["counts"]["listed"] - len(bad)
    )
    rejected = {r["id"]: r["reason"] for r in m["rejected"]}
    assert set(rejected) == {f"cat/bad_{n}" for n in bad}
    for name, (_, reason) in bad.items():
        assert rejected[f"cat/bad_{name}"].startswith(reason), (name, rejected)

    table = all_rows(dest)
    assert table.schema.equals(SCHEMA)
    rows = table.to_pylist()
    assert sorted(r["id"] for r in rows) == sorted(good)
    for r in rows:
        assert r["image"] == (messy_folder / r["id"]).read_bytes()  # never re-encoded
        assert r["label"] == m["label_names"].index(r["id"].split("/")[0])
        assert r["source"] == messy_folder.name
        assert (r["width"], r["height"]) == Image.open(io.BytesIO(r["image"])).size
    val_ids = {r["id"] for r in pq.read_table(dest / "val").to_pylist()}
    assert val_ids == {i for i in good if split_of(i, 0.3) == "val"}
    assert 0 < len(val_ids) < len(good)
    listed = [s["path"] for split in ("train", "val") for s in m["shards"][split]]
    assert sorted(listed) == sorted(
        p.relative_to(dest).as_posix() for p in dest.glob("*/*.parquet")
    )
    assert json.loads((dest / "_manifest.json").read_text())["counts"] == m["counts"]


def test_reingest_never_duplicates(messy_folder: Path, tmp_path) -> None:
    dest = tmp_path / "out"
    first = ingest(str(messy_folder), str(dest), val_fraction=0.2, shard_size_mb=0.002)
    n = first["counts"]["train"] + first["counts"]["val"]
    assert len(first["shards"]["train"]) > 2  # several groups
    again = ingest(str(messy_folder), str(dest), val_fraction=0.2, shard_size_mb=0.002)
    assert again.get("skipped") is True
    forced = ingest(str(messy_folder), str(dest), val_fraction=0.2, shard_size_mb=0.002, force=True)
    assert forced["shards"] == first["shards"]
    fewer = ingest(str(messy_folder), str(dest), val_fraction=0.2, shard_size_mb=64)
    assert len(fewer["shards"]["train"]) == 1  # the stale shards of the larger run are gone
    ids = all_rows(dest).column("id").to_pylist()
    assert len(ids) == len(set(ids)) == n


def test_flat_folder_has_no_labels(tmp_path) -> None:
    src = tmp_path / "flat"
    src.mkdir()
    for i in range(5):
        (src / f"{i}.jpg").write_bytes(jpeg(30, 40, seed=i))
    m = ingest(str(src), str(tmp_path / "out"), val_fraction=0.0)
    assert m["label_names"] == [] and m["counts"]["train"] == 5 and m["counts"]["val"] == 0
    assert all_rows(tmp_path / "out").column("label").null_count == 5


def test_tar_source_webdataset_style(tmp_path) -> None:
    samples = {
        f"shard0/{i:04d}": (jpeg(32, 48, seed=i) if i % 2 else png(30, 30, i), i % 3)
        for i in range(7)
    }
    tar_path = tmp_path / "images.tar"
    with tarfile.open(tar_path, "w") as tar:
        for key, (data, label) in samples.items():
            ext = ".jpg" if data[:2] == b"\xff\xd8" else ".png"
            for name, payload in ((key + ext, data), (key + ".cls", str(label).encode())):
                info = tarfile.TarInfo(name)
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
        meta = json.dumps({"note": "metadata"}).encode()
        info = tarfile.TarInfo("shard0/0000.json")
        info.size = len(meta)
        tar.addfile(info, io.BytesIO(meta))
    m = ingest(str(tar_path), str(tmp_path / "out"), val_fraction=0.0)
    assert m["counts"]["train"] == 7 and m["counts"]["rejected"] == 0
    rows = {r["id"].rsplit(".", 1)[0]: r for r in all_rows(tmp_path / "out").to_pylist()}
    assert set(rows) == set(samples)
    for key, (data, label) in samples.items():
        assert rows[key]["image"] == data and rows[key]["label"] == label
        assert rows[key]["source"] == "images"


def test_builtin_digits(tmp_path) -> None:
    from sklearn.datasets import load_digits

    m = ingest("builtin:digits", str(tmp_path / "digits"), image_size=16, val_fraction=0.1)
    digits = load_digits()
    assert m["counts"]["train"] + m["counts"]["val"] == len(digits.target) == 1797
    assert m["label_names"] == [str(d) for d in range(10)]
    rows = all_rows(tmp_path / "digits").to_pylist()
    for r in rows[:50]:
        img = Image.open(io.BytesIO(r["image"]))
        assert img.format == "PNG" and img.size == (16, 16)
        assert r["label"] == digits.target[int(r["id"].split("/")[1])]
    # Real handwriting: the upscaled image is the 8x8 digit, brighter where the ink is.
    r = rows[0]
    small = np.asarray(Image.open(io.BytesIO(r["image"])).resize((8, 8), Image.BOX), float)
    ink = digits.images[int(r["id"].split("/")[1])]
    assert np.corrcoef(small.ravel(), ink.ravel())[0, 1] > 0.9


def test_jobs_ingest_builtins_once_and_the_pipeline_only_reads_them(tmp_path, monkeypatch) -> None:
    from aim_platform.config import DataSource
    from aim_platform.data.pipeline import resolve_url, source_shards
    from aim_platform.errors import DataError
    from aim_platform.jobs.ingest import prepare_sources

    monkeypatch.setenv("AIM_DATA_CACHE", str(tmp_path / "cache"))
    half = DataSource(url="builtin:digits-half")
    assert resolve_url(half.url) == str(tmp_path / "cache" / "digits-half")
    with pytest.raises(DataError, match="builtin:digits-half is not ingested yet"):
        source_shards(half, "val")  # the data library never starts an ingest itself
    prepare_sources(["builtin:digits-half", None, str(tmp_path / "not-a-builtin")])
    val, train = source_shards(half, "val"), source_shards(half, "train")
    assert val.rows + train.rows == 1797 and 800 < val.rows < 1000  # half held out
    before = (tmp_path / "cache" / "digits-half" / "_manifest.json").stat().st_mtime_ns
    prepare_sources(["builtin:digits-half"])  # up to date: nothing rewritten
    assert (tmp_path / "cache" / "digits-half" / "_manifest.json").stat().st_mtime_ns == before


def test_builtin_photos_are_web_size_jpegs_q90(tmp_path) -> None:
    m = ingest("builtin:photos", str(tmp_path / "photos"), num_photos=6, val_fraction=0.0)
    assert m["counts"]["train"] == 6
    buf = io.BytesIO()
    Image.new("RGB", (64, 64)).save(buf, format="JPEG", quality=90)
    q90 = Image.open(buf).quantization
    images = [
        Image.open(io.BytesIO(b)) for b in all_rows(tmp_path / "photos").column("image").to_pylist()
    ]
    assert {im.size for im in images} <= {(1024, 768), (768, 1024)}
    assert all(im.format == "JPEG" and im.quantization == q90 for im in images)
    assert len({im.tobytes()[:1000] for im in images}) == 6  # distinct crops


def test_cli_ingest(messy_folder: Path, tmp_path) -> None:
    from typer.testing import CliRunner

    from aim_platform.cli import app

    runner = CliRunner()

    def text(res) -> str:
        return " ".join(res.output.split())  # rich wraps long lines

    out = tmp_path / "cli"
    res = runner.invoke(app, ["ingest", str(messy_folder), str(out), "--val-fraction", "0.2"])
    assert res.exit_code == 0, res.output
    assert "rejected 6" in text(res) and "bad_empty.jpg: empty file" in text(res)
    res = runner.invoke(app, ["ingest", str(messy_folder), str(out), "--val-fraction", "0.2"])
    assert res.exit_code == 0 and "up to date" in res.output
    res = runner.invoke(app, ["ingest", str(tmp_path / "missing"), str(out)])
    assert res.exit_code == 2 and "does not exist" in text(res)
    res = runner.invoke(app, ["ingest", str(messy_folder), str(out), "--storage-options", "[1"])
    assert res.exit_code == 2 and "storage_options" in text(res)


def test_cli_bench_data_prints_the_ratio() -> None:
    import os

    from typer.testing import CliRunner

    from aim_platform.cli import app

    cpus = os.sched_getaffinity(0)
    res = CliRunner().invoke(
        app, ["bench", "data", "--images", "3", "--rounds", "1", "--no-pipeline"]
    )
    assert res.exit_code == 0, res.output
    assert "ratio" in res.output and "baseline" in res.output
    assert os.sched_getaffinity(0) == cpus  # the pinning is undone


CIFAR_MINI = Path(__file__).parent / "assets" / "cifar10-mini"


def test_split_folders_give_the_splits_and_one_class_index(tmp_path) -> None:
    """CIFAR-10 / ImageNet layout: train/<class>/ and test/<class>/ are the two splits."""
    from aim_platform.config import DataConfig, DataSource, ModelConfig
    from aim_platform.data.pipeline import build_val_dataset

    dest = tmp_path / "cifar"
    m = ingest(str(CIFAR_MINI), str(dest), split_folders=True, shard_size_mb=1)
    assert m["counts"]["train"] == 160 and m["counts"]["val"] == 40 and not m["rejected"]
    assert m["label_names"][:3] == ["airplane", "automobile", "bird"]
    table = all_rows(dest)
    ids, labels = table["id"].to_pylist(), table["label"].to_pylist()
    by_id = dict(zip(ids, labels, strict=True))
    assert by_id["train/cat/0001.jpg"] == by_id["test/cat/0001.jpg"] == 3
    val = {r["id"] for r in pq.read_table(dest / m["shards"]["val"][0]["path"]).to_pylist()}
    assert val and all(i.startswith("test/") for i in val)
    original = (CIFAR_MINI / "test" / "cat" / "0001.jpg").read_bytes()
    assert table.filter(pa.compute.equal(table["id"], "test/cat/0001.jpg"))["image"][0].as_py() == (
        original
    )
    # data.val_limit: validation reads only the first rows of the val split
    data = DataConfig(sources=[DataSource(url=str(dest))], val_limit=7)
    rows = build_val_dataset(data, ModelConfig(size="aim-tiny")).take_all()
    assert len(rows) == 7


def test_split_folders_refuse_other_layouts_with_one_line(tmp_path) -> None:
    from aim_platform.errors import DataError

    with pytest.raises(DataError, match="must hold exactly train/ and one of val/ or test/"):
        ingest(str(CIFAR_MINI / "train"), str(tmp_path / "a"), split_folders=True)
    odd = tmp_path / "odd"
    write_image_folder(odd / "train", per_class=2)
    write_image_folder(odd / "val", per_class=2)
    (odd / "val" / "horse").mkdir()
    (odd / "val" / "horse" / "x.png").write_bytes(png())
    with pytest.raises(DataError, match="val/ has classes train/ lacks: horse"):
        ingest(str(odd), str(tmp_path / "b"), split_folders=True)
