"""``aimctl``: the platform's command line (typer)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer
from rich.console import Console

app = typer.Typer(no_args_is_help=True, add_completion=False, help=__doc__)
console = Console()


def _load_or_exit(path: Path | None, overrides: list[str], cls: type[Any]) -> Any:
    """Load a config; on a bad one print the field-naming message and exit with code 2."""
    from aim_platform.config import ConfigError, load_config

    try:
        return load_config(path, overrides, cls)
    except ConfigError as exc:
        console.print(f"[red]{exc}[/red]")
        raise typer.Exit(2) from None


@app.command()
def doctor() -> None:
    """Print versions (Python, torch, Ray, MLflow), the active PIL and the devices seen."""
    from aim_platform.doctor import report

    for key, value in report().items():
        if isinstance(value, list):
            console.print(f"[bold]{key}[/bold]:")
            for line in value:
                console.print(f"  {line}")
        else:
            console.print(f"[bold]{key}[/bold]: {value}")


@app.command()
def selfcheck(steps: int = typer.Option(100, help="pre-training steps on digits")) -> None:
    """ml-aim parity check, then single-process pre-training of aim-tiny on digits."""
    from aim_platform import selfcheck as sc

    if not sc.run(steps=steps, echo=console.print):
        raise typer.Exit(1)


@app.command("convert-ml-aim")
def convert_ml_aim(
    src: Path = typer.Argument(..., exists=True, dir_okay=False, help="official checkpoint"),
    dst: Path = typer.Argument(..., help="where to write the converted classifier"),
) -> None:
    """Convert an official AIM v1 checkpoint (state_dict + ml_aim_config) into ours."""
    from aim_platform.models.interop import convert_file

    try:
        out = convert_file(src, dst)
    except (ValueError, KeyError) as exc:
        console.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2) from None
    console.print(f"wrote {out}")


services_app = typer.Typer(
    no_args_is_help=True, help="Local MLflow server and development S3 endpoint."
)
app.add_typer(services_app, name="services")
_STATE_OPT = typer.Option(None, "--state-dir", help="state folder [default: runs/services]")


@services_app.command("up")
def services_up(
    state_dir: Path | None = _STATE_OPT,
    mlflow: bool = typer.Option(True, "--mlflow/--no-mlflow", help="start the MLflow server"),
    s3: bool = typer.Option(False, "--s3/--no-s3", help="start the development S3 endpoint"),
    host: str = typer.Option("127.0.0.1", help="interface to bind (explicit: exposes it)"),
    expose: bool = typer.Option(False, "--expose", help="bind 0.0.0.0 (all interfaces)"),
    mlflow_port: int = typer.Option(5000, help="MLflow port (0: any free port)"),
    s3_port: int = typer.Option(9000, help="development S3 port (0: any free port)"),
    backend_store_uri: str | None = typer.Option(None, help="SQL URI [default: SQLite file]"),
    artifacts: str | None = typer.Option(None, help="artifact folder or s3:// URI"),
    s3_endpoint: str | None = typer.Option(None, help="S3 endpoint for s3:// artifacts"),
    auth: bool = typer.Option(False, "--auth", help="MLflow basic-auth app"),
    bucket: list[str] = typer.Option([], help="bucket to create on the dev S3 endpoint"),
) -> None:
    """Start the services in the background; return once each answers over HTTP."""
    from aim_platform import services as svc

    bind = "0.0.0.0" if expose else host
    started = []
    try:
        if s3:
            started.append(svc.s3_up(state_dir, host=bind, port=s3_port, buckets=bucket))
            console.print(f"s3: {started[-1].url} ({svc.DEV_S3_LABEL})", soft_wrap=True)
        if mlflow:
            rec = svc.mlflow_up(
                state_dir,
                host=bind,
                port=mlflow_port,
                backend_store_uri=backend_store_uri,
                artifacts=artifacts,
                auth=auth,
                s3_endpoint=s3_endpoint or (started[0].url if started else None),
            )
            started.append(rec)
            console.print(f"mlflow: {rec.url} (log {rec.log})", soft_wrap=True)
    except svc.ServiceError as exc:
        console.print(f"error: {exc}", markup=False, soft_wrap=True)
        svc.down(state_dir, names=[rec.name for rec in started])  # all or nothing
        raise typer.Exit(1) from None
    for key, value in svc.client_env(started).items():
        console.print(f"export {key}={value}", soft_wrap=True)


@services_app.command("down")
def services_down(state_dir: Path | None = _STATE_OPT) -> None:
    """Stop every service recorded in the state folder and clear its state."""
    from aim_platform import services as svc

    lines = svc.down(state_dir)
    for line in lines or ["nothing was running"]:
        console.print(line)


@services_app.command("status")
def services_status(state_dir: Path | None = _STATE_OPT) -> None:
    """Say what runs where; exit 1 if any recorded service is stale (its PID is gone)."""
    from aim_platform import services as svc

    states = svc.status(state_dir)
    for st in states:
        console.print(st.describe(), soft_wrap=True)
    if any(st.state == "stale" for st in states):
        raise typer.Exit(1)


@app.command()
def pretrain(
    config: Path = typer.Argument(..., help="job YAML (see jobs/configs/)"),
    set_: list[str] = typer.Option([], "--set", help="override a.b=c (repeatable)"),
    address: str = typer.Option(None, help="Ray cluster address; default: embedded Ray"),
) -> None:
    """Pre-train AIM on Ray Train (FSDP2), checkpointing and logging to MLflow."""
    from aim_platform.config import JobConfig
    from aim_platform.train.launcher import pretrain as run_pretrain
    from aim_platform.train.launcher import summary

    job = _load_or_exit(config, set_, JobConfig)
    result = run_pretrain(job, address=address)
    for line in summary(result):
        console.print(line)
    if result.error:
        raise typer.Exit(1)


@app.command()
def ingest(
    src: str = typer.Argument(..., help="image folder, .tar, builtin:digits or builtin:photos"),
    dest: str = typer.Argument(..., help="destination: local folder or s3://bucket/prefix"),
    val_fraction: float = typer.Option(0.05, help="share of ids (by hash) in the val split"),
    shard_size_mb: float = typer.Option(256.0, help="target input MB per shard"),
    storage_options: str = typer.Option("", help='fsspec options JSON, e.g. {"endpoint_url": ...}'),
    image_size: int = typer.Option(64, help="side of builtin:digits images"),
    num_photos: int = typer.Option(1000, help="number of builtin:photos crops"),
    max_pixels: int = typer.Option(89_478_485, help="larger images are rejected as bombs"),
    source: str = typer.Option("", help="value of the `source` column (default: SRC's name)"),
    force: bool = typer.Option(False, help="re-ingest even if DEST is up to date"),
) -> None:
    """Ingest images into Parquet shards + _manifest.json (Ray Data; idempotent)."""
    from rich.progress import Progress

    from aim_platform.data.ingest import ingest as run_ingest
    from aim_platform.data.storage import parse_storage_options

    try:
        opts = parse_storage_options(storage_options)
        with Progress(console=console, transient=True) as bar:
            task = bar.add_task("ingest", total=None)
            m = run_ingest(
                src,
                dest,
                val_fraction=val_fraction,
                shard_size_mb=shard_size_mb,
                storage_options=opts,
                image_size=image_size,
                num_photos=num_photos,
                max_pixels=max_pixels,
                source=source or None,
                force=force,
                progress=lambda done, total: bar.update(task, completed=done, total=total),
            )
    except ValueError as exc:
        console.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2) from None
    c = m["counts"]
    state = "up to date" if m.get("skipped") else "written"
    console.print(
        f"{dest}: {state}; train {c['train']}, val {c['val']}, rejected {c['rejected']}, "
        f"shards {len(m['shards']['train'])}+{len(m['shards']['val'])}"
    )
    for r in m["rejected"][:20]:
        console.print(f"  rejected {r['id']}: {r['reason']}")


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
    from aim_platform.data import bench

    bench.run(
        images=images,
        rounds=rounds,
        size=size,
        pipeline=pipeline,
        pipeline_images=pipeline_images,
        echo=console.print,
    )


_ADDRESS_OPT = typer.Option(
    None, "--address", envvar="RAY_API_SERVER_ADDRESS", help="Ray dashboard, http://HOST:8265"
)
_TOKEN_OPT = typer.Option(
    None, "--token-file", help="file with the Ray auth token [default: $RAY_AUTH_TOKEN, ...]"
)


def _submit_call(fn, *args, **kwargs):  # noqa: ANN001, ANN202 - thin error-mapping wrapper
    from aim_platform.submit import SubmitError

    try:
        return fn(*args, **kwargs)
    except SubmitError as exc:
        console.print(f"error: {exc}", markup=False, soft_wrap=True)
        raise typer.Exit(2) from None


@app.command("submit")
def submit_cmd(
    config: Path | None = typer.Argument(None, help="YAML config inside the repository"),
    address: str | None = _ADDRESS_OPT,
    overrides: list[str] = typer.Option([], "--set", help="override, a.b=c (repeatable)"),
    entrypoint: str | None = typer.Option(None, help="command instead of aimctl pretrain"),
    token_file: Path | None = _TOKEN_OPT,
    env: list[str] = typer.Option([], "--env", help="KEY=VALUE for the job (no secrets)"),
    submission_id: str | None = typer.Option(None, help="job id [default: generated]"),
    wait: bool = typer.Option(
        False, "--wait", help="wait for the job to end; exit 1 unless it succeeds"
    ),
) -> None:
    """Submit a platform job (default: aimctl pretrain CONFIG) to a Ray cluster."""
    from aim_platform import submit as sub

    job_id = _submit_call(
        sub.submit,
        address,
        config,
        overrides=overrides,
        entrypoint=entrypoint,
        token_file=token_file,
        env=_submit_call(sub.parse_env, env) if env else None,
        submission_id=submission_id,
    )
    console.print(f"submitted {job_id}", soft_wrap=True)
    console.print(f"  aimctl jobs logs {job_id} --follow --address {address}", soft_wrap=True)
    if wait:
        state = _submit_call(sub.wait_for, address, job_id, token_file, timeout=7 * 24 * 3600)
        console.print(f"{job_id}: {state}")
        if state != "SUCCEEDED":
            raise typer.Exit(1)


jobs_app = typer.Typer(no_args_is_help=True, help="Status, logs and stop of submitted jobs.")
app.add_typer(jobs_app, name="jobs")


@jobs_app.command("status")
def jobs_status(
    job_id: str, address: str | None = _ADDRESS_OPT, token_file: Path | None = _TOKEN_OPT
) -> None:
    """Print the job's status and message."""
    from aim_platform import submit as sub

    st = _submit_call(sub.status, address, job_id, token_file)
    console.print(
        f"{st.job_id}: {st.status}" + (f" ({st.message})" if st.message else ""),
        markup=False,
        soft_wrap=True,
    )


