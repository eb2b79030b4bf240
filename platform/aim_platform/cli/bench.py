"""``aimctl bench data|step|attention|pretrain``: benchmarks that print side-by-side ratios."""

from __future__ import annotations

from pathlib import Path

import typer

from aim_platform.cli.app import app, console

bench_app = typer.Typer(no_args_is_help=True, help="benchmarks (ratios, printed)")
app.add_typer(bench_app, name="bench")


@bench_app.command("data")
def bench_data(
    images: int = typer.Option(200, help="builtin:photos JPEGs (about 1024x768, q90)"),
    rounds: int = typer.Option(3, help="interleaved rounds of ours vs baseline"),
    size: int = typer.Option(224, help="output image side"),
    pipeline: bool = typer.Option(True, help="also measure Ray Data with 1 and 2 CPUs"),
    pipeline_images: int = typer.Option(2400, help="rows per epoch in the Ray Data runs"),
) -> None:
    """Decode+crop+flip: our path vs a torchvision-style baseline; Ray Data delivery rate."""
    from aim_platform.bench import data as bench

    bench.run(
        images=images,
        rounds=rounds,
        size=size,
        pipeline=pipeline,
        pipeline_images=pipeline_images,
        echo=console.print,
    )


@bench_app.command("step")
def bench_step(
    size: str = typer.Option("aim-600M", help="registered size whose shapes are used"),
    blocks: int = typer.Option(2, help="trunk blocks (ignored with --full)"),
    head_blocks: int = typer.Option(1, help="pixel-head blocks (ignored with --full)"),
    full: bool = typer.Option(False, "--full", help="the size's registered depths"),
    batch: int = typer.Option(4, help="images per step"),
    dtype: str = typer.Option("fp32", help="fp32, or bf16 (autocast mixed precision)"),
    device: str = typer.Option("auto", help="auto, cpu, cuda, cuda:N"),
    compile_: bool = typer.Option(False, "--compile", help="torch.compile every block"),
    activation_checkpointing: bool = typer.Option(False, "--activation-checkpointing"),
    attention_backend: str = typer.Option("sdpa", help="sdpa, or flex (FlexAttention, GPU)"),
    optimizer: str = typer.Option("platform", help="platform (the loop's AdamW) or fused"),
    rounds: int = typer.Option(4, help="timed rounds, each between two matmul-peak runs"),
    steps_per_round: int = typer.Option(1, help="steps timed together per round"),
    warmup: int = typer.Option(1, help="untimed steps first"),
    matmul_n: int = typer.Option(2048, help="side of the square matmuls of the peak"),
) -> None:
    """A full training step (AIM loss, backward, AdamW) against a matmul peak, side by side."""
    from aim_platform.bench.step import run_step_bench

    result = run_step_bench(
        size=size,
        blocks=None if full else blocks,
        head_blocks=None if full else head_blocks,
        batch=batch,
        dtype=dtype,
        device=device,
        compile=compile_,
        activation_checkpointing=activation_checkpointing,
        attention_backend=attention_backend,
        optimizer=optimizer,
        rounds=rounds,
        steps_per_round=steps_per_round,
        warmup=warmup,
        matmul_n=matmul_n,
        echo=lambda line: console.print(line, soft_wrap=True),
    )
    console.print(result.summary(), markup=False, soft_wrap=True)


@bench_app.command("attention")
def bench_attention(
    size: str = typer.Option("aim-600M", help="registered size giving heads, widths, K"),
    batch: int = typer.Option(4, help="B"),
    dtype: str = typer.Option("fp32", help="fp32 or bf16"),
    device: str = typer.Option("auto", help="auto, cpu, cuda, cuda:N"),
    rounds: int = typer.Option(9, help="round-robin passes over the variants"),
    iters: int = typer.Option(2, help="calls timed together per variant and round"),
) -> None:
    """Prefix-causal attention fwd+bwd as the model runs it vs causal and bidirectional SDPA."""
    from aim_platform.bench.attention import run_attention_bench

    result = run_attention_bench(
        size=size,
        batch=batch,
        dtype=dtype,
        device=device,
        rounds=rounds,
        iters=iters,
        echo=lambda line: console.print(line, soft_wrap=True),
    )
    for line in result.summary():
        console.print(line, markup=False, soft_wrap=True)


@bench_app.command("pretrain")
def bench_pretrain(
    config: Path = typer.Option(None, help="job YAML; default jobs/configs/demo.yaml"),
    steps: int = typer.Option(30, help="optimizer steps (the first few are warm-up)"),
    set_: list[str] = typer.Option([], "--set", help="override a.b=c (repeatable)"),
) -> None:
    """End to end: images/s, MFU and whether data or model is the bottleneck."""
    from aim_platform.bench import pretrain as bench

    result = bench.run(config or bench.DEMO, steps, set_)
    for line in result.lines():
        console.print(line)


@bench_app.command("record")
def bench_record(
    rows: int = typer.Option(256, help="JPEG rows decoded beside their keys"),
    rounds: int = typer.Option(5, help="timed rounds (median)"),
    size: str = typer.Option("aim-tiny", help="model size of the step and checkpoint"),
) -> None:
    """What exact data resume costs: keys vs decode, record vs step, record vs checkpoint."""
    from aim_platform.bench import record

    record.run(rows=rows, rounds=rounds, size=size, echo=console.print)
