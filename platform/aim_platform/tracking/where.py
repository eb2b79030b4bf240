"""Where runs go, and where to see them: the one rule for the tracking URI.

The configured URI, else ``$MLFLOW_TRACKING_URI``, else ``sqlite:///<runs folder>/mlflow.db``.
The runs folder is ``./runs`` (absolute) for pre-training, probes and studies alike unless a
job's storage says otherwise, so one ``mlflow ui`` shows all of them.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from aim_platform.tracking.tracker import Tracker

DEFAULT_RUNS_DIR = "./runs"


def is_local(url: str) -> bool:
    """True for a plain path or ``file://`` URL."""
    return "://" not in url or url.startswith("file://")


def local_path(url: str) -> Path:
    """Absolute local path of a plain path or ``file://`` URL."""
    return Path(url.removeprefix("file://")).expanduser().resolve()


def resolve_tracking_uri(configured: str | None, runs_dir: str | None = None) -> str:
    """Config, else ``$MLFLOW_TRACKING_URI``, else ``sqlite:///<runs folder>/mlflow.db``.

    Args:
        configured: The URI a config or a command-line option names (None: not set).
        runs_dir: The runs folder (a pre-training job's local ``storage_path``); None or a
            remote URL (``s3://``) means :data:`DEFAULT_RUNS_DIR`.
    """
    if configured:
        return configured
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env:
        return env
    folder = runs_dir if runs_dir and is_local(runs_dir) else DEFAULT_RUNS_DIR
    root = local_path(folder)
    root.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{root / 'mlflow.db'}"


def artifact_root(tracking_uri: str) -> str | None:
    """Artifact location for new experiments of an embedded SQLite store (a folder beside it)."""
    if tracking_uri.startswith("sqlite:///"):
        db = Path(tracking_uri.removeprefix("sqlite:///"))
        return (db.parent / "mlartifacts").as_uri()
    return None  # a server decides (--artifacts-destination / --default-artifact-root)


def ui_command(tracking_uri: str) -> str:
    """What to run (or open) to see the runs of ``tracking_uri``."""
    if tracking_uri.startswith("sqlite"):
        return f"mlflow ui --backend-store-uri {tracking_uri}"
    return tracking_uri


def ui_url(tracker: Tracker, run_id: str, base: str = "http://127.0.0.1:5000") -> str:
    """The run's page in MLflow's "Model training" view (``base``: where ``mlflow ui`` serves;
    a server URI is its own base)."""
    if tracker.uri.startswith(("http://", "https://")):
        base = tracker.uri.rstrip("/")
    exp = tracker.experiment_of(run_id)
    return f"{base}/#/experiments/{exp}/runs/{run_id}?workflowType=machine_learning"
