"""The jobs: ``pretrain``, ``study``, ``probe``, ``ingest``, ``tokenizer-fit``. Each long-running one shows a progress display and a summary; the rest of what it
prints goes to a log file (:func:`~aim_platform.cli.app.run_console`).

Over 400 lines on purpose: one typer command per job, each a thin wrapper (options, the
console frame, the call into :mod:`aim_platform.jobs`); splitting them would scatter the
command line over several files."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from aim_platform.cli.app import (
    _CLUSTER_OPT,
    _TOKEN_OPT,
    _VERBOSE_OPT,
    app,
    console,
    load_or_fail,
    run_console,
)
from aim_platform.cluster import use_token
from aim_platform.config import MAX_PIXELS


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
    use_token(address, token_file)  # before anything imports Ray
    from aim_platform import tracking
    from aim_platform.config import JobConfig
    from aim_platform.console import TrainDisplay, log_path
    from aim_platform.jobs.pretrain import latest_train_state
    from aim_platform.jobs.pretrain import pretrain as run_pretrain
    from aim_platform.jobs.pretrain_outputs import summary
    from aim_platform.train.paths import storage_url
    from aim_platform.train.preempt import EXIT_CODE, Preempted

    job = load_or_fail(config, set_, JobConfig)
    tc = job.train
    log = None if verbose else log_path(_log_folder(job), "pretrain")
    header = (
        f"pre-training {job.name}: {job.model.size}, {tc.steps} steps at batch "
        f"{tc.global_batch_size} on {tc.num_workers} worker(s)"
    )
    previous = latest_train_state(job)
    if previous:
        header += f"\nresuming from the checkpoint at step {previous['step']}"
    uri = tracking.resolve_tracking_uri(job.tracking.tracking_uri, storage_url(tc.storage_path))
    with run_console("pre-training", header, log, address=address, token_file=token_file) as term:
        display = TrainDisplay(term, job.name, tc.steps, tracking_uri=uri)
        preempted = None  # SIGTERM: the run stopped at a step boundary (see train/preempt.py)
        try:
            result = run_pretrain(
                job, address=address, on_progress=display.update, on_event=display.notice
            )
        except Preempted as stop:
            result, preempted = stop.result, str(stop)
        finally:
            display.close()
        for line in [*summary(result), *([preempted] if preempted else [])]:
            term.print(line, markup=False, highlight=False)
    if preempted:
        raise typer.Exit(EXIT_CODE)
    if result.error:
        raise typer.Exit(1)


@app.command()
def study(
    spec: Path = typer.Argument(..., help="study spec (jobs/studies/*.yaml)"),
    scale: str = typer.Option("tiny", help="budget preset: tiny, small, cifar10 or paper"),
    set_: list[str] = typer.Option([], "--set", help="override for every trial a.b=c"),
    address: str = _CLUSTER_OPT,
    token_file: Path | None = _TOKEN_OPT,
    storage: str = typer.Option(
        "./runs/studies", help="study folder root: a local folder or s3://bucket/prefix"
    ),
    storage_options: str = typer.Option(
        "",
        help='fsspec options JSON of --storage, e.g. {"endpoint_url": ...} (every trial '
        "gets them as train.storage_options)",
    ),
    tracking_uri: str = typer.Option(
        None, help="MLflow URI; default $MLFLOW_TRACKING_URI, else mlflow.db above --storage"
    ),
    resume: bool = typer.Option(False, help="continue an interrupted study"),
    seeds: int = typer.Option(1, help="trials per variant (seeds 0..N-1); the table: mean ± std"),
    only_seeds: str = typer.Option(
        "",
        help="run only these seed indices of --seeds, comma-separated (a study split over "
        "sessions or machines: each part's trials.csv holds its seeds' rows)",
    ),
    concurrent: int = typer.Option(None, help="trials at once; default: the spec's"),
    gpus_per_trial: float = typer.Option(
        None,
        help="GPUs a trial's workers take together; a fraction (one-worker trials, e.g. 0.5) "
        "puts several trials on one GPU",
    ),
    variants: str = typer.Option("", help="only these variants, comma-separated"),
    floor: bool = typer.Option(
        True, help="also probe randomly initialized trunks (the table's floor row)"
    ),
    verbose: bool = _VERBOSE_OPT,
) -> None:
    """Run one of the paper's ablations (Tables 3-5) with Ray Tune; print its table."""
    use_token(address, token_file)  # before anything imports Ray
    import json

    import yaml

    from aim_platform import tracking
    from aim_platform.config import SCALES, ConfigError, yaml_problem
    from aim_platform.console import StudyDisplay, log_path
    from aim_platform.jobs.lease import acquire as hold_name
    from aim_platform.jobs.study import check_gpus_per_trial, run_study
    from aim_platform.jobs.study_spec import load_study, pretraining_groups, select_variants
    from aim_platform.jobs.study_table import seed_indices, trial_name
    from aim_platform.storage import is_remote, parse_storage_options
    from aim_platform.train.paths import storage_url

    if scale not in SCALES:
        raise ConfigError(f"--scale: {scale!r} is not one of {', '.join(SCALES)}")
    only = _int_list(only_seeds, "--only-seeds") if only_seeds else None
    indices = seed_indices(seeds, only)
    try:
        parsed = load_study(spec)
    except yaml.YAMLError as exc:  # safe_load: a Python-object tag is only ever this error
        raise ConfigError(f"study spec {spec}: not valid YAML: {yaml_problem(exc)}") from None
    if variants:
        parsed = select_variants(parsed, [v.strip() for v in variants.split(",") if v.strip()])
    if storage_options:  # every trial's storage, so the trials' train.storage_options
        try:
            opts = parse_storage_options(storage_options)
        except ValueError as exc:  # bad JSON from the command line
            raise ConfigError(f"--storage-options: {exc}") from None
        set_ = [*set_, f"train.storage_options={json.dumps(opts)}"]
    first = parsed.job(next(iter(parsed.variants)), scale, set_)  # validates the overrides
    if gpus_per_trial is not None:
        for v in parsed.variants:
            check_gpus_per_trial(gpus_per_trial, parsed.job(v, scale, set_).train.num_workers)
    root = f"{storage_url(storage).rstrip('/')}/{parsed.name}-{scale}"  # the study's folder
    # the console log stays on this machine: ./runs/studies/<study> for a study on s3://
    folder = Path("runs/studies").resolve() / Path(root).name if is_remote(root) else Path(root)
    log = None if verbose else log_path(folder, "study")
    header = (
        f"study {parsed.name} (Table {parsed.table}), scale {scale}: "
        f"{len(parsed.variants) * len(indices)} trials of {first.train.steps} steps"
    )
    if only is not None:
        header += f" (seed indices {', '.join(map(str, indices))} of 0..{seeds - 1})"
    groups = pretraining_groups(parsed, scale, set_, seeds)
    if len(groups) < len(parsed.variants):
        n = len(groups) * len(indices)
        header += (
            f" ({n} pre-training{'s' if n > 1 else ''}: trials that differ only in the probe "
            "share one)"
        )
    names = [trial_name(v, i, seeds) for v in parsed.variants for i in indices]
    with run_console("the study", header, log, address=address, token_file=token_file) as term:
        # One driver per study folder (aim_platform.jobs.lease), held until the study ends.
        held = hold_name(
            f"{storage_url(storage).rstrip('/')}/{parsed.name}-{scale}",
            ttl=first.train.lease_ttl_s,
            storage_options=first.train.storage_options,
            say=lambda text: term.print(text, markup=False, highlight=False),
        )
        display = StudyDisplay(term, parsed.name, names, first.train.steps)
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
                seeds=seeds,
                concurrent=concurrent,
                floor=floor,
                gpus_per_trial=gpus_per_trial,
                only_seeds=only,
            )
        finally:
            display.close()
            held.release()
        term.print(result.markdown(), markup=False, highlight=False)
        for t in result.trials:
            if t.error:
                first_line = t.error.strip().splitlines()[0]
                name = trial_name(t.variant, t.seed, seeds)
                term.print(f"trial {name} failed: {first_line}", markup=False)
        term.print(f"table: {root}/table.md (and table.csv)", markup=False)
        term.print(
            f"MLflow study run {result.parent_run_id}: {tracking.ui_command(result.tracking_uri)}",
            markup=False,
            highlight=False,
        )
        for line in _study_tracking_lines(result, seeds):
            term.print(line, markup=False, highlight=False)


