"""Bad shards end: a shard whose read fails again and again is given up on, or skipped.

A corrupt or truncated Parquet shard fails its read task, then the step; restarting from the
checkpoint reads it again and fails the same way, forever with ``train.max_failures: -1``.
The pre-training job (:func:`aim_platform.jobs.pretrain.pretrain`) asks :func:`shard_of` which
shard a failure names (the read task adds ``reading shard PATH`` to its error), counts
failures per shard in the run's folder (``shard_failures.json``: a resubmitted job counts on),
and restarts; such a restart does not count against ``train.max_failures`` (a bad shard has
its own budget). Once a shard has failed ``data.max_shard_failures`` times, the job gives up
with one line naming the shard and its error, or, with ``data.skip_bad_shards: true``, leaves
the shard out of every epoch from then on, says so, and lists it with its rows in the summary
and in MLflow (tag ``data/skipped_shards``, metric ``data/skipped_rows``).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field

from aim_platform.config import JobConfig
from aim_platform.errors import DataError, UnsafeFile
from aim_platform.failures import root_cause
from aim_platform.storage import filesystem, join, read_json

RECORD = "shard_failures.json"
_SHARD = re.compile(r"reading shard (\S+?)(?:;| \(worker| \(Ray|$)")


def shard_of(exc: BaseException) -> tuple[str, str] | None:
    """(shard path, one-line error) when a failure comes from reading a shard, else None."""
    line = root_cause(exc)
    found = _SHARD.search(line)
    if found is None:
        return None
    error = line[: found.start()].rstrip("; ")
    return found.group(1), error or line


@dataclass
class ShardFailures:
    """Failures per shard path (count and last error) and the shards skipped."""

    failures: dict[str, dict[str, object]] = field(default_factory=dict)

    @property
    def skipped(self) -> frozenset[str]:
        return frozenset(p for p, f in self.failures.items() if f.get("skipped"))

    def count(self, path: str, error: str) -> int:
        entry = self.failures.setdefault(path, {"count": 0, "error": error, "skipped": False})
        entry["count"] = int(entry["count"]) + 1  # type: ignore[call-overload]
        entry["error"] = error
        return int(entry["count"])  # type: ignore[call-overload]


def _url(job: JobConfig) -> str:
    return join(job.train.storage_path, job.name, RECORD)


def load(job: JobConfig) -> ShardFailures:
    """The run's record (empty for a new run). Raises UnsafeFile for a malformed one."""
    fs, path = filesystem(_url(job), job.train.storage_options)
    if not fs.exists(path):
        return ShardFailures()
    raw = read_json(fs, path, "a shard-failure record")
    if not isinstance(raw, dict) or not all(
        isinstance(v, dict) and isinstance(v.get("count"), int) for v in raw.values()
    ):
        raise UnsafeFile(f"{path}: not a shard-failure record")
    return ShardFailures(failures=raw)


def save(job: JobConfig, record: ShardFailures) -> None:
    fs, path = filesystem(_url(job), job.train.storage_options)
    fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
    with fs.open(path, "w") as f:
        f.write(json.dumps(record.failures))


def on_failure(
    job: JobConfig,
    exc: BaseException,
    record: ShardFailures,
    rows_of: Callable[[str], int],
    say: Callable[[str], None],
) -> bool:
    """Count a failed fit against the shard it names; True when it was a shard's failure
    (restart: the caller rebuilds the stream without ``record.skipped``).

    Raises:
        DataError: the shard failed ``data.max_shard_failures`` times and
            ``data.skip_bad_shards`` is off (one line: the shard, the count, the error).
    """
    found = shard_of(exc)
    if found is None:
        return False
    path, error = found
    n = record.count(path, error)
    limit = job.data.max_shard_failures
    if n < limit:
        save(job, record)
        say(f"reading shard {path} failed ({n} of {limit}): {error}; restarting")
        return True
    if not job.data.skip_bad_shards:
        save(job, record)
        raise DataError(
            f"shard {path} failed {n} times (data.max_shard_failures: {limit}): {error}; "
            "replace or re-ingest it, or set data.skip_bad_shards: true to train without it"
        )
    record.failures[path]["skipped"] = True
    record.failures[path]["rows"] = rows_of(path)
    save(job, record)
    say(
        f"skipping shard {path} ({rows_of(path)} rows) after {n} failures: {error} "
        "(data.skip_bad_shards)"
    )
    return True


def summary(record: ShardFailures) -> list[str]:
    """Summary lines: each skipped shard with its rows and error."""
    return [
        f"skipped bad shard {path} ({f.get('rows', '?')} rows): {f['error']}"
        for path, f in sorted(record.failures.items())
        if f.get("skipped")
    ]
