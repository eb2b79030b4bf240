"""The platform's own job on a GPU, beside ``bench step`` in the same run (issue 30 point 1).

``bench step`` times the model's training step alone; this runs the real job as a user does:
``aimctl ingest`` of JPEGs into Parquet shards, then ``aimctl pretrain`` (Ray Train's
``TorchTrainer``, one GPU worker under FSDP2, bf16 mixed precision, compiled, Ray Data
decoding and cropping, validation, a checkpoint, MLflow in a SQLite store), and reads the
run's own metrics back from MLflow. Then it times ``bench step`` on the same model, batch and
settings in this process and prints, per case::

    real job over bench step: R   (goal R >= 0.95)

with the job's data wait (share of wall time its loop waited for batches) and MFU. Two cases:
``aim-600M`` on 224-px JPEGs generated there (does the real path keep the step's speed?) and
``aim-tiny`` on CIFAR-10 (``--cifar``: a ``<split>.tar.gz`` of ``<split>/<class>/*.jpg`` or
such a folder; generated 32-px JPEGs without it): a tiny model on small images is where the
data pipeline, not the GPU, sets the pace (is the GPU fed?).

On a GPU node without Ray, MLflow or pydantic, unpack the offline bundle first
(``infra/offline_bundle.py``); ``jobs/gpu_check.sh --real-job`` does both::

    bash jobs/gpu_check.sh --real-job --bundle build/offline-bundle.tar.xz \\
        --cifar cifar10/test.tar.gz --out real_job.md
    python jobs/gpu_real_job.py --smoke          # tiny shapes, a few steps, on a CPU
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "platform"))  # runnable from a bare checkout, no install
GOAL = 0.95  # the real job's images/s over bench step's
CLASSES = 10
# aimctl without an installed console script (an unpacked bundle has none)
AIMCTL = [sys.executable, "-c", "import sys; from aim_platform.cli import main; main()"]


@dataclass(frozen=True)
class Case:
    """One real job and its ``bench step`` twin."""

    name: str
    slug: str  # its folder and run name
    size: str
    batch: int  # images a step: one worker, no gradient accumulation
    steps: int
    images: int  # generated train images (without --cifar)
    gpu: bool

    @property
    def dtype(self) -> str:
        return "bf16" if self.gpu else "fp32"


@dataclass
class Measured:
    """What a case measured; ``None`` where a part failed."""

    case: Case
    job_images_per_s: float | None = None
    data_wait: float | None = None
    mfu: float | None = None
    val_loss: float | None = None
    checkpoint_step: int | None = None
    bench_images_per_s: float | None = None
    wall_s: float = 0.0
    problem: str | None = None

    @property
    def ratio(self) -> float | None:
        if self.job_images_per_s is None or not self.bench_images_per_s:
            return None
        return self.job_images_per_s / self.bench_images_per_s


def cases(smoke: bool, steps: int, batch: int) -> list[Case]:
    """aim-600M on 224 px and aim-tiny on 32 px; ``smoke``: both on aim-tiny, on the CPU."""
    if smoke:
        return [
            Case("aim-tiny (smoke, as aim-600M)", "smoke-large", "aim-tiny", 16, 6, 96, False),
            Case("aim-tiny on CIFAR-10 (smoke)", "smoke-cifar10", "aim-tiny", 16, 6, 96, False),
        ]
    return [
        # one epoch covers the run (epoch turnover is not what this measures); 5% go to val
        Case(
            "aim-600M on 224-px JPEGs",
            "aim-600M",
            "aim-600M",
            batch,
            steps,
            steps * batch * 21 // 19,
            True,
        ),
        # the cifar10 preset's batch (CIFAR-10's 10,000 test images: 1.3 epochs of 100 steps)
        Case("aim-tiny on CIFAR-10", "cifar10", "aim-tiny", 128, steps, 10_000, True),
    ]


def make_jpegs(folder: Path, n: int, side: int, seed: int = 0) -> None:
    """``n`` JPEGs of ``side`` px in ``folder/<class>/``: smooth random colour fields with a
    few rectangles (decoded like photos of that size; their content does not matter here),
    written by one process a CPU."""
    from concurrent.futures import ProcessPoolExecutor

    procs = max(1, min(os.cpu_count() or 1, n // 256))
    parts = [range(k, n, procs) for k in range(procs)]
    if procs == 1:
        _write_jpegs(folder, parts[0], side, seed)
        return
    with ProcessPoolExecutor(procs) as pool:
        list(pool.map(_write_jpegs, [folder] * procs, parts, [side] * procs, [seed] * procs))


def _write_jpegs(folder: Path, indices: range, side: int, seed: int) -> None:
    from PIL import Image

    rng = np.random.default_rng([seed, indices.start])
    for i in indices:
        coarse = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
        img = Image.fromarray(coarse).resize((side, side), Image.BICUBIC)
        pixels = np.asarray(img).copy()  # (side, side, 3)
        for _ in range(3):
            y, x = rng.integers(0, side - side // 4, 2)
            pixels[y : y + side // 4, x : x + side // 4] = rng.integers(0, 256, 3)
        out = folder / f"c{i % CLASSES}"
        out.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels).save(out / f"{i:06d}.jpg", quality=90)


def cifar_folder(archive: Path, into: Path) -> Path:
    """The class folders of a CIFAR-10 split, from a ``.tar.gz`` or a folder."""
    if archive.is_dir():
        return archive
    with tarfile.open(archive) as tar:
        tar.extractall(into, filter="data")  # data only: no links out, no devices
    splits = [p for p in into.iterdir() if p.is_dir()]
    if len(splits) != 1:
        raise SystemExit(f"{archive}: expected one <split>/<class>/ tree, found {splits}")
    return splits[0]


def aimctl(args: list[str], log: Path, env: dict[str, str]) -> None:
    """Run ``aimctl ARGS`` with its output in ``log``; a failure raises with the log's tail."""
    with open(log, "w") as out:
        done = subprocess.run([*AIMCTL, *args], stdout=out, stderr=subprocess.STDOUT, env=env)
    if done.returncode:
        tail = "\n".join(log.read_text().splitlines()[-15:])
        raise RuntimeError(f"aimctl {args[0]} exited {done.returncode} (log {log}):\n{tail}")


