"""``aimctl bench data``: our decode path against a torchvision-style baseline (a ratio).

1. Same process, same core (pinned), the same ``builtin:photos`` JPEGs (about 1024x768,
   quality 90), interleaved rounds: our :func:`~aim_platform.data.transforms.train_image`
   (draft-mode decode, crop and bicubic resize in one call, flip) against the baseline that
   ``torchvision.transforms.RandomResizedCrop`` amounts to (open, convert RGB, full decode,
   crop, bicubic resize, flip), written here plainly so torchvision is not needed.
2. Optionally, the rate at which the Ray Data pipeline (:func:`build_train_dataset`)
   delivers batches to a consumer with 1 and 2 CPUs, against a plain one-core loop that
   runs the same decode (+ patchify) over the same Parquet shards.

:func:`baseline_image` can be timed under another PIL build too (``python -m
aim_platform.bench.data --baseline-only``): BENCHMARKS.md compares ours on Pillow-SIMD with
the baseline on standard Pillow, each in its own environment::

    python -m aim_platform.bench.data --write-jpegs /tmp/jpegs        # main venv
    PYTHONPATH=platform /tmp/pillow-venv/bin/python -m aim_platform.bench.data \
        --jpegs /tmp/jpegs --baseline-only                          # Pillow + NumPy only

Over 400 lines on purpose: three side-by-side benchmarks (decode vs a baseline, Ray Data
delivery, ingest and many-shard scale) that share their set-up; only `aimctl bench data` imports
it.
"""

from __future__ import annotations

import argparse
import io
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image

from aim_platform.cluster import start_embedded
from aim_platform.data.transforms import random_resized_crop_box, train_image

Echo = Callable[[str], None]


def baseline_image(data: bytes, size: int, rng: np.random.Generator) -> np.ndarray:
    """torchvision-style: open, convert RGB, RandomResizedCrop(scale 0.4-1), bicubic, flip."""
    img = Image.open(io.BytesIO(data)).convert("RGB")  # full-size decode
    left, top, w, h = random_resized_crop_box(*img.size, rng, (0.4, 1.0), (3 / 4, 4 / 3))
    img = img.crop((left, top, left + w, top + h)).resize((size, size), Image.BICUBIC)
    if rng.random() < 0.5:
        img = img.transpose(Image.FLIP_LEFT_RIGHT)
    return np.asarray(img)  # (S, S, 3)


def ours_image(data: bytes, size: int, rng: np.random.Generator) -> np.ndarray:
    """Our path: draft-mode decode, crop+resize in one call, flip."""
    return train_image(data, size, rng)


def make_jpegs(n: int, seed: int = 0) -> list[bytes]:
    """``n`` builtin:photos JPEGs (web-size random crops of real photos, quality 90)."""
    from aim_platform.data.sources import photo_jpeg

    return [photo_jpeg(i, seed) for i in range(n)]


def _pin_one_core() -> str:
    try:
        cpu = sorted(os.sched_getaffinity(0))[0]
        os.sched_setaffinity(0, {cpu})
        return f"pinned to core {cpu}"
    except (AttributeError, OSError):
        return "not pinned"


def _unpin(cpus: set[int] | None) -> None:
    if cpus:
        os.sched_setaffinity(0, cpus)


def _rate(fn: Callable[[bytes, int, np.random.Generator], np.ndarray], jpegs, size) -> float:
    """Images per CPU-second of this thread: a per-core rate that other processes sharing
    the core do not distort (wall-clock rates on a busy machine would)."""
    rng = np.random.default_rng(0)
    t = time.thread_time()
    for data in jpegs:
        fn(data, size, rng)
    return len(jpegs) / (time.thread_time() - t)


def compare(jpegs: list[bytes], size: int = 224, rounds: int = 3) -> dict[str, list[float]]:
    """Interleaved rounds on the current core; images per second of each path per round."""
    ours_image(jpegs[0], size, np.random.default_rng(0))  # warm up
    baseline_image(jpegs[0], size, np.random.default_rng(0))
    out: dict[str, list[float]] = {"ours": [], "baseline": []}
    for _ in range(rounds):
        out["ours"].append(_rate(ours_image, jpegs, size))
        out["baseline"].append(_rate(baseline_image, jpegs, size))
    return out


def plain_loop_rate(root: str, img_size: int, patch_size: int) -> tuple[int, float]:
    """One core, no Ray: read the train shards with pyarrow and decode+patchify each row."""
    import pyarrow.parquet as pq

    from aim_platform.data.transforms import decode_batch

    files = sorted(Path(root, "train").glob("part-*.parquet"))
    n = 0
    t = time.perf_counter()
    for f in files:
        table = pq.read_table(f, columns=["id", "image"])
        ids, images = table.column("id").to_pylist(), table.column("image").to_pylist()
        for i in range(0, len(ids), 32):
            _, valid = decode_batch(
                ids[i : i + 32], images[i : i + 32], img_size=img_size,
                patch_size=patch_size, train=True,
            )  # fmt: skip
            n += int(valid.sum())
    return n, n / (time.perf_counter() - t)


