"""GPU check for BENCHMARKS.md: aim-600M training steps and attention kernels on one GPU.

On one H200 it took 61 s, compilations included (2026-12-04): a FlexAttention/SDPA parity
check (forward and backward), then ``bench attention`` (seconds, so a slow compilation cannot
crowd it out), then ``bench step`` for ``aim-600M`` in bf16 (eager and compiled, with and
without activation checkpointing, SDPA and FlexAttention); it prints one Markdown table per
benchmark, ready to paste into BENCHMARKS.md, headed by the device name.

    python jobs/gpu_check.py [--batch 64] [--out gpu_check.md]    # on a GPU machine
    python jobs/gpu_check.py --smoke                                # tiny shapes, on a CPU

``--smoke`` runs every code path on tiny shapes (float32 on a CPU, where FlexAttention has no
backward: the steps use SDPA and the parity check is forward-only) so that the script is known
to work before a GPU is lent. Runs stop being started once ``--budget-s`` seconds have passed.
"""

from __future__ import annotations

import argparse
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "platform"))  # runnable from a bare checkout, no install

from aim_platform.bench.attention import run_attention_bench  # noqa: E402
from aim_platform.bench.step import StepBenchResult, run_step_bench  # noqa: E402
from aim_platform.config import ModelConfig  # noqa: E402
from aim_platform.models import AIMForPretraining, sample_prefix_lengths  # noqa: E402
from aim_platform.train.metrics import device_name, peak_flops  # noqa: E402


@dataclass(frozen=True)
class StepCase:
    """One ``bench step`` configuration of the check."""

    compile: bool
    activation_checkpointing: bool
    attention_backend: str

    @property
    def name(self) -> str:
        mode = "compiled" if self.compile else "eager"
        ckpt = ", act. ckpt" if self.activation_checkpointing else ""
        return f"{mode}, {self.attention_backend}{ckpt}"


def step_cases(flex: bool) -> list[StepCase]:
    """The step configurations, cheapest first (compiled runs pay their compilation)."""
    backend = "flex" if flex else "sdpa"
    cases = [StepCase(False, False, "sdpa")]
    if flex:
        cases.append(StepCase(False, False, "flex"))
    cases += [
        StepCase(False, True, backend),
        StepCase(True, False, backend),
        StepCase(True, True, backend),
    ]
    return cases


def parity_check(device: torch.device, smoke: bool) -> str:
    """FlexAttention vs SDPA on one model: loss (and gradients where flex has a backward)."""
    size = dict(size="aim-tiny") if smoke else dict(size="aim-600M", num_blocks=2)
    head = {"num_blocks": 1, "width": 64 if smoke else 256}
    cfgs = [ModelConfig(**size, head=head, attention_backend=b) for b in ("sdpa", "flex")]
    torch.manual_seed(0)
    with device:
        sdpa = AIMForPretraining(cfgs[0])
        flex = AIMForPretraining(cfgs[1])
    flex.load_state_dict(sdpa.state_dict())
    cfg = cfgs[0]
    pixels = torch.randint(0, 256, (4, cfg.num_patches, cfg.patch_dim), dtype=torch.uint8)
    pixels = pixels.to(device)  # (B, K, P)
    prefix = sample_prefix_lengths(4, *cfg.prefix_range)
    backward = device.type == "cuda"
    with torch.set_grad_enabled(backward):
        a = sdpa.loss(pixels, prefix).loss
        b = flex.loss(pixels, prefix).loss
    line = f"parity flex vs sdpa (fp32): loss diff {abs(a.item() - b.item()):.2e}"
    if backward:
        a.backward()
        b.backward()
        worst = max(
            ((p.grad - q.grad).abs().max() / p.grad.abs().max().clamp_min(1e-12)).item()
            for p, q in zip(sdpa.parameters(), flex.parameters(), strict=True)
        )
        line += f", worst relative grad diff {worst:.2e}"
    return line


