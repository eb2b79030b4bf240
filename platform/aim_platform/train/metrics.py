"""Throughput and MFU: the platform's FLOP count, device peaks and a warm-up-aware tracker.

The MFU formula (model FLOPs utilization, PaLM appendix B convention):

    MFU = (images/s x flops_per_image(cfg)) / peak FLOP/s of the devices doing the work

(:func:`job_peak_flops`: the same denominator on every rank, so every rank reports one MFU.)

``flops_per_image`` counts only the model's mathematics for one training image (forward and
backward), never what an implementation adds: activation checkpointing recomputes the forward
(hardware FLOPs go up, model FLOPs do not), and softmax, norms, GELU, the loss and the optimizer
are left out (they are a fraction of a percent at the paper's sizes).
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from aim_platform.config import ModelConfig

PEAK_FLOPS_ENV = "AIM_PEAK_FLOPS"
"""Environment variable that overrides the table of peaks (FLOP/s per device, e.g. 989e12)."""


def matmul_parameters(cfg: ModelConfig) -> int:
    """Weights of every matrix multiply one token goes through, trunk and pixel head.

    Counted: the patch embedding (P x D), per trunk block qkv (3 D^2), output projection (D^2)
    and MLP (2 r D^2); the pixel head's input map (D x W), per head block its MLP (2 r W^2)
    plus, for a transformer head, its attention maps (4 W^2), and its output map (W x P).
    Biases, LayerNorms and the fixed position embedding are not matmul weights.
    """
    d, p = cfg.embed_dim, cfg.patch_dim
    trunk_block = 4 * d * d + 2 * int(d * cfg.mlp_ratio) * d
    n = p * d + cfg.num_blocks * trunk_block
    head = cfg.head
    if head.kind == "none":
        return n + d * p
    w = head.width
    head_block = 2 * int(w * head.mlp_ratio) * w
    if head.kind == "transformer":
        head_block += 4 * w * w
    return n + d * w + head.num_blocks * head_block + w * p


def attention_flops_per_image(cfg: ModelConfig) -> float:
    """FLOPs of the attention score and mixing matmuls for one image, forward + backward.

    Per attention block of width C over K tokens, the forward runs QK^T (2 K^2 C) and AV
    (2 K^2 C); the backward twice that; so 6 x 2 x K^2 x C per block. The full K^2 is counted
    even though prefix-causal and causal attention need only about half of it, as is
    conventional (PaLM, nanoGPT, torchtitan), so MFU stays comparable across masks.
    Trunk blocks have C = D; a transformer pixel head adds its blocks with C = W.
    """
    k = cfg.num_patches
    width_sum = cfg.num_blocks * cfg.embed_dim
    if cfg.head.kind == "transformer":
        width_sum += cfg.head.num_blocks * cfg.head.width
    return 6.0 * 2.0 * k * k * width_sum


def flops_per_image(cfg: ModelConfig) -> float:
    """Training FLOPs (forward + backward) per image: the platform's MFU numerator.

    ``6 x matmul_parameters(cfg) x K + attention_flops_per_image(cfg)``: each matmul weight
    costs 2 FLOPs per token forward and 4 backward (input and weight gradients), for all K
    patches (the head runs on every position, including the last one whose prediction has no
    target). The patch embedding is counted at 6 too although its input needs no gradient
    (an overcount of 2 P D K, under 0.5% at aim-600M).
    """
    return 6.0 * matmul_parameters(cfg) * cfg.num_patches + attention_flops_per_image(cfg)


# Dense (no sparsity) peaks from the vendors' data sheets: (name pattern, bf16/fp16 tensor-core
# FLOP/s, float32 FLOP/s without TF32). The first pattern that matches the device name wins, so
# variants come before their family.
_PEAKS: tuple[tuple[str, float, float], ...] = (
    (r"H100.*PCIe", 756e12, 51e12),
    (r"H100.*NVL", 835e12, 60e12),
    (r"H200.*NVL", 835e12, 60e12),
    (r"GH200", 989e12, 67e12),
    (r"H100", 989e12, 67e12),  # H100 SXM: 989.4 TFLOP/s bf16 dense
    (r"H200", 989e12, 67e12),  # H200 SXM: same chip as H100 SXM, more memory
    (r"B200", 2250e12, 75e12),
    (r"A100", 312e12, 19.5e12),
    (r"L40S", 362e12, 91.6e12),
    (r"\bL4\b", 121e12, 30.3e12),
    (r"V100", 125e12, 15.7e12),  # fp16 only: V100 has no bf16
)


def peak_flops(device_name: str, dtype: torch.dtype, override: float | None = None) -> float | None:
    """Peak dense FLOP/s of one device for matmuls in ``dtype``.

    Args:
        device_name: What :func:`device_name` returns, e.g. ``"NVIDIA H200"``.
        dtype: ``torch.bfloat16``/``torch.float16`` (tensor cores) or ``torch.float32`` (plain
            float32; with TF32 matmuls enabled pass the TF32 peak as ``override``).
        override: Use this value (FLOP/s) instead of the table; else ``$AIM_PEAK_FLOPS`` if set.

    Returns:
        FLOP/s, or None for a device the table does not know (CPUs: measure instead, see
        :func:`measure_matmul_peak`).
    """
    if override is not None:
        return float(override)
    env = os.environ.get(PEAK_FLOPS_ENV)
    if env:
        return float(env)
    for pattern, half, single in _PEAKS:
        if re.search(pattern, device_name):
            return single if dtype == torch.float32 else half
    return None


def device_name(device: torch.device | str) -> str:
    """Human-readable name of a device: the CUDA product name, or the CPU model."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    if device.type == "cpu":
        try:
            with open("/proc/cpuinfo") as f:
                for line in f:
                    if line.startswith("model name"):
                        return f"{line.split(':', 1)[1].strip()} ({torch.get_num_threads()} thr)"
        except OSError:
            pass
        return f"cpu ({torch.get_num_threads()} threads)"
    return str(device)


