"""Object storage that misbehaves: the platform's S3 traffic through a fault-injecting proxy
(``tests/s3_fault_proxy.py``) in front of the development endpoint (moto over HTTP).

First the proxy is shown transparent at a 0% fault rate (what a naive proxy breaks: HEAD
lengths, multipart and streamed uploads), and the platform's own S3 journey through it
(data and checkpoints on S3) unchanged, so that the failures below are the platform's.
"""

from __future__ import annotations

import io
import json
import pickle
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import fault_rows
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from s3_fault_proxy import FaultProxy
from train_helpers import digits_datasets, tiny_job

from aim_platform import storage
from aim_platform.config import DataConfig, ModelConfig, load_config
from aim_platform.data.pipeline import build_train_dataset
from aim_platform.data.tasks import read_and_decode
from aim_platform.errors import DataError
from aim_platform.jobs.ingest import ingest
from aim_platform.jobs.pretrain import latest_train_state, pretrain

MODEL = ModelConfig(size="aim-tiny")
DIGITS = {"image_size": 32, "val_fraction": 0.05, "shard_size_mb": 0.05}
CHECKPOINT_FILES = {"__0_0.distcp", "__1_0.distcp", ".metadata", "train_state.json", "config.yaml"}


@pytest.fixture
def proxy(s3_endpoint: dict[str, str]) -> Iterator[FaultProxy]:
    """A fault proxy (0% to start with) in front of the session's S3 endpoint."""
    with FaultProxy(s3_endpoint["endpoint_url"], hang_s=10) as p:
        yield p


@pytest.fixture(scope="module")
def digits_on_s3(s3_endpoint: dict[str, str]) -> str:
    """Real digits ingested to S3 (directly, no proxy), in many small shards."""
    url = f"s3://{s3_endpoint['bucket']}/faults/digits"
    ingest("builtin:digits", url, **DIGITS)
    return url


def _s3fs(endpoint: str) -> Any:
    import s3fs

    return s3fs.S3FileSystem(client_kwargs={"endpoint_url": endpoint})


def test_proxy_at_zero_faults_is_transparent(proxy: FaultProxy, s3_endpoint) -> None:
    """HEAD lengths, ranged reads, single and multipart uploads (s3fs, boto3, pyarrow)."""
    import boto3
    import pyarrow.fs as pafs

    bucket = s3_endpoint["bucket"]
    big = np.random.default_rng(0).integers(0, 256, 12 * 2**20, dtype=np.uint8).tobytes()
    fs = _s3fs(proxy.url)
    fs.pipe_file(f"{bucket}/t/small", b"hello")
    with fs.open(f"{bucket}/t/s3fs", "wb", block_size=5 * 2**20) as f:  # multipart
        f.write(big)
    assert fs.info(f"{bucket}/t/s3fs")["size"] == len(big)
    assert fs.cat_file(f"{bucket}/t/s3fs") == big and fs.cat_file(f"{bucket}/t/small") == b"hello"
    arrow = pafs.S3FileSystem(
        endpoint_override=proxy.url.removeprefix("http://"), scheme="http", region="us-east-1"
    )
    with arrow.open_output_stream(f"{bucket}/t/arrow") as out:  # multipart, background writes
        out.write(big)
    assert arrow.get_file_info(f"{bucket}/t/arrow").size == len(big)
    with arrow.open_input_file(f"{bucket}/t/arrow") as src:
        src.seek(5_000_000)
        assert src.read(1000) == big[5_000_000:5_001_000]
    client = boto3.client("s3", endpoint_url=proxy.url)
    client.upload_fileobj(io.BytesIO(big), bucket, "t/boto")  # multipart, threads
    assert client.head_object(Bucket=bucket, Key="t/boto")["ContentLength"] == len(big)
    assert client.get_object(Bucket=bucket, Key="t/boto")["Body"].read() == big
    stats = proxy.stats()
    assert stats["faulted"] == 0
    assert {"GET", "PUT", "POST", "HEAD"} <= set(stats["by_method"])  # POST: multipart


