"""``aimctl bench step``: the platform's training step against a matmul peak, side by side.

One step is exactly what a training worker runs: uint8 patches already on the device, a fresh
prefix length per sample, ``AIMForPretraining.loss`` (normalization, pattern, mask, trunk,
pixel head, normalized-pixel MSE), backward, gradient clipping and an AdamW step. Rounds
alternate a matmul-peak measurement with timed steps, so that on a shared machine both see the
same load; the utilization is model FLOP/s (the MFU formula of
:mod:`aim_platform.train.metrics`) over the matmul peak of the same round.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch
from torch.profiler import record_function

from aim_platform.config import ConfigError, ModelConfig, OptimConfig, build_config
from aim_platform.models import AIMForPretraining, sample_prefix_lengths
from aim_platform.train.metrics import (
    device_name,
    flops_per_image,
    measure_matmul_peak,
    peak_flops,
    synchronize,
)
from aim_platform.train.trainer import OPTIMIZER_REGION, Trainer

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def resolve_device(device: str) -> torch.device:
    """``auto`` -> the first CUDA device if there is one, else the CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def bench_model_config(
    size: str,
    blocks: int | None,
    head_blocks: int | None,
    attention_backend: str = "sdpa",
) -> ModelConfig:
    """A registered size cut to ``blocks`` trunk and ``head_blocks`` head blocks (None: all)."""
    data: dict = {"size": size, "attention_backend": attention_backend}
    if blocks is not None:
        data["num_blocks"] = blocks
    if head_blocks is not None:
        data["head"] = {"num_blocks": head_blocks}
    return build_config(ModelConfig, data, [])


def build_optimizer(model: torch.nn.Module, kind: str, cfg: OptimConfig) -> torch.optim.Optimizer:
    """``platform``: the training loop's own optimizer; ``fused``: the same AdamW, fused kernel."""
    from aim_platform.train import optim

    if kind == "platform":
        return optim.build_optimizer(model, cfg)
    if kind == "fused":
        groups = optim.param_groups(model, cfg.weight_decay)
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), fused=True)
    raise ConfigError(f"unknown optimizer {kind!r}; known: platform, fused")


@dataclass
class StepBenchResult:
    """Figures of one ``bench step`` run; lists hold one value per round.

    Attributes:
        label: Short description of the configuration (size, blocks, dtype, switches).
        device_name: What :func:`device_name` says.
        batch: Images per step.
        flops_per_step: Model FLOPs of one step (``flops_per_image x batch``).
        step_s: Seconds per step.
        optimizer_s: Seconds of that spent in gradient clipping and the optimizer step.
        matmul_peak: Measured matmul FLOP/s.
        table_peak: The device's peak from the table (None: unknown, e.g. a CPU).
        max_memory_gb: Peak device memory allocated (CUDA only).
        cpu_utilization: CPU only, per round: model FLOPs per CPU-second of this process over
            matmul FLOPs per CPU-second. Wall-clock figures swing when other processes share
            the cores; CPU time counts only the time this process ran, so this ratio is the
            steadier cross-check (it flatters code that leaves cores idle, e.g. serial Python).
        peak_spread: Per round, how much the matmul peaks before and after the steps differ
            (``|after - before| / max``): large when the machine's load changed meanwhile.
        breakdown: CPU only: share of one profiled step's wall time per kind of operator
            (``matmul``, ``attention``, ``optimizer``, ``other``). Matmuls and the rest
            alternate every few milliseconds, so unlike the rounds this share is immune to
            other processes' load changing over seconds.
    """

    label: str
    device_name: str
    batch: int
    flops_per_step: float
    step_s: list[float] = field(default_factory=list)
    optimizer_s: list[float] = field(default_factory=list)
    matmul_peak: list[float] = field(default_factory=list)
    table_peak: float | None = None
    max_memory_gb: float | None = None
    breakdown: dict[str, float] = field(default_factory=dict)
    cpu_utilization: list[float] = field(default_factory=list)
    peak_spread: list[float] = field(default_factory=list)

    @property
    def step_time(self) -> float:
        """Median seconds per step."""
        return statistics.median(self.step_s)

    @property
    def model_flops_per_s(self) -> float:
        """Model FLOP/s at the median step time."""
        return self.flops_per_step / self.step_time

    @property
    def utilization(self) -> float:
        """Median over rounds of model FLOP/s over that round's measured matmul peak."""
        ratios = [
            self.flops_per_step / s / p for s, p in zip(self.step_s, self.matmul_peak, strict=True)
        ]
        return statistics.median(ratios)

    @property
    def best_utilization(self) -> float:
        """Fastest step's model FLOP/s over the highest round peak (:attr:`matmul_peak`):
        other processes only ever slow either side down, so best against best estimates the
        machine to itself."""
        return self.flops_per_step / min(self.step_s) / max(self.matmul_peak)

    @property
    def stable_utilization(self) -> float | None:
        """:attr:`utilization` over the rounds whose two peaks differ by under 10% (None:
        no such round): on a shared machine, the rounds during which the load held still."""
        ratios = [
            self.flops_per_step / s / p
            for s, p, d in zip(self.step_s, self.matmul_peak, self.peak_spread, strict=True)
            if d < 0.1
        ]
        return statistics.median(ratios) if ratios else None

    @property
    def mfu(self) -> float | None:
        """Model FLOP/s over the device's table peak (None when the table has no entry)."""
        return None if self.table_peak is None else self.model_flops_per_s / self.table_peak

    @property
    def optimizer_share(self) -> float:
        """Fraction of the step spent in gradient clipping and the optimizer."""
        return statistics.median(o / s for o, s in zip(self.optimizer_s, self.step_s, strict=True))

    def summary(self) -> str:
        """One line with every figure."""
        mfu = "n/a" if self.mfu is None else f"{self.mfu:.1%}"
        mem = "" if self.max_memory_gb is None else f", max memory {self.max_memory_gb:.1f} GB"
        stable = self.stable_utilization
        if stable is not None and len(self.step_s) > 1:
            mem += f", utilization in steady rounds {stable:.1%}"
        mem += f", best step vs best peak {self.best_utilization:.1%}"
        if self.cpu_utilization:
            mem += f", CPU-time utilization {statistics.median(self.cpu_utilization):.1%}"
        if self.breakdown:
            shares = ", ".join(f"{k} {v:.1%}" for k, v in self.breakdown.items())
            mem += f"; profiled step: {shares}"
        return (
            f"{self.label}: {self.flops_per_step / 1e9:.1f} GFLOP/step, "
            f"step {self.step_time * 1e3:.1f} ms, {self.batch / self.step_time:.1f} images/s, "
            f"model {self.model_flops_per_s / 1e12:.3f} TFLOP/s, matmul peak "
            f"{statistics.median(self.matmul_peak) / 1e12:.3f} TFLOP/s, "
            f"utilization {self.utilization:.1%}, MFU {mfu}, "
            f"optimizer {self.optimizer_share:.1%} of the step{mem}"
        )


