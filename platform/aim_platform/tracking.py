"""MLflow, through one door: the only module of the platform that imports ``mlflow``.

- :func:`resolve_tracking_uri` is the one rule for where runs go: the configured URI, else
  ``$MLFLOW_TRACKING_URI``, else ``sqlite:///<runs folder>/mlflow.db``. The runs folder is
  ``./runs`` (absolute) for pre-training, probes and studies alike unless a job's storage says
  otherwise, so one ``mlflow ui`` shows all of them.
- A :class:`Tracker` is built once from that URI by the driver and passed down. It creates
  the experiment (with MLflow 3's experiment kind, so the UI opens on training runs) and the
  runs (with the git commit as tags), then writes metrics, texts, figures, dataset inputs.
- Tracking is never on the training path: a ``Tracker(uri, background=True)`` queues its
  writes in a bounded, ordered :class:`~aim_platform.outbox.Outbox` drained by a thread, so a
  write returns at once whether or not the server answers; while it does not, the writes wait
  (and the thread tries again), a full queue drops and counts, and :meth:`Tracker.close` ends
  with a time limit and says what could not be written (:class:`TrackingReport`). Rank 0,
  the pre-training driver, probes and studies write this way. MLflow's HTTP client would retry
  a request for about four minutes before it raises; a Tracker shortens that for its process
  (:data:`CLIENT_DEFAULTS`), so that an outage shows in seconds and a synchronous call (a run's
  creation, a read) fails with one line (:class:`TrackingUnavailable`) instead of hanging.
- Only rank 0 of a training job writes, through :class:`RunLogger`, which also samples
  system metrics (CPU, memory, GPU when present) from a background thread of that process
  into the same queue.
- Concurrent writers (Tune trials) may share an embedded SQLite store once the driver has
  created it (schema migrations and experiment creation race otherwise): MLflow gives each
  SQLite session a 20 s busy timeout, and ``tests/test_tracking.py`` checks that 4 writers at
  once lose nothing. Many more writers should go through an MLflow server.

Over 400 lines on purpose: it is the one door to MLflow, so every read and write of runs,
datasets, figures and system metrics, and the queue they wait in, lives here.
"""

from __future__ import annotations

import io
import json
import math
import os
import subprocess
import threading
import time
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aim_platform.errors import PlatformError
from aim_platform.outbox import Outbox, OutboxStatus, one_line

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


#: MLflow's HTTP client retries a failed request 7 times with a doubling back-off (about four
#: minutes) and waits 120 s for an answer. Writes are retried by the outbox instead, so every
#: process that builds a :class:`Tracker` gets these shorter defaults (set a variable to choose
#: otherwise): a dead server shows within seconds, and a synchronous call fails instead of
#: hanging.
CLIENT_DEFAULTS = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "20",
}
#: Writes a background tracker holds while the server does not answer; more are dropped and
#: counted (a job's ``tracking.buffer_size`` overrides it).
BUFFER_SIZE = 10_000
#: How long the end of a command waits for the queued writes (``tracking.flush_timeout_s``).
FLUSH_TIMEOUT_S = 60.0
#: Prefix of the id :meth:`Tracker.start_run` returns for a run it could not create yet.
PENDING = "pending-"
#: The metric that counts writes dropped because the queue was full.
DROPPED_METRIC = "tracking/dropped_writes"
_TRANSIENT_HTTP = {429, 500, 502, 503, 504}
_TRANSIENT_CODES = {"INTERNAL_ERROR", "TEMPORARILY_UNAVAILABLE", "REQUEST_LIMIT_EXCEEDED"}


class TrackingUnavailable(PlatformError, ConnectionError):
    """The tracking server does not answer (a synchronous call: a run's creation, a read)."""


def is_unreachable(exc: BaseException) -> bool:
    """Whether an error from MLflow means "try again later": no answer (connection refused,
    timed out), a busy or failing server (429, 5xx) or a locked SQLite store; not a refusal
    of the request itself (a bad value, a run that does not exist)."""
    from mlflow.exceptions import MlflowException, RestException

    if isinstance(exc, TrackingUnavailable):
        return True
    if isinstance(exc, RestException):
        return exc.get_http_status_code() in _TRANSIENT_HTTP
    if isinstance(exc, MlflowException):
        return exc.error_code in _TRANSIENT_CODES
    return isinstance(exc, OSError)  # requests' connection errors are OSErrors


