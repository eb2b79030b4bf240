"""The pre-training job, the only place that builds a ``TorchTrainer``: ``aimctl pretrain`` and
the studies call it.

Driver side: connect to (or start) Ray, create the MLflow run, build the datasets, fit,
then log the artifacts and print a summary. The per-worker loop is :mod:`.loop`.

Over 400 lines on purpose: this is the one place that builds the ``TorchTrainer`` and runs
its restart loop, and a reader should see every branch of that loop in one file (a bad shard,
a hung rank, a lost node, a preemption); what each branch does lives in its own module
(:mod:`.bad_shards`, :mod:`.restarts`, :mod:`aim_platform.train.preempt`, :mod:`.lease`,
:mod:`.durable`, :mod:`.pretrain_data`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import threading
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from aim_platform import tracking
from aim_platform.cluster import connect, resolve_devices
from aim_platform.config import JobConfig, dump_config, flatten
from aim_platform.errors import UnsafeFile
from aim_platform.failures import root_cause
from aim_platform.jobs import bad_shards, restarts
from aim_platform.jobs.ingest import prepare_sources
from aim_platform.jobs.pretrain_data import (
    default_datasets,
    record_skipped,
    resume_plan,
    rows_of_shard,
)
from aim_platform.jobs.pretrain_outputs import (
    PretrainResult,
    log_outputs,
    probe_checkpoints,
)
from aim_platform.storage import filesystem, is_remote, join, pyarrow_filesystem, read_json
from aim_platform.train import preempt
from aim_platform.train.entry import LoopArgs
from aim_platform.train.paths import RunPaths, storage_url
from aim_platform.train.progress import Snapshot, create_board, read_board, take_handover


def run_paths(job: JobConfig) -> RunPaths:
    """The run's folder, ``<storage>/<name>``: checkpoints, trunks and bookkeeping."""
    return RunPaths.of(job.train.storage_path, job.name)


def latest_train_state(job: JobConfig) -> dict[str, Any] | None:
    """The newest complete checkpoint's train state (``latest.json``), or None."""
    fs, latest = filesystem(run_paths(job).latest, job.train.storage_options)
    if not fs.exists(latest):
        return None
    state = read_json(fs, latest, "a latest-checkpoint record")
    if not isinstance(state, dict) or not isinstance(state.get("step"), int):
        raise UnsafeFile(f"{latest}: not a latest-checkpoint record (no integer step)")
    return state


@functools.cache
def trainer_class() -> type:
    """Ray Train's ``TorchTrainer`` without its placement-group cleaner.

    Ray 2.60 starts a detached actor per run that removes the run's placement group as soon as
    the State API does not return the controller actor (``is_actor_alive`` reads a missing
    answer as dead). On a loaded head that answer goes missing while the controller is alive:
    the live workers were destroyed mid-run ("placement group was removed", then "A worker
    health check failed") in a CI run. A controller that ends, as every fit does here, removes
    its placement group itself; what the cleaner adds (a group left by a controller that
    crashed) is not worth a healthy run killed.
    """
    from ray.train.torch import TorchTrainer
    from ray.train.v2._internal.callbacks.placement_group_callback import (
        PlacementGroupCleanerCallback,
    )

    class Trainer(TorchTrainer):
        def _create_default_callbacks(self) -> list[Any]:
            callbacks = super()._create_default_callbacks()
            return [c for c in callbacks if not isinstance(c, PlacementGroupCleanerCallback)]

    return Trainer


