"""``aimctl submit`` and ``aimctl jobs status|logs|stop``: jobs on a Ray cluster."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console

from aim_platform.cli.app import _ADDRESS_OPT, _TOKEN_OPT, app, console


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
    seeds: int = typer.Option(1, help="study spec: trials per variant"),
    variants: str = typer.Option("", help="study spec: only these variants, comma-separated"),
    wait: bool = typer.Option(
        False, "--wait", help="wait for the job to end; exit 1 unless it succeeds"
    ),
    verbose: bool = typer.Option(
        False,
        "--verbose",
        "-v",
        help="show Ray's own messages (packaging, upload) instead of a log file",
    ),
) -> None:
    """Submit a job to a Ray cluster: a job CONFIG runs `aimctl pretrain CONFIG`, a study
    spec (jobs/studies/) `aimctl study SPEC --scale S`; --entrypoint runs anything else."""
    from aim_platform import submit as sub
    from aim_platform.console import captured_output, log_path

    # Ray logs the packaging and upload of the code (packaging.py, working_dir.py,
    # dashboard_sdk.py) on its own handlers: into the log file, unless --verbose.
    log = None if verbose else log_path(Path("runs").resolve(), "submit")
    with captured_output(log) as term:
        job_id = sub.submit(
            address,
            config,
            overrides=overrides,
            entrypoint=entrypoint,
            token_file=token_file,
            env=sub.parse_env(env) if env else None,
            submission_id=submission_id,
            scale=scale,
            seeds=seeds,
            variants=variants,
            on_wait=lambda message: term.print(message, markup=False, highlight=False),
        )
        term.print(f"submitted {job_id}", soft_wrap=True)
        term.print(f"  aimctl jobs logs {job_id} --follow --address {address}", soft_wrap=True)
        if wait:
            with term.status(f"{job_id}: running (Ctrl-C stops waiting, not the job)"):
                state = sub.wait_for(address, job_id, token_file, timeout=7 * 24 * 3600)
            if state != "SUCCEEDED":
                _print_job_failure(term, address, job_id, token_file)
                raise typer.Exit(1)
            term.print(f"{job_id}: {state}")


def _print_job_failure(
    term: Console, address: str | None, job_id: str, token_file: Path | None
) -> None:
    """The job's status and its root cause in one line, as a local command prints it; the
    command that shows the whole log (the tracebacks stay there)."""
    term.print(_status_line(address, job_id, token_file), markup=False, highlight=False)
    term.print(
        f"  the whole log: aimctl jobs logs {job_id} --address {address}",
        markup=False,
        highlight=False,
        soft_wrap=True,
    )


def _status_line(address: str | None, job_id: str, token_file: Path | None) -> str:
    """``ID: STATUS (Ray's message)``; a failed job's root cause instead of Ray's message
    (which repeats the last 20,000 characters of the log)."""
    from aim_platform import submit as sub

    st = sub.status(address, job_id, token_file)
    if st.status == "FAILED":
        cause = sub.failure_cause(sub.logs(address, job_id, token_file), st.message)
        return f"{st.job_id}: FAILED: {cause}"
    return f"{st.job_id}: {st.status}" + (f" ({st.message})" if st.message else "")


jobs_app = typer.Typer(no_args_is_help=True, help="Status, logs and stop of submitted jobs.")
app.add_typer(jobs_app, name="jobs")


@jobs_app.command("status")
def jobs_status(
    job_id: str, address: str | None = _ADDRESS_OPT, token_file: Path | None = _TOKEN_OPT
) -> None:
    """Print the job's status and message (a failed job: its root cause, in one line)."""
    console.print(_status_line(address, job_id, token_file), markup=False, soft_wrap=True)


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
        for chunk in sub.follow_logs(address, job_id, token_file):
            typer.echo(chunk, nl=False)
    else:
        typer.echo(sub.logs(address, job_id, token_file), nl=False)


@jobs_app.command("stop")
def jobs_stop(
    job_id: str,
    address: str | None = _ADDRESS_OPT,
    token_file: Path | None = _TOKEN_OPT,
    wait: float = typer.Option(
        120.0,
        help="seconds to wait for the job to end (0: don't); a pre-training job first saves a "
        "checkpoint at its next step, within its train.preempt_grace_s",
    ),
) -> None:
    """Stop a running job (SIGTERM: a pre-training job checkpoints, then ends)."""
    from aim_platform import submit as sub

    state = sub.stop(address, job_id, token_file, wait=wait)
    console.print(f"{job_id}: {state}")