@dataclass(frozen=True)
class Write:
    """One queued write: ``Tracker._<method>(*args)``, applied by the outbox's thread. Plain
    data, so that rank 0 can hand what it could not write to the driver."""

    method: str
    args: tuple[Any, ...]


class Tracker:
    """One MLflow store: experiments, runs and everything written into them.

    Built once per process from :func:`resolve_tracking_uri`'s answer and passed down.

    Args:
        uri: The tracking URI.
        background: Queue every write (metrics, params, tags, texts, figures, dataset inputs,
            a run's end) in an :class:`~aim_platform.outbox.Outbox` drained by a thread: a
            write never waits for the server. Reads first wait for the queue to empty (and
            raise :class:`TrackingUnavailable` at once while the server is known to be down);
            :meth:`close` ends it.
        buffer_size: Most writes queued at once (background only).
        flush_timeout: Longest wait for the queue, before a read and in :meth:`close`.
    """

    def __init__(
        self,
        uri: str,
        *,
        background: bool = False,
        buffer_size: int = BUFFER_SIZE,
        flush_timeout: float = FLUSH_TIMEOUT_S,
    ):
        for key, value in CLIENT_DEFAULTS.items():
            os.environ.setdefault(key, value)
        from mlflow.tracking import MlflowClient

        self.uri = uri
        self.flush_timeout = flush_timeout
        self._client = MlflowClient(tracking_uri=uri)
        self._pending: dict[str, str] = {}  # pending id -> the run's id once created
        self._outbox: Outbox[Write] | None = None
        if background:
            self._outbox = Outbox(
                self._apply, transient=is_unreachable, capacity=buffer_size, name="aim-mlflow"
            )

    # -- the queue -----------------------------------------------------------------------

    def _write(self, method: str, *args: Any, essential: bool = False) -> None:
        write = Write(method, args)
        if self._outbox is None:
            self._apply(write)
        else:
            self._outbox.put(write, essential=essential)

    def _apply(self, write: Write) -> None:
        args = write.args
        if write.method != "_create_run" and args and args[0] in self._pending:
            args = (self._pending[args[0]], *args[1:])  # a run created by the queue
        getattr(self, write.method)(*args)

    def enqueue(self, writes: Iterable[Write]) -> None:
        """Queue writes handed over by another process (rank 0's leftovers), never dropped."""
        for write in writes:
            if self._outbox is None:
                self._apply(write)
            else:
                self._outbox.put(write, essential=True)

    def created(self, run_id: str) -> str | None:
        """The id of a run :meth:`start_run` deferred (``pending-...``) once the queue made
        it; None while it is not made. Any other id is returned as is."""
        return self._pending.get(run_id) if run_id.startswith(PENDING) else run_id

    def status(self) -> OutboxStatus:
        """The queue's counters (all zero for a synchronous tracker)."""
        return self._outbox.status() if self._outbox is not None else OutboxStatus()

    def flush(self, timeout: float | None = None) -> bool:
        """Wait up to ``timeout`` seconds (default ``flush_timeout``) for the queued writes;
        True when every one got through (or was refused)."""
        if self._outbox is None:
            return True
        return self._outbox.flush(self.flush_timeout if timeout is None else timeout)

    def close(self, timeout: float | None = None) -> tuple[OutboxStatus, list[Write]]:
        """Wait up to ``timeout`` seconds (default ``flush_timeout``) for the queued writes,
        then stop the queue.

        Returns:
            The queue's final status and the writes that did not get through, in order.
        """
        if self._outbox is None:
            return OutboxStatus(), []
        return self._outbox.close(self.flush_timeout if timeout is None else timeout)

    def _call(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        """A synchronous call to MLflow: after this tracker's queued writes; an unreachable
        server raises :class:`TrackingUnavailable` (one line) instead of MLflow's error."""
        if self._outbox is not None and not self._outbox.flush(self.flush_timeout, until_down=True):
            raise self._unavailable(self._outbox.status())
        try:
            return fn(*args, **kwargs)
        except TrackingUnavailable:
            raise
        except Exception as exc:
            if is_unreachable(exc):
                raise TrackingUnavailable(
                    f"MLflow at {self.uri} does not answer ({one_line(exc, 160)}); start it "
                    "(`aimctl services up`) or set tracking.tracking_uri / MLFLOW_TRACKING_URI"
                ) from None
            raise

    def _unavailable(self, state: OutboxStatus) -> TrackingUnavailable:
        since = time.strftime("%H:%M:%S", time.localtime(state.down_since or time.time()))
        return TrackingUnavailable(
            f"MLflow at {self.uri} unreachable since {since} ({state.buffered} writes waiting)"
        )

    # -- runs ----------------------------------------------------------------------------

    def experiment_id(self, name: str) -> str:
        """Id of experiment ``name``, created (with its kind tag) when missing."""
        exp = self._call(self._client.get_experiment_by_name, name)
        if exp is None:
            exp_id = self._call(
                self._client.create_experiment,
                name,
                artifact_location=artifact_root(self.uri),
                tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND},
            )
            return exp_id
        if exp.tags.get(EXPERIMENT_KIND_TAG) != EXPERIMENT_KIND:  # made by an older version
            self._call(
                self._client.set_experiment_tag,
                exp.experiment_id,
                EXPERIMENT_KIND_TAG,
                EXPERIMENT_KIND,
            )
        return exp.experiment_id

    def start_run(
        self,
        experiment: str,
        run_name: str,
        params: Mapping[str, Any] | None = None,
        tags: Mapping[str, str | None] | None = None,
        parent_run_id: str | None = None,
        *,
        defer: bool = False,
    ) -> str:
        """Create a run with its params and tags (already redacted by the caller) and the git
        commit; return its id.

        Args:
            defer: When the server does not answer (background trackers only), queue the
                run's creation and return a ``pending-...`` id that later writes of this
                tracker may use (a probe's results, logged after the computation). Without
                it, :class:`TrackingUnavailable`.
        """
        run_tags = {"mlflow.runName": run_name}
        commit = git_commit()
        if commit:
            run_tags.update({k: commit for k in GIT_COMMIT_TAGS})
        if parent_run_id:
            run_tags["mlflow.parentRunId"] = parent_run_id
        run_tags.update({k: str(v) for k, v in (tags or {}).items() if v is not None})
        try:
            run_id = self._call(self._create_run, None, experiment, run_name, run_tags)
        except TrackingUnavailable:
            if not (defer and self._outbox is not None):
                raise
            run_id = f"{PENDING}{uuid.uuid4().hex}"
            self._write("_create_run", run_id, experiment, run_name, run_tags, essential=True)
        self.log_params(run_id, params or {})
        return run_id

    def _create_run(
        self, pending: str | None, experiment: str, run_name: str, tags: dict[str, str]
    ) -> str:
        if pending is not None and pending in self._pending:  # created by an earlier try
            return self._pending[pending]
        parent = tags.get("mlflow.parentRunId")
        if parent in self._pending:
            tags = {**tags, "mlflow.parentRunId": self._pending[parent]}
        exp_id = self.experiment_id(experiment) if pending is None else self._experiment(experiment)
        run = self._client.create_run(exp_id, tags=tags, run_name=run_name)
        if pending is not None:
            self._pending[pending] = run.info.run_id
        return run.info.run_id

    def _experiment(self, name: str) -> str:
        """:meth:`experiment_id` from the queue's thread (no waiting for the queue itself)."""
        exp = self._client.get_experiment_by_name(name)
        if exp is not None:
            return exp.experiment_id
        return self._client.create_experiment(
            name,
            artifact_location=artifact_root(self.uri),
            tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND},
        )

    # -- writes (queued on a background tracker) -----------------------------------------

    def log_params(self, run_id: str, params: Mapping[str, Any]) -> None:
        """Params (long values cut to MLflow's limit)."""
        items = [(k, _param_value(v)) for k, v in params.items()]
        for i in range(0, len(items), 100):  # MLflow caps a batch at 100 params
            self._write("_log_params", run_id, items[i : i + 100])

    def _log_params(self, run_id: str, items: list[tuple[str, str]]) -> None:
        from mlflow.entities import Param

        self._client.log_batch(run_id, params=[Param(k, v) for k, v in items])

    def log_metrics(self, run_id: str, metrics: Mapping[str, Any], step: int) -> None:
        """Numeric, finite metrics at ``step`` (anything else is left out), stamped now."""
        now = int(time.time() * 1000)
        items = [(k, v) for k, v in ((k, _metric_value(v)) for k, v in metrics.items())]
        items = [(k, v) for k, v in items if v is not None]
        for i in range(0, len(items), 1000):
            self._write("_log_metrics", run_id, items[i : i + 1000], step, now)

    def _log_metrics(
        self, run_id: str, items: list[tuple[str, float]], step: int, timestamp_ms: int
    ) -> None:
        from mlflow.entities import Metric

        metrics = [Metric(k, v, timestamp_ms, step) for k, v in items]
        self._client.log_batch(run_id, metrics=metrics)

    def set_tags(self, run_id: str, tags: Mapping[str, str | None]) -> None:
        """Tags (None values are left out)."""
        items = [(k, str(v)) for k, v in tags.items() if v is not None]
        if items:
            self._write("_set_tags", run_id, items)

    def _set_tags(self, run_id: str, items: list[tuple[str, str]]) -> None:
        from mlflow.entities import RunTag

        self._client.log_batch(run_id, tags=[RunTag(k, v) for k, v in items])

    def log_text(self, run_id: str, text: str, path: str) -> None:
        """Write ``text`` as the artifact file ``path``."""
        self._write("_log_text", run_id, text, path)

    def _log_text(self, run_id: str, text: str, path: str) -> None:
        self._client.log_text(run_id, text, path)

    def log_figure(self, run_id: str, figure: Any, path: str) -> None:
        """A matplotlib figure as the image artifact ``path`` (rendered now; closed)."""
        import matplotlib.pyplot as plt

        buf = io.BytesIO()
        try:
            figure.savefig(buf, format=Path(path).suffix.lstrip(".") or "png")
        finally:
            plt.close(figure)
        self._write("_log_bytes", run_id, buf.getvalue(), path)

    def log_artifact(self, run_id: str, file: str | Path, folder: str | None = None) -> None:
        """Upload a local file (read now)."""
        path = f"{folder}/{Path(file).name}" if folder else Path(file).name
        self._write("_log_bytes", run_id, Path(file).read_bytes(), path)

    def _log_bytes(self, run_id: str, data: bytes, path: str) -> None:
        import tempfile

        folder, _, name = path.rpartition("/")
        with tempfile.TemporaryDirectory() as tmp:
            file = Path(tmp) / name
            file.write_bytes(data)
            self._client.log_artifact(run_id, str(file), folder or None)

    def log_dataset(self, run_id: str, dataset: DatasetInfo, context: str = "training") -> None:
        """A dataset input (the runs list's Dataset column): name, source, digest, counts."""
        self._write("_log_dataset", run_id, dataset, context)

    def _log_dataset(self, run_id: str, dataset: DatasetInfo, context: str) -> None:
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

    def finish(self, run_id: str, status: str = "FINISHED") -> None:
        """Mark a run FINISHED or FAILED (never dropped from a full queue)."""
        self._write("_finish", run_id, status, essential=True)

    def _finish(self, run_id: str, status: str) -> None:
        self._client.set_terminated(run_id, status=status)

    # -- reads (after this tracker's queued writes) --------------------------------------

    def datasets(self, run_id: str) -> list[dict[str, Any]]:
        """The run's dataset inputs: name, digest, source, profile (dict) and context."""
        out = []
        for d in self._call(self._client.get_run, run_id).inputs.dataset_inputs:
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
        points = self._call(self._client.get_metric_history, run_id, key)
        return sorted((m.step, m.value) for m in points)

    def metric_keys(self, run_id: str) -> list[str]:
        """Every metric key the run logged, sorted."""
        return sorted(self._call(self._client.get_run, run_id).data.metrics)

    def run_name(self, run_id: str) -> str:
        """The run's display name (its id when it has none)."""
        return self._call(self._client.get_run, run_id).info.run_name or run_id

    def run_status(self, run_id: str) -> str:
        """``RUNNING``, ``FINISHED``, ``FAILED`` or ``KILLED``."""
        return self._call(self._client.get_run, run_id).info.status

    def experiment_of(self, run_id: str) -> str:
        """Id of the run's experiment."""
        return self._call(self._client.get_run, run_id).info.experiment_id

    def tags(self, run_id: str) -> dict[str, str]:
        """The run's tags."""
        return dict(self._call(self._client.get_run, run_id).data.tags)

    def experiment_tags(self, name: str) -> dict[str, str]:
        """Tags of experiment ``name`` (empty when it does not exist)."""
        exp = self._call(self._client.get_experiment_by_name, name)
        return dict(exp.tags) if exp else {}

    def find_experiment(self, name: str) -> str | None:
        """Id of experiment ``name``, or None (nothing is created)."""
        exp = self._call(self._client.get_experiment_by_name, name)
        return exp.experiment_id if exp else None

    def latest_run(self, experiment_id: str, *, parent: bool = False) -> str | None:
        """The newest top-level run of an experiment (``parent``: the newest run that has
        nested runs, e.g. a study's), or None."""
        runs = self._call(
            self._client.search_runs, [experiment_id], order_by=["attributes.start_time DESC"]
        )
        parents = {r.data.tags.get("mlflow.parentRunId") for r in runs}
        for r in runs:
            if "mlflow.parentRunId" in r.data.tags:
                continue
            if not parent or r.info.run_id in parents:
                return r.info.run_id
        return None