def job_overrides(case: Case, root: Path, work: Path, uri: str) -> list[str]:
    """The real job: one GPU worker, the case's batch without accumulation, compiled, bf16,
    validation and a checkpoint at the last step, MLflow in ``uri``."""
    cpus = os.cpu_count() or 2
    sets = [
        f"name=real-job-{case.slug}",
        f"model.size={case.size}",
        f"data.sources=[{{url: '{root}'}}]",
        "data.val_url=null",
        "data.val_limit=512",
        f"data.cpus_per_task={1.0 if case.gpu else 0.5}",
        f"train.steps={case.steps}",
        f"train.global_batch_size={case.batch}",
        f"train.micro_batch_size={case.batch}",
        "train.num_workers=1",
        f"train.use_gpu={'true' if case.gpu else 'false'}",
        f"train.cpus_per_worker={min(4, max(1, cpus // 4)) if case.gpu else 0.5}",
        f"train.precision={case.dtype}",
        f"train.compile={'true' if case.gpu else 'false'}",
        f"train.log_every={max(1, case.steps // 10)}",
        f"train.val_every={case.steps}",
        f"train.checkpoint_every={case.steps}",
        f"train.storage_path={work / 'runs'}",
        "train.max_failures=0",
        f"optim.warmup_steps={max(1, case.steps // 10)}",
        f"tracking.tracking_uri={uri}",
        "tracking.experiment=gpu-real-job",
    ]
    return [x for s in sets for x in ("--set", s)]


