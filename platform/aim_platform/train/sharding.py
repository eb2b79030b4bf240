"""FSDP2: ``fully_shard`` per trunk block, per head block, then the root.

The same code runs on CPU with gloo and on GPUs with NCCL. On GPU the default precision is
bf16 parameters with fp32 gradient reductions; on CPUs without fast bf16 (this machine
multiplies bf16 matrices ~300x slower than float32) the default is float32.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

from aim_platform.models.aim import AIMForPretraining


def resolve_precision(
    precision: Literal["auto", "fp32", "bf16"], device: torch.device
) -> Literal["fp32", "bf16"]:
    """``auto`` -> bf16 on CUDA, fp32 elsewhere."""
    if precision == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    return precision


def shard_model(model: AIMForPretraining, precision: Literal["fp32", "bf16"]) -> nn.Module:
    """Wrap ``model`` in place with FSDP2 and return it; without a process group (one
    process on one device, no Ray Train) it is left as it is.

    Each trunk block and each head block is its own FSDP unit (all-gathered just before use,
    freed after), then the root holds the rest (patch embedding, norms, head projections).
    """
    if not torch.distributed.is_initialized():
        return model
    mp = None
    if precision == "bf16":
        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    kwargs = {"mp_policy": mp} if mp is not None else {}
    for block in model.trunk.blocks:
        fully_shard(block, **kwargs)
    for block in model.head.blocks:
        fully_shard(block, **kwargs)
    fully_shard(model, **kwargs)
    return model