@dataclass(frozen=True)
class TrackingReport:
    """What tracking delayed or lost over a whole job: rank 0's queue (each incarnation, if
    workers were restarted) and the driver's, which also took rank 0's leftovers.

    Attributes:
        outages: Times the server became unreachable (one outage seen by rank 0 and then by
            the driver, which took over rank 0's writes while it lasted, counts once).
        first_down: When the first outage began (``time.time()``).
        last_up: When the server answered again after the last outage that ended.
        dropped: Writes dropped because the queue was full.
        failed: Writes the server refused (see ``last_error``).
        lost: Writes still queued in a rank 0 that was replaced (a worker failure).
        unwritten: Writes still queued when the end's flush ran out of time.
        down_since: The server unreachable at the end: since when.
        last_error: The last error seen, one line.
    """

    outages: int = 0
    first_down: float | None = None
    last_up: float | None = None
    dropped: int = 0
    failed: int = 0
    lost: int = 0
    unwritten: int = 0
    down_since: float | None = None
    last_error: str = ""

    @classmethod
    def of(
        cls, replaced: Sequence[OutboxStatus], ranks: Sequence[OutboxStatus], end: OutboxStatus
    ) -> TrackingReport:
        """Combine the statuses of replaced rank-0 queues, the last rank 0's (its leftovers
        went to the driver) and the driver's queue at the end."""
        every = [*replaced, *ranks, end]
        errors = [s.last_error for s in every if s.last_error]
        outages = sum(s.outages for s in every)
        if end.outages and any(s.down for s in ranks):  # the driver's first one continued it
            outages -= 1
        down_since = end.down_since  # still down at the end: since rank 0 first saw it
        if down_since is not None:
            down_since = min([down_since, *(s.down_since for s in ranks if s.down)])
        downs = [s.first_down for s in every if s.first_down is not None]
        ups = [s.last_up for s in every if s.last_up is not None]
        return cls(
            outages=outages,
            first_down=min(downs) if downs else None,
            last_up=max(ups) if ups else None,
            dropped=sum(s.dropped for s in every),
            failed=sum(s.failed for s in every),
            lost=sum(s.buffered for s in replaced),
            unwritten=end.buffered,
            down_since=down_since,
            last_error=errors[-1] if errors else "",
        )

    def metrics(self) -> dict[str, int]:
        """The report as a job's result metrics (what a study trial reports)."""
        return {
            DROPPED_METRIC: self.dropped,
            "tracking/unwritten_writes": self.unwritten + self.lost + self.failed,
        }

    @property
    def complete(self) -> bool:
        """Everything logged is in the run."""
        return not (self.dropped or self.failed or self.lost or self.unwritten)

    def lines(self, uri: str, flush_timeout: float) -> list[str]:
        """What the summary says (nothing when there was nothing to say)."""
        out = []
        if self.outages and self.down_since is None:
            span = f"between {_clock(self.first_down)} and {_clock(self.last_up)}"
            out.append(
                f"MLflow was unreachable {self.outages} time(s), {span}; training went on"
                + (", and every buffered write went in afterwards" if self.complete else "")
            )
        if self.dropped:
            out.append(
                f"MLflow: {self.dropped} writes dropped, the buffer being full "
                f"(tracking.buffer_size); counted as {DROPPED_METRIC}"
            )
        if self.lost:
            out.append(f"MLflow: {self.lost} buffered writes lost with a replaced worker")
        if self.failed:
            out.append(f"MLflow: {self.failed} writes refused by the server ({self.last_error})")
        if self.unwritten:
            out.append(
                f"MLflow at {uri} unreachable since {_clock(self.down_since)}: "
                f"{self.unwritten} writes not written after waiting {flush_timeout:g}s "
                "(tracking.flush_timeout_s); the run may show RUNNING there"
            )
        return out


