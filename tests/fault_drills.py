"""Fault drills behind BENCHMARKS.md's fault table: a job under one fault, its console
with a time stamp on each line, then what it cost (SUMMARY lines: time lost, steps redone;
the MLflow run's steps, images dropped and restarts; on S3, the faults each phase met).

    python tests/fault_drills.py killed-worker   # embedded Ray, one training worker SIGKILLed
    python tests/fault_drills.py lost-node       # 2-node loopback cluster, node 2's raylet killed
    python tests/fault_drills.py s3 --rate 0.1   # ingest + demo on S3 through the fault proxy:
                                                 # 0% first, then --rate
    python tests/fault_drills.py half-checkpoint # a half-written checkpoint, the job run again
    python tests/fault_drills.py killed-ingest   # an ingest SIGKILLed, run again

The killing drills strike once the console shows step 40 and the step-30 checkpoint is in
(``train.checkpoint_every=30``). Each kills only what it started. Run from the repository
root with the venv's python; a run takes a few minutes on 2 cores. The jobs run from the
repository root, as ``make demo`` does (the S3 runs' logs go to the ignored ``./runs``).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))
from net_helpers import REPO, free_port  # noqa: E402

BIN = Path(sys.executable).parent
STEP = re.compile(r": step (\d+)/\d+")
KILL_AT_STEP, CHECKPOINT_EVERY = 40, 30
PHOTOS = 600  # the killed ingest's
OnLine = Callable[[float, str, subprocess.Popen], None]


def _env(**extra: str) -> dict[str, str]:
    """This process's environment without Ray's and AWS's variables, with this checkout's
    ``platform/`` first on ``PYTHONPATH`` (the venv may hold another checkout's editable
    install: the driver, the nodes and the Ray workers must all run this code)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "AWS_"))}
    path = [str(REPO / "platform"), *filter(None, env.get("PYTHONPATH", "").split(os.pathsep))]
    return {**env, "PYTHONPATH": os.pathsep.join(path), **extra}


def _say(t: float, text: str) -> None:
    print(f"[{t:7.1f}s] {text}", flush=True)


def _console(
    cmd: list[str], env: dict[str, str], on_line: OnLine | None = None
) -> tuple[int, float]:
    """Run ``cmd``, print its lines time-stamped; ``on_line(t, line, proc)`` may act on them."""
    t0 = time.monotonic()
    proc = subprocess.Popen(
        cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True,
    )  # fmt: skip
    assert proc.stdout is not None
    try:
        for line in proc.stdout:
            t = time.monotonic() - t0
            _say(t, line.rstrip())
            if on_line:
                on_line(t, line, proc)
        return proc.wait(), time.monotonic() - t0
    finally:
        if proc.poll() is None:  # the drill itself failed: take the job down with it
            os.killpg(proc.pid, signal.SIGKILL)


def _demo(work: Path, sets: dict[str, object]) -> list[str]:
    sets = {
        "name": "demo",
        "train.storage_path": str(work / "runs"),
        "tracking.tracking_uri": f"sqlite:///{work}/mlflow.db",
        **sets,
    }
    args = [x for k, v in sets.items() for x in ("--set", f"{k}={v}")]
    return [str(BIN / "aimctl"), "pretrain", "jobs/configs/demo.yaml", *args]


