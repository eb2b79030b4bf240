"""``aimctl``: the platform's command line (typer)."""

from __future__ import annotations

import traceback
from pathlib import Path
from typing import Any, NoReturn

import click
import typer
from rich.console import Console
from typer.core import TyperGroup

from aim_platform.config import MAX_PIXELS
from aim_platform.errors import PlatformError

console = Console(soft_wrap=True)


class _ErrorBoundary(TyperGroup):
    """The one place expected failures become messages: a :class:`PlatformError` prints one
    line and exits with code 2; anything else is a bug and keeps its traceback."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except PlatformError as exc:
            console.print(f"error: {exc}", markup=False, highlight=False)
            raise typer.Exit(2) from None


app = typer.Typer(no_args_is_help=True, add_completion=False, help=__doc__, cls=_ErrorBoundary)
_CLUSTER_OPT = typer.Option(
    None, "--address", help="Ray cluster to join (auto, HOST:6379); default: embedded Ray"
)
_TOKEN_OPT = typer.Option(
    None, "--token-file", help="file with the Ray auth token [default: $RAY_AUTH_TOKEN, ...]"
)
_VERBOSE_OPT = typer.Option(
    False, "--verbose", "-v", help="show Ray's and the workers' logs live instead of a log file"
)


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


def _log_folder(job: Any) -> Path:
    """Local folder for a run's console log: the run folder, or ./runs/NAME for s3:// runs."""
    from aim_platform.jobs.pretrain import run_paths

    paths = run_paths(job)
    return Path(paths.root) if paths.is_local else Path("runs").resolve() / job.name


@app.command()
def pretrain(
    config: Path = typer.Argument(..., help="job YAML (see jobs/configs/)"),
    set_: list[str] = typer.Option([], "--set", help="override a.b=c (repeatable)"),
    address: str = _CLUSTER_OPT,
    token_file: Path | None = _TOKEN_OPT,
    verbose: bool = _VERBOSE_OPT,
) -> None:
    """Pre-train AIM on Ray Train (FSDP2), checkpointing and logging to MLflow."""
    from aim_platform.cluster import connect
    from aim_platform.config import JobConfig
    from aim_platform.console import TrainDisplay, captured_output, log_path
    from aim_platform.jobs.pretrain import latest_train_state, summary
    from aim_platform.jobs.pretrain import pretrain as run_pretrain

    job = _load_or_exit(config, set_, JobConfig)
    log = None if verbose else log_path(_log_folder(job), "pretrain")
    tc = job.train
    with captured_output(log) as term:
        term.print(
            f"pre-training {job.name}: {job.model.size}, {tc.steps} steps at batch "
            f"{tc.global_batch_size} on {tc.num_workers} worker(s)"
            + (f"; log: {log}" if log else ""),
            markup=False,
            highlight=False,
        )
        previous = latest_train_state(job)
        if previous:
            term.print(f"resuming from the checkpoint at step {previous['step']}", markup=False)
        own_ray = connect(address, token_file)
        display = TrainDisplay(term, job.name, tc.steps)
        try:
            result = run_pretrain(job, address=address, on_progress=display.update)
        except PlatformError:
            raise
        except Exception as exc:  # the run failed: one line here, the traceback in the log
            display.close()
            traceback.print_exc()
            _failed(term, "pre-training", exc, log)
        display.close()
        for line in summary(result):
            term.print(line, markup=False, highlight=False)
        if log:
            term.print(f"log: {log}", markup=False, highlight=False)
        if own_ray:  # still captured: Ray flushes the workers' last lines
            import ray

            ray.shutdown()
    if result.error:
        raise typer.Exit(1)


def _failed(term: Console, what: str, exc: BaseException, log: Path | None) -> NoReturn:
    first = (str(exc).strip().splitlines() or [""])[0]
    term.print(f"{what} failed: {type(exc).__name__}: {first}", markup=False, highlight=False)
    if log:
        term.print(f"the whole story is in the log: {log}", markup=False, highlight=False)
    raise typer.Exit(1)


