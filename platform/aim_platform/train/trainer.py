"""The pre-training step, in one place: the Ray Train workers (:mod:`.loop`),
``aimctl selfcheck`` and ``aimctl bench step`` all run :meth:`Trainer.step`.

A step is: for each micro-batch, ``AIMForPretraining.loss`` (normalization, pattern, prefix
mask, trunk, head, normalized-pixel loss) and its backward (scaled by the accumulation);
then gradient clipping (the true global norm is reported), AdamW, the warm-up + cosine
schedule, and zeroed gradients. Under FSDP2 the gradient all-reduce happens only on the
last micro-batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch.profiler import record_function

from aim_platform.config import OptimConfig
from aim_platform.models.aim import AIMForPretraining
from aim_platform.train import checkpoint as ckpt
from aim_platform.train.optim import build_optimizer, build_scheduler

#: The name of the clipping + optimizer part of a step in a torch profile.
OPTIMIZER_REGION = "aim::optimizer"


@dataclass(frozen=True)
class StepResult:
    """One optimizer step: mean loss over its micro-batches, global gradient norm before
    clipping, and the learning rate the step used."""

    loss: float
    grad_norm: float
    lr: float


def clip_and_norm(model: torch.nn.Module, max_norm: float | None) -> float:
    """Clip to ``max_norm`` (if set) and return the true global norm before clipping."""
    norm = torch.nn.utils.clip_grad_norm_(
        model.parameters(), max_norm if max_norm is not None else float("inf")
    )
    full = getattr(norm, "full_tensor", None)  # a DTensor under FSDP2
    return float(full() if full is not None else norm)


class Trainer:
    """Optimizer, schedule and the step of one pre-training model.

    Args:
        model: The (possibly FSDP2-sharded) pre-training model, on its device.
        optim: Learning rate, betas, weight decay, warm-up, clipping.
        total_steps: Length of the cosine schedule.
        accum: Micro-batches per optimizer step (gradient accumulation).
        optimizer: A ready optimizer (``bench step`` compares kinds); None: the platform's
            fused AdamW with no decay on norms and biases.
    """

    def __init__(
        self,
        model: AIMForPretraining,
        optim: OptimConfig,
        total_steps: int,
        *,
        accum: int = 1,
        optimizer: torch.optim.Optimizer | None = None,
    ) -> None:
        self.model = model
        self.optimizer = optimizer if optimizer is not None else build_optimizer(model, optim)
        self.scheduler = build_scheduler(self.optimizer, optim, total_steps)
        self.grad_clip = optim.grad_clip
        self.accum = accum
        self._micro = 0
        self._loss = 0.0

    @property
    def micro(self) -> int:
        """Micro-batches done in the current step (0 right after :meth:`step`)."""
        return self._micro

    def backward(
        self,
        pixels: torch.Tensor,
        prefix: torch.Tensor,
        generator: torch.Generator | None = None,
    ) -> bool:
        """Forward and backward of one micro-batch.

        Args:
            pixels: (B, K, P) uint8 patches in raster order, on the model's device.
            prefix: (B,) prefix lengths.
            generator: Draws what the objective samples (random patterns, masks).

        Returns:
            True when this was the last micro-batch of the step (call :meth:`step`).
        """
        last = self._micro == self.accum - 1
        if hasattr(self.model, "set_requires_gradient_sync"):  # FSDP2: reduce once per step
            self.model.set_requires_gradient_sync(last)
        out = self.model.loss(pixels, prefix, generator=generator)
        (out.loss / self.accum).backward()
        self._loss += float(out.loss.detach()) / self.accum
        self._micro += 1
        return last

    def step(self) -> StepResult:
        """Clip, AdamW, schedule, zero the gradients; after :meth:`backward` said so."""
        with record_function(OPTIMIZER_REGION):
            grad_norm = clip_and_norm(self.model, self.grad_clip)
            lr = float(self.optimizer.param_groups[0]["lr"])
            self.optimizer.step()
            self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
        result = StepResult(self._loss, grad_norm, lr)
        self._micro, self._loss = 0, 0.0
        return result

    def train_step(
        self,
        pixels: torch.Tensor,
        prefix: torch.Tensor,
        generator: torch.Generator | None = None,
    ) -> StepResult:
        """A whole step on one batch (no accumulation)."""
        self.backward(pixels, prefix, generator)
        return self.step()

    def app_state(self) -> ckpt.AppState:
        """Model, optimizer and schedule as one DCP ``Stateful``."""
        return ckpt.AppState(self.model, self.optimizer, self.scheduler)

    def save(self, folder: Path, state: ckpt.TrainState, config_yaml: str, rank: int) -> None:
        """A sharded checkpoint of this rank into ``folder`` (every rank calls it)."""
        ckpt.save(folder, self.app_state(), state, config_yaml, rank)

    def restore(self, folder: Path) -> ckpt.TrainState:
        """Load a checkpoint written by :meth:`save`; returns its train state."""
        return ckpt.load(folder, self.app_state())
