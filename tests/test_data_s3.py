"""Object storage for real: ingest to and from an S3 endpoint over HTTP on 127.0.0.1 (moto),
read back through the pipeline, and compare with a local-folder run."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import ray.data
import s3fs
from data_helpers import write_image_folder

from aim_platform import storage
from aim_platform.config import DataConfig, ModelConfig
from aim_platform.data.pipeline import build_train_dataset, build_val_dataset
from aim_platform.jobs.ingest import ingest
from aim_platform.security import REDACTED, redact

pytestmark = pytest.mark.usefixtures("ray_session")
MODEL = ModelConfig(size="aim-tiny")


def shard_rows(url: str) -> dict[str, bytes]:
    """id -> image bytes of every train/val shard, read with the pipeline's filesystem."""
    fs, root = storage.pyarrow_filesystem(url)
    out = {}
    for split in ("train", "val"):
        ds = ray.data.read_parquet(storage.join(root, split), filesystem=fs)
        out.update({r["id"]: r["image"] for r in ds.iter_rows()})
    return out


def test_s3_ingest_and_pipeline_match_local(s3_endpoint, tmp_path: Path) -> None:
    src = tmp_path / "pets"
    write_image_folder(src, per_class=6)
    bucket = s3_endpoint["bucket"]
    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3_endpoint["endpoint_url"]})
    fs.put(str(src), f"{bucket}/raw/pets", recursive=True)

    local = tmp_path / "local"
    m_local = ingest(str(src), str(local), val_fraction=0.25, shard_size_mb=0.01)
    url = f"s3://{bucket}/ingested/pets"
    m_s3 = ingest(f"s3://{bucket}/raw/pets", url, val_fraction=0.25, shard_size_mb=0.01)
    for key in ("counts", "shards", "label_names", "rejected", "fingerprint"):
        if key != "fingerprint":
            assert m_s3[key] == m_local[key], key
    assert m_s3["counts"]["val"] > 0 and len(m_s3["shards"]["train"]) > 1
    assert ingest(f"s3://{bucket}/raw/pets", url, val_fraction=0.25, shard_size_mb=0.01)["skipped"]
    text = fs.cat_file(f"{bucket}/ingested/pets/_manifest.json").decode()
    assert "testing-secret" not in text and "testing" not in json.loads(text)["source"]

    # Same ids, same bytes: the S3 shards hold exactly what the local run holds.
    s3_rows, local_rows = shard_rows(url), shard_rows(str(local))
    assert s3_rows.keys() == local_rows.keys() and len(s3_rows) == 12
    assert all(s3_rows[k] == local_rows[k] == (src / k).read_bytes() for k in s3_rows)

    # Through the pipeline: the same patches, row for row.
    def train_rows(u: str) -> list[tuple]:
        data = DataConfig(sources=[{"url": u, "name": "pets"}])
        ds = build_train_dataset(data, MODEL, seed=7, epochs=1)
        return [(r["id"], r["label"], r["patches"]) for r in ds.iter_rows()]

    a, b = train_rows(url), train_rows(str(local))
    assert [r[:2] for r in a] == [r[:2] for r in b] and len(a) == m_s3["counts"]["train"]
    assert all(np.array_equal(x[2], y[2]) for x, y in zip(a, b, strict=True))
    val = build_val_dataset(DataConfig(sources=[{"url": url}]), MODEL).take_all()
    assert len(val) == m_s3["counts"]["val"] and all(r["valid"] for r in val)


def test_endpoint_from_options_or_environment(s3_endpoint, monkeypatch) -> None:
    ep = s3_endpoint["endpoint_url"]
    assert storage.endpoint_url({}) == ep  # from AWS_ENDPOINT_URL
    assert storage.endpoint_url({"endpoint_url": "http://other:9000"}) == "http://other:9000"
    fs, path = storage.filesystem(f"s3://{s3_endpoint['bucket']}/x/", {})
    assert path == f"{s3_endpoint['bucket']}/x"
    fs.pipe_file(f"{path}/hello", b"hi")
    pa_fs, pa_path = storage.pyarrow_filesystem(f"s3://{s3_endpoint['bucket']}/x")
    with pa_fs.open_input_stream(f"{pa_path}/hello") as f:
        assert f.read() == b"hi"
    assert storage.public_url("s3://key:secret@b/p?x=1") == "s3://b/p"
    # storage options reach records through the one redaction rule
    assert redact({"key": "k", "client_kwargs": {"aws_secret_access_key": "s"}}) == {
        "key": REDACTED,
        "client_kwargs": {"aws_secret_access_key": REDACTED},
    }


def test_s3_tars_read_by_file_match_local(s3_endpoint, tmp_path: Path) -> None:
    from test_data_by_file import write_class_per_tar

    labels = write_class_per_tar(tmp_path / "wds")
    bucket = s3_endpoint["bucket"]
    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3_endpoint["endpoint_url"]})
    fs.put(str(tmp_path / "wds"), f"{bucket}/raw/wds", recursive=True)
    kw = {"val_fraction": 0.25, "shard_size_mb": 0.05}
    local = ingest(str(tmp_path / "wds"), str(tmp_path / "local"), **kw)
    url = f"s3://{bucket}/ingested/wds"
    remote = ingest(f"s3://{bucket}/raw/wds/part-{{000..003}}.tar", url, **kw)
    assert remote["settings"]["order"] == local["settings"]["order"] == "files"
    assert remote["counts"] == local["counts"] and remote["shards"] == local["shards"]
    assert shard_rows(url) == shard_rows(str(tmp_path / "local"))
    assert len(shard_rows(url)) == len(labels)


def test_bench_tar_reads_counts_requests_over_http(s3_endpoint) -> None:
    from aim_platform.bench.tar_reads import compare

    size, per_image, by_file, ratio = compare(
        s3_endpoint["endpoint_url"], tars=2, per_tar=5, bucket=s3_endpoint["bucket"], create=False
    )
    assert per_image["images"] == by_file["images"] == 10 and size["tars"] == 2
    assert per_image["task_gets"] == 10  # one ranged GET an image
    assert by_file["task_gets"] == 2  # one stream a tar (each under 16 MiB)
    assert ratio["requests_ratio"] > 1