def ray_rate(root: str, cpus: int, epochs: int = 1) -> dict[str, float]:
    """Start a Ray with ``cpus`` CPUs, consume ``epochs`` epochs, stop it.

    Returns:
        rows, seconds from building the dataset to the last batch (``total_s``), the
        time to the first batch (``first_s``) and rows/s overall and after the first batch.
    """
    import ray

    from aim_platform.config import DataConfig, ModelConfig
    from aim_platform.data.pipeline import build_train_dataset

    start_embedded(num_cpus=cpus, include_dashboard=False, log_to_driver=False)
    try:
        data = DataConfig(sources=[{"url": root}], cpus_per_task=1.0)
        model = ModelConfig(size="aim-600M")
        t0 = time.perf_counter()
        ds = build_train_dataset(data, model, seed=0, epochs=epochs)
        rows, first = 0, None
        for batch in ds.iter_batches(batch_size=64, batch_format="numpy", prefetch_batches=2):
            if first is None:
                first = time.perf_counter() - t0
            rows += len(batch["valid"])
        total = time.perf_counter() - t0
    finally:
        ray.shutdown()
    first = first or total
    return {
        "rows": rows,
        "total_s": total,
        "first_s": first,
        "rate": rows / total,
        "steady_rate": rows / max(total - first, 1e-9),
    }


def run(
    images: int = 200,
    rounds: int = 3,
    size: int = 224,
    pipeline: bool = True,
    pipeline_images: int = 2400,
    echo: Echo = print,
) -> dict[str, object]:
    """The whole benchmark; prints as it goes and returns the figures."""
    import PIL
    from PIL import features

    echo(
        f"PIL {PIL.__version__} (libjpeg-turbo: {features.check_feature('libjpeg_turbo')}); "
        f"{images} builtin:photos JPEGs, output {size}px"
    )
    jpegs = make_jpegs(images)
    shapes = {Image.open(io.BytesIO(j)).size for j in jpegs}
    echo(f"JPEG sizes: {sorted(shapes)}, mean {np.mean([len(j) for j in jpegs]) / 1e3:.0f} kB")
    # The ratio first, in a process that has not started Ray: after ray.init, large
    # allocations stop page-faulting (see BENCHMARKS.md) and the baseline looks 2x faster.
    saved = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else None
    echo(_pin_one_core())
    rates = compare(jpegs, size, rounds)
    _unpin(saved)
    ours, base = statistics.median(rates["ours"]), statistics.median(rates["baseline"])
    for r, (o, b) in enumerate(zip(rates["ours"], rates["baseline"], strict=True)):
        echo(f"round {r}: ours {o:.0f} img/s, baseline {b:.0f} img/s, ratio {o / b:.2f}")
    echo(
        f"median (images per CPU-second of one core): ours {ours:.0f}, baseline {base:.0f}, "
        f"ratio {ours / base:.2f}"
    )
    result: dict[str, object] = {"ours": ours, "baseline": base, "ratio": ours / base}
    if pipeline:
        result.update(_pipeline(pipeline_images, echo))
    return result