@jobs_app.command("logs")
def jobs_logs(
    job_id: str,
    address: str | None = _ADDRESS_OPT,
    token_file: Path | None = _TOKEN_OPT,
    follow: bool = typer.Option(False, "--follow", "-f", help="stream until the job ends"),
) -> None:
    """Print the job's logs (optionally following them)."""
    from aim_platform import submit as sub

    if follow:
        for chunk in _submit_call(sub.follow_logs, address, job_id, token_file):
            typer.echo(chunk, nl=False)
    else:
        typer.echo(_submit_call(sub.logs, address, job_id, token_file), nl=False)


@jobs_app.command("stop")
def jobs_stop(
    job_id: str,
    address: str | None = _ADDRESS_OPT,
    token_file: Path | None = _TOKEN_OPT,
    wait: float = typer.Option(30.0, help="seconds to wait for the job to stop (0: don't)"),
) -> None:
    """Stop a running job."""
    from aim_platform import submit as sub

    state = _submit_call(sub.stop, address, job_id, token_file, wait=wait)
    console.print(f"{job_id}: {state}")


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

    try:
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
    except ValueError as exc:
        console.print(f"error: {exc}", markup=False, soft_wrap=True)
        raise typer.Exit(2) from None
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

    try:
        result = run_attention_bench(
            size=size,
            batch=batch,
            dtype=dtype,
            device=device,
            rounds=rounds,
            iters=iters,
            echo=lambda line: console.print(line, soft_wrap=True),
        )
    except ValueError as exc:
        console.print(f"error: {exc}", markup=False, soft_wrap=True)
        raise typer.Exit(2) from None
    for line in result.summary():
        console.print(line, markup=False, soft_wrap=True)


