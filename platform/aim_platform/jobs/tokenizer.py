"""The tokenizer fit job (Table 3a's discrete-token target): sample training patches through
the Ray Data pipeline, fit the k-means codebook (:mod:`aim_platform.models.tokenizer`), save it;
and ``tokenizer: auto`` for pre-training runs."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from aim_platform.config import DataConfig, ModelConfig
from aim_platform.errors import DataError
from aim_platform.models.tokenizer import AUTO, fit_tokenizer_from_arrays, load_codebook


def sample_patches(
    data: DataConfig, model: ModelConfig, max_patches: int, seed: int = 0
) -> tuple[np.ndarray, int]:
    """Up to ``max_patches`` uint8 patches from the training pipeline (augmented crops).

    Reads whole images from one epoch of :func:`build_train_dataset` until ``max_patches``
    patches are collected, then draws ``max_patches`` of them at random (seeded). Needs Ray.

    Returns:
        ``(patches (N, P) uint8, images read)``.
    """
    from aim_platform.data.pipeline import build_train_dataset

    ds = build_train_dataset(data, model, seed=seed, epochs=1)
    chunks, total, images = [], 0, 0
    for batch in ds.iter_batches(batch_size=64, batch_format="numpy"):
        patches = np.stack(list(batch["patches"])) if batch["patches"].dtype == object else None
        patches = batch["patches"] if patches is None else patches  # (b, K, P)
        patches = patches[np.asarray(batch["valid"], dtype=bool)]  # drop failed decodes
        images += patches.shape[0]
        chunks.append(patches.reshape(-1, patches.shape[-1]))  # (b*K, P)
        total += chunks[-1].shape[0]
        if total >= max_patches:
            break
    if not chunks:
        raise DataError("sources: no training images to fit a tokenizer on")
    flat = np.concatenate(chunks)  # (N', P)
    if flat.shape[0] > max_patches:
        gen = torch.Generator().manual_seed(seed)
        keep = torch.randperm(flat.shape[0], generator=gen)[:max_patches].numpy()
        flat = flat[np.sort(keep)]
    return np.ascontiguousarray(flat), images


def fit_tokenizer(
    data: DataConfig,
    model: ModelConfig,
    out_url: str,
    num_tokens: int = 512,
    max_patches: int = 100_000,
    seed: int = 0,
    iters: int = 20,
    storage_options: dict[str, Any] | None = None,
) -> str:
    """The offline job: sample training patches through the data pipeline, fit, save.

    Args:
        data: Data section (sources and augmentation, as in pre-training).
        model: Gives image size, patch size and ``target_eps``.
        out_url: Codebook file to write (local path or fsspec URL).
        num_tokens: V.
        max_patches: Patch vectors k-means runs on.
        seed: Seed of the pipeline's crops, the subsample and k-means++.
        iters: Maximum Lloyd iterations.
        storage_options: fsspec options for ``out_url`` (None: the data section's).

    Returns:
        ``out_url``.
    """
    from aim_platform.jobs.ingest import prepare_sources

    prepare_sources([src.url for src in data.sources], data.storage_options)
    patches, images = sample_patches(data, model, max_patches, seed)
    tok = fit_tokenizer_from_arrays(patches, num_tokens, iters, seed, model.target_eps)
    tok.fitted_on.update(
        sources=[s.url for s in data.sources],
        images=images,
        img_size=model.img_size,
        patch_size=model.patch_size,
    )
    opts = data.storage_options if storage_options is None else storage_options
    return tok.save(out_url, opts)


def resolve_tokenizer(
    model: ModelConfig,
    data: DataConfig,
    out_url: str,
    *,
    seed: int = 0,
    max_patches: int = 100_000,
    storage_options: dict[str, Any] | None = None,
) -> ModelConfig:
    """The model config with ``tokenizer: auto`` replaced by a fitted codebook at ``out_url``.

    For the pre-training job: with ``target: tokens`` and ``tokenizer: auto``, reuse the codebook
    already at ``out_url`` when it matches ``num_tokens`` and the patch size (a resumed run),
    else fit one with :func:`fit_tokenizer` (needs Ray) and write it there. Any other config
    comes back unchanged.
    """
    if model.target != "tokens" or model.tokenizer != AUTO:
        return model
    from aim_platform.storage import filesystem

    opts = data.storage_options if storage_options is None else storage_options
    fs, path = filesystem(out_url, opts)
    reuse = False
    if fs.exists(path):
        try:
            load_codebook(out_url, model.num_tokens, model.patch_dim, opts)
            reuse = True
        except ValueError:
            reuse = False
    if not reuse:
        fit_tokenizer(data, model, out_url, model.num_tokens, max_patches, seed, 20, opts)
    return model.model_copy(update={"tokenizer": out_url})