class KillAfterCheckpoint:
    """An ``on_line`` that calls ``kill(driver)`` once the console shows a step of at least
    ``KILL_AT_STEP`` and ``latest.json`` names a checkpoint of at least ``CHECKPOINT_EVERY``,
    then times the way back: the failure reported, the restart said, the killed step shown
    again."""

    def __init__(self, latest: Path, kill: Callable[[subprocess.Popen], str]) -> None:
        self.latest, self.kill = latest, kill
        self.t: dict[str, float] = {}
        self.step = self.checkpoint = 0  # the step reached when killed, the checkpoint

    def __call__(self, t: float, line: str, driver: subprocess.Popen) -> None:
        m = STEP.search(line)
        if "kill" not in self.t:
            if not m or int(m.group(1)) < KILL_AT_STEP or not self.latest.exists():
                return
            checkpoint = json.loads(self.latest.read_text())["step"]
            if checkpoint < CHECKPOINT_EVERY:
                return
            what = self.kill(driver)
            self.t["kill"], self.step, self.checkpoint = t, int(m.group(1)), checkpoint
            _say(t, f"KILLED {what} (console at step {self.step}, checkpoint {checkpoint})")
        elif "failed" not in self.t and (
            "training failed" in line or re.search(r"lost \d+ of \d+ node", line)
        ):
            self.t["failed"] = t
            said = re.search(r"at step (\d+)", line)  # the step training had reached
            self.step = max(self.step, int(said.group(1))) if said else self.step
        elif "restart" not in self.t and re.search(r"restart \d+ of", line):
            self.t["restart"] = t
        elif "back" not in self.t and "restart" in self.t and m and int(m.group(1)) >= self.step:
            self.t["back"] = t

    def summary(self) -> str:
        if "kill" not in self.t:
            return "SUMMARY: no kill happened (the run never showed step 40 after a checkpoint)"
        t0 = self.t["kill"]
        since = {k: f"+{v - t0:.1f} s" for k, v in self.t.items() if k != "kill"}
        lost = f"{self.t['back'] - t0:.1f} s" if "back" in self.t else "never (not back)"
        return (
            f"SUMMARY: killed at {t0:.1f} s at step {self.step}, checkpoint "
            f"{self.checkpoint}; failure said {since.get('failed', 'never')}, restart said "
            f"{since.get('restart', 'never')}, step {self.step} shown again {since.get('back', 'never')}"
            f"; time lost {lost}, steps redone {self.step - self.checkpoint}"
        )


def mlflow_facts(tracking_uri: str, run_id: str) -> str:
    """What the MLflow run holds: status, logged steps (distinct, last, logged twice), images
    dropped, restarts and worker counts."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    run = client.get_run(run_id)
    steps = Counter(m.step for m in client.get_metric_history(run_id, "train/loss"))
    dropped = client.get_metric_history(run_id, "data/dropped_images")
    workers = sorted(client.get_metric_history(run_id, "train/workers"), key=lambda m: m.step)
    tags = {k: v for k, v in run.data.tags.items() if k.startswith("restart")}
    return (
        f"MLFLOW run {run_id} {run.info.status}: train/loss at {len(steps)} steps "
        f"(last {max(steps, default=0)}; logged twice: {sorted(s for s, n in steps.items() if n > 1)}), "
        f"data/dropped_images max {max((m.value for m in dropped), default=None)}, "
        f"train/workers {[int(m.value) for m in workers][:1] + [int(m.value) for m in workers][-1:]}, "
        f"tags {tags}"
    )  # fmt: skip


def _same_curves(a: dict[str, str], b: dict[str, str]) -> str:
    """Whether two MLflow runs (``{"tracking_uri", "run_id"}``) logged the same values at the
    same steps: the same rows in the same order went into both."""
    from mlflow.tracking import MlflowClient

    out = []
    for key in ("train/loss", "val/loss", "data/dropped_images", "train/epoch"):
        curves = [
            sorted((m.step, m.value) for m in MlflowClient(r["tracking_uri"]).get_metric_history(
                r["run_id"], key))
            for r in (a, b)
        ]  # fmt: skip
        out.append(f"{key} at {len(curves[0])} steps equal: {curves[0] == curves[1]}")
    return "; ".join(out)


def _run_facts(work: Path, name: str = "demo") -> str:
    marker = work / "runs" / name / "mlflow_run_id.json"
    if not marker.exists():
        return "MLFLOW: no run (the job never started one)"
    saved = json.loads(marker.read_text())
    return mlflow_facts(saved["tracking_uri"], saved["run_id"])


def lost_node(work: Path) -> int:
    """The issue's journey: SPREAD over a head and a second node, 1 CPU a worker."""
    from test_node_loss import _node_args, _ports, _raylet_of, _up
    from test_submit import _stop_head

    head_dir = tempfile.mkdtemp(prefix="aimh", dir="/tmp")  # short: unix socket paths
    node_dir = tempfile.mkdtemp(prefix="aimn", dir="/tmp")
    env = _env(
        RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(24), HOME=head_dir,
        PATH=f"{BIN}{os.pathsep}{os.environ['PATH']}", RAY_USAGE_STATS_ENABLED="0",
        RAY_ENABLE_UV_RUN_RUNTIME_ENV="0",
    )  # fmt: skip
    port = free_port()
    gcs = f"127.0.0.1:{port}"
    head = node = None
    try:
        head = _up(
            ["--head", "--port", str(port), "--include-dashboard", "false", "--temp-dir", head_dir,
             *_ports("--ray-client-server-port", "--dashboard-port"), *_node_args()],
            env, head_dir, gcs, 1,
        )  # fmt: skip
        node = _up(["--address", gcs, "--temp-dir", node_dir, *_node_args()], env, node_dir, gcs, 2)
        print("cluster: head + 1 node on 127.0.0.1, 2 CPUs each", flush=True)
        sets = {
            "train.placement_strategy": "SPREAD",
            "train.cpus_per_worker": 1,
            "train.max_failures": 3,
            "train.checkpoint_every": CHECKPOINT_EVERY,
        }

        def kill(driver: subprocess.Popen) -> str:
            os.kill(_raylet_of(node_dir), signal.SIGKILL)
            return "the second node's raylet"

        watch = KillAfterCheckpoint(work / "runs" / "demo" / "latest.json", kill)
        denv = {**env, "HOME": str(work), "AIM_DATA_CACHE": str(work / "cache")}
        rc, wall = _console([*_demo(work, sets), "--address", gcs], denv, watch)
    finally:
        for proc, folder in ((node, node_dir), (head, head_dir)):
            if proc is not None:
                _stop_head(proc, folder)
        shutil.rmtree(head_dir, ignore_errors=True)
        shutil.rmtree(node_dir, ignore_errors=True)
    print(f"{watch.summary()}; exit {rc} after {wall:.1f} s", flush=True)
    print(_run_facts(work), flush=True)
    return rc


