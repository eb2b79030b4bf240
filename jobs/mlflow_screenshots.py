"""Screenshots of the MLflow UI for a store: the runs list, a run's charts, a study's trials.

Starts ``mlflow server`` on 127.0.0.1 over the given store, then drives headless Chromium with
Playwright (the system browser, no ``playwright install``): it opens each page, clicks where a
picture needs it (the study's parent row is expanded to show its trials, an artifact is
selected) and saves 1600x1000 PNGs. Pages open in MLflow's "Model training" view. MLflow
3.17 opens its assistant panel on the first load from a loopback host; the browser's
localStorage is seeded so that it stays closed. From a clean checkout (Debian/Ubuntu)::

    apt-get install -y chromium
    pip install -e '.[screenshots]'
    aimctl pretrain jobs/configs/demo.yaml --set train.steps=30 --set train.val_every=10 \\
        --set train.storage_path=/tmp/shots/runs
    aimctl study jobs/studies/head.yaml --scale tiny --storage /tmp/shots/runs/studies \\
        --set train.steps=4 --set probe.steps=10
    python jobs/mlflow_screenshots.py sqlite:////tmp/shots/runs/mlflow.db docs/screenshots

(``PYTHONPATH=platform`` when the package is not installed.)
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
from typing import Any

from aim_platform.services import free_port
from aim_platform.tracking import Tracker

VIEW = "?workflowType=machine_learning"
# MLflow 3.17's useLocalStorage keys are `${key}_v${version}` holding JSON
SEED_STORAGE = """
localStorage.setItem("mlflow.assistant.fab.autoOpenedOnFirstLoad_v1", "true");
localStorage.setItem("mlflow.assistant.panelOpen_v1", "false");
"""


def start_server(store: str, port: int, folder: Path) -> subprocess.Popen:
    """``mlflow server`` over ``store`` (artifacts served from beside a SQLite file)."""
    cmd = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1"]
    cmd += ["--port", str(port), "--workers", "1", "--backend-store-uri", store]
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


def find_chromium(given: str | None) -> str | None:
    """Path of the Chromium to drive: ``given``, else the first one on PATH."""
    if given:
        return given if Path(given).exists() else None
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    return None


class Shooter:
    """One browser page over the MLflow UI at ``base``; each method saves one PNG."""

    def __init__(self, page: Any, base: str, out: Path, timeout_ms: int) -> None:
        self.page = page
        self.base = base
        self.out = out
        self.timeout_ms = timeout_ms
        self.settle_ms = 3000

    def open(self, path: str, wait_text: str) -> None:
        """Load ``base + path`` and wait until ``wait_text`` is on the page."""
        self.page.goto(f"{self.base}{path}")
        self.page.get_by_text(wait_text, exact=False).first.wait_for(timeout=self.timeout_ms)

    def save(self, name: str) -> None:
        """Let the page settle (charts animate, images load), then save ``name``."""
        self.page.mouse.move(1, 1)  # no hover highlight
        self.page.wait_for_timeout(self.settle_ms)
        self.page.screenshot(path=str(self.out / name))
        print(f"{self.out / name}: {self.page.url}")

    def runs_list(self, exp: str, name: str, run_name: str) -> None:
        """The experiment's runs table."""
        self.open(f"/#/experiments/{exp}/runs{VIEW}", run_name)
        self.save(name)

    def run_charts(self, exp: str, run: str, name: str) -> None:
        """The run's model-metric charts whose name holds ``loss`` (train/loss, val/loss)."""
        self.open(f"/#/experiments/{exp}/runs/{run}/model-metrics{VIEW}", "Auto-refresh")
        self.page.locator(".js-plotly-plot").first.wait_for(timeout=self.timeout_ms)
        self.page.get_by_placeholder("Search metric charts").fill("loss")
        self.page.evaluate("document.activeElement && document.activeElement.blur()")
        self.save(name)

    def run_page(self, exp: str, run: str, tab: str, wait_text: str, name: str) -> None:
        """A tab of the run page (``overview``, ``system-metrics``)."""
        self.open(f"/#/experiments/{exp}/runs/{run}/{tab}{VIEW}", wait_text)
        self.save(name)

    def artifact(self, exp: str, run: str, file: str, ready: str, name: str) -> None:
        """The run's artifacts tab with ``file`` selected; ``ready``: the CSS selector of
        what shows it loaded (``img``; a table for rendered markdown)."""
        self.open(f"/#/experiments/{exp}/runs/{run}/artifacts{VIEW}", file)
        self.page.get_by_text(file, exact=True).first.click()
        self.page.locator(f"{ready} >> visible=true").first.wait_for(timeout=self.timeout_ms)
        self.save(name)

    def nested(self, exp: str, parent_name: str, children: list[str], name: str) -> None:
        """The study experiment's runs table with the parent row expanded, then each trial
        (``children``, whose own nested runs are probes)."""
        self.open(f"/#/experiments/{exp}/runs{VIEW}", parent_name)
        self.expand(parent_name)
        self.page.get_by_text(children[0]).first.wait_for(timeout=self.timeout_ms)
        for child in children:
            self.expand(child)
        self.page.evaluate("document.activeElement && document.activeElement.blur()")
        self.save(name)

    def expand(self, run_name: str) -> None:
        """Click the expander of the runs-table row of ``run_name`` when it has one."""
        row = self.page.locator(".ag-row", has_text=run_name).first
        button = row.locator("button")
        if button.count():
            button.first.click()


