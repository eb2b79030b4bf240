"""``aimctl selfcheck``: ml-aim parity, then a short single-process pre-training on digits.

Runs without Ray in a minute on a laptop CPU: proves the model computes what the official
AIM v1 code computes and that the pre-training objective learns on real images.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources

import torch

from aim_platform.config import ModelConfig, OptimConfig
from aim_platform.models.aim import AIMForPretraining, sample_prefix_lengths
from aim_platform.models.interop import load_ml_aim_v1, read_weights
from aim_platform.models.layers import patchify
from aim_platform.train.trainer import Trainer


@dataclass
class ParityResult:
    block_max_abs_diff: float
    logits_max_abs_diff: float

    @property
    def ok(self) -> bool:
        return self.block_max_abs_diff < 1e-5 and self.logits_max_abs_diff < 1e-4


def reference_path() -> str:
    """The tensors produced by the official AIM v1 code (shipped with the package)."""
    return str(resources.files("aim_platform") / "assets" / "ml_aim_v1_tiny.pt")


def ml_aim_parity(path: str | None = None) -> ParityResult:
    """Compare our converted model with the official outputs stored in the reference file."""
    ref = read_weights(path or reference_path())  # weights only: tensors and plain values
    model = load_ml_aim_v1(ref["state_dict"], **ref["ml_aim_config"])
    with torch.no_grad():
        patches = patchify(ref["images"], ref["ml_aim_config"]["patch_size"])  # (B, K, P)
        _, blocks = model.trunk(patches)
        block_diff = (torch.stack(blocks) - ref["block_features"]).abs().max().item()
        logit_diff = (model(ref["images"]) - ref["logits"]).abs().max().item()
    return ParityResult(block_diff, logit_diff)


def digits_patches(img_size: int, patch_size: int) -> torch.Tensor:
    """scikit-learn's real handwritten digits as uint8 RGB patch sequences (N, K, P)."""
    from sklearn.datasets import load_digits

    digits = torch.from_numpy(load_digits().images).float()  # (N, 8, 8), values 0..16
    x = (digits / 16.0 * 255.0).unsqueeze(1)  # (N, 1, 8, 8)
    x = torch.nn.functional.interpolate(x, size=(img_size, img_size), mode="bicubic")
    x = x.clamp(0, 255).round().to(torch.uint8).expand(-1, 3, -1, -1)  # (N, 3, S, S)
    return patchify(x, patch_size)  # (N, K, P) uint8


def pretrain_steps(
    cfg: ModelConfig,
    steps: int = 100,
    batch_size: int = 64,
    lr: float = 1e-3,
    seed: int = 0,
    log: Callable[[int, float], None] | None = None,
) -> list[float]:
    """Single-process pre-training on digits with the platform's :class:`Trainer` step;
    returns the loss of every step."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    data = digits_patches(cfg.img_size, cfg.patch_size)  # (N, K, P) uint8
    model = AIMForPretraining(cfg)
    # the platform's step (fused AdamW, clipping, warm-up + cosine), as the workers run it
    trainer = Trainer(model, OptimConfig(lr=lr, warmup_steps=max(1, steps // 20)), steps)
    lo, hi = cfg.prefix_range
    losses = []
    for step in range(steps):
        idx = torch.randint(0, data.shape[0], (batch_size,), generator=gen)
        batch = data[idx]  # (B, K, P) uint8
        if torch.rand((), generator=gen) < 0.5:  # horizontal flip of the whole batch
            g, p = cfg.grid_size, cfg.patch_size
            imgs = batch.reshape(batch_size, g, g, p, p, 3).flip(2, 4)
            batch = imgs.reshape(batch_size, g * g, -1)
        prefix = sample_prefix_lengths(batch_size, lo, hi, gen)
        losses.append(trainer.train_step(batch, prefix).loss)
        if log is not None:
            log(step, losses[-1])
    return losses


def run(steps: int = 100, echo: Callable[[str], None] = print) -> bool:
    """The whole self-check; returns True when parity holds and the loss fell."""
    parity = ml_aim_parity()
    echo(
        f"ml-aim parity: block outputs max |diff| {parity.block_max_abs_diff:.2e} (< 1e-5), "
        f"logits {parity.logits_max_abs_diff:.2e} (< 1e-4): {'OK' if parity.ok else 'FAILED'}"
    )
    cfg = ModelConfig(size="aim-tiny")
    echo(
        f"pre-training aim-tiny ({cfg.num_patches} patches of {cfg.patch_size}px) "
        f"on scikit-learn digits for {steps} steps"
    )
    start = time.perf_counter()

    def log(step: int, loss: float) -> None:
        if step % 10 == 0 or step == steps - 1:
            echo(f"  step {step:4d}  loss {loss:.4f}")

    losses = pretrain_steps(cfg, steps=steps, log=log)
    first, last = sum(losses[:10]) / 10, sum(losses[-10:]) / 10
    fell = last < 0.8 * first
    echo(
        f"loss {first:.4f} -> {last:.4f} (mean of first/last 10 steps) in "
        f"{time.perf_counter() - start:.0f}s: {'OK' if fell else 'did not fall'}"
    )
    return parity.ok and fell
