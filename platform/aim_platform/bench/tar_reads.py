"""WebDataset tars on S3, read image by image or file by file: ``python -m
aim_platform.bench.tar_reads --tars 8 --per-tar 250``.

Writes ``--tars`` tars of ``--per-tar`` JPEGs (500x375 crops of the shipped photos, about
ImageNet's size) to an S3 endpoint over HTTP (``--endpoint``; default: a moto server on
127.0.0.1 started here), then runs one ingest task (:func:`aim_platform.data.shards.write_group`,
in this process, no Ray) over all of them twice, side by side, writing to local folders:

- ``per image``: the listing image by image (``order=hash``; the driver reads every tar's
  headers) and one ranged GET an image;
- ``by file``: the listing by file (``order=files``, the default for tars): one streamed
  GET sequence a tar (16 MiB a request).

Prints one JSON line per way: S3 requests (by operation), seconds of listing and of the task,
and the ratio. Loopback moto answers in well under a millisecond; a real S3 GET costs 10-50 ms
of first-byte latency, which the request counts turn into time.
"""

from __future__ import annotations

import argparse
import io
import json
import tarfile
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np


def _write_tars(fs: Any, prefix: str, tars: int, per_tar: int) -> int:
    from aim_platform.data.sources import photo_jpeg

    total = 0
    for t in range(tars):
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w") as tar:
            for i in range(per_tar):
                key = f"{t:04d}{i:05d}"
                for name, data in (
                    (f"{key}.jpg", photo_jpeg(t * per_tar + i, size=(500, 375))),
                    (f"{key}.cls", str(i % 10).encode()),
                ):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        fs.pipe_file(f"{prefix}/shard-{t:04d}.tar", buf.getvalue())
        total += buf.tell()
    return total


def _counting(fs: Any) -> Counter[str]:
    """Count the S3 API calls ``fs`` makes (s3fs routes each through ``_call_s3``)."""
    calls: Counter[str] = Counter()
    real = fs._call_s3

    async def counted(method: str, *args: Any, **kwargs: Any) -> Any:
        calls[method] += 1
        return await real(method, *args, **kwargs)

    fs._call_s3 = counted
    return calls


def _one_way(url: str, opts: dict[str, Any], by_file: bool, out: Path) -> dict[str, Any]:
    from aim_platform.data import storage
    from aim_platform.data.shards import write_group
    from aim_platform.data.sources import list_source

    fs, _ = storage.filesystem(url, opts)
    calls = _counting(fs)  # fsspec caches instances: listing and task share this one
    t0 = time.perf_counter()
    listing = list_source(url, opts, by_file=by_file)
    listed = time.perf_counter() - t0
    list_calls, list_gets = sum(calls.values()), calls["get_object"]
    payload = json.dumps([it.to_dict() for it in listing.items])
    t0 = time.perf_counter()
    res = write_group(
        {"group": np.array([0]), "items": np.array([payload], dtype=object)},
        dest=str(out),
        storage_options=opts,
        source="bench",
        options=listing.options,
        val_fraction=0.0,
        max_pixels=10**8,
        fingerprint="0" * 64,
        split_bytes=256 * 2**20 if by_file else 0,
        shuffle_seed=0 if by_file else None,
    )
    task = time.perf_counter() - t0
    return {
        "way": "by file" if by_file else "per image",
        "images": int(sum(res["rows"])),
        "rejected": int(sum(1 for r in res["reason"] if r)),
        "list_s": round(listed, 2),
        "list_requests": list_calls,
        "task_s": round(task, 2),
        "task_requests": sum(calls.values()) - list_calls,
        "task_gets": calls["get_object"] - list_gets,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tars", type=int, default=8)
    p.add_argument("--per-tar", type=int, default=250)
    p.add_argument("--endpoint", default="", help="S3 endpoint URL (default: a local moto)")
    args = p.parse_args()
    server = None
    endpoint = args.endpoint
    if not endpoint:
        import logging

        from moto.server import ThreadedMotoServer

        logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one line a request otherwise

        from aim_platform.services import free_port

        port = free_port()
        server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
        server.start()
        endpoint = f"http://127.0.0.1:{port}"
    import os

    import s3fs

    os.environ.setdefault("AWS_ACCESS_KEY_ID", "bench")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "bench-secret")
    opts = {"endpoint_url": endpoint}
    fs = s3fs.S3FileSystem(client_kwargs=opts)
    if server:
        fs.mkdir("bench")
    nbytes = _write_tars(fs, "bench/wds", args.tars, args.per_tar)
    print(json.dumps({"tars": args.tars, "per_tar": args.per_tar, "mib": round(nbytes / 2**20)}))
    url = "s3://bench/wds"
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for by_file in (False, True):
            s3fs.S3FileSystem.clear_instance_cache()
            rows.append(_one_way(url, opts, by_file, Path(tmp) / str(by_file)))
            print(json.dumps(rows[-1]))
    per_image, by_file_row = rows
    print(
        json.dumps(
            {
                "requests_ratio": round(
                    (per_image["list_requests"] + per_image["task_requests"])
                    / max(by_file_row["list_requests"] + by_file_row["task_requests"], 1),
                    1,
                ),
                "seconds_ratio": round(
                    (per_image["list_s"] + per_image["task_s"])
                    / max(by_file_row["list_s"] + by_file_row["task_s"], 1e-9),
                    2,
                ),
            }
        )
    )
    if server:
        server.stop()


if __name__ == "__main__":
    main()
