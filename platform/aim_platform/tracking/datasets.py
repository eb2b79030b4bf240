"""Dataset inputs of a run (the runs list's Dataset column), read from ingest manifests."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from aim_platform.tracking.naming import short_name

if TYPE_CHECKING:
    from aim_platform.tracking.tracker import Tracker


@dataclass(frozen=True)
class DatasetInfo:
    """What MLflow shows of a dataset input (the runs list's Dataset column)."""

    name: str
    source: str  # the URL the rows come from
    digest: str  # from the ingest manifest's fingerprint
    counts: Mapping[str, int]  # rows per split (train, val), listed, rejected

    @property
    def source_type(self) -> str:
        scheme = self.source.split("://")[0] if "://" in self.source else "local"
        return scheme.split(":")[0][:36]


def dataset_info(url: str, storage_options: Mapping[str, Any] | None = None) -> DatasetInfo | None:
    """The dataset input of an ingest root (or an ingested built-in), from its manifest;
    None when there is no manifest."""
    from aim_platform.data.pipeline import resolve_url
    from aim_platform.data.shards import read_manifest
    from aim_platform.storage import public_url

    opts = dict(storage_options or {})
    root = resolve_url(url)
    manifest = read_manifest(root, opts)
    if manifest is None:
        return None
    counts = {k: int(v) for k, v in (manifest.get("counts") or {}).items()}
    return DatasetInfo(
        name=str(manifest.get("name") or short_name(url)),
        source=url if url.startswith("builtin:") else public_url(root),
        digest=str(manifest.get("fingerprint", ""))[:16] or "unknown",
        counts=counts,
    )


def log_datasets(
    tracker: Tracker,
    run_id: str,
    urls: Sequence[str],
    storage_options: Mapping[str, Any] | None = None,
    context: str = "training",
) -> None:
    """Each URL's manifest as a dataset input of the run (URLs without a manifest skipped)."""
    for url in urls:
        info = dataset_info(url, storage_options)
        if info is not None:
            tracker.log_dataset(run_id, info, context)