@app.command()
def probe(
    checkpoint: str = typer.Argument(..., help="trunk folder (runs/NAME/final) or converted .pt"),
    dataset: str = typer.Argument(..., help="labelled ingest root (local or s3://)"),
    set_: list[str] = typer.Option([], "--set", help="ProbeConfig override a=b (repeatable)"),
    config: Path = typer.Option(None, help="ProbeConfig YAML"),
    address: str = typer.Option(None, help="Ray cluster address; default: embedded Ray"),
    tracking_uri: str = typer.Option(
        None, help="MLflow URI; default $MLFLOW_TRACKING_URI, else ./runs/mlflow.db"
    ),
    experiment: str = typer.Option("aim-probe", help="MLflow experiment"),
    parent_run_id: str = typer.Option(None, help="nest under this (pre-training) run"),
) -> None:
    """Attentive/linear probes (and a layer sweep, LoRA) on a frozen trunk."""
    from aim_platform import tracking
    from aim_platform.config import ProbeConfig
    from aim_platform.eval.probe import log_probe, report_metrics, run_probe
    from aim_platform.train.launcher import ensure_ray

    cfg = _load_or_exit(config, set_, ProbeConfig)
    ensure_ray(address)
    report = run_probe(checkpoint, cfg, dataset=dataset, storage_options=cfg.storage_options)
    uri = tracking.resolve_tracking_uri(tracking_uri)
    run_id = log_probe(
        tracking.Tracker(uri),
        report,
        cfg,
        experiment=experiment,
        run_name=tracking.probe_run_name(checkpoint, dataset),
        trunk_path=checkpoint,
        dataset=dataset,
        parent_run_id=parent_run_id,
    )
    for key, value in sorted(report_metrics(report).items()):
        console.print(f"{key:40s} {tracking.format_metric(value)}")
    console.print(f"MLflow run {run_id} at {uri}")


