"""Sources users have: WebDataset tar shards, HF-style Parquet, ImageNet folders + label map."""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from data_helpers import add_tar_member, jpeg, png

from aim_platform.data.sources import expand_braces, list_source, read_label_map
from aim_platform.jobs.ingest import ingest


def write_wds(root: Path, shards: int = 3, per_shard: int = 4) -> dict[str, int]:
    """WebDataset shards: key.jpg (+ key.seg.png for some) + key.cls + key.json per sample."""
    root.mkdir(parents=True)
    labels = {}
    for s in range(shards):
        with tarfile.open(root / f"shard-{s:04d}.tar", "w") as tar:
            for i in range(per_shard):
                key = f"sample{s}{i:03d}"
                add_tar_member(tar, f"{key}.jpg", jpeg(20, 24, seed=10 * s + i))
                labels[f"shard-{s:04d}/{key}.jpg"] = (s + i) % 3
                if i == 0:
                    add_tar_member(tar, f"{key}.seg.png", png(20, 24, seed=99))  # same __key__
                    labels[f"shard-{s:04d}/{key}.seg.png"] = (s + i) % 3
                add_tar_member(tar, f"{key}.cls", str((s + i) % 3).encode())
                add_tar_member(tar, f"{key}.json", b"{}")
    return labels


def test_webdataset_folder_glob_and_brace_list(ray_session, tmp_path: Path) -> None:
    labels = write_wds(tmp_path / "wds")
    m = ingest(str(tmp_path / "wds"), str(tmp_path / "out"), val_fraction=0.0)
    assert m["counts"]["train"] == len(labels) == 15 and not m["rejected"]
    table = pq.read_table(tmp_path / "out" / "train")
    got = dict(zip(table["id"].to_pylist(), table["label"].to_pylist(), strict=True))
    assert got == labels  # .seg.png shares its sample's .cls label
    for pattern in ("wds/*.tar", "wds/shard-{0000..0002}.tar", "wds/shard-{0000,0001,0002}.tar"):
        listing = list_source(str(tmp_path / pattern))
        assert {it.id: it.label for it in listing.items} == labels, pattern
    two = list_source(str(tmp_path / "wds/shard-{0000..0001}.tar"))
    assert {it.id.split("/")[0] for it in two.items} == {"shard-0000", "shard-0001"}
    with pytest.raises(ValueError, match="matches no files"):
        list_source(str(tmp_path / "wds/nope-{0..3}.tar"))


def test_expand_braces() -> None:
    assert expand_braces("a-{08..11}.tar") == ["a-08.tar", "a-09.tar", "a-10.tar", "a-11.tar"]
    assert expand_braces("{x,y}/{1..2}") == ["x/1", "x/2", "y/1", "y/2"]
    assert expand_braces("plain.tar") == ["plain.tar"]


def write_hf_parquet(path: Path, n: int, binary: bool = False) -> None:
    """HF ``datasets`` layout: image struct {bytes, path} + ClassLabel metadata (or binary)."""
    data = [jpeg(16, 20, seed=i) for i in range(n)]
    labels = pa.array([i % 2 for i in range(n)], pa.int64())
    if binary:
        table = pa.table({"img": pa.array(data, pa.binary()), "label": labels})
    else:
        image = pa.array(
            [{"bytes": d, "path": f"{i}.jpg"} for i, d in enumerate(data)],
            pa.struct([("bytes", pa.binary()), ("path", pa.string())]),
        )
        hf = {"info": {"features": {"label": {"_type": "ClassLabel", "names": ["cat", "dog"]}}}}
        table = pa.table({"image": image, "label": labels}).replace_schema_metadata(
            {"huggingface": json.dumps(hf)}
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path, row_group_size=4)


def test_hf_parquet_image_struct_and_binary_column(ray_session, tmp_path: Path) -> None:
    write_hf_parquet(tmp_path / "hf" / "train-00000-of-00002.parquet", 6)
    write_hf_parquet(tmp_path / "hf" / "train-00001-of-00002.parquet", 5)
    for order in ("auto", "source"):  # auto: by file, read in the tasks; source: row by row
        out = tmp_path / f"out-{order}"
        m = ingest(str(tmp_path / "hf"), str(out), val_fraction=0.0, order=order)
        assert m["settings"]["order"] == ("files" if order == "auto" else "source")
        assert m["label_names"] == ["cat", "dog"]
        assert m["counts"]["train"] == m["counts"]["listed"] == 11 and not m["rejected"]
        table = pq.read_table(out / "train")
        first = table.filter(pa.compute.equal(table["id"], "train-00001-of-00002/00000003"))
        assert first["image"][0].as_py() == jpeg(16, 20, seed=3)  # bytes kept as they were
        assert first["label"][0].as_py() == 1
    write_hf_parquet(tmp_path / "bin.parquet", 3, binary=True)
    listing = list_source(str(tmp_path / "bin.parquet"))
    assert listing.options == {"image_column": "img"} and len(listing.items) == 3
    with pytest.raises(ValueError, match="image_column"):
        list_source(str(tmp_path / "bin.parquet"), image_column="label")