def synchronize(device: torch.device | str) -> None:
    """Wait for queued work on ``device`` (a no-op on the CPU), before reading a clock."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_matmul_peak(
    device: torch.device | str,
    dtype: torch.dtype,
    n: int = 2048,
    iters: int = 5,
    repeats: int = 3,
    warmup: int = 1,
    clock: Callable[[], float] = time.perf_counter,
) -> float:
    """FLOP/s of square ``n x n`` matmuls measured here and now (best of ``repeats``).

    Each repeat times ``iters`` back-to-back products of the same two random matrices
    (``2 n^3`` FLOPs each). On a shared machine, call it next to what it is compared with.
    ``clock=time.process_time`` gives FLOPs per CPU-second of this process instead (CPUs
    only: a figure that other processes' load hardly moves).
    """
    device = torch.device(device)
    a = torch.randn(n, n, device=device, dtype=dtype)  # (n, n)
    b = torch.randn(n, n, device=device, dtype=dtype)  # (n, n)
    out = torch.empty(n, n, device=device, dtype=dtype)  # (n, n)
    for _ in range(warmup):
        torch.mm(a, b, out=out)
    best = 0.0
    for _ in range(repeats):
        synchronize(device)
        start = clock()
        for _ in range(iters):
            torch.mm(a, b, out=out)
        synchronize(device)
        best = max(best, 2.0 * n**3 * iters / max(clock() - start, 1e-9))
    return best


def job_peak_flops(
    device: torch.device | str,
    dtype: torch.dtype,
    override: float | None = None,
    measure: Callable[[torch.device | str, torch.dtype], float] | None = None,
) -> float:
    """Peak FLOP/s of all ranks of the job together: the MFU denominator, the same on every
    rank (call it on every rank: it is a collective when a process group is up).

    A device the table knows (or ``override``, or ``$AIM_PEAK_FLOPS``): its peak times the
    world size. Otherwise (CPUs) every rank measures its own matmul peak, all of them at the
    same moment (a barrier first), and the job's peak is their sum. Measured one rank at a
    time, each rank would see whatever the others were doing just then (one alone gets the
    whole machine, one beside another's start-up gets a fraction), and a rank whose peak came
    out low reported an MFU above 1 (1.22 on rank 1 beside 0.56 on rank 0).

    Args:
        device: This rank's device.
        dtype: The matmul dtype of training.
        override: FLOP/s of one device, instead of the table (``train.peak_flops``).
        measure: ``(device, dtype) -> FLOP/s`` of one rank (default: a short
            :func:`measure_matmul_peak`).

    Returns:
        FLOP/s of all ranks together.
    """
    distributed = dist.is_available() and dist.is_initialized()
    world = dist.get_world_size() if distributed else 1
    per_device = peak_flops(device_name(device), dtype, override=override)
    if per_device is not None:
        return per_device * world
    if measure is None:

        def measure(d: torch.device | str, t: torch.dtype) -> float:
            return measure_matmul_peak(d, t, n=1024, iters=2, repeats=2)

    if distributed:
        dist.barrier()  # every rank measures while the others do too, as in training
    mine = torch.tensor([measure(device, dtype)], dtype=torch.float64, device=device)
    if distributed:
        dist.all_reduce(mine)
    return float(mine.item())


@dataclass
class Throughput:
    """Images/s, patches/s and MFU of a training run, warm-up steps excluded.

    Call :meth:`update` once per optimizer step with the images that step processed and its
    wall time (synchronize the device before reading the clock). The first ``warmup_steps``
    steps (compilation, allocator growth, first data) are counted in ``steps`` only.

    Attributes:
        flops_per_image: From :func:`flops_per_image`.
        patches_per_image: K.
        peak_flops: Peak FLOP/s of all the devices sharing the work counted by ``update``
            (images are global; :func:`job_peak_flops`); None: MFU is not reported.
        warmup_steps: Leading steps left out of the rates.
    """

    flops_per_image: float
    patches_per_image: int
    peak_flops: float | None = None
    warmup_steps: int = 3
    steps: int = field(default=0, init=False)
    images: int = field(default=0, init=False)
    seconds: float = field(default=0.0, init=False)

    def update(self, images: int, seconds: float) -> None:
        """Record one step: ``images`` processed (all devices) in ``seconds`` of wall time."""
        self.steps += 1
        if self.steps > self.warmup_steps:
            self.images += images
            self.seconds += seconds

    @property
    def images_per_s(self) -> float | None:
        """Images per second over the counted steps (None before any)."""
        return self.images / self.seconds if self.seconds > 0 else None

    @property
    def patches_per_s(self) -> float | None:
        """Patches (tokens) per second over the counted steps."""
        ips = self.images_per_s
        return None if ips is None else ips * self.patches_per_image

    @property
    def flops_per_s(self) -> float | None:
        """Model FLOP/s over the counted steps, all devices together."""
        ips = self.images_per_s
        return None if ips is None else ips * self.flops_per_image

    @property
    def mfu(self) -> float | None:
        """Model FLOPs utilization in [0, 1] (None without a peak or before any counted step)."""
        fps = self.flops_per_s
        if fps is None or not self.peak_flops:
            return None
        return fps / self.peak_flops

    def metrics(self, prefix: str = "train/") -> dict[str, float]:
        """The figures known so far, e.g. ``{"train/images_per_s": ..., "train/mfu": ...}``."""
        values = {
            "images_per_s": self.images_per_s,
            "patches_per_s": self.patches_per_s,
            "mfu": self.mfu,
        }
        return {f"{prefix}{k}": v for k, v in values.items() if v is not None}
