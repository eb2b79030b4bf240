"""The real job as a user runs it: ``aimctl pretrain`` of the demo config in a subprocess with
its own embedded Ray (so that a test can kill it, or set the environment its workers get)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from net_helpers import REPO


def start_demo(
    storage: Path, log: Path, sets: dict[str, Any], env: dict[str, str] | None = None
) -> subprocess.Popen[bytes]:
    """``aimctl pretrain jobs/configs/demo.yaml --set ...`` with storage under ``storage``,
    built-in data cached beside it; console (stdout and stderr) appended to ``log``."""
    sets = {"train.storage_path": str(storage), **sets}
    args = [a for k, v in sets.items() for a in ("--set", f"{k}={v}")]
    cmd = [str(Path(sys.executable).parent / "aimctl"), "pretrain", "jobs/configs/demo.yaml"]
    full_env = {
        **os.environ,
        "AIM_DATA_CACHE": str(storage.parent / "cache"),
        "RAY_AUTH_MODE": "disabled",
        **(env or {}),
    }
    out = open(log, "ab")  # noqa: SIM115 - the process keeps it
    return subprocess.Popen(
        [*cmd, *args], cwd=REPO, env=full_env, stdout=out, stderr=subprocess.STDOUT,
        start_new_session=True,
    )  # fmt: skip


def latest_step(run: Path) -> int:
    """The step ``latest.json`` names in a local run folder (0: none yet)."""
    try:
        return int(json.loads((run / "latest.json").read_text())["step"])
    except (OSError, ValueError, KeyError):
        return 0


def wait_for_checkpoint(
    run: Path, step: int, proc: subprocess.Popen[bytes], log: Path, timeout: float = 900
) -> int:
    """Wait until ``latest.json`` names ``step`` or later; returns the step it names."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = latest_step(run)
        if got >= step:
            return got
        assert proc.poll() is None, log.read_text()[-3000:]
        time.sleep(0.3)
    raise AssertionError(f"no checkpoint at step {step}: " + log.read_text()[-3000:])


def mlflow_run(run: Path) -> tuple[Any, str]:
    """(MlflowClient, run id) of a local run folder's MLflow run."""
    from mlflow import MlflowClient

    record = json.loads((run / "mlflow_run_id.json").read_text())
    return MlflowClient(tracking_uri=record["tracking_uri"]), record["run_id"]


def metric(client: Any, run_id: str, key: str) -> dict[int, float]:
    """A metric's history as step -> value (the last value logged at each step)."""
    return {m.step: m.value for m in client.get_metric_history(run_id, key)}
