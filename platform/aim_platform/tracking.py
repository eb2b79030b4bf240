"""MLflow, through one door: the only module of the platform that imports ``mlflow``.

- :func:`resolve_tracking_uri` is the one rule for where runs go: the configured URI, else
  ``$MLFLOW_TRACKING_URI``, else ``sqlite:///<runs folder>/mlflow.db``. The runs folder is
  ``./runs`` (absolute) for pre-training, probes and studies alike unless a job's storage says
  otherwise, so one ``mlflow ui`` shows all of them.
- A :class:`Tracker` is built once from that URI by the driver and passed down. It creates
  the experiment (with MLflow 3's experiment kind, so the UI opens on training runs) and the
  runs (with the git commit as tags), then writes metrics, texts, figures, dataset inputs.
- Only rank 0 of a training job writes, through :class:`RunLogger`, which also samples
  system metrics (CPU, memory, GPU when present) from a background thread of that process.
- Concurrent writers (Tune trials) may share an embedded SQLite store once the driver has
  created it (schema migrations and experiment creation race otherwise): MLflow gives each
  SQLite session a 20 s busy timeout, and ``tests/test_tracking.py`` checks that 4 writers at
  once lose nothing. Many more writers should go through an MLflow server.

Over 400 lines on purpose: it is the one door to MLflow, so every read and write of runs,
datasets, figures and system metrics lives here.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

_MAX_PARAM_LEN = 6000
DEFAULT_RUNS_DIR = "./runs"
#: MLflow 3's experiment type (the UI's "experimentKind"): without it an experiment may open
#: on the GenAI overview (traces, token usage) instead of its runs.
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"
GIT_COMMIT_TAGS = ("git_commit", "mlflow.source.git.commit")


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


#: Set by ``aimctl submit`` for the job: the commit of the checkout the code was sent from
#: (the copy on the cluster has no ``.git``).
GIT_COMMIT_ENV = "AIM_GIT_COMMIT"


def git_commit(cwd: str | Path | None = None) -> str | None:
    """HEAD of the repository the code runs from, if it is a git checkout; else the commit
    a submitted job was sent from (``$AIM_GIT_COMMIT``)."""
    found = _git_head(cwd)
    return found if found is not None else (os.environ.get(GIT_COMMIT_ENV) or None)


def _git_head(cwd: str | Path | None) -> str | None:
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


def _short_name(url: str) -> str:
    """Last meaningful part of a path or URL (``builtin:digits`` -> ``digits``)."""
    tail = url.rstrip("/").split("/")[-1].split(":")[-1]
    return Path(tail).stem if tail.endswith((".pt", ".safetensors")) else tail


def trunk_name(path: str) -> str:
    """A trunk's short name: ``runs/demo/final`` -> ``demo``, ``.../trunks/step_00000010`` ->
    ``demo@10``, ``aim.pt`` -> ``aim``."""
    parts = path.rstrip("/").split("/")
    if len(parts) >= 2 and parts[-1] == "final":
        return parts[-2]
    if len(parts) >= 3 and parts[-2] == "trunks" and parts[-1].startswith("step_"):
        return f"{parts[-3]}@{int(parts[-1].removeprefix('step_'))}"
    return _short_name(path)


def probe_run_name(trunk_path: str, dataset: str) -> str:
    """``probe demo@10 on digits``: the trunk and the dataset of a probe run."""
    return f"probe {trunk_name(trunk_path)} on {_short_name(dataset)}"


@dataclass(frozen=True)
class DatasetInfo:
    """What MLflow shows of a dataset input (the runs list's Dataset column)."""

    name: str
    source: str  # the URL the rows come from
    digest: str  # from the ingest manifest's fingerprint
    counts: Mapping[str, int]  # rows per split (train, val), listed, rejected

    @property
    def source_type(self) -> str:
        scheme = self.source.split("://")[0] if "://" in self.source else "local"
        return scheme.split(":")[0][:36]


def dataset_info(url: str, storage_options: Mapping[str, Any] | None = None) -> DatasetInfo | None:
    """The dataset input of an ingest root (or an ingested built-in), from its manifest;
    None when there is no manifest."""
    from aim_platform.data.pipeline import resolve_url
    from aim_platform.data.shards import read_manifest
    from aim_platform.storage import public_url

    opts = dict(storage_options or {})
    root = resolve_url(url)
    manifest = read_manifest(root, opts)
    if manifest is None:
        return None
    counts = {k: int(v) for k, v in (manifest.get("counts") or {}).items()}
    return DatasetInfo(
        name=str(manifest.get("name") or _short_name(url)),
        source=url if url.startswith("builtin:") else public_url(root),
        digest=str(manifest.get("fingerprint", ""))[:16] or "unknown",
        counts=counts,
    )


def _param_value(value: Any) -> str:
    text = str(value)
    return text if len(text) <= _MAX_PARAM_LEN else text[: _MAX_PARAM_LEN - 3] + "..."


def _metric_value(value: Any) -> float | None:
    """A finite number (bools and NaN/inf are left out), else None."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(float(value)) else None


class Tracker:
    """One MLflow store: experiments, runs and everything written into them.

    Built once per process from :func:`resolve_tracking_uri`'s answer and passed down.
    """

    def __init__(self, uri: str) -> None:
        from mlflow.tracking import MlflowClient

        self.uri = uri
        self._client = MlflowClient(tracking_uri=uri)

    def experiment_id(self, name: str) -> str:
        """Id of experiment ``name``, created (with its kind tag) when missing."""
        exp = self._client.get_experiment_by_name(name)
        if exp is None:
            exp_id = self._client.create_experiment(
                name,
                artifact_location=artifact_root(self.uri),
                tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND},
            )
            return exp_id
        if exp.tags.get(EXPERIMENT_KIND_TAG) != EXPERIMENT_KIND:  # made by an older version
            self._client.set_experiment_tag(exp.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
        return exp.experiment_id

    def start_run(
        self,
        experiment: str,
        run_name: str,
        params: Mapping[str, Any] | None = None,
        tags: Mapping[str, str | None] | None = None,
        parent_run_id: str | None = None,
    ) -> str:
        """Create a run with its params and tags (already redacted by the caller) and the git
        commit; return its id."""
        exp_id = self.experiment_id(experiment)
        run_tags = {"mlflow.runName": run_name}
        commit = git_commit()
        if commit:
            run_tags.update({k: commit for k in GIT_COMMIT_TAGS})
        if parent_run_id:
            run_tags["mlflow.parentRunId"] = parent_run_id
        run_tags.update({k: str(v) for k, v in (tags or {}).items() if v is not None})
        run = self._client.create_run(exp_id, tags=run_tags, run_name=run_name)
        self.log_params(run.info.run_id, params or {})
        return run.info.run_id

    def log_params(self, run_id: str, params: Mapping[str, Any]) -> None:
        """Params (long values cut to MLflow's limit)."""
        from mlflow.entities import Param

        items = [Param(k, _param_value(v)) for k, v in params.items()]
        for i in range(0, len(items), 100):  # MLflow caps a batch at 100 params
            self._client.log_batch(run_id, params=items[i : i + 100])

    def log_metrics(self, run_id: str, metrics: Mapping[str, Any], step: int) -> None:
        """Numeric, finite metrics at ``step`` (anything else is left out)."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = []
        for k, v in metrics.items():
            value = _metric_value(v)
            if value is not None:
                items.append(Metric(k, value, now, step))
        for i in range(0, len(items), 1000):
            self._client.log_batch(run_id, metrics=items[i : i + 1000])

    def set_tags(self, run_id: str, tags: Mapping[str, str | None]) -> None:
        """Tags (None values are left out)."""
        from mlflow.entities import RunTag

        items = [RunTag(k, str(v)) for k, v in tags.items() if v is not None]
        if items:
            self._client.log_batch(run_id, tags=items)

    def log_text(self, run_id: str, text: str, path: str) -> None:
        """Write ``text`` as the artifact file ``path``."""
        self._client.log_text(run_id, text, path)

    def log_figure(self, run_id: str, figure: Any, path: str) -> None:
        """A matplotlib figure as the image artifact ``path`` (the figure is closed)."""
        import matplotlib.pyplot as plt

        try:
            self._client.log_figure(run_id, figure, path)
        finally:
            plt.close(figure)

    def log_artifact(self, run_id: str, file: str | Path, folder: str | None = None) -> None:
        """Upload a local file."""
        self._client.log_artifact(run_id, str(file), folder)

    def log_dataset(self, run_id: str, dataset: DatasetInfo, context: str = "training") -> None:
        """A dataset input (the runs list's Dataset column): name, source, digest, counts."""
        from mlflow.entities import Dataset, DatasetInput, InputTag

        entity = Dataset(
            name=dataset.name,
            digest=dataset.digest,
            source_type=dataset.source_type,
            source=json.dumps({"url": dataset.source}),
            profile=json.dumps({"num_rows": dataset.counts.get("train"), **dataset.counts}),
        )
        tags = [InputTag("mlflow.data.context", context)]
        self._client.log_inputs(run_id, datasets=[DatasetInput(entity, tags)])

    def datasets(self, run_id: str) -> list[dict[str, Any]]:
        """The run's dataset inputs: name, digest, source, profile (dict) and context."""
        out = []
        for d in self._client.get_run(run_id).inputs.dataset_inputs:
            tags = {t.key: t.value for t in d.tags}
            out.append(
                {
                    "name": d.dataset.name,
                    "digest": d.dataset.digest,
                    "source": json.loads(d.dataset.source).get("url"),
                    "profile": json.loads(d.dataset.profile or "{}"),
                    "context": tags.get("mlflow.data.context"),
                }
            )
        return out

    def metric_history(self, run_id: str, key: str) -> list[tuple[int, float]]:
        """``(step, value)`` of every logged point of ``key``, by step."""
        points = self._client.get_metric_history(run_id, key)
        return sorted((m.step, m.value) for m in points)

    def metric_keys(self, run_id: str) -> list[str]:
        """Every metric key the run logged, sorted."""
        return sorted(self._client.get_run(run_id).data.metrics)

    def run_name(self, run_id: str) -> str:
        """The run's display name (its id when it has none)."""
        return self._client.get_run(run_id).info.run_name or run_id

    def experiment_of(self, run_id: str) -> str:
        """Id of the run's experiment."""
        return self._client.get_run(run_id).info.experiment_id

    def tags(self, run_id: str) -> dict[str, str]:
        """The run's tags."""
        return dict(self._client.get_run(run_id).data.tags)

    def experiment_tags(self, name: str) -> dict[str, str]:
        """Tags of experiment ``name`` (empty when it does not exist)."""
        exp = self._client.get_experiment_by_name(name)
        return dict(exp.tags) if exp else {}

    def find_experiment(self, name: str) -> str | None:
        """Id of experiment ``name``, or None (nothing is created)."""
        exp = self._client.get_experiment_by_name(name)
        return exp.experiment_id if exp else None

    def latest_run(self, experiment_id: str, *, parent: bool = False) -> str | None:
        """The newest top-level run of an experiment (``parent``: the newest run that has
        nested runs, e.g. a study's), or None."""
        runs = self._client.search_runs([experiment_id], order_by=["attributes.start_time DESC"])
        parents = {r.data.tags.get("mlflow.parentRunId") for r in runs}
        for r in runs:
            if "mlflow.parentRunId" in r.data.tags:
                continue
            if not parent or r.info.run_id in parents:
                return r.info.run_id
        return None

    def finish(self, run_id: str, status: str = "FINISHED") -> None:
        """Mark a run FINISHED or FAILED."""
        self._client.set_terminated(run_id, status=status)

    def system_metrics(self, run_id: str, interval: float = 10.0) -> SystemMetrics:
        """Start sampling CPU, memory, disk, network (and GPU when present) into the run."""
        return SystemMetrics(self.uri, run_id, interval)


class SystemMetrics:
    """MLflow's system-metrics monitor for one run, sampled from a thread of this process.

    Start it on the process that owns the devices (rank 0), stop it with :meth:`stop`; it
    also stops by itself once the run is no longer RUNNING.
    """

    def __init__(self, uri: str, run_id: str, interval: float = 10.0) -> None:
        import logging
        import warnings

        # "Skip logging GPU metrics" and start/stop notes are info, not news, on a CPU worker.
        logging.getLogger("mlflow.system_metrics").setLevel(logging.WARNING)
        self._monitor = None
        try:  # needs psutil (and nvidia-ml-py for GPUs): training goes on without them
            from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

            self._monitor = SystemMetricsMonitor(
                run_id, sampling_interval=interval, resume_logging=True, tracking_uri=uri
            )
        except ImportError as exc:
            warnings.warn(f"no system metrics: {exc} (pip install psutil)", stacklevel=2)
            return
        self._monitor.start()

    def stop(self) -> None:
        """Stop sampling and flush what was collected."""
        if self._monitor is not None:
            self._monitor.finish()
            self._monitor = None


class RunLogger:
    """Metrics into one existing run (rank 0 only), optionally with system metrics."""

    def __init__(
        self,
        tracking_uri: str,
        run_id: str,
        *,
        system_metrics: bool = False,
        interval: float = 10.0,
    ) -> None:
        self.tracker = Tracker(tracking_uri)
        self.run_id = run_id
        self._system = self.tracker.system_metrics(run_id, interval) if system_metrics else None

    def log_metrics(self, metrics: Mapping[str, Any], step: int) -> None:
        self.tracker.log_metrics(self.run_id, metrics, step)

    def close(self) -> None:
        """Stop the system-metrics sampling, if any."""
        if self._system is not None:
            self._system.stop()
            self._system = None


def format_metric(value: Any) -> str:
    """A metric for the console: integers as integers (``best_block 3``), floats to 4 places."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return str(value)
    if isinstance(value, int):
        return str(value)
    return f"{value:.4f}"


def log_datasets(
    tracker: Tracker,
    run_id: str,
    urls: Sequence[str],
    storage_options: Mapping[str, Any] | None = None,
    context: str = "training",
) -> None:
    """Each URL's manifest as a dataset input of the run (URLs without a manifest skipped)."""
    for url in urls:
        info = dataset_info(url, storage_options)
        if info is not None:
            tracker.log_dataset(run_id, info, context)
