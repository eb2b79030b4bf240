"""System metrics (CPU, memory, disk, network, GPU when present) of a run, by MLflow's own
monitor: the one ``mlflow.start_run(log_system_metrics=True)`` starts, built the same way
(its documented constructor, ``start`` and ``finish``), without the fluent API's global
active run, whose ``end_run`` would also end the run (the driver ends it, after its own
writes).

MLflow's monitor writes from a thread of its own, so a sample never waits on the training
path; it stops for good at its first failed request, so a new one, continuing the run's
system-metric steps, is started once the tracker's queue has seen the server answer again.
Configure it with MLflow's own variables (``MLFLOW_SYSTEM_METRICS_NODE_ID``,
``MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL``).
"""

from __future__ import annotations

import logging
import threading
import warnings
from collections.abc import Callable
from typing import Any

from aim_platform.outbox import OutboxStatus


class SystemMetrics:
    """MLflow's system-metrics monitor for one run, restarted after each outage; stop it with
    :meth:`stop`.

    Args:
        uri: The tracking URI the run lives in.
        run_id: The run.
        status: The queue status of a tracker writing to the same server (its outages tell
            when the monitor must have stopped and may start again).
        interval: Seconds between samples (``MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL``
            overrides it).
    """

    def __init__(
        self, uri: str, run_id: str, status: Callable[[], OutboxStatus], interval: float = 10.0
    ) -> None:
        # start/stop notes and "Failed to get mlflow run" during an outage (which the console
        # already reports once) are not news on a worker
        logging.getLogger("mlflow.system_metrics").setLevel(logging.ERROR)
        self._uri, self._run_id, self._status = uri, run_id, status
        self._interval = interval
        self._done = threading.Event()
        self._thread: threading.Thread | None = None
        try:  # needs psutil (and nvidia-ml-py for GPUs): training goes on without them
            import psutil  # noqa: F401
        except ImportError as exc:
            warnings.warn(f"no system metrics: {exc} (pip install psutil)", stacklevel=2)
            return
        # a thread: the monitor's construction reads the run (its last system step)
        self._thread = threading.Thread(target=self._run, name="aim-system-metrics", daemon=True)
        self._thread.start()

    def _monitor(self) -> Any:
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        monitor = SystemMetricsMonitor(
            self._run_id,
            sampling_interval=self._interval,
            resume_logging=True,  # a restarted worker or monitor continues the run's steps
            tracking_uri=self._uri,
        )
        monitor.start()
        return monitor

    def _run(self) -> None:
        seen = self._status().outages
        monitor = self._monitor()
        while not self._done.wait(self._interval):
            state = self._status()
            if state.outages != seen and not state.down:  # the server answers again
                seen = state.outages
                monitor.finish()
                monitor = self._monitor()
        monitor.finish()

    def stop(self) -> None:
        """Stop sampling (waits at most 30 s for MLflow's monitor to write its last sample)."""
        self._done.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
            self._thread = None