def step_table(results: list[tuple[StepCase, StepBenchResult | str]], peak: float | None) -> str:
    """Markdown table of the step runs (a string in place of a result: why it did not run)."""
    peak_txt = "n/a" if peak is None else f"{peak / 1e12:.0f}"
    lines = [
        f"| configuration | step (ms) | images/s | model TFLOP/s | MFU (peak {peak_txt} "
        "TFLOP/s) | of measured matmul peak | max memory (GB) |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for case, r in results:
        if isinstance(r, str):
            lines.append(f"| {case.name} | {r} | | | | | |")
            continue
        mfu = "n/a" if r.mfu is None else f"{r.mfu:.1%}"
        mem = "n/a" if r.max_memory_gb is None else f"{r.max_memory_gb:.1f}"
        lines.append(
            f"| {case.name} | {r.step_time * 1e3:.1f} | {r.batch / r.step_time:.1f} | "
            f"{r.model_flops_per_s / 1e12:.1f} | {mfu} | {r.utilization:.1%} | {mem} |"
        )
    return "\n".join(lines)


def attention_table(attn: dict, dtype: str) -> str:
    """Run ``bench attention`` and format its Markdown table."""
    a = run_attention_bench(**attn, dtype=dtype)
    b, h, k, dh = a.shape
    lines = [
        f"Attention forward+backward, B={b} H={h} K={k} Dh={dh}, {dtype}:",
        "",
        "| variant | ms | vs causal SDPA |",
        "| --- | ---: | ---: |",
    ]
    lines += [f"| {n} | {a.median(n) * 1e3:.3f} | {a.ratio(n):.2f}x |" for n in a.times]
    return "\n".join(lines)


def guarded(fn: Callable[[], str], what: str) -> str:
    """``fn()``, or a line saying that ``what`` failed (the traceback goes to stderr)."""
    try:
        return fn()
    except Exception as exc:  # noqa: BLE001 - report and carry on with the other checks
        traceback.print_exc()
        return f"{what}: failed: {type(exc).__name__}: {exc}"


def main(argv: list[str] | None = None) -> int:
    """Run the check; print (and optionally write) the Markdown report."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny shapes (runs on a CPU)")
    parser.add_argument("--size", default="aim-600M", help="registered size (full depth)")
    parser.add_argument("--batch", type=int, default=64, help="images per step")
    parser.add_argument("--budget-s", type=float, default=540.0, help="start no run after this")
    parser.add_argument("--out", type=Path, default=None, help="also write the report here")
    args = parser.parse_args(argv)

    start = time.monotonic()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    gpu = device.type == "cuda"
    if not gpu and not args.smoke:
        print("no GPU here: run with --smoke for the tiny CPU version", file=sys.stderr)
        return 2
    if gpu:
        torch.backends.cuda.matmul.allow_tf32 = False  # fp32 parity is meant as fp32
    dtype = "bf16" if gpu else "fp32"
    if args.smoke:
        shape = dict(size="aim-tiny", blocks=1, head_blocks=1, batch=2)
        timing = dict(rounds=1, steps_per_round=1, warmup=1, matmul_n=256)
        attn = dict(size="aim-tiny", batch=2, rounds=1, iters=1)
    else:
        shape = dict(size=args.size, blocks=None, head_blocks=None, batch=args.batch)
        timing = dict(rounds=3, steps_per_round=5, warmup=2, matmul_n=8192, matmul_iters=20)
        attn = dict(size=args.size, batch=args.batch, rounds=9, iters=5)
    name = device_name(device)
    report = [
        f"### {name}: torch {torch.__version__}, CUDA {torch.version.cuda}, {dtype}"
        + (" (smoke: tiny shapes)" if args.smoke else ""),
        "",
        guarded(lambda: parity_check(device, args.smoke), "parity flex vs sdpa"),
        "",
        f"Training step, {shape['size']} "
        f"({'cut' if args.smoke else 'full depth'}), batch {shape['batch']}, {dtype}, "
        "platform AdamW + grad clipping:",
        "",
    ]
    print(report[0], flush=True)
    print(report[2], flush=True)
    # Attention first: it takes seconds, and the prefix-vs-causal figure must not be the one
    # that a slow compilation pushes past the budget.
    print("-- attention", flush=True)
    attention = guarded(lambda: attention_table(attn, dtype), "attention")

    results: list[tuple[StepCase, StepBenchResult | str]] = []
    for case in step_cases(flex=gpu):
        if time.monotonic() - start > args.budget_s:
            results.append((case, "skipped: time budget"))
            continue
        print(f"-- step: {case.name}", flush=True)
        try:
            r = run_step_bench(
                **shape,
                **timing,
                dtype=dtype,
                compile=case.compile,
                activation_checkpointing=case.activation_checkpointing,
                attention_backend=case.attention_backend,
            )
        except torch.OutOfMemoryError:
            results.append((case, "out of memory"))
        except Exception as exc:  # noqa: BLE001 - one broken case must not cost the lease
            traceback.print_exc()
            results.append((case, f"failed: {type(exc).__name__}"))
        else:
            print(r.summary(), flush=True)
            results.append((case, r))
        if gpu:
            torch.cuda.empty_cache()
    report += [step_table(results, peak_flops(name, torch.bfloat16) if gpu else None), ""]

    report.append(attention)
    report.append(f"\n(total {time.monotonic() - start:.0f} s)")
    text = "\n".join(report)
    print("\n" + text, flush=True)
    if args.out is not None:
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
