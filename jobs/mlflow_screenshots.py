"""Screenshots of the MLflow UI for a store: the runs list, a run's charts, a study's trials.

Starts ``mlflow server`` on 127.0.0.1 over the given store, then headless Chromium (Debian
package ``chromium``) saves PNGs. Pages open in MLflow's "Model training" view
(``?workflowType=machine_learning``). Chromium reaches the server under the name
``mlflow.test`` (mapped to 127.0.0.1): on a loopback name MLflow 3.17 opens its assistant
panel on first load, which would cover a third of each picture. Used to check by eye what
the dashboard shows::

    python jobs/mlflow_screenshots.py sqlite:////abs/runs/mlflow.db docs/screenshots \\
        --experiment aim-demo --study-experiment aim-studies
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from urllib.parse import quote

from aim_platform.services import free_port
from aim_platform.tracking import Tracker

HOST = "mlflow.test"  # resolved to 127.0.0.1 by Chromium itself
VIEW = "?workflowType=machine_learning"


def start_server(store: str, port: int, folder: Path) -> subprocess.Popen:
    """``mlflow server`` over ``store`` (artifacts served from beside a SQLite file)."""
    cmd = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1"]
    cmd += ["--port", str(port), "--workers", "1", "--backend-store-uri", store]
    cmd += ["--allowed-hosts", f"{HOST},{HOST}:{port},127.0.0.1:{port},localhost:{port}"]
    log = open(folder / "server.log", "w")  # noqa: SIM115 (lives as long as the server)
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"mlflow server exited: {(folder / 'server.log').read_text()}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                if r.status == 200:
                    return proc
        except OSError:
            time.sleep(0.5)
    proc.terminate()
    raise RuntimeError("mlflow server did not answer /health within 120 s")


def chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    raise RuntimeError("no chromium: apt-get install -y chromium")


def shoot(url: str, out: Path, budget_ms: int, size: str) -> None:
    """One PNG of ``url`` after ``budget_ms`` of virtual time for the JS app."""
    with tempfile.TemporaryDirectory() as profile:
        cmd = [
            chromium(),
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--hide-scrollbars",
            f"--user-data-dir={profile}",
            f"--window-size={size}",
            f"--host-resolver-rules=MAP {HOST} 127.0.0.1",
            f"--virtual-time-budget={budget_ms}",
            f"--screenshot={out}",
            url,
        ]
        subprocess.run(cmd, check=True, capture_output=True, timeout=180)
    print(f"{out}: {url}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("store", help="tracking store (sqlite:////abs/mlflow.db)")
    parser.add_argument("out", type=Path, help="folder for the PNGs")
    parser.add_argument("--experiment", default="aim-demo", help="pre-training experiment")
    parser.add_argument("--study-experiment", default="aim-studies", help="studies' experiment")
    parser.add_argument("--budget-ms", type=int, default=45000, help="virtual time per page")
    parser.add_argument("--size", default="1600,1000", help="window width,height")
    args = parser.parse_args()

    tracker = Tracker(args.store)
    exp = tracker.find_experiment(args.experiment)
    if exp is None:
        print(f"no experiment {args.experiment!r} in {args.store}", file=sys.stderr)
        return 2
    run = tracker.latest_run(exp, parent=False)
    study_exp = tracker.find_experiment(args.study_experiment)
    parent = tracker.latest_run(study_exp, parent=True) if study_exp else None

    args.out.mkdir(parents=True, exist_ok=True)
    port = free_port()
    base = f"http://{HOST}:{port}/#/experiments"
    # the runs list answers INTERNAL_ERROR under HOST (seen with 3.17.2): lists on 127.0.0.1
    lists = f"http://127.0.0.1:{port}/#/experiments"
    with tempfile.TemporaryDirectory() as tmp:
        server = start_server(args.store, port, Path(tmp))
        try:
            pages = {"runs_list.png": f"{lists}/{exp}/runs{VIEW}"}
            if run:
                pages["run_overview.png"] = f"{base}/{exp}/runs/{run}{VIEW}"
                pages["run_charts.png"] = f"{base}/{exp}/runs/{run}/model-metrics{VIEW}"
                pages["run_system_metrics.png"] = f"{base}/{exp}/runs/{run}/system-metrics{VIEW}"
            if study_exp and parent:
                pages["study_runs.png"] = f"{lists}/{study_exp}/runs{VIEW}"
                nested = quote(f"tags.mlflow.parentRunId = '{parent}'")
                trials = f"{lists}/{study_exp}/runs{VIEW}&searchFilter={nested}"
                pages["study_trials.png"] = trials
                pages["study_parent.png"] = f"{base}/{study_exp}/runs/{parent}{VIEW}"
                pages["study_artifacts.png"] = f"{base}/{study_exp}/runs/{parent}/artifacts{VIEW}"
            for name, url in pages.items():
                shoot(url, args.out / name, args.budget_ms, args.size)
        finally:
            server.terminate()
            server.wait(timeout=30)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