def write_imagenet(root: Path) -> None:
    for synset in ("n01440764", "n01443537", "n15075141"):
        (root / synset).mkdir(parents=True)
        for i in range(2):
            (root / synset / f"{synset}_{i}.JPEG").write_bytes(jpeg(16, 16, seed=i))


def test_imagenet_folder_with_label_map(ray_session, tmp_path: Path) -> None:
    write_imagenet(tmp_path / "train")
    synsets = tmp_path / "LOC_synset_mapping.txt"  # ImageNet's file: line number = index
    synsets.write_text(
        "n01440764 tench, Tinca tinca\nn01443537 goldfish, Carassius auratus\n"
        "n01484850 great white shark\nn15075141 toilet tissue\n"
    )
    m = ingest(
        str(tmp_path / "train"), str(tmp_path / "out"), label_map=str(synsets), val_fraction=0.5
    )
    assert m["label_names"][3] == "toilet tissue" and len(m["label_names"]) == 4
    ids = [
        i for s in ("train", "val") for i in pq.read_table(tmp_path / "out" / s)["id"].to_pylist()
    ]
    labels = [
        lab
        for s in ("train", "val")
        for lab in pq.read_table(tmp_path / "out" / s)["label"].to_pylist()
    ]
    want = {"n01440764": 0, "n01443537": 1, "n15075141": 3}  # index from the map, not sorting
    assert labels == [want[i.split("/")[0]] for i in ids] and len(ids) == 6
    as_json = tmp_path / "map.json"
    as_json.write_text(json.dumps({"n01440764": [5, "tench"], "n01443537": 2, "n15075141": 0}))
    listing = list_source(str(tmp_path / "train"), label_map=str(as_json))
    assert listing.label_names[5] == "tench" and listing.items[0].label == 5
    as_json.write_text(json.dumps({"n01440764": 0}))
    with pytest.raises(ValueError, match=r"2 class folder\(s\) not in"):
        list_source(str(tmp_path / "train"), label_map=str(as_json))
    with pytest.raises(ValueError, match="taken"):
        read_label_map('{"a": 0, "b": 0}', "x.json")
    assert read_label_map("n1 7 seven\nn2 3\n", "t") == {"n1": (7, "seven"), "n2": (3, "n2")}


def test_cli_ingest_label_map_and_order(ray_session, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from aim_platform.cli import app

    write_imagenet(tmp_path / "train")
    (tmp_path / "map.json").write_text(json.dumps(["n15075141", "n01443537", "n01440764"]))
    out = tmp_path / "out"
    args = ["ingest", str(tmp_path / "train"), str(out), "--label-map", str(tmp_path / "map.json")]
    res = CliRunner().invoke(app, [*args, "--order", "source", "--val-fraction", "0"])
    assert res.exit_code == 0, res.output
    m = json.loads((out / "_manifest.json").read_text())
    assert m["settings"]["order"] == "source" and m["label_names"][0] == "n15075141"
    assert pq.read_table(out / "train")["label"].to_pylist() == [2, 2, 1, 1, 0, 0]
    res = CliRunner().invoke(app, [*args, "--order", "random"])
    assert res.exit_code == 2 and "order" in res.output


def test_builtin_digits_equal_scikit_learns_without_importing_it() -> None:
    """The demo's data, read from the CSV scikit-learn ships: the same images and classes as
    ``load_digits()``, and a fresh process that reads them has not imported scikit-learn
    (about 2 s of CPU at every ``aimctl pretrain`` of the demo)."""
    import subprocess
    import sys

    import numpy as np
    from sklearn.datasets import load_digits

    from aim_platform.data.sources import _digits

    images, target = _digits()
    d = load_digits()
    assert images.shape == (1797, 8, 8) and np.array_equal(images, d.images)
    assert np.array_equal(target, d.target) and target.dtype == d.target.dtype
    code = "import sys; from aim_platform.data.sources import _digits; _digits(); "
    code += "print('sklearn' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False", out.stdout + out.stderr
