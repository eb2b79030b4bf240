"""The per-worker pre-training loop (runs inside each Ray Train worker).

Linear control flow: :meth:`Trainer.setup` -> restore -> for each batch: accumulate, step,
log, validate, checkpoint. Everything distributed is a collective that every rank reaches
the same number of times (Ray Data's equal split gives every rank the same batch count).
After SIGTERM (to the driver or to a worker) the ranks agree at the next step boundary to
checkpoint that step and stop (:mod:`.preempt`).
"""

from __future__ import annotations

import contextlib
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

from aim_platform.config import JobConfig, dump_config
from aim_platform.data.batches import train_batches
from aim_platform.data.consumed import DATA_STATE, ConsumedLog, DataState
from aim_platform.models.aim import sample_prefix_lengths
from aim_platform.train import checkpoint as ckpt
from aim_platform.train import preempt
from aim_platform.train.paths import RunPaths
from aim_platform.train.run_storage import (
    checkpoint_upload,
    commit_latest,
    local_copy,
    named_checkpoint,
)
from aim_platform.train.sharding import resolve_precision
from aim_platform.train.trainer import Trainer, all_reduce_sum
from aim_platform.train.watchdog import REPORT_TIMEOUT_S, StepWatchdog, maybe_hang

if TYPE_CHECKING:  # the entry module imports this one when a worker runs it
    from aim_platform.train.entry import LoopArgs