def end_run(
    tracker: Tracker,
    run_id: str,
    step: int,
    status: str,
    *,
    ranks: Sequence[OutboxStatus] = (),
    replaced: Sequence[OutboxStatus] = (),
    wait: bool = True,
) -> TrackingReport:
    """A job's last writes into its run (the count of dropped writes at ``step``, then its
    status), one flush of ``tracker`` within its time limit (none when ``wait`` is False: a
    flush already ran out of time), and the report of everything tracking delayed or lost
    (``ranks``/``replaced``: rank 0's queues, see :meth:`TrackingReport.of`)."""
    dropped = sum(s.dropped for s in [*ranks, *replaced]) + tracker.status().dropped
    tracker.log_metrics(run_id, {DROPPED_METRIC: dropped}, step=step)
    tracker.finish(run_id, status)
    end, _ = tracker.close(None if wait else 0)
    return TrackingReport.of(replaced, ranks, end)


def _clock(t: float | None) -> str:
    return time.strftime("%H:%M:%S", time.localtime(t if t is not None else time.time()))


class SystemMetrics:
    """CPU, memory, disk, network (and GPU when present) sampled by a thread of this process
    into a background tracker's queue (MLflow's own monitor writes synchronously, stops for
    good at the first failed request, and its ``finish`` waits on a hanging one).

    Each sample is logged at the training step of the moment (``step()``), so that a resumed
    run continues its curves. Stop it with :meth:`stop`.
    """

    def __init__(self, tracker: Tracker, run_id: str, step: Any, interval: float = 10.0) -> None:
        import logging
        import warnings

        # "Skip logging GPU metrics" and start/stop notes are info, not news, on a CPU worker.
        logging.getLogger("mlflow.system_metrics").setLevel(logging.WARNING)
        self._tracker, self._run_id, self._step = tracker, run_id, step
        self._interval = interval
        self._done = threading.Event()
        self._thread: threading.Thread | None = None
        try:  # needs psutil (and nvidia-ml-py for GPUs): training goes on without them
            from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

            # Used for its samplers only: never started, so it makes no request of its own.
            self._monitor = SystemMetricsMonitor(run_id, sampling_interval=interval)
        except ImportError as exc:
            warnings.warn(f"no system metrics: {exc} (pip install psutil)", stacklevel=2)
            return
        self._thread = threading.Thread(target=self._run, name="aim-system-metrics", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        monitor = self._monitor
        prefix = "system/" + (f"{monitor.node_id}/" if monitor.node_id else "")
        while not self._done.wait(self._interval):
            monitor.collect_metrics()
            values = monitor.aggregate_metrics()
            for sampler in monitor.monitors:
                sampler.clear_metrics()
            metrics = {prefix + k: v for k, v in values.items()}
            self._tracker.log_metrics(self._run_id, metrics, step=self._step())

    def stop(self) -> None:
        """Stop sampling (what was sampled is in the queue)."""
        self._done.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
            self._thread = None


class RunLogger:
    """Metrics into one existing run (rank 0 only), optionally with system metrics, through a
    background tracker: :meth:`log_metrics` never waits for the server."""

    def __init__(
        self,
        tracking_uri: str,
        run_id: str,
        *,
        system_metrics: bool = False,
        interval: float = 10.0,
        buffer_size: int = BUFFER_SIZE,
    ) -> None:
        self.tracker = Tracker(tracking_uri, background=True, buffer_size=buffer_size)
        self.run_id = run_id
        self.step = 0
        self._system = (
            SystemMetrics(self.tracker, run_id, lambda: self.step, interval)
            if system_metrics
            else None
        )

    def log_metrics(self, metrics: Mapping[str, Any], step: int) -> None:
        self.step = step
        self.tracker.log_metrics(self.run_id, metrics, step)

    def status(self) -> OutboxStatus:
        """The queue's counters: down since when, buffered, dropped."""
        return self.tracker.status()

    def close(self, timeout: float | None = None) -> tuple[OutboxStatus, list[Write]]:
        """Stop the system-metrics sampling, wait up to ``timeout`` seconds for the queue;
        return its status and the writes left (to be handed on, e.g. to the driver)."""
        if self._system is not None:
            self._system.stop()
            self._system = None
        return self.tracker.close(timeout)


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