def test_proxy_injects_each_fault_kind(proxy: FaultProxy, s3_endpoint) -> None:
    """At 100% each kind fails a plain client's request the way S3 would."""
    import boto3
    from botocore.config import Config

    bucket = s3_endpoint["bucket"]
    _s3fs(s3_endpoint["endpoint_url"]).pipe_file(f"{bucket}/t/kinds", b"x" * 4000)
    cfg = Config(retries={"total_max_attempts": 1, "mode": "standard"}, read_timeout=2)
    client = boto3.client("s3", endpoint_url=proxy.url, config=cfg)
    seen = {}
    for kind in ("slowdown", "reset", "cut", "timeout"):
        proxy.configure(rate=1.0, kinds=[kind])
        with pytest.raises(Exception) as err:  # noqa: PT011 - each kind raises its own
            client.get_object(Bucket=bucket, Key="t/kinds")["Body"].read()
        seen[kind] = f"{type(err.value).__name__}: {err.value}"
    assert "SlowDown" in seen["slowdown"]
    assert "timeout" in seen["timeout"].lower()
    assert proxy.stats()["faults"] == {"slowdown": 1, "reset": 1, "cut": 1, "timeout": 1}
    # a cut upload: the store took it, the reset reaches the client while the proxy still
    # pumps its (finished) body; it once stayed silent and the client waited for an answer
    proxy.configure(rate=1.0, kinds=["cut"], methods={"PUT"})
    slow = boto3.client("s3", endpoint_url=proxy.url, config=cfg.merge(Config(read_timeout=60)))
    with pytest.raises(Exception) as err:  # noqa: PT011 - a closed connection, not a timeout
        slow.put_object(Bucket=bucket, Key="t/cut", Body=io.BytesIO(b"y" * 4000))
    assert "timeout" not in f"{type(err.value).__name__}: {err.value}".lower(), err.value


def test_a_silent_upload_gives_up_after_read_timeout(s3_endpoint) -> None:
    """A store that goes silent on an upload (held for 5 minutes) holds it ``read_timeout``,
    not until the store lets go: the upload is retried and lands. botocore's ``Expect:
    100-continue`` made aiohttp wait for the store without a limit (an ingest hung on it)."""
    import threading

    bucket = s3_endpoint["bucket"]
    with FaultProxy(s3_endpoint["endpoint_url"], hang_s=300) as proxy:
        fs, root = storage.filesystem(
            f"s3://{bucket}/t/silent", {"endpoint_url": proxy.url, "read_timeout": 2}
        )
        proxy.configure(rate=1.0, kinds=["timeout"], methods={"PUT"}, limit=1)
        errors: list[BaseException] = []

        def upload() -> None:
            try:
                fs.pipe_file(f"{root}/obj", b"z" * 20_000)
            except BaseException as exc:  # noqa: BLE001 - reported by the assert below
                errors.append(exc)

        worker = threading.Thread(target=upload, daemon=True)
        worker.start()
        worker.join(timeout=60)  # a guard against the hang, far below the store's 300 s
        assert not worker.is_alive(), f"the upload still waits: {proxy.in_flight()}"
        assert errors == []
        stats = proxy.stats()
        assert stats["faults"] == {"timeout": 1} and stats["given_up"] == 1
        assert fs.cat_file(f"{root}/obj") == b"z" * 20_000


def test_storage_retry_options(s3_endpoint) -> None:
    assert storage.S3Retry.of({}) == storage.S3Retry(10, None, None)
    assert storage.S3Retry.of({"max_attempts": 3, "read_timeout": 2}).read_timeout == 2.0
    with pytest.raises(DataError, match="max_attempts"):
        storage.S3Retry.of({"max_attempts": 0})
    with pytest.raises(DataError, match="read_timeout"):
        storage.S3Retry.of({"read_timeout": -1})
    fs, _ = storage.filesystem("s3://b/x", {"max_attempts": 4, "connect_timeout": 2})
    assert fs.config_kwargs["retries"] == {"total_max_attempts": 4, "mode": "standard"}
    assert fs.config_kwargs["connect_timeout"] == 2.0


