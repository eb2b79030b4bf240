"""Targets and the next-patch regression loss (paper Section 3, eq. 2)."""

from __future__ import annotations

from dataclasses import dataclass

import torch


def normalize_patches(patches: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Normalize each patch by its own mean and (population) variance.

    Args:
        patches: (B, K, P) float.

    Returns:
        (B, K, P): per patch, mean 0 and variance var/(var+eps) ~ 1.
    """
    mean = patches.mean(dim=-1, keepdim=True)  # (B, K, 1)
    var = patches.var(dim=-1, keepdim=True, unbiased=False)  # (B, K, 1)
    return (patches - mean) / torch.sqrt(var + eps)


@dataclass
class LossOutput:
    """Result of :func:`next_patch_loss`.

    Attributes:
        loss: Scalar mean squared error over every (sample, target patch) after the prefix.
        per_position: (K,) summed squared error per target position t (0 for t=0), so that
            loss per chunk of the sequence (paper Fig. 7) can be aggregated across batches.
        per_position_count: (K,) number of (sample, patch) pairs behind ``per_position``.
    """

    loss: torch.Tensor
    per_position: torch.Tensor
    per_position_count: torch.Tensor


def next_patch_loss(
    pred: torch.Tensor, target: torch.Tensor, prefix_len: torch.Tensor | None
) -> LossOutput:
    """MSE of "position k predicts patch k+1", on target patches after the prefix only.

    Args:
        pred: (B, K, P) predictions; pred[:, k] is the prediction of target[:, k+1].
        target: (B, K, P) targets in sequence order (already normalized if wanted).
        prefix_len: (B,) prefix lengths S; targets t < S carry no loss. None: S = 1 for every
            sample (plain causal: every patch but the first is predicted).

    Returns:
        :class:`LossOutput`.
    """
    b, k, _ = target.shape
    err = (pred[:, :-1].float() - target[:, 1:].float()).pow(2).mean(dim=-1)  # (B, K-1)
    t = torch.arange(1, k, device=target.device)  # target index of each prediction
    if prefix_len is None:
        valid = torch.ones(b, k - 1, dtype=torch.bool, device=target.device)
    else:
        valid = t.view(1, -1) >= prefix_len.view(-1, 1)  # (B, K-1)
    weight = valid.to(err.dtype)
    count = weight.sum()
    loss = (err * weight).sum() / count.clamp_min(1.0)
    zero = err.new_zeros(1)
    per_position = torch.cat([zero, (err * weight).sum(dim=0).detach()])  # (K,)
    per_position_count = torch.cat([zero, weight.sum(dim=0)])  # (K,)
    return LossOutput(loss, per_position, per_position_count)


def chunk_losses(per_position: torch.Tensor, counts: torch.Tensor, chunks: int = 8) -> list[float]:
    """Mean loss over each of ``chunks`` equal slices of the sequence (paper Fig. 7).

    Chunks with no counted target (e.g. inside every prefix) come out as NaN.
    """
    sums = torch.tensor_split(per_position.double().cpu(), chunks)
    nums = torch.tensor_split(counts.double().cpu(), chunks)
    return [
        float(s.sum() / n.sum()) if n.sum() > 0 else float("nan")
        for s, n in zip(sums, nums, strict=True)
    ]
