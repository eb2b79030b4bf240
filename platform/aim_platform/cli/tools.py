"""The quick commands that start no job: ``aimctl doctor``, ``selfcheck``, ``convert-ml-aim``,
``correlate`` (loss vs probe accuracy from MLflow) and ``plan`` (a config's size and cost)."""

from __future__ import annotations

from pathlib import Path

import typer

from aim_platform.cli.app import app, console


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

    out = convert_file(src, dst)  # a refused or malformed SRC: one line naming it, exit 2
    console.print(f"wrote {out}", markup=False, highlight=False)


@app.command()
def correlate(
    run_ids: list[str] = typer.Argument(..., help="one pre-training run, or several runs"),
    tracking_uri: str = typer.Option(
        None, help="MLflow URI; default $MLFLOW_TRACKING_URI, else ./runs/mlflow.db"
    ),
    log_to: str = typer.Option(None, help="across runs: log the result into this run"),
    within: bool = typer.Option(
        False,
        "--within",
        help="several runs of one recipe (seeds): each run's own coefficients, their mean "
        "and 95% interval over the runs, and a verdict against the paper's Fig. 4",
    ),
) -> None:
    """Pre-training loss vs probe accuracy: per checkpoint of one run, across runs (each
    run's last point), or --within each of several runs with a verdict over them."""
    from aim_platform import tracking
    from aim_platform.config import ConfigError
    from aim_platform.eval.correlation import correlate_run, correlate_runs, correlate_within

    tracker = tracking.Tracker(tracking.resolve_tracking_uri(tracking_uri))
    for rid in [*run_ids, *([log_to] if log_to else [])]:  # a mistyped id: one line, exit 2
        try:
            tracker.run_name(rid)
        except Exception as exc:  # MLflow: RESOURCE_DOES_NOT_EXIST and the like
            raise ConfigError(f"run {rid}: not found in {tracker.uri} ({exc})") from None
    if within:
        if log_to:
            raise ConfigError("--log-to is for across runs; --within logs into each run")
        console.print(correlate_within(tracker, run_ids).table())
        return
    if len(run_ids) == 1:
        corr = correlate_run(tracker, run_ids[0])
    else:
        corr = correlate_runs(tracker, run_ids, log_to=log_to)
    console.print(corr.table())
    if len(corr.losses) < 2:
        console.print("[yellow]fewer than 2 points: no coefficient[/yellow]")


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
