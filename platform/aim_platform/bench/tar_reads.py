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

``--driver-files N`` measures instead what the ingest driver holds for a source of N tars of
1 GB listed by file (no Ray, no S3): the locators, hashed order, groups and JSON payloads, then
5 result rows a tar (256 MB shards: 4 train, 1 val) and the manifest built from them, with
``tracemalloc`` peaks.
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
    from aim_platform import storage
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


def driver_cost(files: int) -> dict[str, Any]:
    """What the ingest driver holds for ``files`` tars of 1 GB listed by file."""
    import tracemalloc

    from aim_platform.data.shards import build_manifest, fingerprint_of, group_items, order_items
    from aim_platform.data.sources import Item, Listing

    tracemalloc.start()
    t0 = time.perf_counter()
    items = [
        Item(f"shards-{i:06d}", "tarfile", path=f"s3://b/dfn/shards-{i:06d}.tar", size=10**9)
        for i in range(files)
    ]
    listing = Listing("dfn", items, [], {"prefixed": True}, by_file=True)
    fingerprint = fingerprint_of(listing, {})
    groups = group_items(order_items(items, "files", 0), 256 * 2**20)
    payloads = [json.dumps([it.to_dict() for it in g]) for g in groups]
    listed_s = time.perf_counter() - t0
    listing_peak = tracemalloc.get_traced_memory()[1]
    results = []
    for g in range(len(groups)):
        for split, part, rows in [("train", k, 2400) for k in range(4)] + [("val", 0, 500)]:
            shard = f"{split}/part-{g:05d}" + (f"-{part:03d}" if part else "") + ".parquet"
            results.append(
                {
                    "id": "",
                    "split": split,
                    "shard": shard,
                    "reason": "",
                    "rows": rows,
                    "nbytes": rows * 10**5,
                }
            )
    t0 = time.perf_counter()
    manifest = build_manifest("s3://b/dfn", "dfn", listing, results, {}, fingerprint)
    text = json.dumps(manifest, indent=1)
    return {
        "files": files,
        "groups": len(payloads),
        "shard_rows": len(results),
        "list_order_group_s": round(listed_s, 1),
        "listing_peak_mib": round(listing_peak / 2**20),
        "manifest_s": round(time.perf_counter() - t0, 1),
        "peak_mib": round(tracemalloc.get_traced_memory()[1] / 2**20),
        "manifest_json_mib": round(len(text) / 2**20),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tars", type=int, default=8)
    p.add_argument("--per-tar", type=int, default=250)
    p.add_argument("--endpoint", default="", help="S3 endpoint URL (default: a local moto)")
    p.add_argument("--driver-files", type=int, default=0, help="measure the driver instead")
    args = p.parse_args()
    if args.driver_files:
        print(json.dumps(driver_cost(args.driver_files)))
        return
    server = None
    endpoint = args.endpoint
    if not endpoint:
        import logging

        from aim_platform.services import free_port, require_dev_s3

        require_dev_s3("the tar-read benchmark without --endpoint")
        from moto.server import ThreadedMotoServer

        logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one line a request otherwise

        port = free_port()
        server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
        server.start()
        endpoint = f"http://127.0.0.1:{port}"
    try:
        for row in compare(endpoint, args.tars, args.per_tar, bucket="bench", create=bool(server)):
            print(json.dumps(row))
    finally:
        if server:
            server.stop()


def compare(
    endpoint: str, tars: int, per_tar: int, bucket: str = "bench", create: bool = True
) -> list[dict[str, Any]]:
    """Write the tars under ``s3://bucket/wds`` and run both ways; a size row, one row a
    way (per image, by file) and the ratios."""
    import os

    import s3fs

    os.environ.setdefault("AWS_ACCESS_KEY_ID", "bench")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "bench-secret")
    opts = {"endpoint_url": endpoint}
    fs = s3fs.S3FileSystem(client_kwargs=opts)
    if create:
        fs.mkdir(bucket)
    nbytes = _write_tars(fs, f"{bucket}/wds", tars, per_tar)
    rows: list[dict[str, Any]] = [
        {"tars": tars, "per_tar": per_tar, "mib": round(nbytes / 2**20, 1)}
    ]
    with tempfile.TemporaryDirectory() as tmp:
        for by_file in (False, True):
            s3fs.S3FileSystem.clear_instance_cache()
            rows.append(_one_way(f"s3://{bucket}/wds", opts, by_file, Path(tmp) / str(by_file)))
    per_image, by_file_row = rows[1:]
    requests = [r["list_requests"] + r["task_requests"] for r in (per_image, by_file_row)]
    seconds = [r["list_s"] + r["task_s"] for r in (per_image, by_file_row)]
    rows.append(
        {
            "requests_ratio": round(requests[0] / max(requests[1], 1), 1),
            "seconds_ratio": round(seconds[0] / max(seconds[1], 1e-9), 2),
        }
    )
    return rows


if __name__ == "__main__":
    main()