def run_step_bench(
    size: str = "aim-600M",
    blocks: int | None = 2,
    head_blocks: int | None = 1,
    batch: int = 4,
    dtype: str = "fp32",
    device: str = "auto",
    compile: bool = False,
    activation_checkpointing: bool = False,
    attention_backend: str = "sdpa",
    optimizer: str = "platform",
    rounds: int = 3,
    steps_per_round: int = 1,
    warmup: int = 1,
    matmul_n: int = 2048,
    matmul_iters: int = 4,
    seed: int = 0,
    echo: Callable[[str], None] = print,
) -> StepBenchResult:
    """Time the training step and a matmul peak in alternating rounds.

    Args:
        size: Registered size whose shapes are used.
        blocks: Trunk blocks (None: the size's depth).
        head_blocks: Pixel-head blocks (None: the size's default).
        batch: Images per step.
        dtype: ``fp32``, or ``bf16`` (autocast, as mixed precision; the matmul peak is then
            measured in bf16 too).
        device: ``auto``, ``cpu``, ``cuda``, ``cuda:1``...
        compile: ``torch.compile`` each block (:meth:`AIMForPretraining.compile_blocks`).
        activation_checkpointing: Recompute trunk blocks in the backward.
        attention_backend: ``sdpa`` or ``flex`` (FlexAttention needs a GPU for the backward).
        optimizer: ``platform`` (the training loop's AdamW) or ``fused`` (fused AdamW).
        rounds: Timed groups of steps, each between two matmul-peak measurements (the round's
            peak is their mean, so that a change of load on a shared machine hits both).
        steps_per_round: Steps timed together in a round.
        warmup: Untimed steps first (compilation, optimizer state, allocator).
        matmul_n: Side of the square matmuls of the peak measurement.
        matmul_iters: Matmuls per peak measurement.
        seed: Seed of the weights and data.
        echo: Where per-round lines go.
    """
    if dtype not in DTYPES:
        raise ConfigError(f"dtype: unknown {dtype!r}; known: {', '.join(DTYPES)}")
    torch.manual_seed(seed)
    dev = resolve_device(device)
    amp_dtype = DTYPES[dtype]
    cfg = bench_model_config(size, blocks, head_blocks, attention_backend)
    with dev:  # initialize on the device: no host-side init of a billion weights
        model = AIMForPretraining(cfg, activation_checkpointing=activation_checkpointing)
    if compile:
        model.compile_blocks()
    optim_cfg = OptimConfig(lr=1e-4, warmup_steps=0)
    # The platform's step; only the optimizer kind may differ (``--optimizer``).
    trainer = Trainer(
        model, optim_cfg, 10**9, optimizer=build_optimizer(model, optimizer, optim_cfg)
    )
    pixels = torch.randint(
        0, 256, (batch, cfg.num_patches, cfg.patch_dim), dtype=torch.uint8, device=dev
    )  # (B, K, P) uint8, in memory on the device
    gen = torch.Generator().manual_seed(seed)
    autocast = (
        torch.autocast(dev.type, dtype=amp_dtype) if amp_dtype != torch.float32 else nullcontext()
    )

    on_cpu = dev.type == "cpu"
    events: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []

    def step() -> float:
        """One training step; returns the host seconds of clipping + optimizer (0 on CUDA,
        where events in ``events`` time them without synchronizing the step)."""
        prefix = sample_prefix_lengths(batch, *cfg.prefix_range, generator=gen)  # (B,) on CPU
        with autocast:
            trainer.backward(pixels, prefix)
        if dev.type == "cuda":
            pair = (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
            events.append(pair)
            events[-1][0].record()
        start = time.perf_counter()
        trainer.step()  # clipping + optimizer + schedule, profiled as OPTIMIZER_REGION
        if dev.type == "cuda":
            events[-1][1].record()
            return 0.0
        return time.perf_counter() - start

    parts = [
        size,
        f"{cfg.num_blocks}+{cfg.head.num_blocks} blocks",
        f"batch {batch}",
        dtype,
        "compiled" if compile else "eager",
        attention_backend,
    ]
    if activation_checkpointing:
        parts.append("act. ckpt")
    if optimizer != "platform":
        parts.append(f"{optimizer} AdamW")
    result = StepBenchResult(
        label=f"{parts[0]} ({', '.join(parts[1:])})",
        device_name=device_name(dev),
        batch=batch,
        flops_per_step=flops_per_image(cfg) * batch,
        table_peak=peak_flops(device_name(dev), amp_dtype) if dev.type != "cpu" else None,
    )
    for _ in range(warmup):
        step()
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)

    def matmul_peak(clock: Callable[[], float] = time.perf_counter) -> float:
        return measure_matmul_peak(
            dev, amp_dtype, n=matmul_n, iters=matmul_iters, repeats=1, clock=clock
        )

    before = matmul_peak()
    for r in range(rounds):
        synchronize(dev)
        events.clear()
        start, cpu_start = time.perf_counter(), time.process_time()
        opt_s = sum(step() for _ in range(steps_per_round))
        synchronize(dev)
        opt_s += sum(a.elapsed_time(b) / 1e3 for a, b in events)
        step_s = (time.perf_counter() - start) / steps_per_round
        cpu_s = (time.process_time() - cpu_start) / steps_per_round
        after = matmul_peak()
        if on_cpu:
            cpu_peak = matmul_peak(time.process_time)
            result.cpu_utilization.append(result.flops_per_step / cpu_s / cpu_peak)
        peak = (before + after) / 2  # the load the step saw lies between the two
        spread = abs(after - before) / max(after, before)
        peak_txt = f"{before / 1e9:.1f}/{after / 1e9:.1f}"
        before = after
        result.step_s.append(step_s)
        result.optimizer_s.append(opt_s / steps_per_round)
        result.matmul_peak.append(peak)
        result.peak_spread.append(spread)
        cpu_txt = f"; CPU-time {result.cpu_utilization[-1]:.1%}" if on_cpu else ""
        echo(
            f"round {r + 1}/{rounds}: matmul peak before/after {peak_txt} GFLOP/s | step "
            f"{step_s:.3f} s, model {result.flops_per_step / step_s / 1e9:.1f} GFLOP/s "
            f"({result.flops_per_step / step_s / peak:.1%} of peak{cpu_txt})"
        )
    if dev.type == "cuda":
        result.max_memory_gb = torch.cuda.max_memory_allocated(dev) / 2**30
    if on_cpu:
        result.breakdown = profile_step(step)
    return result


_MATMUL_OPS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm")


def profile_step(step: Callable[[], float]) -> dict[str, float]:
    """Shares of one step's wall time on the CPU: matmuls, attention, optimizer, the rest.

    Operators are classified by their self CPU time (time not spent in a child operator);
    ``optimizer`` is gradient clipping plus the optimizer step (the ``aim::optimizer``
    region of the step), whatever they call.
    """
    from torch.profiler import ProfilerActivity, profile

    def traced() -> None:
        with record_function("bench::step"):
            step()

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        traced()
    events = prof.key_averages()
    total = next(e.cpu_time_total for e in events if e.key == "bench::step")
    opt = next(e.cpu_time_total for e in events if e.key == OPTIMIZER_REGION)
    matmul = sum(e.self_cpu_time_total for e in events if e.key in _MATMUL_OPS)
    attention = sum(
        e.self_cpu_time_total
        for e in events
        if "attention" in e.key and not e.key.startswith("Optimizer")
    )
    shares = {"matmul": matmul, "attention": attention, "optimizer": opt}
    shares["other"] = max(0.0, total - sum(shares.values()))
    return {k: v / total for k, v in shares.items()}