def test_pyarrow_s3_keeps_its_retries_in_a_ray_task(proxy: FaultProxy, s3_endpoint) -> None:
    """pyarrow's own pickling drops the retry strategy; a worker's copy must keep it."""
    _s3fs(s3_endpoint["endpoint_url"]).pipe_file(f"{s3_endpoint['bucket']}/t/retries", b"x")
    url = f"s3://{s3_endpoint['bucket']}/t/retries"
    fs, path = storage.pyarrow_filesystem(url, {"endpoint_url": proxy.url, "max_attempts": 6})
    copy = pickle.loads(pickle.dumps(fs))  # what Ray sends to a task or a Train worker
    proxy.configure(rate=1.0, kinds=["slowdown"])
    with pytest.raises(OSError, match="503"):
        copy.get_file_info(path)
    assert proxy.stats()["requests"] == 6


class _FlakyFile(io.RawIOBase):
    """A readable file that fails once with an I/O error after ``fail_at`` bytes."""

    def __init__(self, data: bytes, fail_at: int | None) -> None:
        self.buf, self.pos, self.fail_at = data, 0, fail_at

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = 0) -> int:
        self.pos = {0: 0, 1: self.pos, 2: len(self.buf)}[whence] + offset
        return self.pos

    def tell(self) -> int:
        return self.pos

    def readinto(self, b: Any) -> int:
        if self.fail_at is not None and self.pos + len(b) > self.fail_at:
            raise OSError("Connection reset by peer")
        chunk = self.buf[self.pos : self.pos + len(b)]
        b[: len(chunk)] = chunk
        self.pos += len(chunk)
        return len(chunk)


