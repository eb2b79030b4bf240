"""``aimctl bench attention``: prefix-causal attention as the model runs it, against SDPA.

Forward + backward of the attention kernel alone on the model's shapes, the variants timed in
alternation (round-robin) so that they share the machine's load:

- ``prefix-causal sdpa``: SDPA with the boolean (B, 1, K, K) mask of
  :func:`aim_platform.models.layers.attention_mask` (the CPU path; on GPUs a boolean mask rules
  out the flash kernel);
- ``prefix-causal flex``: compiled FlexAttention with the per-sample prefix-LM block mask of
  :func:`aim_platform.models.layers.flex_block_mask` (the GPU path; its backward needs a GPU);
- ``causal sdpa``: ``is_causal=True``, the speed a prefix-causal kernel should approach;
- ``bidirectional sdpa``: no mask, the dense upper bound on work.

Masks are built once, as the model builds them once per step for all blocks.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from aim_platform.bench.step import DTYPES, resolve_device
from aim_platform.config import ConfigError, ModelConfig, build_config
from aim_platform.models import sample_prefix_lengths
from aim_platform.models.layers import attention_mask, compiled_flex_attention, flex_block_mask
from aim_platform.train.metrics import device_name, synchronize

REFERENCE = "causal sdpa"


@dataclass
class AttentionBenchResult:
    """Median forward+backward seconds per variant.

    Attributes:
        shape: ``(B, H, K, Dh)``.
        dtype: ``fp32`` or ``bf16``.
        device_name: What :func:`device_name` says.
        times: Variant name -> seconds per forward+backward, one value per round.
    """

    shape: tuple[int, int, int, int]
    dtype: str
    device_name: str
    times: dict[str, list[float]] = field(default_factory=dict)

    def median(self, name: str) -> float:
        """Median seconds of one variant."""
        return statistics.median(self.times[name])

    def ratio(self, name: str, reference: str = REFERENCE) -> float:
        """Median over rounds of the time of ``name`` over that of ``reference`` in the same
        round (timed seconds apart, so a change of the machine's load hits both)."""
        pairs = zip(self.times[name], self.times[reference], strict=True)
        return statistics.median(t / ref for t, ref in pairs)

    def summary(self) -> list[str]:
        """One line per variant: time and ratio to plain causal SDPA."""
        b, h, k, dh = self.shape
        lines = [f"attention fwd+bwd, B={b} H={h} K={k} Dh={dh}, {self.dtype}, {self.device_name}"]
        for name in self.times:
            lines.append(
                f"  {name:<22} {self.median(name) * 1e3:9.3f} ms  "
                f"{self.ratio(name):5.2f}x {REFERENCE}"
            )
        return lines


def run_attention_bench(
    size: str = "aim-600M",
    batch: int = 4,
    dtype: str = "fp32",
    device: str = "auto",
    backends: tuple[str, ...] | None = None,
    rounds: int = 9,
    iters: int = 2,
    seed: int = 0,
    echo: Callable[[str], None] = print,
) -> AttentionBenchResult:
    """Time the attention variants in alternation.

    Args:
        size: Registered size giving heads, head width and K.
        batch: B.
        dtype: ``fp32`` or ``bf16``.
        device: ``auto``, ``cpu``, ``cuda``...
        backends: Prefix-causal backends to time (default: ``sdpa``, plus ``flex`` on CUDA:
            FlexAttention has no CPU backward).
        rounds: Round-robin passes over the variants; each variant's figure is the median.
        iters: Forward+backward calls timed together per variant and round.
        seed: Seed of the inputs and prefix lengths.
        echo: Where per-round lines go.
    """
    if dtype not in DTYPES:
        raise ConfigError(f"dtype: unknown {dtype!r}; known: {', '.join(DTYPES)}")
    torch.manual_seed(seed)
    dev = resolve_device(device)
    cfg = build_config(ModelConfig, {"size": size}, [])
    b, h, k = batch, cfg.num_heads, cfg.num_patches
    dh = cfg.embed_dim // h
    if backends is None:
        backends = ("sdpa", "flex") if dev.type == "cuda" else ("sdpa",)
    qkv = torch.randn(b, k, 3, h, dh, device=dev, dtype=DTYPES[dtype], requires_grad=True)
    grad = torch.randn(b, h, k, dh, device=dev, dtype=DTYPES[dtype])  # (B, H, K, Dh)
    prefix = sample_prefix_lengths(b, *cfg.prefix_range).to(dev)  # (B,)

    def split() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        q, key, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # 3 x (B, H, K, Dh), as the model
        return q, key, v

    variants: dict[str, Callable[[], torch.Tensor]] = {}
    if "sdpa" in backends:
        mask = attention_mask("prefix_causal", k, prefix, dev)  # (B, 1, K, K)
        variants["prefix-causal sdpa"] = lambda: F.scaled_dot_product_attention(
            *split(), attn_mask=mask
        )
    if "flex" in backends:
        block_mask = flex_block_mask("prefix_causal", k, prefix, dev)
        variants["prefix-causal flex"] = lambda: compiled_flex_attention(*split(), block_mask)
    variants[REFERENCE] = lambda: F.scaled_dot_product_attention(*split(), is_causal=True)
    variants["bidirectional sdpa"] = lambda: F.scaled_dot_product_attention(*split())

    def fwd_bwd(fn: Callable[[], torch.Tensor]) -> None:
        fn().backward(grad)
        qkv.grad = None

    result = AttentionBenchResult((b, h, k, dh), dtype, device_name(dev))
    for fn in variants.values():  # warm-up: compilation, kernels' first calls
        fwd_bwd(fn)
    for r in range(rounds):
        for name, fn in variants.items():
            synchronize(dev)
            start = time.perf_counter()
            for _ in range(iters):
                fwd_bwd(fn)
            synchronize(dev)
            result.times.setdefault(name, []).append((time.perf_counter() - start) / iters)
        echo(
            f"round {r + 1}/{rounds}: "
            + ", ".join(f"{n} {t[-1] * 1e3:.2f} ms" for n, t in result.times.items())
        )
    return result