def _pipeline(n: int, echo: Echo) -> dict[str, object]:
    from aim_platform.jobs.ingest import ingest

    cache = os.environ.get("AIM_DATA_CACHE") or tempfile.gettempdir()
    root = str(Path(cache) / f"bench-photos-{n}")
    import ray

    start_embedded(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        m = ingest("builtin:photos", root, num_photos=n, val_fraction=0.0, shard_size_mb=16)
    finally:
        ray.shutdown()
    echo(f"ingested {m['counts']['train']} photos into {len(m['shards']['train'])} shards: {root}")
    echo(f"load average before the pipeline runs: {os.getloadavg()}")
    rows, plain = plain_loop_rate(root, 224, 14)
    echo(
        f"plain one-core loop (decode+crop+flip+patchify, no Ray): {plain:.0f} img/s ({rows} rows)"
    )
    out: dict[str, object] = {"plain": plain}
    for cpus in (1, 2):
        for epochs in (1, 2):
            r = ray_rate(root, cpus, epochs)
            echo(
                f"Ray Data, {cpus} CPU(s), {epochs} epoch(s) in one dataset: {r['rate']:.0f} img/s "
                f"overall ({r['rate'] / plain:.2f}x plain), first batch after "
                f"{r['first_s']:.1f} s, {r['steady_rate']:.0f} img/s after it"
            )
            out[f"ray_{cpus}cpu_{epochs}ep"] = r
    return out


def _main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--baseline-only", action="store_true", help="time the baseline alone")
    p.add_argument("--images", type=int, default=200)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--jpegs", help="time these *.jpg instead of generating them")
    p.add_argument("--write-jpegs", help="write the generated JPEGs here and stop")
    args = p.parse_args()
    if args.write_jpegs:
        Path(args.write_jpegs).mkdir(parents=True, exist_ok=True)
        for i, data in enumerate(make_jpegs(args.images)):
            Path(args.write_jpegs, f"{i:05d}.jpg").write_bytes(data)
        return
    if args.jpegs:
        jpegs = [f.read_bytes() for f in sorted(Path(args.jpegs).glob("*.jpg"))]
    else:
        jpegs = make_jpegs(args.images)
    import PIL

    print(_pin_one_core(), f"PIL {PIL.__version__}, {len(jpegs)} JPEGs")
    fns = (
        {"baseline": baseline_image}
        if args.baseline_only
        else {"ours": ours_image, "baseline": baseline_image}
    )
    for fn in fns.values():
        fn(jpegs[0], 224, np.random.default_rng(0))
    rates: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(args.rounds):
        for name, fn in fns.items():
            rates[name].append(_rate(fn, jpegs, 224))
    for name, r in rates.items():
        print(
            f"{name}: median {statistics.median(r):.0f} img/s/core, rounds "
            + ", ".join(f"{x:.0f}" for x in r)
        )


# --- ingest throughput and pipeline start-up at scale (BENCHMARKS_data2.md) -----------------


class _RssSampler:
    """Peak RSS of this process and of all its descendants (Ray's GCS, raylet, workers)."""

    def __init__(self, every_s: float = 0.25) -> None:
        import threading

        self.peak_self = 0
        self.peak_tree = 0
        self._stop = threading.Event()
        self._every = every_s
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        import psutil

        me = psutil.Process()
        while not self._stop.is_set():
            own = me.memory_info().rss
            tree = own
            for p in me.children(recursive=True):
                try:
                    tree += p.memory_info().rss
                except psutil.Error:
                    pass
            self.peak_self = max(self.peak_self, own)
            self.peak_tree = max(self.peak_tree, tree)
            self._stop.wait(self._every)

    def __enter__(self) -> _RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def write_jpeg_folder(root: Path, n: int, classes: int = 100) -> int:
    """``n`` ImageNet-sized JPEGs (500x375, q90 crops of real photos) in ``classes`` folders."""
    from aim_platform.data.sources import photo_jpeg

    total = 0
    for i in range(n):
        folder = root / f"c{i % classes:03d}"
        folder.mkdir(parents=True, exist_ok=True)
        data = photo_jpeg(i, seed=1, size=(500, 375))
        (folder / f"{i:07d}.jpg").write_bytes(data)
        total += len(data)
    return total


def ingest_throughput(src: str, dest: str, cpus: int, shard_size_mb: float) -> dict[str, float]:
    """Ingest ``src`` into ``dest`` on a fresh local Ray with ``cpus`` CPUs; rates and peaks."""
    import shutil

    import ray

    from aim_platform.jobs.ingest import ingest

    shutil.rmtree(dest, ignore_errors=True)
    start_embedded(num_cpus=cpus, include_dashboard=False, log_to_driver=False)
    try:
        with _RssSampler() as rss:
            t0 = time.perf_counter()
            m = ingest(src, dest, shard_size_mb=shard_size_mb)
            secs = time.perf_counter() - t0
    finally:
        ray.shutdown()
    n = m["counts"]["train"] + m["counts"]["val"]
    nbytes = sum(s["bytes"] for split in ("train", "val") for s in m["shards"][split])
    return {
        "images": n,
        "seconds": secs,
        "images_per_s": n / secs,
        "mb_per_s": nbytes / 2**20 / secs,
        "driver_peak_rss_mb": rss.peak_self / 2**20,
        "all_processes_peak_rss_mb": rss.peak_tree / 2**20,
        "shards": len(m["shards"]["train"]) + len(m["shards"]["val"]),
    }


def write_tiny_shards(root: Path, shards: int, rows: int) -> None:
    """An ingest root of ``shards`` train shards holding ``rows`` tiny PNGs in all."""
    import json

    import pyarrow as pa
    import pyarrow.parquet as pq

    from aim_platform.data.shards import MANIFEST, SCHEMA, SCHEMA_VERSION, shard_path
    from aim_platform.data.sources import digit_png

    (root / "train").mkdir(parents=True, exist_ok=True)
    img = digit_png(0, 16)
    per = [rows // shards + (1 if s < rows % shards else 0) for s in range(shards)]
    listed = []
    row = 0
    for s, k in enumerate(per):
        ids = [f"{row + j:07d}" for j in range(k)]
        row += k
        table = pa.table(
            {
                "id": ids,
                "image": [img] * k,
                "label": pa.array([0] * k, pa.int32()),
                "source": ["tiny"] * k,
                "width": pa.array([16] * k, pa.int32()),
                "height": pa.array([16] * k, pa.int32()),
            },
            schema=SCHEMA,
        )
        pq.write_table(table, root / shard_path("train", s))
        listed.append({"path": shard_path("train", s), "rows": k, "bytes": k * len(img)})
    manifest = {
        "schema_version": SCHEMA_VERSION,
        "shards": {"train": listed, "val": []},
        "counts": {"train": rows, "val": 0, "rejected": 0},
        "label_names": [],
        "rejected": [],
    }
    (root / MANIFEST).write_text(json.dumps(manifest))


def first_batch(root: str, cpus: int, batch_size: int = 64) -> dict[str, float]:
    """Time to build the train dataset and to get its first batch, driver RSS, full epoch."""
    import resource

    import ray

    from aim_platform.config import DataConfig, ModelConfig
    from aim_platform.data.pipeline import build_train_dataset

    start_embedded(num_cpus=cpus, include_dashboard=False, log_to_driver=False)
    try:
        data = DataConfig(sources=[{"url": root}])
        model = ModelConfig(size="aim-tiny")
        with _RssSampler() as rss:
            t0 = time.perf_counter()
            ds = build_train_dataset(data, model, seed=0, epochs=1)
            t_build = time.perf_counter() - t0
            it = iter(ds.iter_batches(batch_size=batch_size))
            next(it)
            t_first = time.perf_counter() - t0
            rows = batch_size + sum(len(b["id"]) for b in it)
            t_all = time.perf_counter() - t0
    finally:
        ray.shutdown()
    return {
        "build_s": t_build,
        "first_batch_s": t_first,
        "epoch_s": t_all,
        "rows": rows,
        "driver_peak_rss_mb": rss.peak_self / 2**20,
        "driver_maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def first_batch_s3(root: Path, cpus: int) -> dict[str, float]:
    """:func:`first_batch` with the ingest root ``root`` copied to an S3 endpoint over HTTP
    (a moto server on 127.0.0.1 started here): the pipeline reads it with s3fs/pyarrow."""
    import logging
    import os

    from aim_platform.services import free_port, require_dev_s3

    require_dev_s3("the S3 read benchmark")
    import s3fs
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    for key, value in (("AWS_ACCESS_KEY_ID", "bench"), ("AWS_SECRET_ACCESS_KEY", "bench-s")):
        os.environ.setdefault(key, value)
    os.environ["AWS_ENDPOINT_URL"] = endpoint  # Ray's local workers inherit it
    try:
        fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": endpoint})
        fs.mkdir("bench")
        fs.put(str(root), f"bench/{root.name}", recursive=True)
        return first_batch(f"s3://bench/{root.name}", cpus)
    finally:
        server.stop()


def _scale_main() -> None:
    """``python -m aim_platform.bench.data scale ...``: the ingest / start-up measurements."""
    p = argparse.ArgumentParser(prog="bench scale")
    p.add_argument("what", choices=["write-jpegs", "ingest", "tiny-shards", "first-batch"])
    p.add_argument("path")
    p.add_argument("--dest", default="")
    p.add_argument("-n", type=int, default=10_000)
    p.add_argument("--shards", type=int, default=50)
    p.add_argument("--cpus", type=int, default=2)
    p.add_argument("--shard-size-mb", type=float, default=64.0)
    p.add_argument("--s3", action="store_true", help="first-batch: read PATH through S3 (moto)")
    a = p.parse_args()
    if a.what == "write-jpegs":
        t0 = time.perf_counter()
        nbytes = write_jpeg_folder(Path(a.path), a.n)
        print(f"wrote {a.n} JPEGs, {nbytes / 2**20:.0f} MiB in {time.perf_counter() - t0:.0f} s")
    elif a.what == "ingest":
        print(ingest_throughput(a.path, a.dest, a.cpus, a.shard_size_mb))
    elif a.what == "tiny-shards":
        write_tiny_shards(Path(a.path), a.shards, a.n)
    elif a.s3:
        print(first_batch_s3(Path(a.path), a.cpus))
    else:
        print(first_batch(a.path, a.cpus))


if __name__ == "__main__":
    import sys

    if sys.argv[1:2] == ["scale"]:
        del sys.argv[1]
        _scale_main()
    else:
        _main()