def _reuse_or_start_run(
    job: JobConfig,
    tracker: tracking.Tracker,
    tags: Mapping[str, str | None],
    parent_run_id: str | None,
) -> str:
    """One MLflow run per job: a job restarted by name continues its run. A new run gets the
    job as params, its datasets as inputs and its config as ``config.yaml``."""
    uri = tracker.uri
    paths = run_paths(job)
    fs, root = filesystem(paths.root, job.train.storage_options)
    marker = filesystem(paths.run_id_file, job.train.storage_options)[1]
    if fs.exists(marker):
        saved = read_json(fs, marker, "a run-id record")
        if isinstance(saved, dict) and saved.get("tracking_uri") == uri:
            if not isinstance(saved.get("run_id"), str):
                raise UnsafeFile(f"{marker}: not a run-id record (no run_id)")
            return saved["run_id"]
    from aim_platform.security import redact

    params = flatten(redact(job.model_dump(mode="json")))
    run_id = tracker.start_run(job.tracking.experiment, job.name, params, tags, parent_run_id)
    urls = [s.url for s in job.data.sources]
    tracking.log_datasets(tracker, run_id, urls, job.data.storage_options)
    tracker.log_text(run_id, dump_config(_redacted(job)), "config.yaml")
    fs.makedirs(root, exist_ok=True)
    with fs.open(marker, "w") as f:
        f.write(json.dumps({"run_id": run_id, "tracking_uri": uri}))
    return run_id


def pretrain(
    job: JobConfig,
    *,
    address: str | None = None,
    datasets: Mapping[str, Any] | None = None,
    tags: Mapping[str, str | None] | None = None,
    parent_run_id: str | None = None,
    track: bool = True,
    callbacks: list[Any] | None = None,
    on_progress: Callable[[Snapshot], None] | None = None,
    on_event: Callable[[str], None] | None = None,
) -> PretrainResult:
    """Run (or resume) a pre-training job as the one writer of its name; the arguments and
    the result are :func:`_pretrain`'s.

    Before any step, once Ray is joined: a job keeping checkpoints on node-local storage on a
    cluster of several nodes is refused (:func:`~aim_platform.jobs.durable.
    check_durable_storage`), and the run's lease ``<storage>/<name>/lease.json`` is taken
    (:mod:`aim_platform.jobs.lease`): a live run of that name is refused with one line naming
    it, a stale one taken over (``on_event`` says so). The lease is released at the end,
    finished, failed or preempted.
    """
    from aim_platform.jobs import lease
    from aim_platform.jobs.durable import check_durable_storage

    connect(address)
    check_durable_storage(job.train, nodes=len(restarts.alive_node_cpus()))
    held = lease.acquire(
        run_paths(job).root,
        ttl=job.train.lease_ttl_s,
        storage_options=job.train.storage_options,
        say=on_event,
    )
    try:
        return _pretrain(
            job,
            datasets=datasets,
            tags=tags,
            parent_run_id=parent_run_id,
            track=track,
            callbacks=callbacks,
            on_progress=on_progress,
            on_event=on_event,
        )
    finally:
        held.release()