def _int_list(text: str, option: str) -> list[int]:
    """``"0,2"`` -> ``[0, 2]``; a clear error naming ``option`` for anything else."""
    from aim_platform.config import ConfigError

    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ConfigError(f"{option}: {text!r} is not a comma-separated list of integers") from None


def _study_tracking_lines(result: Any, seeds: int) -> list[str]:
    """What MLflow missed of a study: a trial's writes dropped or unwritten (its own
    pre-training reported them), or the study run itself left unfinished."""
    from aim_platform import tracking
    from aim_platform.jobs.study_table import trial_name

    lines = []
    for t in result.trials:
        missed = int(t.metrics.get("tracking/unwritten_writes", 0)) + int(
            t.metrics.get(tracking.DROPPED_METRIC, 0)
        )
        if missed:
            name = trial_name(t.variant, t.seed, seeds)
            lines.append(f"trial {name}: {missed} MLflow writes dropped or not written")
    try:
        status = tracking.Tracker(result.tracking_uri).run_status(result.parent_run_id)
    except tracking.TrackingUnavailable as exc:
        return [*lines, f"the study run's table and plots may be missing in MLflow: {exc}"]
    if status == "RUNNING":
        lines.append("the study run's end was not written to MLflow (it shows RUNNING)")
    return lines


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
    use_token(address, token_file)  # before anything imports Ray
    from aim_platform import tracking
    from aim_platform.config import ProbeConfig
    from aim_platform.console import PhaseDisplay, log_path
    from aim_platform.eval.probe import report_metrics
    from aim_platform.jobs.probe import log_probe, run_probe

    cfg = load_or_fail(config, set_, ProbeConfig)
    log = None if verbose else log_path(Path("runs").resolve(), "probe")
    header = f"probing {checkpoint} on {dataset}"
    with run_console("the probe", header, log, address=address, token_file=token_file) as term:
        phases = PhaseDisplay(term, "loading the trunk and the dataset")
        try:
            report = run_probe(
                checkpoint,
                cfg,
                dataset=dataset,
                storage_options=cfg.storage_options,
                on_phase=phases.phase,
            )
        finally:
            phases.close()
        uri = tracking.resolve_tracking_uri(tracking_uri)
        tracker = tracking.Tracker(uri, background=True)  # MLflow down: the results still show
        run_id = log_probe(
            tracker,
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
        end, _ = tracker.close()
        created = tracker.created(run_id)  # None: its creation never reached the server
        if created is not None:
            term.print(f"MLflow run {created}: {tracking.ui_command(uri)}", markup=False)
        for line in tracking.TrackingReport.of([], [], end).lines(uri, tracker.flush_timeout):
            term.print(line, markup=False, highlight=False)


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
    order: str = typer.Option(
        "auto", help="row order: hash (mixes classes), source, files (tars/Parquet), auto"
    ),
    order_seed: int = typer.Option(0, help="seed of the hash order"),
    label_map: str = typer.Option("", help="folder name -> class index/name (JSON or text)"),
    image_column: str = typer.Option("", help="Parquet: image column (default: detected)"),
    label_column: str = typer.Option("", help="Parquet: label column (default: label)"),
    split_folders: bool = typer.Option(
        False, help="SRC holds train/ and val/ (or test/) class folders: they are the splits"
    ),
    verbose: bool = _VERBOSE_OPT,
) -> None:
    """Ingest images into Parquet shards + _manifest.json (Ray Data; idempotent, resumable)."""
    from rich.progress import Progress

    from aim_platform.console import log_path
    from aim_platform.jobs.ingest import ingest as run_ingest
    from aim_platform.storage import parse_storage_options

    log = None if verbose else log_path(Path("runs").resolve(), "ingest")
    with run_console("ingest", f"ingesting {src} -> {dest}", log) as term:
        opts = parse_storage_options(storage_options)
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
                split_folders=split_folders,
            )
        c = m["counts"]
        state = "up to date" if m.get("skipped") else "written"
        term.print(
            f"{dest}: {state}; train {c['train']}, val {c['val']}, rejected {c['rejected']}, "
            f"shards {len(m['shards']['train'])}+{len(m['shards']['val'])}, "
            f"order {m['settings']['order']}",
            markup=False,
            highlight=False,
        )
        if m.get("resumed_groups"):
            term.print(
                f"resumed an interrupted ingest: {m['resumed_groups']} finished group(s) kept, "
                "not redone",
                markup=False,
                highlight=False,
            )
        for r in m["rejected"][:20]:
            term.print(f"  rejected {r['id']}: {r['reason']}", markup=False, highlight=False)


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
    use_token(address, token_file)  # before anything imports Ray
    from aim_platform.cluster import connect
    from aim_platform.config import ConfigError, DataConfig, ModelConfig, build_config
    from aim_platform.jobs.tokenizer import fit_tokenizer
    from aim_platform.models.tokenizer import Tokenizer
    from aim_platform.storage import parse_storage_options

    sizes = {"img_size": image_size, "patch_size": patch_size}
    try:
        opts = parse_storage_options(storage_options)
    except ValueError as exc:  # bad JSON from the command line
        raise ConfigError(f"--storage-options: {exc}") from None
    model = build_config(ModelConfig, {"size": model_size, **{k: v for k, v in sizes.items() if v}})
    data = build_config(DataConfig, {"sources": [{"url": dataset_url}], "storage_options": opts})
    connect(address, token_file)
    fit_tokenizer(data, model, out, num_tokens, max_patches, seed, iters, opts)
    tok = Tokenizer.load(out, opts)
    info = tok.fitted_on
    console.print(
        f"{out}: {tok.num_tokens} tokens x {tok.patch_dim} values, fitted on {info['patches']} "
        f"patches of {info['images']} images; mean squared distance {info['inertia']:.4g} "
        f"after {info['iterations']} Lloyd iterations"
    )
