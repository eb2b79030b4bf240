"""Targets and losses: next-patch regression (paper Section 3, eq. 2), next-token
cross-entropy (Table 3a) and the masked-image-modelling losses (Table 5)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


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
    """Result of every loss here (:func:`next_patch_loss` and the others).

    Attributes:
        loss: Scalar mean error (squared error, or cross-entropy for tokens) over every
            (sample, target patch) that carries loss: after the prefix, or masked.
        per_position: (K,) summed error per target position t (0 where nothing is counted,
            e.g. t=0 for next-patch losses), so that loss per chunk of the sequence (paper
            Fig. 7) can be aggregated across batches.
        per_position_count: (K,) number of (sample, patch) pairs behind ``per_position``.
    """

    loss: torch.Tensor
    per_position: torch.Tensor
    per_position_count: torch.Tensor


def _shifted_valid(
    b: int, k: int, prefix_len: torch.Tensor | None, device: torch.device
) -> torch.Tensor:
    """Which next-patch predictions carry loss: target t = k+1 >= S. (B, K-1) bool."""
    if prefix_len is None:
        return torch.ones(b, k - 1, dtype=torch.bool, device=device)
    t = torch.arange(1, k, device=device)  # target index of each prediction
    return t.view(1, -1) >= prefix_len.view(-1, 1)  # (B, K-1)


def _reduce(err: torch.Tensor, valid: torch.Tensor, shift: int) -> LossOutput:
    """Mean of ``err`` over ``valid`` entries, and its per-target-position sums and counts.

    Args:
        err: (B, N) error of each prediction (N = K - shift).
        valid: (B, N) bool, which predictions count.
        shift: Target position of prediction n is n + shift (1: next patch, 0: same patch);
            the first ``shift`` target positions get a zero sum and count.
    """
    weight = valid.to(err.dtype)  # (B, N)
    count = weight.sum()
    loss = (err * weight).sum() / count.clamp_min(1.0)
    zero = err.new_zeros(shift)
    per_position = torch.cat([zero, (err * weight).sum(dim=0).detach()])  # (K,)
    per_position_count = torch.cat([zero, weight.sum(dim=0)])  # (K,)
    return LossOutput(loss, per_position, per_position_count)


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
    return _reduce(err, _shifted_valid(b, k, prefix_len, target.device), shift=1)


def next_token_loss(
    logits: torch.Tensor, token_ids: torch.Tensor, prefix_len: torch.Tensor | None
) -> LossOutput:
    """Cross-entropy of "position k predicts the token of patch k+1" (discrete target, Table 3a).

    Args:
        logits: (B, K, V) scores over the codebook; logits[:, k] predicts token_ids[:, k+1].
        token_ids: (B, K) int64 codebook index of each patch, in sequence order.
        prefix_len: (B,) prefix lengths S; targets t < S carry no loss (None: S = 1).

    Returns:
        :class:`LossOutput` with per-position sums of cross-entropy (nats).
    """
    b, k = token_ids.shape
    scores = logits[:, :-1].float().transpose(1, 2)  # (B, V, K-1)
    err = F.cross_entropy(scores, token_ids[:, 1:], reduction="none")  # (B, K-1)
    return _reduce(err, _shifted_valid(b, k, prefix_len, token_ids.device), shift=1)


def masked_patch_loss(pred: torch.Tensor, target: torch.Tensor, masked: torch.Tensor) -> LossOutput:
    """MSE of "position k predicts its own patch", on masked patches only (Table 5).

    Args:
        pred: (B, K, P) predictions; pred[:, k] is the prediction of target[:, k].
        target: (B, K, P) targets.
        masked: (B, K) bool, True where the patch was replaced by the mask token.

    Returns:
        :class:`LossOutput`; ``per_position`` is indexed by the patch's own position.
    """
    err = (pred.float() - target.float()).pow(2).mean(dim=-1)  # (B, K)
    return _reduce(err, masked, shift=0)


def masked_token_loss(
    logits: torch.Tensor, token_ids: torch.Tensor, masked: torch.Tensor
) -> LossOutput:
    """Cross-entropy of each masked patch's own token (masked objective with target tokens).

    Args:
        logits: (B, K, V) scores over the codebook, logits[:, k] for patch k.
        token_ids: (B, K) int64 codebook index of each patch.
        masked: (B, K) bool, True where the patch was replaced by the mask token.
    """
    err = F.cross_entropy(logits.float().transpose(1, 2), token_ids, reduction="none")  # (B, K)
    return _reduce(err, masked, shift=0)


# The validation loss is also reported per chunk of the patch sequence (paper Fig. 7): this many
# equal chunks, ``val/loss_chunk_0`` ... ``val/loss_chunk_{VAL_CHUNKS - 1}``.
VAL_CHUNKS = 8


def chunk_losses(
    per_position: torch.Tensor, counts: torch.Tensor, chunks: int = VAL_CHUNKS
) -> list[float]:
    """Mean loss over each of ``chunks`` equal slices of the sequence (paper Fig. 7).

    Chunks with no counted target (e.g. inside every prefix) come out as NaN.
    """
    sums = torch.tensor_split(per_position.double().cpu(), chunks)
    nums = torch.tensor_split(counts.double().cpu(), chunks)
    return [
        float(s.sum() / n.sum()) if n.sum() > 0 else float("nan")
        for s, n in zip(sums, nums, strict=True)
    ]