def _pretrain(
    job: JobConfig,
    *,
    datasets: Mapping[str, Any] | None = None,
    tags: Mapping[str, str | None] | None = None,
    parent_run_id: str | None = None,
    track: bool = True,
    callbacks: list[Any] | None = None,
    on_progress: Callable[[Snapshot], None] | None = None,
    on_event: Callable[[str], None] | None = None,
) -> PretrainResult:
    """Run (or resume) a pre-training job and return where everything went.

    Args:
        job: The validated job config.
        address: (of :func:`pretrain`, which joins Ray) Ray cluster address (``auto``,
            ``HOST:6379``; the token as
            :func:`aim_platform.cluster.connect` finds it); None starts an embedded Ray (or
            uses the one this process already joined).
        datasets: ``{"train": ..., "val": ...}`` Ray Datasets with columns ``patches``
            (uint8 (K, P)), ``valid`` (bool), ``epoch`` and ``label`` (int; other columns are
            ignored); None builds them from ``job.data``.
        tags: Extra MLflow tags (e.g. a study name).
        parent_run_id: Nest the MLflow run under this run.
        track: False disables MLflow.
        callbacks: Ray Train callbacks (a Tune trial passes ``TuneReportCallback``).
        on_progress: Called about twice a second, from a thread, with rank 0's latest
            :class:`~aim_platform.train.progress.Snapshot` (a console display).
        on_event: Called with a line to show when something happens outside the steps (a
            lost node, a restart, waiting for CPUs).

    Failed training (a worker or node lost) restarts from the last checkpoint up to
    ``train.max_failures`` times on what fits (:mod:`aim_platform.jobs.restarts`).

    Raises:
        Preempted: SIGTERM to this process or to a worker (:mod:`aim_platform.train.preempt`):
            training stopped at a step boundary, with its checkpoint if it was done within
            ``train.preempt_grace_s``; the MLflow run ended ``KILLED``.
    """
    import ray
    import ray.train
    from ray.exceptions import RayActorError
    from ray.train.torch import TorchConfig, TorchTrainer

    from aim_platform.data.pipeline import execution_options
    from aim_platform.train.entry import train_loop_per_worker

    # Ray is joined (pretrain() connected before taking the lease)
    job = resolve_devices(job)  # train.use_gpu: auto -> a bool, from the cluster's GPUs
    # Built-in sources are ingested into the local cache first (a no-op when up to date).
    probe_url = job.probe.dataset if job.probe else None
    prepare_sources([*(s.url for s in job.data.sources), probe_url], job.data.storage_options)
    tc = job.train
    storage = storage_url(tc.storage_path)
    paths = run_paths(job)
    root = paths.root
    previous = latest_train_state(job)

    uri = run_id = tracker = None
    if track:
        uri = tracking.resolve_tracking_uri(job.tracking.tracking_uri, storage)
        tracker = tracking.Tracker(
            uri,
            background=True,
            buffer_size=job.tracking.buffer_size,
            flush_timeout=job.tracking.flush_timeout_s,
        )
        run_tags = {
            "ray_job_id": ray.get_runtime_context().get_job_id(),
            "storage": root,
            "data": ",".join(s.url for s in job.data.sources),
            **(tags or {}),
        }
        run_id = _reuse_or_start_run(job, tracker, run_tags, parent_run_id)

    if job.model.target == "tokens" and job.model.tokenizer == "auto":
        from aim_platform.jobs.tokenizer import resolve_tokenizer

        # Fit the k-means codebook once into the run's storage (reused when resuming).
        job = job.model_copy(
            update={
                "model": resolve_tokenizer(
                    job.model,
                    job.data,
                    paths.tokenizer,
                    seed=job.seed,
                    storage_options=tc.storage_options,
                )
            }
        )
    own_datasets = datasets is None
    bad = bad_shards.load(job)  # shards that failed before (a resubmitted job counts on)
    shard_rows = functools.partial(rows_of_shard, job.data)
    if datasets is None:
        datasets = default_datasets(job, resume_plan(job, previous), bad.skipped)
    # The board carries rank 0's progress and tracking state (and, at the end, its
    # unwritten writes) to this driver.
    board = create_board(tc.steps) if on_progress is not None or tracker else None
    storage_fs, storage_path = None, storage
    if is_remote(storage):  # pyarrow's S3 client with the endpoint override (e.g. MinIO)
        storage_fs, storage_path = pyarrow_filesystem(storage, tc.storage_options)
    loop_args = LoopArgs(
        job=job.model_dump(mode="json"),
        paths=paths,
        tracking_uri=uri,
        run_id=run_id,
        progress=board,
        resume_from=join(root, previous["checkpoint"]) if previous else None,
    )

    def trainer(workers: int, datasets: Mapping[str, Any]) -> TorchTrainer:
        return trainer_class()(
            train_loop_per_worker,
            train_loop_config=loop_args,
            scaling_config=ray.train.ScalingConfig(
                num_workers=workers,
                use_gpu=tc.use_gpu,
                resources_per_worker={
                    "CPU": tc.cpus_per_worker,
                    **({"GPU": tc.gpus_per_worker} if tc.use_gpu else {}),
                },
                placement_strategy=tc.placement_strategy,
            ),
            run_config=ray.train.RunConfig(
                name=job.name,
                storage_path=storage_path,
                storage_filesystem=storage_fs,
                # Restarts are this function's (see restarts.py): Ray Train's own would refill
                # the surviving nodes and starve the data pipeline.
                failure_config=ray.train.FailureConfig(max_failures=0),
                checkpoint_config=ray.train.CheckpointConfig(num_to_keep=tc.keep_checkpoints),
                callbacks=callbacks,
            ),
            datasets=dict(datasets),
            # Ray Train would reset each dataset's execution options (dropping preserve_order).
            dataset_config=ray.train.DataConfig(execution_options=execution_options(job.data)),
            torch_config=TorchConfig(backend="nccl" if tc.use_gpu else "gloo"),
        )

    result = PretrainResult(
        name=job.name,
        storage=root,
        run_id=run_id,
        tracking_uri=uri,
        flush_timeout=job.tracking.flush_timeout_s,
    )
    say = on_event or (lambda text: None)
    workers, restarted = tc.num_workers, 0
    # SIGTERM from here on: a checkpoint at the next step boundary, then stop "preempted"
    preemption = preempt.DriverPreemption(tc.preempt_grace_s, say)
    preemption.start()
    try:
        while True:
            if preemption.active:  # SIGTERM between two trainings: nothing new to save
                raise preempt.GaveUp("before training started")
            nodes = set(restarts.alive_node_cpus())
            if restarted and board is not None and read_board(board) is None:  # on a lost node
                board = create_board(tc.steps)
                loop_args = dataclasses.replace(loop_args, progress=board)
            stop_board = preempt.create_stop_board()  # the driver's SIGTERM to rank 0
            preemption.attach(stop_board)
            loop_args = dataclasses.replace(loop_args, stop_board=stop_board)
            try:
                with _polling(board, on_progress):
                    fit = trainer(workers, datasets).fit()
                break
            except (ray.train.TrainingFailedError, RayActorError) as exc:
                if preemption.active:  # no restart: a signalled worker died before its save
                    reason = f"training failed first: {restarts.failure_reason(exc)}"
                    raise preempt.GaveUp(reason) from exc
                if tracker and run_id:  # the failed rank 0's queue: in MLflow before a redo
                    tracker.enqueue(take_handover(board).writes)
                    tracker.flush()
                if own_datasets and bad_shards.on_failure(job, exc, bad, shard_rows, say):
                    previous = latest_train_state(job)  # a bad shard: its own budget
                    resume = join(root, previous["checkpoint"]) if previous else None
                    loop_args = dataclasses.replace(loop_args, resume_from=resume)
                    datasets = default_datasets(job, resume_plan(job, previous), bad.skipped)
                    record_skipped(tracker, run_id, bad, shard_rows)
                    continue
                if tc.max_failures != -1 and restarted >= tc.max_failures:
                    raise
                restarted += 1
                snap = (read_board(board) or Snapshot()) if board is not None else Snapshot()
                at_step = snap.step if board is not None else None
                if snap.hung:  # a rank's watchdog ended it (train/watchdog.py)
                    h = snap.hung
                    say(
                        f"rank {h['rank']} on node {h['node']} made no step for "
                        f"{h['seconds']:g} s after step {h['step']}, "
                        f"{h['where']} (train.step_timeout_s): ended it"
                    )
                previous = latest_train_state(job)
                workers = restarts.restart(
                    job,
                    exc,
                    nodes=nodes,
                    count=restarted,
                    at_step=at_step,
                    from_step=previous["step"] if previous else 0,
                    say=say,
                    tracker=tracker,
                    run_id=run_id,
                )
                resume = join(root, previous["checkpoint"]) if previous else None
                loop_args = dataclasses.replace(loop_args, resume_from=resume)
                if own_datasets:
                    datasets = default_datasets(job, resume_plan(job, previous), bad.skipped)
    except KeyboardInterrupt as exc:  # preempt.GaveUp (as ray.get passes it on), or Ctrl+C
        if not preemption.gave_up and not isinstance(exc, preempt.GaveUp):
            raise
        why = preemption.gave_up or str(exc)  # SIGTERM, and no checkpoint of the step reached
        raise _preempted(job, preemption, result, tracker, run_id, board, why) from None
    except Exception:  # a failed fit still closes the MLflow run, then re-raises
        if tracker and run_id:
            _end_tracking(tracker, run_id, board, result, "FAILED")
        raise
    finally:
        preemption.close()
    result.metrics = dict(fit.metrics or {})
    result.steps = int(result.metrics.get("step", 0))
    result.checkpoint = fit.checkpoint.path if fit.checkpoint else None
    if "saved_step" in preemption.refresh():  # SIGTERM: stopped after a checkpoint
        raise _preempted(job, preemption, result, tracker, run_id, board)
    result.error = root_cause(fit.error) if fit.error else None  # one line; tracebacks: log
    result.notes += bad_shards.summary(bad)
    final = paths.final_trunk
    fs, path = filesystem(final, tc.storage_options)
    result.final_trunk = final if fs.exists(path) else None
    if tracker and run_id:
        tracker.enqueue(take_handover(board).writes)  # rank 0's last writes go first
        settled = tracker.flush()  # the one wait (tracking.flush_timeout_s) for MLflow
        try:
            log_outputs(tracker, run_id, result)
        except tracking.TrackingUnavailable as exc:
            result.notes.append(f"no per-chunk loss plot: {exc}")
        if job.probe and result.final_trunk and not result.error:
            result.metrics.update(probe_checkpoints(job, result, tracker, paths, say))
        status = "FAILED" if result.error else "FINISHED"
        _end_tracking(tracker, run_id, board, result, status, wait=settled)
    return result