@app.command()
def ingest(
    src: str = typer.Argument(
        ...,
        help="image folder, .tar(s) or .parquet (file, folder, glob or {a..b} list), "
        "builtin:digits or builtin:photos",
    ),
    dest: str = typer.Argument(..., help="destination: local folder or s3://bucket/prefix"),
    val_fraction: float = typer.Option(0.05, help="share of ids (by hash) in the val split"),
    shard_size_mb: float = typer.Option(256.0, help="target input MB per shard"),
    storage_options: str = typer.Option("", help='fsspec options JSON, e.g. {"endpoint_url": ...}'),
    image_size: int = typer.Option(64, help="side of builtin:digits images"),
    num_photos: int = typer.Option(1000, help="number of builtin:photos crops"),
    max_pixels: int = typer.Option(MAX_PIXELS, help="larger images are rejected as bombs"),
    source: str = typer.Option("", help="value of the `source` column (default: SRC's name)"),
    force: bool = typer.Option(False, help="re-ingest even if DEST is up to date"),
    order: str = typer.Option("auto", help="row order: hash (mixes classes), source, auto"),
    order_seed: int = typer.Option(0, help="seed of the hash order"),
    label_map: str = typer.Option("", help="folder name -> class index/name (JSON or text)"),
    image_column: str = typer.Option("", help="Parquet: image column (default: detected)"),
    label_column: str = typer.Option("", help="Parquet: label column (default: label)"),
    verbose: bool = _VERBOSE_OPT,
) -> None:
    """Ingest images into Parquet shards + _manifest.json (Ray Data; idempotent, resumable)."""
    from rich.progress import Progress

    from aim_platform.cluster import connect
    from aim_platform.console import captured_output, log_path
    from aim_platform.data.ingest import ingest as run_ingest
    from aim_platform.data.storage import parse_storage_options

    log = None if verbose else log_path(Path("runs").resolve(), "ingest")
    with captured_output(log) as term:
        term.print(f"ingesting {src} -> {dest}" + (f"; log: {log}" if log else ""), markup=False)
        try:
            opts = parse_storage_options(storage_options)
            own_ray = connect(None)
            # a bar in a terminal; in a log (a Ray job, CI) only the summary below
            bar = Progress(console=term, transient=True, disable=not term.is_terminal)
            with bar:
                task = bar.add_task("decode and validate, write shards", total=None)
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
                    order=order,
                    order_seed=order_seed,
                    label_map=label_map or None,
                    image_column=image_column or None,
                    label_column=label_column or None,
                )
        except ValueError as exc:  # bad input: the source, an option, an image folder
            term.print(f"error: {exc}", markup=False, highlight=False)
            raise typer.Exit(2) from None
        c = m["counts"]
        state = "up to date" if m.get("skipped") else "written"
        term.print(
            f"{dest}: {state}; train {c['train']}, val {c['val']}, rejected {c['rejected']}, "
            f"shards {len(m['shards']['train'])}+{len(m['shards']['val'])}",
            markup=False,
            highlight=False,
        )
        for r in m["rejected"][:20]:
            term.print(f"  rejected {r['id']}: {r['reason']}", markup=False, highlight=False)
        if log:
            term.print(f"log: {log}", markup=False, highlight=False)
        if own_ray:
            import ray

            ray.shutdown()


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
    scale: str = typer.Option("tiny", help="budget preset when CONFIG is a study spec"),
    wait: bool = typer.Option(
        False, "--wait", help="wait for the job to end; exit 1 unless it succeeds"
    ),
) -> None:
    """Submit a job to a Ray cluster: a job CONFIG runs `aimctl pretrain CONFIG`, a study
    spec (jobs/studies/) `aimctl study SPEC --scale S`; --entrypoint runs anything else."""
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
        scale=scale,
    )
    console.print(f"submitted {job_id}", soft_wrap=True)
    console.print(f"  aimctl jobs logs {job_id} --follow --address {address}", soft_wrap=True)
    if wait:
        with console.status(f"{job_id}: running (Ctrl-C stops waiting, not the job)"):
            state = _submit_call(sub.wait_for, address, job_id, token_file, timeout=7 * 24 * 3600)
        if state != "SUCCEEDED":
            _print_job_failure(address, job_id, token_file)
            raise typer.Exit(1)
        console.print(f"{job_id}: {state}")