def killed_worker(work: Path) -> int:
    """Embedded Ray: one ``ray::RayTrainWorker`` of this driver's own Ray SIGKILLed."""
    import psutil

    def kill(driver: subprocess.Popen) -> str:
        tree = psutil.Process(driver.pid).children(recursive=True)
        workers = sorted(p.pid for p in tree if "RayTrainWorker" in " ".join(p.cmdline()))
        if not workers:
            raise RuntimeError("no ray::RayTrainWorker under the driver")
        os.kill(workers[-1], signal.SIGKILL)
        return f"training worker {workers[-1]} (of {len(workers)})"

    env = _env(RAY_AUTH_MODE="disabled", AIM_DATA_CACHE=str(work / "cache"))
    watch = KillAfterCheckpoint(work / "runs" / "demo" / "latest.json", kill)
    sets = {"train.max_failures": 1, "train.checkpoint_every": CHECKPOINT_EVERY}
    rc, wall = _console(_demo(work, sets), env, watch)
    print(f"{watch.summary()}; exit {rc} after {wall:.1f} s", flush=True)
    print(_run_facts(work), flush=True)
    return rc


def half_checkpoint(work: Path) -> int:
    """The demo for 20 steps; then a checkpoint that crashed half way (rank 0's train state
    and a partial ``.metadata``, no shards, never named by ``latest.json``) beside it; then the
    same config by name for 30 steps."""
    env = _env(RAY_AUTH_MODE="disabled", AIM_DATA_CACHE=str(work / "cache"))
    sets: dict[str, object] = {"train.checkpoint_every": 10, "train.val_every": 10}
    rc1, t1 = _console(_demo(work, {**sets, "train.steps": 20}), env)
    half = work / "runs" / "demo" / "checkpoint_00000099"
    half.mkdir()
    (half / "train_state.json").write_text(json.dumps({"step": 99, "epoch": 9, "data_seed": 0}))
    (half / ".metadata").write_bytes(b"partial")
    latest = (work / "runs" / "demo" / "latest.json").read_text()
    print(f"PLANTED {half.name} (train state at step 99, no shards); latest.json {latest}")
    rc2, t2 = _console(_demo(work, {**sets, "train.steps": 30}), env)
    print(f"SUMMARY: first run {t1:.1f} s (exit {rc1}), second {t2:.1f} s (exit {rc2})")
    print(_run_facts(work), flush=True)
    return max(rc1, rc2)