def read_run(uri: str, name: str) -> dict[str, list[tuple[int, float]]]:
    """The last MLflow run named ``name``: metric -> [(step, value)] in step order."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name("gpu-real-job")
    if exp is None:
        raise RuntimeError("no MLflow experiment gpu-real-job: the job logged nothing")
    runs = client.search_runs(
        [exp.experiment_id], f"tags.mlflow.runName = '{name}'", order_by=["start_time DESC"]
    )
    if not runs:
        raise RuntimeError(f"no MLflow run {name}")
    keys = ("perf/images_per_s", "perf/mfu", "perf/data_wait_fraction", "val/loss")
    out = {}
    for key in keys:
        history = client.get_metric_history(runs[0].info.run_id, key)
        out[key] = sorted((m.step, m.value) for m in history)
    return out


def run_case(case: Case, work: Path, cifar: Path | None, env: dict[str, str]) -> Measured:
    """Ingest, pre-train through aimctl, read MLflow, then ``bench step`` the same shapes."""
    from aim_platform.bench.step import run_step_bench
    from aim_platform.models.sizes import SIZES

    got = Measured(case)
    start = time.perf_counter()
    here = work / case.slug
    here.mkdir(parents=True, exist_ok=True)
    try:
        side = SIZES[case.size].img_size
        if cifar is not None and "CIFAR" in case.name:
            images = cifar_folder(cifar, here / "cifar")
        else:
            images = here / "jpegs"
            make_jpegs(images, case.images, side)
        root = here / "shards"
        print(f"[{case.name}] aimctl ingest ...", flush=True)
        aimctl(
            ["ingest", str(images), str(root), "--val-fraction", "0.05"], here / "ingest.log", env
        )
        uri = f"sqlite:///{here / 'mlflow.db'}"
        print(f"[{case.name}] aimctl pretrain: {case.steps} steps ...", flush=True)
        config = REPO / "jobs" / "configs" / "demo.yaml"
        args = ["pretrain", str(config), *job_overrides(case, root, here, uri)]
        aimctl(args, here / "pretrain.log", env)
        m = read_run(uri, f"real-job-{case.slug}")
        if not m["perf/images_per_s"]:
            raise RuntimeError("the job logged no perf/images_per_s")
        # perf/images_per_s counts every step after the first 3 (compilation): its last
        # value is the steady rate of the run; the data wait is per log window: their mean
        # after the first window
        got.job_images_per_s = m["perf/images_per_s"][-1][1]
        waits = [v for _, v in m["perf/data_wait_fraction"][1:]] or [
            v for _, v in m["perf/data_wait_fraction"]
        ]
        got.data_wait = float(np.mean(waits)) if waits else None
        got.mfu = m["perf/mfu"][-1][1] if m["perf/mfu"] else None
        got.val_loss = m["val/loss"][-1][1] if m["val/loss"] else None
        latest = here / "runs" / f"real-job-{case.slug}" / "latest.json"
        if latest.exists():
            import json

            got.checkpoint_step = int(json.loads(latest.read_text())["step"])
        print(f"[{case.name}] bench step ...", flush=True)
        bench = run_step_bench(
            size=case.size,
            blocks=None,
            head_blocks=None,
            batch=case.batch,
            dtype=case.dtype,
            device="cuda" if case.gpu else "cpu",
            compile=case.gpu,
            rounds=3,
            steps_per_round=5 if case.gpu else 1,
            warmup=3 if case.gpu else 1,
            echo=lambda line: None,
        )
        got.bench_images_per_s = case.batch / bench.step_time
    except Exception as exc:  # noqa: BLE001 (one case's failure is reported, the next runs)
        got.problem = f"{type(exc).__name__}: {exc}"
    got.wall_s = time.perf_counter() - start
    return got


def _f(value: float | None, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def _pct(share: float | None) -> str:
    return "-" if share is None else f"{100 * share:.1f}%"


def report(results: list[Measured], device: str) -> str:
    """A Markdown table and one ``real job over bench step`` line per case."""
    lines = [
        f"Real job vs `bench step` on {device} (one worker, batch without accumulation)",
        "",
        "| case | real job images/s | bench step images/s | ratio | data wait | MFU "
        "| val loss | checkpoint | wall (s) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in results:
        lines.append(
            f"| {r.case.name} (batch {r.case.batch}, {r.case.steps} steps, {r.case.dtype}) "
            f"| {_f(r.job_images_per_s, '.1f')} | {_f(r.bench_images_per_s, '.1f')} "
            f"| {_f(r.ratio, '.3f')} | {_pct(r.data_wait)} | {_pct(r.mfu)} | {_f(r.val_loss, '.4f')} "
            f"| {'-' if r.checkpoint_step is None else f'step {r.checkpoint_step}'} "
            f"| {r.wall_s:.0f} |"
        )
    lines.append("")
    for r in results:
        if r.problem:
            lines.append(f"{r.case.name}: FAILED: {r.problem}")
            continue
        verdict = "met" if (r.ratio or 0) >= GOAL else "not met"
        lines.append(
            f"{r.case.name}: real job over bench step: {_f(r.ratio, '.3f')} (goal >= {GOAL}: "
            f"{verdict}); data wait {_pct(r.data_wait)}, MFU {_pct(r.mfu)}"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--smoke", action="store_true", help="tiny shapes, a few steps, on a CPU")
    ap.add_argument("--steps", type=int, default=100, help="pre-training steps a case")
    ap.add_argument("--batch", type=int, default=64, help="aim-600M's images a step")
    ap.add_argument("--cifar", type=Path, default=None, help="a CIFAR-10 split (.tar.gz/folder)")
    ap.add_argument("--work", type=Path, default=None, help="working folder (default: a temp)")
    ap.add_argument("--out", type=Path, default=None, help="also write the report here")
    ap.add_argument("--only", default="", help="run only the cases whose name has this text")
    args = ap.parse_args(argv)

    import torch

    from aim_platform.train.metrics import device_name

    if not args.smoke and not torch.cuda.is_available():
        print("no GPU: the real-job check needs one (--smoke runs it on the CPU)")
        return 2
    work = args.work or Path(tempfile.mkdtemp(prefix="real-job-"))
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        [str(REPO / "platform"), *filter(None, [env.get("PYTHONPATH")])]
    )
    env.pop("MLFLOW_TRACKING_URI", None)
    device = device_name(
        torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    )
    results = []
    for case in cases(args.smoke, args.steps, args.batch):
        if args.only and args.only not in case.name:
            continue
        results.append(run_case(case, work, args.cifar, env))
        print(report(results[-1:], device).splitlines()[-1], flush=True)
    text = report(results, device)
    print(text)
    if args.out:
        args.out.write_text(text)
    if args.work is None:
        shutil.rmtree(work, ignore_errors=True)
    return 1 if any(r.problem for r in results) else 0


if __name__ == "__main__":
    raise SystemExit(main())
