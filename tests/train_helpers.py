"""In-memory Ray datasets of real digits for training tests (no decode, so tests stay fast)."""

from __future__ import annotations

from typing import Any

import numpy as np

from aim_platform.config import JobConfig, build_config
from aim_platform.selfcheck import digits_patches


def tiny_job(storage: str, name: str, *overrides: str) -> JobConfig:
    """A small pre-training job on aim-tiny shapes (width 64, 2 blocks, 1 head block)."""
    base = [
        f"name={name}",
        f"train.storage_path={storage}",
        "model.embed_dim=64",
        "model.num_blocks=2",
        "model.head.num_blocks=1",
        "model.head.width=64",
        "train.global_batch_size=16",
        "train.micro_batch_size=8",
        "train.log_every=1",
        "optim.warmup_steps=2",
        "optim.lr=2e-3",
    ]
    return build_config(JobConfig, {}, [*base, *overrides])


def digits_datasets(
    job: JobConfig, n_train: int = 64, n_val: int = 32, epochs: int = 4
) -> dict[str, Any]:
    """``{"train": ..., "val": ...}`` with the pipeline's columns (patches, valid, epoch)."""
    import ray

    patches = digits_patches(job.model.img_size, job.model.patch_size).numpy()  # (N, K, P)
    rng = np.random.default_rng(job.seed)

    def rows(index: np.ndarray, epochs: int) -> list[dict[str, Any]]:
        out = []
        for e in range(epochs):
            for i in rng.permutation(index):
                out.append({"patches": patches[i], "valid": True, "epoch": e, "label": -1})
        return out

    train_idx = np.arange(n_train)
    val_idx = np.arange(len(patches) - n_val, len(patches))
    return {
        "train": ray.data.from_items(rows(train_idx, epochs)),
        "val": ray.data.from_items(rows(val_idx, 1)),
    }


def fsdp_step_rank(rank: int, world: int, port: int, job: JobConfig, out: str) -> None:
    """One rank of a ``world``-rank FSDP2 group (gloo, CPU) taking one optimizer step on its
    equal share of the first ``global_batch_size`` digits (what Ray Train's workers run:
    :meth:`Trainer.setup` and :meth:`Trainer.train_step`). Rank 0 writes the mean loss, the
    global grad norm and every full parameter to ``out`` (``torch.save``).
    Run by ``torch.multiprocessing.spawn`` (the first argument is the rank)."""
    import torch
    import torch.distributed as dist

    from aim_platform.train.trainer import Trainer, all_reduce_sum

    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world
    )
    try:
        torch.set_num_threads(1)
        trainer = Trainer.setup(job, torch.device("cpu"), "fp32")
        pixels = fsdp_batch(job)  # (G, K, P) uint8
        share = pixels.shape[0] // world
        mine = pixels[rank * share : (rank + 1) * share]  # (G / world, K, P)
        prefix = torch.full((share,), job.model.prefix_range[0])  # causal: prefix unused
        done = trainer.train_step(mine, prefix)
        (loss,) = all_reduce_sum([done.loss], torch.device("cpu"))
        params = {n: p.full_tensor() for n, p in trainer.model.named_parameters()}  # collective
        if rank == 0:
            torch.save({"loss": loss / world, "grad_norm": done.grad_norm, "params": params}, out)
    finally:
        dist.destroy_process_group()


def fsdp_batch(job: JobConfig) -> Any:
    """The global batch of the FSDP comparison: the first ``global_batch_size`` digits as
    (G, K, P) uint8 patches."""
    return digits_patches(job.model.img_size, job.model.patch_size)[: job.train.global_batch_size]