def killed_ingest(work: Path) -> int:
    """``aimctl ingest`` of 600 photos SIGKILLed (with its Ray) once 20 groups are done, run
    again, then a clean ingest of the same photos for the time it takes."""
    import pyarrow.parquet as pq

    env = _env(RAY_AUTH_MODE="disabled", AIM_DATA_CACHE=str(work / "cache"))

    def ingest(dest: Path) -> list[str]:
        return [str(BIN / "aimctl"), "ingest", "builtin:photos", str(dest), "--num-photos",
                str(PHOTOS), "--shard-size-mb", "0.3", "--val-fraction", "0.1"]  # fmt: skip

    dest = work / "photos"
    markers = dest / "_progress"
    state: dict[str, float] = {}

    def kill_after_groups(driver: subprocess.Popen, groups: int = 20) -> None:
        while driver.poll() is None and len(list(markers.glob("*/group-*.json"))) < groups:
            time.sleep(0.05)
        state["groups"] = len(list(markers.glob("*/group-*.json")))
        if driver.poll() is not None:
            raise RuntimeError("the ingest ended before the kill: give it more photos")
        os.killpg(driver.pid, signal.SIGKILL)  # the CLI and the Ray it started

    t0 = time.monotonic()
    proc = subprocess.Popen(
        ingest(dest), cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True, start_new_session=True,
    )  # fmt: skip
    kill_after_groups(proc)
    assert proc.stdout is not None
    for line in proc.stdout:
        print(f"[ before kill] {line.rstrip()}", flush=True)
    proc.wait()
    t_kill = time.monotonic() - t0
    _say(t_kill, f"KILLED the ingest and its Ray: {state['groups']:.0f} group(s) were done")
    time.sleep(3)  # a worker mid-task may still finish its group
    groups = len(list(markers.glob("*/group-*.json")))
    print(f"{groups} group(s) done once the killed ingest's workers stopped", flush=True)
    rc, t_again = _console(ingest(dest), env)
    manifest = json.loads((dest / "_manifest.json").read_text())
    ids = [i for s in ("train", "val") for i in pq.read_table(dest / s).column("id").to_pylist()]
    rc_clean, t_clean = _console(ingest(work / "clean"), env)
    print(
        f"SUMMARY: killed after {t_kill:.1f} s; run again {t_again:.1f} s (exit {rc}), "
        f"resumed_groups {manifest['resumed_groups']}, counts {manifest['counts']}, {len(ids)} "
        f"ids ({len(set(ids))} distinct, {PHOTOS} expected); a clean ingest {t_clean:.1f} s "
        f"(exit {rc_clean}): time lost {t_kill + t_again - t_clean:.1f} s",
        flush=True,
    )
    return max(rc, rc_clean)


def _fault_kinds(entries: list[str]) -> str:
    """``faulted_paths`` entries (``kind METHOD path``) grouped: data reads, checkpoint
    uploads, other run files, ingest writes."""

    def what(entry: str) -> str:
        _, method, path = entry.split(" ", 2)
        if "/runs/" in path:
            if "checkpoint_" in path and method in ("PUT", "POST"):
                return "checkpoint upload"
            return f"run files {method}"
        return f"data {method}"

    return ", ".join(f"{k} {n}" for k, n in sorted(Counter(map(what, entries)).items())) or "none"


