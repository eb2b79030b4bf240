"""``aimctl services up|down|status|user|secrets``: the local MLflow server and development S3
endpoint, MLflow basic-auth users, the compose stack's secret files."""

from __future__ import annotations

import os
from pathlib import Path

import typer

from aim_platform.cli.app import app, console

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
    host: str = typer.Option("127.0.0.1", help="interface to bind (beyond loopback: --auth)"),
    expose: bool = typer.Option(
        False, "--expose", help="bind 0.0.0.0 (all interfaces); needs --auth"
    ),
    mlflow_port: int = typer.Option(5000, help="MLflow port (0: any free port)"),
    s3_port: int = typer.Option(9000, help="development S3 port (0: any free port)"),
    backend_store_uri: str | None = typer.Option(None, help="SQL URI [default: SQLite file]"),
    artifacts: str | None = typer.Option(None, help="artifact folder or s3:// URI"),
    s3_endpoint: str | None = typer.Option(None, help="S3 endpoint for s3:// artifacts"),
    auth: bool = typer.Option(False, "--auth", help="MLflow basic-auth app"),
    bucket: list[str] = typer.Option([], help="bucket to create on the dev S3 endpoint"),
    timeout: float = typer.Option(120.0, help="seconds to wait for each service to answer"),
) -> None:
    """Start the services in the background; return once each answers over HTTP."""
    from aim_platform import services as svc

    bind = "0.0.0.0" if expose else host
    # Before anything starts: a server open to the network without a login is never started.
    svc.check_exposure(bind, mlflow=mlflow, auth=auth, s3=s3)  # PlatformError: one line, exit 2
    started = []
    try:
        if s3:
            started.append(
                svc.s3_up(state_dir, host=bind, port=s3_port, buckets=bucket, timeout=timeout)
            )
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
                timeout=timeout,
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


@services_app.command("user")
def services_user(
    username: str = typer.Argument(
        ..., help="the MLflow user to create (or whose password to set)"
    ),
    tracking_uri: str | None = typer.Option(
        None, "--tracking-uri", help="MLflow server [default: $MLFLOW_TRACKING_URI]"
    ),
    password_env: str = typer.Option(
        "AIM_MLFLOW_USER_PASSWORD", help="environment variable holding the new user's password"
    ),
) -> None:
    """Create an MLflow basic-auth user (or set its password), as an admin.

    The admin logs in with MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD (as every MLflow
    client does); passwords come from the environment, never the command line.
    """
    from aim_platform import services as svc

    uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    if not uri:
        raise svc.ServiceError("aimctl services user: set --tracking-uri or MLFLOW_TRACKING_URI")
    password = os.environ.get(password_env, "")
    admin = os.environ.get("MLFLOW_TRACKING_USERNAME", svc.AUTH_ADMIN_USERNAME)
    admin_password = os.environ.get("MLFLOW_TRACKING_PASSWORD", "")
    if not password or not admin_password:
        missing = password_env if not password else "MLFLOW_TRACKING_PASSWORD"
        raise svc.ServiceError(f"aimctl services user: {missing} is not set")
    done = svc.mlflow_user(
        uri, username, password, admin_username=admin, admin_password=admin_password
    )
    console.print(f"mlflow user {username}: {done}", soft_wrap=True)


@services_app.command("secrets")
def services_secrets(
    folder: Path = typer.Option(Path("infra/secrets"), "--dir", help="where compose reads them"),
) -> None:
    """Create the compose stack's missing secret files (random values), each 0600 from the start."""
    from aim_platform import services as svc

    made = svc.write_compose_secrets(folder)
    console.print(
        f"created {', '.join(made)}" if made else "all secret files exist", soft_wrap=True
    )