@app.command()
def correlate(
    run_ids: list[str] = typer.Argument(..., help="one pre-training run, or several runs"),
    tracking_uri: str = typer.Option(
        None, help="MLflow URI; default $MLFLOW_TRACKING_URI, else ./runs/mlflow.db"
    ),
    log_to: str = typer.Option(None, help="across runs: log the result into this run"),
) -> None:
    """Pre-training loss vs probe accuracy: per checkpoint of one run, or across runs."""
    from aim_platform import tracking
    from aim_platform.eval.correlation import correlate_run, correlate_runs

    tracker = tracking.Tracker(tracking.resolve_tracking_uri(tracking_uri))
    if len(run_ids) == 1:
        corr = correlate_run(tracker, run_ids[0])
    else:
        corr = correlate_runs(tracker, run_ids, log_to=log_to)
    console.print(corr.table())
    if len(corr.losses) < 2:
        console.print("[yellow]fewer than 2 points: no coefficient[/yellow]")


@app.command()
def study(
    spec: Path = typer.Argument(..., help="study spec (jobs/studies/*.yaml)"),
    scale: str = typer.Option("tiny", help="budget preset: tiny, small or paper"),
    set_: list[str] = typer.Option([], "--set", help="override for every trial a.b=c"),
    address: str = typer.Option(None, help="Ray cluster address; default: embedded Ray"),
    storage: str = typer.Option("./runs/studies", help="study folder root"),
    tracking_uri: str = typer.Option(
        None, help="MLflow URI; default $MLFLOW_TRACKING_URI, else mlflow.db above --storage"
    ),
    resume: bool = typer.Option(False, help="continue an interrupted study"),
) -> None:
    """Run one of the paper's ablations (Tables 3-5) with Ray Tune; print its table."""
    from aim_platform.config import ConfigError
    from aim_platform.tune.studies import load_study, run_study

    if scale not in ("tiny", "small", "paper"):
        console.print(f"[red]--scale: {scale!r} is not one of tiny, small, paper[/red]")
        raise typer.Exit(2)
    try:
        parsed = load_study(spec)
        parsed.job(next(iter(parsed.variants)), scale, set_)  # validate the overrides
    except ConfigError as exc:
        console.print(f"[red]{exc}[/red]")
        raise typer.Exit(2) from None
    result = run_study(
        parsed,
        scale,
        storage=storage,
        tracking_uri=tracking_uri,
        address=address,
        resume=resume,
        extra=set_,
    )
    console.print(result.markdown())
    for t in result.trials:
        if t.error:
            console.print(f"[red]trial {t.variant} failed:[/red] {t.error.splitlines()[0]}")
    console.print(f"MLflow parent run {result.parent_run_id} at {result.tracking_uri}")


