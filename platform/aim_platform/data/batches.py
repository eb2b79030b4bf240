"""The consuming side of the pipeline, in each training worker: Ray Data batches as tensors.

:func:`train_batches` is ``iterator.iter_torch_batches`` with the data section's knobs;
:data:`collate_patches` turns a batch's numeric columns into tensors (strings dropped). The
datasets themselves are built in :mod:`aim_platform.data.pipeline`.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any

import numpy as np
from ray.data.collate_fn import NumpyBatchCollateFn

from aim_platform.config import DataConfig
from aim_platform.data.consumed import COLUMNS as CONSUMED_COLUMNS

if TYPE_CHECKING:
    import torch


class PatchCollate(NumpyBatchCollateFn):
    """``iter_torch_batches`` collate: the numeric columns as tensors (strings dropped).

    The tensors may share the (read-only) memory of Ray's batch: move or convert them
    (``.to(device)``, ``.float()``) rather than writing into them.

    Returns (when called):
        ``patches`` (B, K, P) uint8, ``valid`` (B,) bool, ``label`` (B,) int32 and the
        provenance columns of :mod:`aim_platform.data.consumed` (``epoch``, ``item``,
        ``epoch_items``, ``item_rows`` (B,) int32, ``key`` (B,) int64).
    """

    def __call__(self, batch: Mapping[str, np.ndarray]) -> dict[str, torch.Tensor]:
        import torch

        with warnings.catch_warnings():  # read-only arrays from the object store; no copy
            warnings.simplefilter("ignore", UserWarning)
            return {
                name: torch.as_tensor(np.ascontiguousarray(batch[name]))
                for name in ("patches", "valid", "label", *CONSUMED_COLUMNS)
                if name in batch  # datasets of a caller's own may lack provenance columns
            }


collate_patches = PatchCollate()


def train_batches(
    iterator: Any,
    data: DataConfig,
    *,
    batch_size: int,
    seed: int = 0,
    device: str | None = None,
    drop_last: bool = True,
) -> Iterator[dict[str, torch.Tensor]]:
    """``iterator.iter_torch_batches`` with the data section's knobs applied.

    Args:
        iterator: A ``ray.data.DataIterator`` (``ray.train.get_dataset_shard(...)``) or Dataset.
        data: Gives ``prefetch_batches`` and ``local_shuffle_buffer``.
        batch_size: Rows per batch (before invalid rows are dropped).
        seed: Seed of the local shuffle buffer.
        device: Where tensors go (None: Ray Train's device, or CPU).
        drop_last: Drop the last incomplete batch.
    """
    kwargs: dict[str, Any] = {
        "batch_size": batch_size,
        "prefetch_batches": data.prefetch_batches,
        "collate_fn": collate_patches,
        "drop_last": drop_last,
    }
    if data.local_shuffle_buffer:
        kwargs["local_shuffle_buffer_size"] = data.local_shuffle_buffer
        kwargs["local_shuffle_seed"] = seed
    if device is not None:
        kwargs["device"] = device
    return iterator.iter_torch_batches(**kwargs)