def train_loop_per_worker(args: LoopArgs) -> None:
    """The loop of one worker, from :func:`aim_platform.train.entry.train_loop_per_worker`."""
    import ray.train
    import ray.train.torch

    from aim_platform.train.metrics import (
        Throughput,
        flops_per_image,
        job_peak_flops,
        synchronize,
    )

    job = JobConfig.model_validate(args.job)
    tc = job.train
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    if world != tc.num_workers:  # restarted on fewer workers (a lost node): same global batch
        tc = tc.model_copy(update={"num_workers": world})
        job = job.model_copy(update={"train": tc})
    device = ray.train.torch.get_device()
    if device.type == "cpu":
        torch.set_num_threads(max(1, int(tc.cpus_per_worker)))
    precision = resolve_precision(tc.precision, device)

    trainer = Trainer.setup(job, device, precision)
    model = trainer.model
    state = ckpt.TrainState(data_seed=job.seed)
    data_state = DataState()  # every rank's trained rows, merged on rank 0 at checkpoints
    restored = named_checkpoint(args.resume_from, job) or ray.train.get_checkpoint()
    if restored is not None:
        with local_copy(restored) as folder:
            state = trainer.restore(folder)
            data_state = _read_data_state(Path(folder))
    # this rank's trained rows since the last checkpoint
    consumed = ConsumedLog(ordered=job.data.preserve_order and not job.data.local_shuffle_buffer)

    # SIGTERM (a pod deleted, a spot node reclaimed): a checkpoint at the next step boundary
    preempt.install_worker_handler()
    vote = preempt.StepVote(args.stop_board, rank, world, device)
    stop: preempt.Stop | None = None
    board = args.progress if rank == 0 else None  # the driver's display
    if board is not None:
        board.started.remote(state.step)
    logger = None
    logged_through = 0  # the run's last step already in MLflow (a restart redoes steps)
    if rank == 0 and args.run_id and args.tracking_uri:
        from aim_platform.tracking import DROPPED_METRIC, RunLogger

        # rank 0 owns the run: it samples system metrics (CPU, memory, GPU) until the end.
        # Every write waits in a queue drained by a thread: no step ever waits for MLflow.
        logger = RunLogger(
            args.tracking_uri,
            args.run_id,
            system_metrics=True,
            buffer_size=job.tracking.buffer_size,
        )
        if restored is not None:  # a restart (worker failure or job restarted by name)
            logger.log_metrics({"train/resumed_from_step": state.step}, step=state.step)
            logged_through = _logged_through(logger)

    config_yaml = dump_config(job)
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    meter = Throughput(
        flops_per_image=flops_per_image(job.model),
        patches_per_image=job.model.num_patches,
        peak_flops=job_peak_flops(device, dtype, override=tc.peak_flops),  # all ranks, collective
        warmup_steps=tc.warmup_throughput_steps,
    )
    probe_steps = set(job.probe.at_steps) if job.probe else set()
    lo, hi = job.model.prefix_range
    train_shard = ray.train.get_dataset_shard("train")
    val_shard = ray.train.get_dataset_shard("val")
    upload = checkpoint_upload(args.paths, tc.storage_options)

    dropped = 0
    last_val: dict[str, float] = {}
    step_start = window_start = ready = time.perf_counter()
    data_wait = 0.0  # seconds spent waiting for batches since the last report
    batches = train_batches(
        train_shard, job.data, batch_size=tc.micro_batch_size, seed=job.seed, device=device
    )
    watchdog = _watchdog(args.progress, tc.step_timeout_s, rank)  # armed by its first beat
    first_step = state.step  # before this attempt's first step: no rhythm yet (start-up)
    try:
        for batch in batches:
            data_wait += time.perf_counter() - ready
            if state.step >= tc.steps:
                break
            maybe_hang(rank, state.step)  # fault drills only (AIM_FAULT_HANG)
            if state.step > first_step:  # a batch arrived: into the step, batch in hand
                watchdog.beat(state.step, holding_batch=True)
            valid = batch["valid"].bool()
            dropped += int((~valid).sum())
            state.epoch = max(state.epoch, int(batch["epoch"].max()))
            pixels = batch["patches"][valid]  # (B', K, P) uint8, corrupt images dropped
            # Prefix lengths from (seed, step, rank, micro): reproducible, different per rank.
            seed = hash((job.seed, state.step, rank, trainer.micro)) % 2**63
            gen = torch.Generator().manual_seed(seed)
            prefix = sample_prefix_lengths(pixels.shape[0], lo, hi, gen)
            consumed.add(batch)  # trained from here on, decodable or not
            if not trainer.backward(pixels, prefix, gen):  # gen also draws masked-MIM masks
                if state.step > first_step:
                    watchdog.beat(state.step)  # a micro-batch done: reads the next one
                ready = time.perf_counter()
                continue

            done = trainer.step()
            step_loss, grad_norm, lr = done.loss, done.grad_norm, done.lr
            state.step += 1
            synchronize(device)
            watchdog.beat(state.step)
            now = time.perf_counter()
            meter.update(tc.global_batch_size, now - step_start)
            step_start = now
            stop = vote()  # collective: every rank gets the same answer
            if stop is not None and rank == 0 and args.stop_board is not None:
                args.stop_board.stopping.remote(state.step, stop.who())

            last = state.step == tc.steps or stop is not None  # a preempted run stops here too
            do_log = state.step % tc.log_every == 0 or last
            probe_now = state.step in probe_steps  # a trunk to probe: export it, validate here
            do_val = state.step % tc.val_every == 0 or state.step == tc.steps or probe_now
            do_ckpt = state.step % tc.checkpoint_every == 0 or last
            watchdog.pause()  # trunk exports, validation, checkpoints: no step rhythm
            if probe_now:
                _export_trunk(model, job, args.paths.trunk_at(state.step), rank)
            if not (do_log or do_val or do_ckpt):
                if board is not None:
                    board.step.remote(state.step, None, logger.status() if logger else None)
                watchdog.beat(state.step)
                ready = time.perf_counter()
                continue
            window = time.perf_counter() - window_start
            loss_sum, dropped_total = all_reduce_sum([step_loss, float(dropped)], device)
            metrics: dict[str, float] = {
                "train/loss": loss_sum / world,
                "train/lr": lr,
                "train/grad_norm": grad_norm,
                "train/epoch": float(state.epoch),
                "train/workers": float(world),
                "data/dropped_images": dropped_total,
                **meter.metrics(prefix="perf/"),
                # share of wall time spent waiting for data: > ~0.1 means the pipeline is the
                # bottleneck (add decode CPUs), ~0 means the model is
                "perf/data_wait_fraction": data_wait / window if window > 0 else 0.0,
            }
            if do_val:
                val_batches = train_batches(
                    val_shard,
                    job.data,
                    batch_size=tc.micro_batch_size,
                    device=device,
                    drop_last=False,
                )
                last_val = trainer.validate(val_batches)
                metrics.update(last_val)
            if logger is not None and state.step > logged_through:  # redone steps: logged once
                metrics[DROPPED_METRIC] = float(logger.status().dropped)
                logger.log_metrics(metrics, step=state.step)
            if board is not None:
                board.step.remote(state.step, metrics, logger.status() if logger else None)
            # Every report carries the latest validation figures (a scheduler such as ASHA on
            # val/loss needs the metric in each result); MLflow gets them only when measured.
            report = {**last_val, **metrics, "step": state.step}
            if do_ckpt:
                saving = time.perf_counter()
                epochs_done = _merge_consumed(consumed, data_state, rank)  # collective
                if logger is not None:
                    for epoch, rows, distinct in epochs_done:
                        logger.log_metrics(
                            {"data/epoch_rows": rows, "data/epoch_distinct_rows": distinct},
                            step=epoch,
                        )
                with tempfile.TemporaryDirectory() as tmp:
                    trainer.save(Path(tmp), state, config_yaml, rank)
                    if rank == 0:
                        (Path(tmp) / DATA_STATE).write_text(data_state.to_json())
                    ray.train.report(
                        report,
                        checkpoint=ray.train.Checkpoint.from_directory(tmp),
                        checkpoint_dir_name=RunPaths.checkpoint_name(state.step),
                        checkpoint_upload_fn=upload,
                    )
                commit_latest(args.paths, tc.storage_options, state, rank)
                if stop is not None:  # preempted: latest.json names this step; no final trunk
                    if rank == 0 and args.stop_board is not None:
                        args.stop_board.saved.remote(state.step, time.perf_counter() - saving)
                    break
            else:
                ray.train.report(report)
            # logging, validation and saving count neither as step time nor as data waiting
            watchdog.beat(state.step)
            step_start = window_start = ready = time.perf_counter()
            data_wait = 0.0
    except BaseException:  # a peer died, a collective failed: the job restarts
        if logger is not None and board is not None:
            # what rank 0 still holds for MLflow goes to the driver, which writes it before
            # the restart (not lost with this process, redone steps not logged twice); best
            # effort: the process may be ended first
            with contextlib.suppress(Exception):
                _close_logger(logger, board, flush_timeout=0)
        raise
    finally:  # a failed step too: a watchdog left armed would report a rank wrongly
        watchdog.close()

    if stop is None:
        if state.step < tc.steps and rank == 0:
            print(f"data ran out at step {state.step} of {tc.steps}: raise the epochs")
        _export_trunk(model, job, args.paths.final, rank)
    if logger is not None:
        _close_logger(logger, board, job.tracking.flush_timeout_s)


