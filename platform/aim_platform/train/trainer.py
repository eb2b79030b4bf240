"""The pre-training model's life on a worker, in one place: :meth:`Trainer.setup` (build,
compile, shard), :meth:`Trainer.backward` + :meth:`Trainer.step`, :meth:`Trainer.validate`
and :meth:`Trainer.save` / :meth:`Trainer.restore`. The Ray Train workers (:mod:`.loop`),
``aimctl selfcheck`` and ``aimctl bench step`` all run the same :meth:`Trainer.step`.

A step is: for each micro-batch, ``AIMForPretraining.loss`` (normalization, pattern, prefix
mask, trunk, head, normalized-pixel loss) and its backward (scaled by the accumulation);
then gradient clipping (the true global norm is reported), AdamW, the warm-up + cosine
schedule, and zeroed gradients. Under FSDP2 the gradient all-reduce happens only on the
last micro-batch.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch.profiler import record_function

from aim_platform.config import JobConfig, OptimConfig
from aim_platform.models.aim import AIMForPretraining, sample_prefix_lengths
from aim_platform.models.losses import VAL_CHUNKS, chunk_losses
from aim_platform.train import checkpoint as ckpt
from aim_platform.train.optim import build_optimizer, build_scheduler
from aim_platform.train.sharding import shard_model

#: The name of the clipping + optimizer part of a step in a torch profile.
OPTIMIZER_REGION = "aim::optimizer"
VAL_PREFIX_SEED = 1234  # fixed prefix lengths: validation losses comparable across steps/runs


def all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    """Sum over ranks (the values themselves without a process group)."""
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_initialized():
        dist.all_reduce(t)
    return t.tolist()


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

    @classmethod
    def setup(cls, job: JobConfig, device: torch.device, precision: str) -> Trainer:
        """The job's model, built the same on every rank (seeded), moved to ``device``,
        compiled if asked, sharded with FSDP2 (a no-op without a process group), and its
        optimizer and schedule."""
        # FSDP2 warns that the root returns a view (a Linear's 3-D output); nothing modifies it
        # in place, so the warning is noise on every step.
        warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view")
        tc = job.train
        torch.manual_seed(job.seed)  # identical initialization on every rank
        model = AIMForPretraining(
            job.model,
            activation_checkpointing=tc.activation_checkpointing,
            storage_options=tc.storage_options,  # where a tokens target's codebook is read
        )
        model.to(device)
        if tc.compile:
            model.compile_blocks()
        shard_model(model, precision)
        return cls(model, job.optim, tc.steps, accum=tc.grad_accum_steps)

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

    def validate(self, batches: Iterable[dict[str, torch.Tensor]]) -> dict[str, float]:
        """Validation loss, and loss per chunk of the sequence, over ``batches`` (this rank's
        whole validation shard: ``patches`` (B, K, P) uint8 and ``valid`` (B,) bool each),
        summed over ranks; the prefix lengths are drawn from a fixed seed."""
        model = self.model
        cfg = model.cfg
        lo, hi = cfg.prefix_range
        gen = torch.Generator().manual_seed(VAL_PREFIX_SEED)
        k = cfg.num_patches
        loss_sum = torch.zeros(k, dtype=torch.float64)  # (K,)
        counts = torch.zeros(k, dtype=torch.float64)  # (K,)
        device = next(model.parameters()).device
        model.eval()
        with torch.no_grad():
            for batch in batches:
                pixels = batch["patches"][batch["valid"]]  # (B, K, P) uint8
                if pixels.shape[0] == 0:
                    continue
                prefix = sample_prefix_lengths(pixels.shape[0], lo, hi, gen)
                out = model.loss(pixels, prefix, generator=gen)
                loss_sum += out.per_position.double().cpu()
                counts += out.per_position_count.double().cpu()
        model.train()
        totals = all_reduce_sum(loss_sum.tolist() + counts.tolist(), device)
        loss_sum = torch.tensor(totals[:k])
        counts = torch.tensor(totals[k:])
        metrics = {"val/loss": float(loss_sum.sum() / counts.sum().clamp_min(1))}
        for i, value in enumerate(chunk_losses(loss_sum, counts, VAL_CHUNKS)):
            metrics[f"val/loss_chunk_{i}"] = value
        return metrics

    def app_state(self) -> ckpt.AppState:
        """Model, optimizer and schedule as one DCP ``Stateful``."""
        return ckpt.AppState(self.model, self.optimizer, self.scheduler)

    def save(self, folder: Path, state: ckpt.TrainState, config_yaml: str, rank: int) -> None:
        """A sharded checkpoint of this rank into ``folder`` (every rank calls it)."""
        ckpt.save(folder, self.app_state(), state, config_yaml, rank)

    def restore(self, folder: Path) -> ckpt.TrainState:
        """Load a checkpoint written by :meth:`save`; returns its train state."""
        return ckpt.load(folder, self.app_state())
