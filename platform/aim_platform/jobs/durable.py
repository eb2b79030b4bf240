"""Durable by default: a run on a cluster keeps its checkpoints where every node reaches them.

A local ``train.storage_path`` (``./runs``, ``/data/runs``) is a folder on the disk of
whichever node writes it: on a cluster of several nodes a checkpoint dies with its node (and a
KubeRay cluster deletes every pod when its job ends), so such a job is refused before any step,
by ``aimctl pretrain`` once it has joined a cluster of more than one alive node and by
``aimctl submit`` before anything is sent. Object storage (``s3://...``) passes; so does a
local path the user marks ``train.storage_shared: true`` (NFS, a PersistentVolumeClaim every
pod mounts). ``make demo`` (embedded one-node Ray, ``./runs``) is untouched.
"""

from __future__ import annotations

from aim_platform.config import ConfigError, TrainConfig
from aim_platform.storage import is_remote

ADVICE = (
    "use object storage (s3://bucket/runs, with train.storage_options for an endpoint) or set "
    "train.storage_shared: true for a filesystem every node mounts"
)


def check_durable_storage(train: TrainConfig, *, nodes: int | None = None) -> None:
    """Refuse node-local checkpoint storage where a node can take it with it.

    Args:
        train: The job's training config (``storage_path``, ``storage_shared``).
        nodes: Alive nodes of the cluster the job runs on; None: the job is being submitted
            to a cluster (its size unknown here, its driver on some other machine).

    Raises:
        ConfigError: a local ``storage_path`` not marked shared, with ``nodes`` > 1 or None;
            one line naming ``train.storage_path`` and what to use instead.
    """
    if is_remote(train.storage_path) or train.storage_shared:
        return
    path = train.storage_path
    if nodes is None:
        raise ConfigError(
            f"train.storage_path {path} is a local folder and the job is submitted to a "
            f"cluster: checkpoints would stay on the disk of whichever node wrote them and die "
            f"with it; {ADVICE}"
        )
    if nodes > 1:
        raise ConfigError(
            f"train.storage_path {path} is on this node's disk and the cluster has {nodes} "
            f"nodes: checkpoints would die with the node; {ADVICE}"
        )
