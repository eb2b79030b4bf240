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