def _watchdog(board: Any, timeout_s: float, rank: int) -> StepWatchdog:
    """This rank's :class:`StepWatchdog`; it tells the driver's progress board (when there is
    one) which rank on which node stopped making steps before it ends the process."""
    import ray

    node = ray.util.get_node_ip_address()
    if board is not None:  # a first call resolves the actor: a report later goes straight out
        with contextlib.suppress(Exception):
            ray.get(board.ping.remote(), timeout=REPORT_TIMEOUT_S)

    def report(what: dict[str, Any]) -> None:
        if board is not None:
            with contextlib.suppress(Exception):  # the process ends either way
                ray.get(
                    board.hung.remote({**what, "rank": rank, "node": node}),
                    timeout=REPORT_TIMEOUT_S,
                )

    return StepWatchdog(timeout_s, report)


def _read_data_state(folder: Path) -> DataState:
    """The checkpoint's record of trained rows (an empty one for checkpoints without it)."""
    path = folder / DATA_STATE
    return DataState.from_json(path.read_text(), str(path)) if path.exists() else DataState()


def _merge_consumed(
    consumed: ConsumedLog, data_state: DataState, rank: int
) -> list[tuple[int, int, int]]:
    """Gather every rank's trained rows since the last checkpoint into rank 0's
    ``data_state`` (collective) and return the epochs that became complete:
    (epoch, rows, distinct ids) each; empty on the other ranks."""
    mine = consumed.take()
    logs = [mine]
    if dist.is_initialized() and dist.get_world_size() > 1:
        logs = [None] * dist.get_world_size()
        dist.all_gather_object(logs, mine)
    if rank != 0:
        return []
    data_state.merge(logs)
    return data_state.newly_complete()


def _logged_through(logger: Any) -> int:
    """The last step whose ``train/loss`` the run holds (0: none, or MLflow does not answer).

    A restart resumes from the last checkpoint, so the steps after it that the failed attempt
    had logged are redone: they are not logged again (``train/resumed_from_step`` says where
    the redo began). Rank 0's writes reach MLflow in order, so every step after this one is
    missing from the run and is logged when redone. MLflow down: every redone step is logged
    (a step twice rather than a step missing).
    """
    from aim_platform.tracking import TrackingUnavailable

    try:
        history = logger.tracker.metric_history(logger.run_id, "train/loss")
    except TrackingUnavailable:
        return 0
    return max((step for step, _ in history), default=0)


def _close_logger(logger: Any, board: Any, flush_timeout: float) -> None:
    """End rank 0's tracking queue without waiting: what is still queued goes to the driver
    (through the board), which writes it within ``flush_timeout`` or says what it could not.
    Without a board, wait here for at most ``flush_timeout`` seconds."""
    if board is None:
        logger.close(timeout=flush_timeout)
        return
    import ray

    status, left = logger.close(timeout=0)
    ray.get(board.hand_over.remote(status, left), timeout=max(60.0, flush_timeout))


def _export_trunk(model: torch.nn.Module, job: JobConfig, final_dir: str | None, rank: int) -> None:
    """Write the consolidated trunk (safetensors) and its config to ``final_dir`` (collective)."""
    trunk = ckpt.full_trunk_state_dict(model)
    if rank != 0 or not final_dir:
        return
    from aim_platform.models.trunk_file import write_trunk

    write_trunk(trunk, job, final_dir)
