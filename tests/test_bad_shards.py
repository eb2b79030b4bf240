"""Bad shards end (issue 29 point 2): a truncated train shard fails its read again after
every restart; the job gives up after ``data.max_shard_failures`` with one line naming the
shard and its error, or, with ``data.skip_bad_shards: true``, trains without it and lists it
with its rows in the summary and in MLflow."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from data_helpers import write_image_folder
from fault_rows import FaultRow, current_test, record
from train_helpers import tiny_job

from aim_platform.errors import DataError
from aim_platform.jobs import bad_shards


def test_a_read_failure_names_its_shard_and_counts_across_runs(tmp_path: Path) -> None:
    job = tiny_job(str(tmp_path), "bad", "data.max_shard_failures=2")
    err = ValueError("Parquet magic bytes not found in footer")
    err.add_note("reading shard /d/train/part-00003.parquet")
    assert bad_shards.shard_of(err) == (
        "/d/train/part-00003.parquet",
        "ValueError: Parquet magic bytes not found in footer",
    )
    assert bad_shards.shard_of(RuntimeError("a worker died")) is None
    said: list[str] = []
    record = bad_shards.load(job)
    assert bad_shards.on_failure(job, err, record, lambda p: 40, said.append)
    assert "failed (1 of 2)" in said[-1]
    again = bad_shards.load(job)  # a resubmitted job counts on
    with pytest.raises(DataError) as exc:
        bad_shards.on_failure(job, err, again, lambda p: 40, said.append)
    line = str(exc.value)
    assert "\n" not in line and "/d/train/part-00003.parquet failed 2 times" in line
    assert "data.max_shard_failures: 2" in line and "magic bytes" in line
    assert "data.skip_bad_shards" in line


@pytest.fixture(scope="module")
def truncated(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path]:
    """(ingest root, the truncated train shard): 2 classes x 24 images, small shards."""
    from aim_platform.jobs.ingest import ingest

    base = tmp_path_factory.mktemp("bad")
    write_image_folder(base / "src", per_class=24)
    ingest(str(base / "src"), str(base / "data"), val_fraction=0.2, shard_size_mb=0.01)
    shard = sorted((base / "data" / "train").glob("*.parquet"))[1]
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    return str(base / "data"), shard


def _job(storage: Path, name: str, data: str, *sets: str):
    return tiny_job(
        str(storage), name, f"data.sources=[{{url: {data}}}]", "train.steps=6",
        "train.checkpoint_every=3", "train.val_every=100", "train.max_failures=0", *sets,
    )  # fmt: skip


@pytest.mark.faults  # `make test-faults` (CI runs it after `make test`)
@pytest.mark.slow
@pytest.mark.timeout(1800)  # several job starts: minutes each on a loaded machine
def test_a_truncated_shard_ends_the_run_or_is_skipped(
    ray_session, truncated: tuple[str, Path], tmp_path: Path
) -> None:
    from mlflow import MlflowClient

    from aim_platform.jobs.pretrain import pretrain

    data, shard = truncated
    said: list[str] = []
    job = _job(tmp_path, "gives-up", data, "data.max_shard_failures=2")
    with pytest.raises(DataError) as exc:
        pretrain(job, on_event=said.append)
    line = str(exc.value)
    assert "\n" not in line and f"{shard} failed 2 times" in line
    assert sum("failed (1 of 2)" in s for s in said) == 1  # one restart, then the end

    said.clear()
    job = _job(tmp_path, "skips", data, "data.max_shard_failures=1", "data.skip_bad_shards=true")
    result = pretrain(job, on_event=said.append)
    assert result.error is None and result.steps == 6
    skipped = [s for s in said if s.startswith(f"skipping shard {shard}")]
    assert len(skipped) == 1, said
    notes = [n for n in result.notes if n.startswith(f"skipped bad shard {shard}")]
    assert len(notes) == 1 and "rows)" in notes[0]
    client = MlflowClient(tracking_uri=result.tracking_uri)
    run = client.get_run(result.run_id)
    assert run.data.tags["data/skipped_shards"] == str(shard)
    manifest = json.loads((Path(data) / "_manifest.json").read_text())
    expected = [s["rows"] for s in manifest["shards"]["train"] if shard.name in s["path"]]
    assert run.data.metrics["data/skipped_rows"] == expected[0] > 0
    assert f"({expected[0]} rows)" in notes[0]
    test = current_test()
    record(FaultRow(
        fault="truncated train shard, data.max_shard_failures 2 (default 3)",
        console=[f"pre-training failed: {line}"],
        steps_redone="the steps since the last checkpoint, once per failure (2 failures)",
        data_lost="none trained; the run stops and names the shard",
        test=test,
    ))  # fmt: skip
    record(FaultRow(
        fault="truncated train shard, data.skip_bad_shards: true",
        console=[skipped[0], notes[0]],
        steps_redone="the steps since the last checkpoint, once",
        data_lost=f"the skipped shard's {expected[0]} rows, listed in the summary and in MLflow",
        test=test,
    ))  # fmt: skip
