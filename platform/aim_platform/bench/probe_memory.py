"""The probe job's memory and feature rate at N images: ``python -m
aim_platform.bench.probe_memory 2000 20000 [--set model.a=b ...]``.

For each N, in fresh processes (a peak RSS belongs to a process): N labelled images (the real
digits, cycled, as PNG bytes in a Hugging Face-style Parquet file) are ingested, then the whole
probe job runs on a randomly initialized trunk (:func:`aim_platform.jobs.probe.run_probe`):
block outputs computed per batch by the Ray Data actor pool, streamed into the sharded feature
cache, attentive and linear probes trained on it. One JSON line per N: the driver's peak RSS
during the probe, the feature actors' peak RSS (sampled every 0.2 s), feature rows/s of the
actor pool and the probe job's seconds.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

# The default trunk: aim-tiny's width at 16 px (16 patches of 4x4), 2 blocks: held in RAM,
# the features of 20k images would take 20k x 16 x 128 x 2 B = 78 MiB per probe input.
DEFAULT_MODEL = [
    "model.size=aim-tiny",
    "model.img_size=16",
    "model.patch_size=4",
    "model.num_blocks=2",
]


def _make_source(n: int, folder: Path) -> Path:
    """``folder/images.parquet``: n rows of (PNG bytes of digit i mod 1797 at 16 px, label)."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from sklearn.datasets import load_digits

    from aim_platform.data.sources import digit_png

    labels = load_digits().target
    pngs = [digit_png(i, 16) for i in range(len(labels))]
    table = pa.table(
        {
            "image": pa.array([pngs[i % len(pngs)] for i in range(n)], pa.binary()),
            "label": pa.array([int(labels[i % len(labels)]) for i in range(n)], pa.int64()),
        }
    )
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "images.parquet"
    pq.write_table(table, path, row_group_size=1000)
    return path


def ingest_step(n: int, work: Path) -> None:
    """Generate and ingest n images into ``work/root`` (its own process: not in the peak)."""
    from aim_platform.cluster import connect
    from aim_platform.jobs.ingest import ingest

    connect(None)
    src = _make_source(n, work / "src")
    ingest(str(src), str(work / "root"), val_fraction=0.1, shard_size_mb=4, image_column="image")


def own_mib(proc: Any) -> float:
    """Memory only this process holds (private pages), less Ray's shared object store: a
    process that reads objects maps store pages that count as its own in RSS and USS, and
    those grow with the data read (up to the store's size), not with what the process holds.
    """
    own = 0
    for m in proc.memory_maps(grouped=True):
        if not m.path.startswith("/dev/shm/plasma"):
            own += m.private_clean + m.private_dirty
    return own / 2**20


class _Peaks(threading.Thread):
    """Samples every 0.25 s the memory of this process and of every ``FeatureActor``
    process: RSS, and :func:`own_mib`."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.peaks = {"driver_own": 0.0, "actor_rss": 0.0, "actor_own": 0.0}
        self.stop = threading.Event()

    def _sample(self) -> None:
        import psutil

        self.peaks["driver_own"] = max(self.peaks["driver_own"], own_mib(psutil.Process()))
        for p in psutil.process_iter(["cmdline"]):
            if "FeatureActor" not in " ".join(p.info["cmdline"] or []):
                continue
            try:
                rss, own = p.memory_info().rss / 2**20, own_mib(p)
            except psutil.Error:
                continue  # it ended
            self.peaks["actor_rss"] = max(self.peaks["actor_rss"], rss)
            self.peaks["actor_own"] = max(self.peaks["actor_own"], own)

    def run(self) -> None:
        while not self.stop.is_set():
            self._sample()
            self.stop.wait(0.25)


def probe_step(work: Path, overrides: list[str]) -> dict[str, float]:
    """Run the probe job on ``work/root`` with a random trunk; the figures as a dict."""
    import torch

    from aim_platform.cluster import connect
    from aim_platform.config import JobConfig, ProbeConfig, build_config
    from aim_platform.jobs.probe import run_probe
    from aim_platform.models.aim import build_trunk
    from aim_platform.models.trunk_file import write_trunk

    connect(None)
    job = build_config(JobConfig, {}, [*DEFAULT_MODEL, *overrides])
    torch.manual_seed(0)
    trunk_dir = str(work / "trunk")
    write_trunk(build_trunk(job.model).state_dict(), job, trunk_dir)
    cfg = ProbeConfig(kind="both", sweep=False, views=1, steps=50, batch_size=256)
    phases: dict[str, float] = {}

    def on_phase(text: str) -> None:
        phases.setdefault("training" if text.startswith("training") else text, time.perf_counter())

    sampler = _Peaks()
    sampler.start()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    t0 = time.perf_counter()
    report = run_probe(trunk_dir, cfg, dataset=str(work / "root"), on_phase=on_phase)
    seconds = time.perf_counter() - t0
    sampler.stop.set()
    sampler.join()
    rows = report.train_images + report.val_images
    feature_s = phases["training"] - min(phases.values())
    return {
        "rows": rows,
        "driver_peak_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "driver_before_mib": round(before, 1),
        "driver_peak_own_mib": round(sampler.peaks["driver_own"], 1),
        "actor_peak_mib": round(sampler.peaks["actor_rss"], 1),
        "actor_peak_own_mib": round(sampler.peaks["actor_own"], 1),
        "features_per_s": round(rows / feature_s, 1),
        "probe_job_s": round(seconds, 1),
        "attentive_top1": round(report.main["attentive"].top1, 3),
    }


def measure(n: int, work: Path, overrides: list[str]) -> dict[str, float]:
    """Ingest and probe n images, each step in a fresh process; the probe's figures + n."""
    me = [sys.executable, "-m", "aim_platform.bench.probe_memory"]
    sets = [a for o in overrides for a in ("--set", o)]
    subprocess.run([*me, "--ingest-only", str(n), str(work)], check=True, capture_output=True)
    out = subprocess.run(
        [*me, "--probe-only", str(work), *sets], check=True, capture_output=True, text=True
    )
    return {"n": n, **json.loads(out.stdout.strip().splitlines()[-1])}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("sizes", nargs="*", type=int, default=[2000, 20000])
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--work", default=None, help="scratch folder (default: a temporary one)")
    parser.add_argument("--ingest-only", nargs=2, metavar=("N", "WORK"))
    parser.add_argument("--probe-only", metavar="WORK")
    args = parser.parse_args(argv)
    if args.ingest_only:
        ingest_step(int(args.ingest_only[0]), Path(args.ingest_only[1]))
        return 0
    if args.probe_only:
        print(json.dumps(probe_step(Path(args.probe_only), args.overrides)))
        return 0
    import tempfile

    base = Path(args.work or tempfile.mkdtemp(prefix="aim-probe-memory-"))
    for n in args.sizes:
        print(json.dumps(measure(n, base / f"n{n}", args.overrides)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
