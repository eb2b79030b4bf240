"""MLflow helpers: one place that decides where runs go and how they are written.

- The driver resolves the tracking URI, creates the experiment and the run once (concurrent
  first calls race on experiment creation and SQLite migrations), and passes the run id down.
- Only rank 0 of a training job writes metrics, through :class:`RunLogger`; other ranks never
  open the tracking store.
- The embedded default is a SQLite file beside the local runs folder (MLflow 3.17 refuses the
  plain-folder backend); concurrent writers (Tune trials) should go through an MLflow server.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from aim_platform.config import TrackingConfig

_MAX_PARAM_LEN = 6000


def is_local(url: str) -> bool:
    """True for a plain path or ``file://`` URL."""
    return "://" not in url or url.startswith("file://")


def local_path(url: str) -> Path:
    """Absolute local path of a plain path or ``file://`` URL."""
    return Path(url.removeprefix("file://")).expanduser().resolve()


def resolve_tracking_uri(cfg: TrackingConfig, storage_path: str) -> str:
    """Config, else ``$MLFLOW_TRACKING_URI``, else ``sqlite:///<runs folder>/mlflow.db``.

    With remote storage (``s3://``) and no tracking URI, the SQLite file goes to ``./runs``.
    """
    if cfg.tracking_uri:
        return cfg.tracking_uri
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env:
        return env
    root = local_path(storage_path) if is_local(storage_path) else Path("runs").resolve()
    root.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{root / 'mlflow.db'}"


def artifact_root(tracking_uri: str) -> str | None:
    """Artifact location for new experiments of an embedded SQLite store (a folder beside it)."""
    if tracking_uri.startswith("sqlite:///"):
        db = Path(tracking_uri.removeprefix("sqlite:///"))
        return (db.parent / "mlartifacts").as_uri()
    return None  # a server decides (--artifacts-destination / --default-artifact-root)


def get_or_create_experiment(tracking_uri: str, name: str) -> str:
    """Experiment id for ``name`` (created once, by the driver)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    return client.create_experiment(name, artifact_location=artifact_root(tracking_uri))


def git_commit(cwd: str | Path | None = None) -> str | None:
    """HEAD of the repository the code runs from, if it is a git checkout."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=cwd or Path(__file__).parent,
            capture_output=True,
            text=True,
            timeout=5,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    if out.returncode != 0:
        return None
    return out.stdout.strip() or None


def _param_value(value: Any) -> str:
    text = str(value)
    return text if len(text) <= _MAX_PARAM_LEN else text[: _MAX_PARAM_LEN - 3] + "..."


def start_run(
    tracking_uri: str,
    experiment: str,
    run_name: str,
    params: Mapping[str, Any],
    tags: Mapping[str, str | None],
    parent_run_id: str | None = None,
) -> str:
    """Create a run with its params and tags (already redacted by the caller); return its id."""
    from mlflow.entities import Param
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    exp_id = get_or_create_experiment(tracking_uri, experiment)
    run_tags = {"mlflow.runName": run_name}
    if parent_run_id:
        run_tags["mlflow.parentRunId"] = parent_run_id
    run_tags.update({k: str(v) for k, v in tags.items() if v is not None})
    run = client.create_run(exp_id, tags=run_tags, run_name=run_name)
    items = [Param(k, _param_value(v)) for k, v in params.items()]
    for i in range(0, len(items), 100):  # MLflow caps a batch at 100 params
        client.log_batch(run.info.run_id, params=items[i : i + 100])
    return run.info.run_id


class RunLogger:
    """Metrics into one existing run (rank 0 only)."""

    def __init__(self, tracking_uri: str, run_id: str) -> None:
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient(tracking_uri=tracking_uri)
        self.run_id = run_id

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        import math
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [
            Metric(k, float(v), now, step)
            for k, v in metrics.items()
            if isinstance(v, int | float) and math.isfinite(float(v))
        ]
        for i in range(0, len(items), 1000):
            self.client.log_batch(self.run_id, metrics=items[i : i + 1000])


def finish_run(tracking_uri: str, run_id: str, status: str = "FINISHED") -> None:
    """Mark a run FINISHED or FAILED."""
    from mlflow.tracking import MlflowClient

    MlflowClient(tracking_uri=tracking_uri).set_terminated(run_id, status=status)


def log_artifact_text(tracking_uri: str, run_id: str, text: str, path: str) -> None:
    """Write ``text`` as an artifact file ``path`` of the run."""
    from mlflow.tracking import MlflowClient

    MlflowClient(tracking_uri=tracking_uri).log_text(run_id, text, path)


def log_artifact_file(
    tracking_uri: str, run_id: str, file: str | Path, folder: str | None = None
) -> None:
    """Upload a local file as an artifact of the run."""
    from mlflow.tracking import MlflowClient

    MlflowClient(tracking_uri=tracking_uri).log_artifact(run_id, str(file), folder)
