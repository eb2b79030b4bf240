"""The pre-training job's datasets: the train stream built where the last checkpoint left it
(every image once per epoch, :mod:`aim_platform.data.consumed`), without the bad shards the
run skips (:mod:`aim_platform.jobs.bad_shards`), and the validation view."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

from aim_platform import tracking
from aim_platform.config import DataConfig, JobConfig
from aim_platform.data.consumed import DATA_STATE, DataState, ResumePlan
from aim_platform.errors import DataError
from aim_platform.jobs import bad_shards
from aim_platform.storage import filesystem, join
from aim_platform.train.paths import RunPaths


def run_root(job: JobConfig) -> str:
    """The run's folder, ``<storage>/<name>``."""
    return RunPaths.of(job.train.storage_path, job.name).root


def resume_plan(job: JobConfig, previous: Mapping[str, Any] | None) -> ResumePlan | None:
    """Where the train stream goes on after the checkpoint ``latest.json`` names: its
    ``data_state.json`` (every rank's trained rows); a checkpoint without one (written before
    it existed) resumes at the start of its epoch."""
    if previous is None:
        return None
    url = join(run_root(job), previous["checkpoint"], DATA_STATE)
    fs, path = filesystem(url, job.train.storage_options)
    if not fs.exists(path):
        return ResumePlan(start_epoch=int(previous["epoch"]))
    with fs.open(path, "r") as f:
        return DataState.from_json(f.read(), url).resume_plan()


def default_datasets(
    job: JobConfig, resume: ResumePlan | None, exclude: frozenset[str] = frozenset()
) -> dict[str, Any]:
    """Train stream (enough epochs for the remaining steps, going on where ``resume`` says,
    without the shards of ``exclude``) and validation view."""
    from aim_platform.data.pipeline import build_train_dataset, build_val_dataset, train_size

    n_train = train_size(job.data)
    if n_train == 0:
        raise DataError("data: the training split is empty")
    images = job.train.steps * job.train.global_batch_size
    start_epoch = resume.start_epoch if resume else 0
    epochs = start_epoch + math.ceil(images / n_train) + 1
    train = build_train_dataset(
        job.data,
        job.model,
        seed=job.seed,
        epochs=epochs,
        start_epoch=start_epoch,
        resume=resume,
        exclude=exclude,
    )
    val = build_val_dataset(job.data, job.model)
    # No select_columns here: a projection can become its own 1-CPU task that never gets
    # scheduled beside the workers; the loop's collate function drops the string columns.
    return {"train": train, "val": val}


def rows_of_shard(data: DataConfig, path: str) -> int:
    """A train shard's rows, from its source's manifest (0 when no source lists it)."""
    from aim_platform.data.pipeline import source_shards

    for source in data.sources:
        shards = source_shards(source, "train", data.storage_options)
        if path in shards.paths:
            return shards.shard_rows[shards.paths.index(path)]
    return 0


def record_skipped(
    tracker: tracking.Tracker | None,
    run_id: str | None,
    bad: bad_shards.ShardFailures,
    rows_of: Callable[[str], int],
) -> None:
    """The skipped shards in the MLflow run: tag ``data/skipped_shards``, metric
    ``data/skipped_rows``."""
    if not (tracker and run_id):
        return
    skipped = sorted(bad.skipped)
    tracker.set_tags(run_id, {"data/skipped_shards": ",".join(skipped)})
    tracker.log_metrics(run_id, {"data/skipped_rows": sum(rows_of(p) for p in skipped)}, step=0)