def _end_tracking(
    tracker: tracking.Tracker, run_id: str, board: Any, result: PretrainResult, status: str,
    wait: bool = True,
) -> None:  # fmt: skip
    """Rank 0's leftovers, the run's dropped count and status, one flush within
    ``tracking.flush_timeout_s`` (none when ``wait`` is False: the end already waited that
    long); what MLflow missed goes to the summary and to the metrics a study trial reports."""
    h = take_handover(board)
    tracker.enqueue(h.writes)
    args = (tracker, run_id, result.steps, status)
    result.tracking = tracking.end_run(*args, ranks=h.ranks, replaced=h.replaced, wait=wait)
    result.metrics.update(result.tracking.metrics())


def _preempted(
    job: JobConfig,
    preemption: preempt.DriverPreemption,
    result: PretrainResult,
    tracker: tracking.Tracker | None,
    run_id: str | None,
    board: Any,
    reason: str | None = None,
) -> preempt.Preempted:
    """The end of a preempted run: one console line (where it stopped, whether the checkpoint
    is in, where a run of the same config resumes), the MLflow run ended ``KILLED`` with the
    tags ``preempted=true``, ``preempted_at_step`` and ``preemption`` (the line).

    Args:
        reason: Why there is no checkpoint of the step reached (None: there is one).
    """
    stop = preemption.refresh()
    who = stop.get("who") or "the driver"
    latest = latest_train_state(job)
    again = "run the same config again to " + (
        f"resume from step {latest['step']}" if latest else "start over (no checkpoint yet)"
    )
    if reason is None:
        step = int(stop["saved_step"])
        line = (
            f"preempted (SIGTERM to {who}) at step {step}: checkpoint saved in "
            f"{stop['seconds']:.1f} s; run the same config again to resume from step {step}"
        )
    else:
        reached = (read_board(board) or Snapshot()).step if board is not None else 0
        step = int(stop.get("step", reached))
        if reason.startswith("checkpoint not finished"):
            reason = f"the {reason} (train.preempt_grace_s)"
        line = f"preempted (SIGTERM to {who}) at step {step}: no checkpoint of it ({reason}); "
        line += again
    result.steps = step
    if tracker and run_id:
        tags = {"preempted": "true", "preempted_at_step": str(step), "preemption": line}
        tracker.set_tags(run_id, tags)
        _end_tracking(tracker, run_id, board, result, preempt.MLFLOW_STATUS)
    return preempt.Preempted(line, result)


@contextlib.contextmanager
def _polling(board: Any, on_progress: Callable[[Snapshot], None] | None) -> Iterator[None]:
    """Feed ``on_progress`` from ``board`` in a thread while the block runs."""
    if board is None or on_progress is None:
        yield
        return
    done = threading.Event()

    def poll() -> None:
        while not done.wait(0.5):
            snap = read_board(board)
            if snap is not None:
                on_progress(snap)

    thread = threading.Thread(target=poll, name="aim-progress", daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join(timeout=10)
        snap = read_board(board)
        if snap is not None:
            on_progress(snap)


def _redacted(job: JobConfig) -> JobConfig:
    from aim_platform.security import redact

    return JobConfig.model_validate(redact(job.model_dump(mode="json")))