def shoot_all(shot: Shooter, tracker: Tracker, experiment: str, study_experiment: str) -> None:
    """The pictures of the newest run of ``experiment`` and the newest study parent run of
    ``study_experiment`` (skipped when there is none)."""
    client = tracker._client
    exp = tracker.find_experiment(experiment)
    run = tracker.latest_run(exp, parent=False) if exp else None
    if exp and run:
        shot.runs_list(exp, "runs_list.png", client.get_run(run).info.run_name)
        shot.run_page(exp, run, "overview", "Parameters", "run_overview.png")
        shot.run_charts(exp, run, "run_charts.png")
        shot.run_page(exp, run, "system-metrics", "system/", "run_system_metrics.png")
        shot.artifact(exp, run, "val_loss_per_chunk.png", "img", "run_artifacts.png")
    study_exp = tracker.find_experiment(study_experiment)
    parent = tracker.latest_run(study_exp, parent=True) if study_exp else None
    if study_exp and parent:
        trials = client.search_runs([study_exp], f"tags.mlflow.parentRunId = '{parent}'")
        names = [t.info.run_name for t in trials]
        shot.nested(study_exp, client.get_run(parent).info.run_name, names, "study_trials.png")
        shot.artifact(study_exp, parent, "table.md", "table, [role=table]", "study_table.png")
        shot.artifact(study_exp, parent, "loss_per_chunk.png", "img", "study_plot.png")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("store", help="tracking store (sqlite:////abs/mlflow.db)")
    parser.add_argument("out", type=Path, help="folder for the PNGs")
    parser.add_argument("--experiment", default="aim-demo", help="pre-training experiment")
    parser.add_argument("--study-experiment", default="aim-studies", help="studies' experiment")
    parser.add_argument("--chromium", help="browser executable (default: chromium on PATH)")
    parser.add_argument("--timeout-s", type=float, default=60, help="wait per page element")
    parser.add_argument("--size", default="1600x1000", help="viewport WIDTHxHEIGHT")
    args = parser.parse_args()

    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        print("playwright is missing: pip install -e '.[screenshots]'", file=sys.stderr)
        return 2
    browser_path = find_chromium(args.chromium)
    if browser_path is None:
        print(
            "chromium is missing: apt-get install -y chromium (or --chromium PATH)", file=sys.stderr
        )
        return 2

    tracker = Tracker(args.store)
    if tracker.find_experiment(args.experiment) is None:
        print(f"no experiment {args.experiment!r} in {args.store}", file=sys.stderr)
        return 2
    width, height = (int(v) for v in args.size.split("x"))
    args.out.mkdir(parents=True, exist_ok=True)
    port = free_port()
    with tempfile.TemporaryDirectory() as tmp:
        server = start_server(args.store, port, Path(tmp))
        try:
            with sync_playwright() as p:
                browser = p.chromium.launch(executable_path=browser_path, args=["--no-sandbox"])
                context = browser.new_context(viewport={"width": width, "height": height})
                context.add_init_script(SEED_STORAGE)
                base = f"http://127.0.0.1:{port}"
                shot = Shooter(context.new_page(), base, args.out, int(args.timeout_s * 1e3))
                shoot_all(shot, tracker, args.experiment, args.study_experiment)
                browser.close()
        finally:
            server.terminate()
            server.wait(timeout=30)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
