"""Where a worker's checkpoints live (local folder or object storage), through Ray Train's
``Checkpoint``: the folder a restart names, this rank's own copy of it to restore from, the
upload that checks every file, and ``latest.json`` written once every rank's upload is in."""

from __future__ import annotations

import contextlib
import json
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch.distributed as dist

from aim_platform.config import JobConfig
from aim_platform.train import checkpoint as ckpt
from aim_platform.train.paths import RunPaths


def named_checkpoint(url: str | None, job: JobConfig) -> Any:
    """A ``ray.train.Checkpoint`` for the folder at ``url`` (local or object storage), or None."""
    if url is None:
        return None
    import ray.train

    from aim_platform.storage import is_remote, pyarrow_filesystem

    if not is_remote(url):
        return ray.train.Checkpoint(url)
    fs, path = pyarrow_filesystem(url, job.train.storage_options)
    return ray.train.Checkpoint(path, filesystem=fs)


@contextlib.contextmanager
def local_copy(checkpoint: Any) -> Iterator[Path]:
    """A checkpoint's folder on this host: itself when local, else a download of this rank's
    own.

    Not ``Checkpoint.as_directory()``: the ranks of one node share its download folder, and a
    rank that takes the download lock after another finished downloads again over the files
    that one is reading (seen with Ray 2.60: a resume from S3 failed on a truncated
    ``.metadata`` on rank 1).
    """
    import pyarrow.fs as pafs

    if isinstance(checkpoint.filesystem, pafs.LocalFileSystem):
        yield Path(checkpoint.path)
        return
    with tempfile.TemporaryDirectory(prefix="aim-restore-") as tmp:
        yield Path(checkpoint.to_directory(tmp))


def checkpoint_upload(paths: RunPaths, storage_options: dict[str, Any]) -> Any:
    """The ``checkpoint_upload_fn`` of ``ray.train.report``: :func:`ckpt.upload` (copy,
    check every file, copy again) into ``<run folder>/<checkpoint name>``, the folder Ray
    Train's own upload would use."""
    import ray.train

    from aim_platform.storage import pyarrow_filesystem

    fs, root = pyarrow_filesystem(paths.root, storage_options)

    def upload(checkpoint: ray.train.Checkpoint, dir_name: str) -> ray.train.Checkpoint:
        dest = f"{root}/{dir_name}"
        ckpt.upload(Path(checkpoint.path), fs, dest)
        return ray.train.Checkpoint(path=dest, filesystem=fs)

    return upload


def commit_latest(
    paths: RunPaths, storage_options: dict[str, Any], state: ckpt.TrainState, rank: int
) -> None:
    """After every rank's upload returned, rank 0 records the checkpoint as the latest.

    ``latest.json`` is written last and in one piece, so a crash in the middle of a save
    leaves it naming the previous, complete checkpoint.
    """
    if dist.is_initialized():
        dist.barrier()
    if rank != 0:
        return
    from aim_platform.storage import filesystem

    fs, latest = filesystem(paths.latest, storage_options)
    body = json.dumps({"checkpoint": RunPaths.checkpoint_name(state.step), **vars(state)})
    tmp = f"{latest}.tmp"
    with fs.open(tmp, "w") as f:
        f.write(body)
    fs.mv(tmp, latest)
