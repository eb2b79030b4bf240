"""After a training failure (a worker died, a node was lost): on how many workers the
pre-training job resumes, and when.

Ray Train's own restart would bring back ``num_workers`` workers wherever CPUs are left: after
a node is lost they can fill the survivors, and the data pipeline's read tasks then never run
(the job hangs without a word). So the job restarts training itself (see
:func:`aim_platform.jobs.pretrain.pretrain`): it waits until Ray has noticed a lost node, then
counts the workers that fit on the nodes still alive while one node keeps
``data.cpus_per_task`` CPUs free for the pipeline (:func:`workers_that_fit`), between
``train.min_workers`` and ``train.num_workers`` and keeping ``global_batch_size`` a whole
number of micro-batches per worker (gradient accumulation makes up the rest). Fewer than
``min_workers`` fit: it waits for the capacity to come back (asking an autoscaler for it),
says so, and gives up after ``train.restart_wait_s``.

Why not Ray Train's elastic mode (measured with Ray 2.60.0, issue 28 point 7, 2026-12-06):
the lost-node journey (``tests/test_node_loss.py``: two 2-CPU nodes, checkpoints on S3, the
second node's raylet killed after the step-10 checkpoint) was run with
``ScalingConfig(num_workers=(1, 2))`` and ``FailureConfig(max_failures=3)`` instead:

- As the journey runs (``STRICT_SPREAD``, 1 CPU a worker) it hangs: after the loss Ray's
  ``ElasticScalingPolicy`` counted "ready resources for 2 workers" (each node's CPUs divided
  by a worker's, the placement strategy ignored), asked for a 2-worker ``STRICT_SPREAD`` group
  on the one node left and hit "worker group startup timed out after 60.0 seconds" 8 times in
  the 482 s it was watched, with no step after 10; these controller errors do not count
  against ``max_failures`` (``controller_failure_limit`` defaults to -1), so it never ends.
  This module resumed the same journey on 1 worker in 70 s and finished.
- With ``SPREAD`` and 0.75 CPU a worker (0.5 left for the data tasks on the survivor) Ray's
  mode resumes: both workers had been on the lost node, came back on the survivor and went on
  (the step-40 checkpoint 448 s after the loss, load 50-80). But it only works when the worker
  size leaves the data's CPUs free on every node by construction; the console says nothing
  (no lost node, no restart: the display stays at the step before the loss); and a restart
  reuses the datasets of the first attempt, so the stream starts over at the job's first
  epoch instead of at the checkpoint's data position (``default_datasets(job, resume_plan)``
  here). Revisit when the elastic policy honours the placement strategy and the data's CPUs.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

from aim_platform import tracking
from aim_platform.config import JobConfig, TrainConfig
from aim_platform.errors import PlatformError

EPS = 1e-9
POLL_S = 2.0


class CapacityError(PlatformError):
    """Not enough CPUs came back for the fewest workers the job accepts."""


def workers_that_fit(
    node_cpus: list[float],
    *,
    cpus_per_worker: float,
    data_cpus: float,
    fewest: int,
    most: int,
    batch_ok: Callable[[int], bool] = lambda k: True,
) -> int:
    """The most workers, from ``fewest`` to ``most``, that fit on nodes with these CPUs
    while one node keeps ``data_cpus`` free; 0 when not even ``fewest`` fit.

    Args:
        node_cpus: Logical CPUs of each alive node.
        cpus_per_worker: What each training worker reserves.
        data_cpus: What one data pipeline task reserves.
        fewest: The fewest workers acceptable.
        most: The most workers wanted.
        batch_ok: Whether a worker count is acceptable otherwise (the batch divides).
    """
    slots = [math.floor(c / cpus_per_worker + EPS) for c in node_cpus]
    best = 0  # workers that fit with the data CPUs kept on one of the nodes
    for i, cpus in enumerate(node_cpus):
        if cpus + EPS < data_cpus:
            continue
        kept = math.floor((cpus - data_cpus) / cpus_per_worker + EPS)
        best = max(best, sum(slots) - slots[i] + kept)
    for k in range(min(most, best), fewest - 1, -1):
        if batch_ok(k):
            return k
    return 0


def batch_divides(tc: TrainConfig) -> Callable[[int], bool]:
    """Whether ``k`` workers keep ``global_batch_size`` a whole number of micro-batches each."""
    return lambda k: tc.global_batch_size % (tc.micro_batch_size * k) == 0


def alive_node_cpus() -> dict[str, float]:
    """Node id -> logical CPUs of every node Ray counts as alive."""
    import ray

    return {n["NodeID"]: float(n["Resources"].get("CPU", 0.0)) for n in ray.nodes() if n["Alive"]}


def wait_for_lost_nodes(before: set[str], settle_s: float) -> set[str]:
    """After a failure, give Ray up to ``settle_s`` seconds to mark lost nodes dead (it
    notices a missing node by its health checks, often after the workers' own errors).

    Args:
        before: The nodes alive when training started.

    Returns:
        The nodes of ``before`` that are dead now (empty: no node was lost).
    """
    deadline = time.monotonic() + settle_s
    while True:
        lost = before - set(alive_node_cpus())
        if lost or time.monotonic() >= deadline:
            return lost
        time.sleep(POLL_S)


def wait_for_workers(
    tc: TrainConfig,
    data_cpus: float,
    say: Callable[[str], None],
    *,
    poll_s: float = POLL_S,
) -> int:
    """How many workers to restart with: at once if at least ``tc.min_workers`` fit on the
    alive nodes, else after waiting (saying so once, asking an autoscaler for the CPUs) up to
    ``tc.restart_wait_s`` seconds.

    Raises:
        CapacityError: the capacity did not come back in time.
    """
    from ray.autoscaler.sdk import request_resources

    def fit() -> tuple[int, dict[str, float]]:
        nodes = alive_node_cpus()
        k = workers_that_fit(
            list(nodes.values()),
            cpus_per_worker=tc.cpus_per_worker,
            data_cpus=data_cpus,
            fewest=tc.min_workers,
            most=tc.num_workers,
            batch_ok=batch_divides(tc),
        )
        return k, nodes

    k, nodes = fit()
    if k:
        return k
    need = tc.min_workers * tc.cpus_per_worker + data_cpus
    say(
        f"waiting for CPUs: {tc.min_workers} worker(s) x {tc.cpus_per_worker} CPU + "
        f"{data_cpus} for data ({need:g} CPUs) do not fit on the {len(nodes)} node(s) left "
        f"({sum(nodes.values()):g} CPUs); giving up in {tc.restart_wait_s:g} s "
        "(train.min_workers: fewer workers are acceptable; train.restart_wait_s: how long to wait)"
    )
    bundles = [{"CPU": tc.cpus_per_worker}] * tc.min_workers + [{"CPU": data_cpus}]
    request_resources(bundles=bundles)  # an autoscaler adds nodes; elsewhere a no-op
    deadline = time.monotonic() + tc.restart_wait_s
    try:
        while time.monotonic() < deadline:
            time.sleep(poll_s)
            k, nodes = fit()
            if k:
                return k
    finally:
        request_resources(bundles=[])
    raise CapacityError(
        f"gave up after {tc.restart_wait_s:g} s waiting for {need:g} CPUs on the cluster "
        f"({len(nodes)} node(s) alive, {sum(nodes.values()):g} CPUs); the last checkpoint "
        "stays in storage: run the same config again to resume from it"
    )


def failure_reason(exc: BaseException, width: int = 120) -> str:
    """One line on why training failed: per failed worker rank (a Ray Train
    ``WorkerGroupError``), the last line of its error, which names the exception."""
    failures = getattr(exc, "worker_failures", None) or {0: exc}

    def last_line(err: BaseException) -> str:
        lines = [line.strip() for line in str(err).splitlines() if line.strip()]
        text = lines[-1] if lines else type(err).__name__
        return text if len(text) <= width else text[: width - 3] + "..."

    if len(failures) == 1 and not hasattr(exc, "worker_failures"):
        return last_line(exc)
    return "; ".join(f"rank {rank}: {last_line(err)}" for rank, err in sorted(failures.items()))


def restart(
    job: JobConfig,
    exc: Exception,
    *,
    nodes: set[str],
    count: int,
    at_step: int | None,
    from_step: int,
    say: Callable[[str], None],
    tracker: tracking.Tracker | None,
    run_id: str | None,
) -> int:
    """After failed training: wait for Ray to see lost nodes, pick the worker count, say what
    happens and record the restart in the MLflow run (tags ``restarts``, ``restart_N``;
    metric ``train/restarts`` at the step resumed from).

    Args:
        exc: What the failed ``fit`` raised.
        nodes: The nodes alive when that training started.
        count: This restart's number (1 for the first).
        at_step: The last step the failed training reached (None: unknown).
        from_step: The step of the checkpoint it resumes from.

    Returns:
        The number of workers to restart with.
    """
    tc = job.train
    reason = failure_reason(exc)
    where = f" at step {at_step}" if at_step else ""
    say(
        f"training failed{where}: {reason}; "
        f"waiting up to {tc.restart_settle_s:g} s for Ray to report lost nodes"
    )
    lost = wait_for_lost_nodes(nodes, tc.restart_settle_s)
    what = f"lost {len(lost)} of {len(nodes)} node(s)" if lost else "training failed"
    if lost:
        say(f"{what}{where}")
    workers = wait_for_workers(tc, job.data.cpus_per_task, say)
    limit = "unlimited" if tc.max_failures == -1 else str(tc.max_failures)
    fewer = f" (of {tc.num_workers}: what fits, {job.data.cpus_per_task:g} CPU kept for data)"
    say(
        f"restart {count} of {limit}: resuming from the checkpoint at step {from_step} "
        f"on {workers} worker(s)" + (fewer if workers < tc.num_workers else "")
    )
    if tracker and run_id:
        note = f"{what}{where}: {reason}; resumed from step {from_step} on {workers} worker(s)"
        tracker.set_tags(run_id, {"restarts": str(count), f"restart_{count}": note})
        tracker.log_metrics(run_id, {"train/restarts": count}, step=from_step)
    return workers