class _FlakyFS:
    """``open_input_file`` whose first opening of each path fails half way through."""

    def __init__(self, files: dict[str, bytes]) -> None:
        self.files, self.opened = files, {}

    def open_input_file(self, path: str) -> io.BufferedReader:
        n = self.opened[path] = self.opened.get(path, 0) + 1
        data = self.files[path]
        return io.BufferedReader(_FlakyFile(data, len(data) // 2 if n == 1 else None))


def test_read_task_reopens_a_shard_after_an_io_error_without_losing_rows() -> None:
    """A shard read that breaks half way is reopened and goes on after the rows already
    handed out: the same rows, once each (today the task fails)."""
    from data_helpers import png

    rows = 60
    table = pa.table(
        {
            "id": [f"img{i:03d}" for i in range(rows)],
            "image": [png(16, 16, seed=i) for i in range(rows)],
            "label": pa.array([i % 3 for i in range(rows)], pa.int32()),
        }
    )
    out = io.BytesIO()
    pq.write_table(table, out, row_group_size=10)
    kwargs = {
        "train": False,
        "model": {"img_size": 16, "patch_size": 4},
        "seed": 0,
        "chunk_rows": 10,
        "aug": {"max_pixels": 10**6},
    }
    batch = {"epoch": np.array([0]), "source": np.array([0]), "path": np.array(["s.parquet"])}
    flaky = _FlakyFS({"s.parquet": out.getvalue()})
    got = [r for chunk in read_and_decode(batch, sources=[("s", 1.0, flaky)], **kwargs)
           for r in chunk["id"]]  # fmt: skip
    assert got == table.column("id").to_pylist()  # every row, in order, once
    assert flaky.opened["s.parquet"] == 2


def _rows(url: str, options: dict[str, Any]) -> list[tuple[str, int, bool]]:
    data = DataConfig(sources=[{"url": url, "name": "digits"}], storage_options=options)
    ds = build_train_dataset(data, MODEL, seed=3, epochs=1)
    return [(r["id"], int(r["epoch"]), bool(r["valid"])) for r in ds.iter_rows()]


@pytest.mark.faults  # a fault journey: `make test-faults` (CI runs it after `make test`)
@pytest.mark.slow
def test_pipeline_reads_survive_faults_without_losing_rows(
    ray_session, proxy: FaultProxy, digits_on_s3: str
) -> None:
    """A quarter of the read requests fail (503, reset, cut, timeout): the same rows come
    out, all decodable (nothing turned into a dropped image)."""
    options = {"endpoint_url": proxy.url}
    clean = _rows(digits_on_s3, options)
    assert len(clean) > 1000 and all(v for _, _, v in clean)
    proxy.configure(rate=0.25, methods={"GET", "HEAD"}, seed=1)
    faulty = _rows(digits_on_s3, options)
    stats = proxy.stats()
    assert stats["faulted"] >= 20 and len(stats["faults"]) == 4, stats
    assert faulty == clean


CIFAR_MINI = Path(__file__).parent / "assets" / "cifar10-mini"


@pytest.mark.slow
@pytest.mark.faults
def test_ingest_to_s3_under_faults_gives_the_same_rows(proxy: FaultProxy, s3_endpoint) -> None:
    """Every kind of request may fail during an ingest to S3 (200 CIFAR-10 JPEGs in many small
    shards): the same shards and rows as a clean ingest."""
    bucket = s3_endpoint["bucket"]
    options = {"endpoint_url": proxy.url, "read_timeout": 3}
    small = {"image_size": 32, "shard_size_mb": 0.01, "split_folders": True}
    clean = ingest(str(CIFAR_MINI), f"s3://{bucket}/faults/ingest-clean", **small)
    proxy.configure(rate=0.2, seed=4)
    url = f"s3://{bucket}/faults/ingest-faulty"
    faulty = ingest(str(CIFAR_MINI), url, storage_options=options, **small)
    assert proxy.stats()["faulted"] >= 5, proxy.stats()
    assert faulty["counts"] == clean["counts"] and faulty["shards"] == clean["shards"]
    proxy.configure(rate=0.0)
    fs, root = storage.pyarrow_filesystem(url, options)
    clean_fs, clean_root = storage.pyarrow_filesystem(f"s3://{bucket}/faults/ingest-clean")
    for shard in faulty["shards"]["train"] + faulty["shards"]["val"]:
        a = pq.read_table(f"{root}/{shard['path']}", filesystem=fs)
        b = pq.read_table(f"{clean_root}/{shard['path']}", filesystem=clean_fs)
        assert a.equals(b), shard["path"]


def _checkpoint_files(endpoint: str, folder: str) -> set[str]:
    return {p.rsplit("/", 1)[-1] for p in _s3fs(endpoint).find(folder)}


@pytest.mark.faults  # a fault journey: `make test-faults` (CI runs it after `make test`)
@pytest.mark.slow
def test_failed_checkpoint_uploads_are_retried(ray_session, proxy: FaultProxy, s3_endpoint) -> None:
    """Every upload request of one checkpoint fails for a while (more than the SDK's own
    retries): the upload is done again, the run finishes, every checkpoint is whole."""
    bucket = s3_endpoint["bucket"]
    job = tiny_job(
        f"s3://{bucket}/faults/runs",
        "upload-retried",
        "train.steps=6",
        "train.checkpoint_every=2",
        "train.val_every=100",
        "train.keep_checkpoints=3",
        f"train.storage_options={json.dumps({'endpoint_url': proxy.url, 'max_attempts': 2})}",
    )
    proxy.configure(rate=1.0, methods={"PUT", "POST"}, path="checkpoint_00000004/", limit=6)
    result = pretrain(job, datasets=digits_datasets(job), track=False)
    assert result.error is None and result.steps == 6
    assert proxy.stats()["faulted"] == 6
    assert latest_train_state(job)["step"] == 6
    for step in (2, 4, 6):
        folder = f"{bucket}/faults/runs/upload-retried/checkpoint_{step:08d}"
        assert CHECKPOINT_FILES <= _checkpoint_files(s3_endpoint["endpoint_url"], folder)


@pytest.mark.slow
@pytest.mark.faults
def test_checkpoint_that_cannot_be_uploaded_is_reported_and_never_latest(
    ray_session, proxy: FaultProxy, s3_endpoint
) -> None:
    """Uploads of one checkpoint fail for good: the job fails naming the upload, and
    ``latest.json`` still names the previous checkpoint, which is whole."""
    bucket = s3_endpoint["bucket"]
    job = tiny_job(
        f"s3://{bucket}/faults/runs",
        "upload-fails",
        "train.steps=6",
        "train.checkpoint_every=2",
        "train.val_every=100",
        f"train.storage_options={json.dumps({'endpoint_url': proxy.url, 'max_attempts': 2})}",
    )
    # Refused at once (503, reset): held connections (timeout) reach the same verdict slower.
    proxy.configure(
        rate=1.0, methods={"PUT", "POST"}, path="checkpoint_00000004/", kinds=["slowdown", "reset"]
    )
    with pytest.raises(Exception, match="checkpoint upload to .*checkpoint_00000004 failed"):
        pretrain(job, datasets=digits_datasets(job), track=False)
    latest = latest_train_state(job)
    assert latest["step"] == 2 and latest["checkpoint"] == "checkpoint_00000002"
    folder = f"{bucket}/faults/runs/upload-fails/checkpoint_00000002"
    assert CHECKPOINT_FILES <= _checkpoint_files(s3_endpoint["endpoint_url"], folder)


@pytest.mark.slow
@pytest.mark.faults
def test_demo_with_data_and_checkpoints_on_s3_through_the_proxy(
    ray_session, proxy: FaultProxy, s3_endpoint, digits_on_s3: str, tmp_path: Path
) -> None:
    """The demo job (cut to 10 steps) with its data and its checkpoints on S3, through the
    proxy with 10% of all requests failing: every step done, no image dropped, every
    checkpoint whole, nothing on the console (a proxy at 0% is transparent:
    test_proxy_at_zero_faults_is_transparent)."""
    bucket = s3_endpoint["bucket"]
    options = json.dumps({"endpoint_url": proxy.url, "read_timeout": 3})
    name, rate = "demo-faulty", 0.1
    job = load_config(
        Path(__file__).parents[1] / "jobs" / "configs" / "demo.yaml",
        [
            f"name={name}",
            f"data.sources.0.url={digits_on_s3}",
            f"data.storage_options={options}",
            f"train.storage_path=s3://{bucket}/faults/runs",
            f"train.storage_options={options}",
            "train.steps=10",
            "train.checkpoint_every=5",
            "train.val_every=5",
            f"tracking.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}",
        ],
    )
    proxy.configure(rate=rate, seed=7)
    before = proxy.stats()
    events: list[str] = []  # what the console would show beside the steps
    result = pretrain(job, on_event=events.append)
    stats = proxy.stats()
    assert events == [], events  # no restart, nothing lost: each fault retried below
    assert result.error is None and result.steps == 10
    assert result.metrics["data/dropped_images"] == 0
    assert latest_train_state(job)["step"] == 10
    folder = f"{bucket}/faults/runs/{name}/checkpoint_00000010"
    assert CHECKPOINT_FILES <= _checkpoint_files(s3_endpoint["endpoint_url"], folder)
    assert stats["faulted"] - before["faulted"] >= 3, stats  # about 1 in 10 of ~700
    assert {"GET", "HEAD", "PUT"} <= set(stats["by_method"])
    fault_rows.record(
        fault_rows.FaultRow(
            fault=f"S3 through the fault proxy at {rate:.0%} of requests failed (503, reset, "
            "cut, hang; data and checkpoints on S3, from scratch)",
            console=[
                f"no line beside the steps ({stats['faulted'] - before['faulted']} of "
                f"{stats['requests'] - before['requests']} requests faulted, each retried "
                "below the job)"
            ],
            steps_redone="0 (no restart)",
            data_lost="0: data/dropped_images 0, the step-10 checkpoint whole",
            test=fault_rows.current_test(),
        )
    )
    assert result.final_trunk
