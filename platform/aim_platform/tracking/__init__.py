"""MLflow, through one door: the only package of the platform that imports ``mlflow``.

One module per concern; every name is re-exported here, so ``from aim_platform import
tracking`` and ``tracking.Tracker`` are the way in:

- :mod:`~aim_platform.tracking.where`: where runs go (:func:`resolve_tracking_uri`: the
  configured URI, else ``$MLFLOW_TRACKING_URI``, else ``sqlite:///<runs folder>/mlflow.db``)
  and where to see them.
- :mod:`~aim_platform.tracking.naming`: the experiment's kind, the git commit, probe run names.
- :mod:`~aim_platform.tracking.tracker`: a :class:`Tracker`, built once per process from that
  URI and passed down: experiments, runs, writes and reads.
- :mod:`~aim_platform.tracking.queued`: the queue a background tracker's writes wait in, so
  that tracking is never on the training path (a write returns at once whether or not the
  server answers; a full queue drops and counts; :meth:`Tracker.close` ends with a time limit).
- :mod:`~aim_platform.tracking.faults`: which failures are transient (retried: no answer, 408,
  429, 5xx) and which are permanent for that write (any other 4xx: an artifact the store
  refuses is named, counted and skipped), and MLflow's client retry budget, shortened
  (:data:`CLIENT_DEFAULTS`) so that an outage shows in seconds and a synchronous call fails
  with one line (:class:`TrackingUnavailable`).
- :mod:`~aim_platform.tracking.run_logger` and :mod:`~aim_platform.tracking.system_metrics`:
  rank 0's writer, with MLflow's system-metrics monitor (CPU, memory, GPU when present).
- :mod:`~aim_platform.tracking.datasets`: dataset inputs from ingest manifests.
- :mod:`~aim_platform.tracking.report`: what tracking delayed or lost, for the summary.

Concurrent writers (Tune trials) may share an embedded SQLite store once the driver has
created it (schema migrations and experiment creation race otherwise): MLflow gives each
SQLite session a 20 s busy timeout, and ``tests/test_tracking.py`` checks that 4 writers at
once lose nothing. Many more writers should go through an MLflow server.
"""

from __future__ import annotations

from aim_platform.tracking.datasets import DatasetInfo, dataset_info, log_datasets
from aim_platform.tracking.faults import (
    CLIENT_DEFAULTS,
    TrackingUnavailable,
    http_status,
    is_unreachable,
    refusal,
)
from aim_platform.tracking.naming import (
    EXPERIMENT_KIND,
    EXPERIMENT_KIND_TAG,
    GIT_COMMIT_ENV,
    GIT_COMMIT_TAGS,
    git_commit,
    probe_run_name,
    trunk_name,
)
from aim_platform.tracking.queued import BUFFER_SIZE, FLUSH_TIMEOUT_S, QueuedWriter, Write
from aim_platform.tracking.report import (
    DROPPED_METRIC,
    REFUSED_ARTIFACTS_METRIC,
    TrackingReport,
    end_run,
    format_metric,
)
from aim_platform.tracking.run_logger import RunLogger
from aim_platform.tracking.system_metrics import SystemMetrics
from aim_platform.tracking.tracker import PENDING, Tracker
from aim_platform.tracking.where import (
    DEFAULT_RUNS_DIR,
    artifact_root,
    is_local,
    local_path,
    resolve_tracking_uri,
    ui_command,
    ui_url,
)

__all__ = [
    "BUFFER_SIZE",
    "CLIENT_DEFAULTS",
    "DEFAULT_RUNS_DIR",
    "DROPPED_METRIC",
    "EXPERIMENT_KIND",
    "EXPERIMENT_KIND_TAG",
    "FLUSH_TIMEOUT_S",
    "GIT_COMMIT_ENV",
    "GIT_COMMIT_TAGS",
    "PENDING",
    "REFUSED_ARTIFACTS_METRIC",
    "DatasetInfo",
    "QueuedWriter",
    "RunLogger",
    "SystemMetrics",
    "Tracker",
    "TrackingReport",
    "TrackingUnavailable",
    "Write",
    "artifact_root",
    "dataset_info",
    "end_run",
    "format_metric",
    "git_commit",
    "http_status",
    "is_local",
    "is_unreachable",
    "local_path",
    "log_datasets",
    "probe_run_name",
    "refusal",
    "resolve_tracking_uri",
    "trunk_name",
    "ui_command",
    "ui_url",
]