@app.command("tokenizer-fit")
def tokenizer_fit(
    dataset_url: str = typer.Argument(..., help="ingest root (aimctl ingest) or builtin:digits"),
    out: str = typer.Argument(..., help="codebook file to write (path or s3://...safetensors)"),
    num_tokens: int = typer.Option(512, help="codebook size (k-means centroids)"),
    max_patches: int = typer.Option(100_000, help="patches sampled for k-means"),
    model_size: str = typer.Option("aim-tiny", help="registered size giving image/patch size"),
    image_size: int | None = typer.Option(None, "--image-size", "--size", help="image side"),
    patch_size: int | None = typer.Option(None, help="patch side (default: the size's)"),
    iters: int = typer.Option(20, help="maximum Lloyd iterations"),
    seed: int = typer.Option(0, help="seed of crops, subsample and k-means++"),
    storage_options: str = typer.Option("", help='fsspec options JSON, e.g. {"endpoint_url": ...}'),
    address: str = typer.Option(None, help="Ray cluster address; default: embedded Ray"),
) -> None:
    """Fit the k-means patch tokenizer of the discrete-token target (Table 3a) on a dataset."""
    from aim_platform.config import ConfigError, DataConfig, ModelConfig, build_config
    from aim_platform.data.storage import parse_storage_options
    from aim_platform.models.tokenizer import Tokenizer, fit_tokenizer
    from aim_platform.train.launcher import ensure_ray

    sizes = {"img_size": image_size, "patch_size": patch_size}
    try:
        opts = parse_storage_options(storage_options)
        model = build_config(
            ModelConfig, {"size": model_size, **{k: v for k, v in sizes.items() if v}}
        )
        source = {"sources": [{"url": dataset_url}], "storage_options": opts}
        data = build_config(DataConfig, source)
        ensure_ray(address)
        fit_tokenizer(data, model, out, num_tokens, max_patches, seed, iters, opts)
    except (ConfigError, ValueError) as exc:
        console.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2) from None
    tok = Tokenizer.load(out, opts)
    info = tok.fitted_on
    console.print(
        f"{out}: {tok.num_tokens} tokens x {tok.patch_dim} values, fitted on {info['patches']} "
        f"patches of {info['images']} images; mean squared distance "
        f"{info['inertia'][0]:.4g} -> {info['inertia'][-1]:.4g}"
    )


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


def main() -> None:
    """Console-script entry point."""
    app()


if __name__ == "__main__":
    main()
