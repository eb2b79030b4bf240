"""A :class:`Tracker`: one MLflow store's experiments, runs and everything written into them.

Built once per process from :func:`~aim_platform.tracking.where.resolve_tracking_uri`'s
answer and passed down. It creates the experiment (with MLflow 3's experiment kind, so the UI
opens on training runs) and the runs (with the git commit as tags), then writes metrics,
texts, figures and dataset inputs, queued on a background tracker (see
:mod:`aim_platform.tracking.queued`), and reads them back.
"""

from __future__ import annotations

import io
import json
import math
import time
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from aim_platform.tracking.datasets import DatasetInfo
from aim_platform.tracking.faults import TrackingUnavailable, refusal
from aim_platform.tracking.naming import (
    EXPERIMENT_KIND,
    EXPERIMENT_KIND_TAG,
    GIT_COMMIT_TAGS,
    git_commit,
)
from aim_platform.tracking.queued import BUFFER_SIZE, FLUSH_TIMEOUT_S, QueuedWriter, Write
from aim_platform.tracking.where import artifact_root

_MAX_PARAM_LEN = 6000
#: Prefix of the id :meth:`Tracker.start_run` returns for a run it could not create yet.
PENDING = "pending-"
#: Queued writes that upload an artifact; their last argument is the artifact's path.
ARTIFACT_WRITES = frozenset({"_log_text", "_log_bytes"})


def _param_value(value: Any) -> str:
    text = str(value)
    return text if len(text) <= _MAX_PARAM_LEN else text[: _MAX_PARAM_LEN - 3] + "..."


def _metric_value(value: Any) -> float | None:
    """A finite number (bools and NaN/inf are left out), else None."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(float(value)) else None


class Tracker(QueuedWriter):
    """One MLflow store: experiments, runs and everything written into them.

    Args:
        uri: The tracking URI.
        background: Queue every write (metrics, params, tags, texts, figures, dataset inputs,
            a run's end) in an :class:`~aim_platform.outbox.Outbox` drained by a thread: a
            write never waits for the server. Reads first wait for the queue to empty (and
            raise :class:`TrackingUnavailable` at once while the server is known to be down);
            :meth:`close` ends it. An artifact the store refuses for good (a 4xx) is named in
            :attr:`~aim_platform.outbox.OutboxStatus.refused` and skipped.
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
        self._pending: dict[str, str] = {}  # pending id -> the run's id once created
        super().__init__(
            uri, background=background, buffer_size=buffer_size, flush_timeout=flush_timeout
        )
        from mlflow.tracking import MlflowClient  # after the client defaults are set

        self._client = MlflowClient(tracking_uri=uri)

    # -- the queue's hooks ---------------------------------------------------------------

    def _apply(self, write: Write) -> None:
        args = write.args
        if write.method != "_create_run" and args and args[0] in self._pending:
            args = (self._pending[args[0]], *args[1:])  # a run created by the queue
        getattr(self, write.method)(*args)

    def _describe(self, write: Write, exc: BaseException) -> str | None:
        if write.method in ARTIFACT_WRITES:
            return f"{write.args[-1]} ({refusal(exc)})"
        return None

    def created(self, run_id: str) -> str | None:
        """The id of a run :meth:`start_run` deferred (``pending-...``) once the queue made
        it; None while it is not made. Any other id is returned as is."""
        return self._pending.get(run_id) if run_id.startswith(PENDING) else run_id

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