def _print_job_failure(address: str | None, job_id: str, token_file: Path | None) -> None:
    """The job's status message and the last lines of its log: why it failed."""
    from aim_platform import submit as sub

    st = _submit_call(sub.status, address, job_id, token_file)
    console.print(f"{job_id}: {st.status}", markup=False, highlight=False)
    lines = [line for line in sub.logs(address, job_id, token_file).splitlines() if line.strip()]
    if lines:
        console.print(f"last {min(25, len(lines))} lines of its log:", highlight=False)
        for line in lines[-25:]:
            console.print(f"  {line}", markup=False, highlight=False)
    if st.message:
        console.print(f"Ray says: {st.message.strip().splitlines()[-1]}", markup=False)


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
    address: str = _CLUSTER_OPT,
    token_file: Path | None = _TOKEN_OPT,
    tracking_uri: str = typer.Option(
        None, help="MLflow URI; default $MLFLOW_TRACKING_URI, else ./runs/mlflow.db"
    ),
    experiment: str = typer.Option("aim-probe", help="MLflow experiment"),
    parent_run_id: str = typer.Option(None, help="nest under this (pre-training) run"),
    verbose: bool = _VERBOSE_OPT,
) -> None:
    """Attentive/linear probes (and a layer sweep, LoRA) on a frozen trunk."""
    from aim_platform import tracking
    from aim_platform.cluster import connect
    from aim_platform.config import ProbeConfig
    from aim_platform.console import PhaseDisplay, captured_output, log_path
    from aim_platform.eval.probe import report_metrics
    from aim_platform.jobs.probe import log_probe, run_probe

    cfg = _load_or_exit(config, set_, ProbeConfig)
    log = None if verbose else log_path(Path("runs").resolve(), "probe")
    with captured_output(log) as term:
        term.print(f"probing {checkpoint} on {dataset}" + (f"; log: {log}" if log else ""))
        own_ray = connect(address, token_file)
        phases = PhaseDisplay(term, "loading the trunk and the dataset")
        try:
            report = run_probe(
                checkpoint,
                cfg,
                dataset=dataset,
                storage_options=cfg.storage_options,
                on_phase=phases.phase,
            )
        except PlatformError:
            phases.close()
            raise
        except Exception as exc:  # one line here, the traceback in the log
            phases.close()
            traceback.print_exc()
            _failed(term, "the probe", exc, log)
        phases.close()
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
            term.print(f"{key:40s} {tracking.format_metric(value)}", markup=False)
        term.print(
            f"MLflow run {run_id}: {tracking.ui_command(uri)}", markup=False, highlight=False
        )
        if log:
            term.print(f"log: {log}", markup=False, highlight=False)
        if own_ray:
            import ray

            ray.shutdown()


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
    address: str = _CLUSTER_OPT,
    token_file: Path | None = _TOKEN_OPT,
    storage: str = typer.Option("./runs/studies", help="study folder root"),
    tracking_uri: str = typer.Option(
        None, help="MLflow URI; default $MLFLOW_TRACKING_URI, else mlflow.db above --storage"
    ),
    resume: bool = typer.Option(False, help="continue an interrupted study"),
    verbose: bool = _VERBOSE_OPT,
) -> None:
    """Run one of the paper's ablations (Tables 3-5) with Ray Tune; print its table."""
    from aim_platform import tracking
    from aim_platform.cluster import connect
    from aim_platform.config import ConfigError
    from aim_platform.console import StudyDisplay, captured_output, log_path
    from aim_platform.jobs.study import load_study, run_study
    from aim_platform.train.paths import storage_url

    if scale not in ("tiny", "small", "paper"):
        raise ConfigError(f"--scale: {scale!r} is not one of tiny, small, paper")
    parsed = load_study(spec)
    first = parsed.job(next(iter(parsed.variants)), scale, set_)  # validates the overrides
    folder = Path(storage_url(storage)) / f"{parsed.name}-{scale}"
    log = None if verbose else log_path(folder, "study")
    with captured_output(log) as term:
        term.print(
            f"study {parsed.name} (Table {parsed.table}), scale {scale}: "
            f"{len(parsed.variants)} trials of {first.train.steps} steps"
            + (f"; log: {log}" if log else ""),
            markup=False,
            highlight=False,
        )
        own_ray = connect(address, token_file)
        display = StudyDisplay(term, parsed.name, list(parsed.variants), first.train.steps)
        try:
            result = run_study(
                parsed,
                scale,
                storage=storage,
                tracking_uri=tracking_uri,
                address=address,
                resume=resume,
                extra=set_,
                on_trial=display.trial,
            )
        except PlatformError:
            raise
        except Exception as exc:  # one line here, the traceback in the log
            display.close()
            traceback.print_exc()
            _failed(term, "the study", exc, log)
        display.close()
        term.print(result.markdown(), markup=False, highlight=False)
        for t in result.trials:
            if t.error:
                first_line = t.error.strip().splitlines()[0]
                term.print(f"trial {t.variant} failed: {first_line}", markup=False)
        term.print(f"table: {folder / 'table.md'} (and table.csv)", markup=False)
        term.print(
            f"MLflow study run {result.parent_run_id}: {tracking.ui_command(result.tracking_uri)}",
            markup=False,
            highlight=False,
        )
        if log:
            term.print(f"log: {log}", markup=False, highlight=False)
        if own_ray:
            import ray

            ray.shutdown()


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
    address: str = _CLUSTER_OPT,
    token_file: Path | None = _TOKEN_OPT,
) -> None:
    """Fit the k-means patch tokenizer of the discrete-token target (Table 3a) on a dataset."""
    from aim_platform.cluster import connect
    from aim_platform.config import ConfigError, DataConfig, ModelConfig, build_config
    from aim_platform.data.storage import parse_storage_options
    from aim_platform.jobs.tokenizer import fit_tokenizer
    from aim_platform.models.tokenizer import Tokenizer

    sizes = {"img_size": image_size, "patch_size": patch_size}
    try:
        opts = parse_storage_options(storage_options)
        model = build_config(
            ModelConfig, {"size": model_size, **{k: v for k, v in sizes.items() if v}}
        )
        source = {"sources": [{"url": dataset_url}], "storage_options": opts}
        data = build_config(DataConfig, source)
        connect(address, token_file)
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


@app.command()
def plan(
    config: Path = typer.Argument(..., help="job YAML (see jobs/configs/)"),
    gpus: int = typer.Option(..., "--gpus", help="GPUs (one FSDP2 worker each)"),
    gpu: str = typer.Option("h200", "--gpu", help="h200, h100, a100, b200, l40s"),
    mfu: float = typer.Option(0.4, "--mfu", help="model FLOPs utilization assumed"),
    set_: list[str] = typer.Option([], "--set", help="override a.b=c (repeatable)"),
) -> None:
    """Validate CONFIG and print its parameters, FLOPs, memory per GPU, steps and hours."""
    from aim_platform.config import JobConfig, load_config
    from aim_platform.plan import plan as make_plan

    job = load_config(config, set_, JobConfig)  # a ConfigError is one line, exit 2
    for line in make_plan(job, gpus, gpu.lower(), mfu).lines():
        typer.echo(line)


def main() -> None:
    """Console-script entry point."""
    app()


if __name__ == "__main__":
    main()