def s3(work: Path, rate: float, kinds: str, read_timeout: float) -> int:
    """Ingest + demo with data and checkpoints on S3 (moto) through the fault proxy, at 0%,
    then from scratch at ``rate``."""
    import boto3
    from s3_fault_proxy import FaultProxy

    creds = {"aws_access_key_id": "testing", "aws_secret_access_key": "testing"}
    env = _env(
        RAY_AUTH_MODE="disabled", AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing",
        AWS_DEFAULT_REGION="us-east-1", AIM_DATA_CACHE=str(work / "cache"),
    )  # fmt: skip
    store = f"http://127.0.0.1:{free_port()}"
    log = open(work / "moto.log", "w")  # noqa: SIM115 - closed below
    moto = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", store.rsplit(":", 1)[1]],
        env=env, stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    client = boto3.client("s3", endpoint_url=store, region_name="us-east-1", **creds)
    rcs: list[int] = []
    try:
        for _ in range(60):
            try:
                client.create_bucket(Bucket="aim")
                break
            except Exception:  # noqa: BLE001 - not up yet
                time.sleep(1)
        else:
            raise RuntimeError(f"moto did not start: {(work / 'moto.log').read_text()[-2000:]}")
        proxy = FaultProxy(store, kinds=kinds.split(","), seed=3)
        proxy.start()
        opts = json.dumps({"endpoint_url": proxy.url, "read_timeout": read_timeout})
        print(f"S3: moto at {store}, fault proxy {proxy.url}, storage options {opts}", flush=True)
        manifests: dict[str, Any] = {}
        runs: dict[str, Any] = {}
        for name, r in (("clean", 0.0), ("faulty", rate)):
            proxy.configure(rate=r)
            print(f"--- {name}: {r:.0%} of all S3 requests fail ({kinds})", flush=True)
            before: dict[str, Any] = proxy.stats()
            seen = len(before["faulted_paths"])
            data = f"s3://aim/{name}/digits"
            ingest = [str(BIN / "aimctl"), "ingest", "builtin:digits", data, "--image-size", "64",
                      "--val-fraction", "0.05", "--shard-size-mb", "0.5", "--storage-options", opts]  # fmt: skip
            rc_i, t_i = _console(ingest, env)
            stats: dict[str, Any] = proxy.stats()
            ingest_faults = stats["faulted_paths"][seen:]
            requests_i = stats["requests"] - before["requests"]
            sets = {
                "name": name,
                "data.sources.0.url": data,
                "data.storage_options": opts,
                "train.storage_path": "s3://aim/runs",
                "train.storage_options": opts,
            }
            rc_p, t_p = _console(_demo(work, sets), env)
            stats = proxy.stats()
            run_faults = stats["faulted_paths"][seen + len(ingest_faults) :]
            rcs += [rc_i, rc_p]
            manifest = json.loads(
                client.get_object(Bucket="aim", Key=f"{name}/digits/_manifest.json")["Body"].read()
            )
            manifests[name] = manifest
            latest = json.loads(
                client.get_object(Bucket="aim", Key=f"runs/{name}/latest.json")["Body"].read()
            )
            keys = client.list_objects_v2(Bucket="aim", Prefix=f"runs/{name}/checkpoint_")
            per_ckpt = Counter(o["Key"].split("/")[2] for o in keys.get("Contents", []))
            print(
                f"SUMMARY {name} ({r:.0%}): ingest {t_i:.1f} s (exit {rc_i}), counts "
                f"{manifest['counts']}, {len(ingest_faults)} faults ({_fault_kinds(ingest_faults)}); "
                f"pretrain {t_p:.1f} s (exit {rc_p}), {len(run_faults)} faults "
                f"({_fault_kinds(run_faults)}); requests: ingest {requests_i}, pretrain "
                f"{stats['requests'] - before['requests'] - requests_i}; faults so far "
                f"{stats['faults']}; latest "
                f"{latest['checkpoint']}; files per checkpoint {dict(per_ckpt)}",
                flush=True,
            )  # fmt: skip
            saved = json.loads(
                client.get_object(Bucket="aim", Key=f"runs/{name}/mlflow_run_id.json")[
                    "Body"
                ].read()
            )
            print(mlflow_facts(saved["tracking_uri"], saved["run_id"]), flush=True)
            runs[name] = saved
        if len(manifests) == 2:
            same = all(
                manifests["clean"][k] == manifests["faulty"][k] for k in ("counts", "shards")
            )
            print(f"SUMMARY ingest: faulty manifest counts and shards equal clean: {same}")
            print(f"SUMMARY pretrain: {_same_curves(runs['clean'], runs['faulty'])}", flush=True)
        proxy.stop()
    finally:
        moto.terminate()
        moto.wait(timeout=30)
        log.close()
    return max(rcs) if rcs else 1


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    drills = ["killed-worker", "lost-node", "s3", "half-checkpoint", "killed-ingest"]
    ap.add_argument("drill", choices=drills)
    ap.add_argument("--rate", type=float, default=0.1, help="s3: fraction of requests that fail")
    ap.add_argument("--kinds", default="slowdown,reset,cut,timeout", help="s3: fault kinds")
    ap.add_argument("--read-timeout", type=float, default=5.0, help="s3: read_timeout option")
    a = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix=f"drill-{a.drill}-"))
    print(f"work folder: {work}", flush=True)
    if a.drill == "half-checkpoint":
        rc = half_checkpoint(work)
    elif a.drill == "killed-ingest":
        rc = killed_ingest(work)
    elif a.drill == "lost-node":
        rc = lost_node(work)
    elif a.drill == "killed-worker":
        rc = killed_worker(work)
    else:
        rc = s3(work, a.rate, a.kinds, a.read_timeout)
    sys.exit(rc)


if __name__ == "__main__":
    main()
