"""How many workers a restart after a lost node gets (no Ray here; the journey with a real
two-node cluster is ``tests/test_node_loss.py``)."""

from __future__ import annotations

import pytest

from aim_platform.config import ConfigError, JobConfig, build_config
from aim_platform.jobs.restarts import batch_divides, failure_reason, workers_that_fit


def fit(cpus: list[float], per_worker: float, fewest: int = 1, most: int = 2, **kw) -> int:
    return workers_that_fit(
        cpus, cpus_per_worker=per_worker, data_cpus=0.5, fewest=fewest, most=most, **kw
    )


def test_a_lost_node_leaves_cpus_for_the_data_pipeline() -> None:
    # The cluster: two 2-CPU nodes, 1 CPU per worker; one node is lost.
    assert fit([2.0, 2.0], 1.0) == 2
    assert fit([2.0], 1.0) == 1  # two would fill the node: the read tasks could never run
    assert fit([2.0], 1.0, fewest=2) == 0  # min_workers = num_workers: wait instead
    # The demo on one 2-CPU machine: 2 x 0.5 + 0.5 fits.
    assert fit([2.0], 0.5) == 2
    assert fit([1.0, 1.0], 1.0) == 1  # a whole node kept for data
    assert fit([0.4], 0.25) == 0  # not even the data task fits


def test_worker_count_keeps_the_global_batch_whole() -> None:
    job = build_config(
        JobConfig,
        {},
        ["train.num_workers=4", "train.global_batch_size=64", "train.micro_batch_size=16"],
    )
    ok = batch_divides(job.train)
    assert [k for k in range(1, 5) if ok(k)] == [1, 2, 4]
    # 3 workers would fit, but 64 is not a whole number of 16-image micro-batches on 3
    assert fit([2.0, 2.0], 1.0, most=4, batch_ok=ok) == 2


def test_min_workers_is_checked() -> None:
    with pytest.raises(ConfigError, match="min_workers: 3 is more than num_workers=2"):
        build_config(JobConfig, {}, ["train.min_workers=3"])


def test_failure_reason_is_one_line_per_failed_rank() -> None:
    from ray.train import WorkerGroupError

    exc = WorkerGroupError(
        "long snippets",
        {
            1: RuntimeError("A worker health check failed.\nWorker info: ...\nThe actor is gone"),
            0: RuntimeError("Traceback (most recent call last):\n  ...\nConnection closed by peer"),
        },
    )
    assert failure_reason(exc) == "rank 0: Connection closed by peer; rank 1: The actor is gone"
    assert failure_reason(OSError("disk full")) == "disk full"
