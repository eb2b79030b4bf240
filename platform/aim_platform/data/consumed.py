"""What the training stream has consumed: each epoch's rows exactly once across restarts.

Ray Data's ``streaming_split`` hands rows to whichever rank asks first, so which rank trained
which row is not a function of the seed, and an epoch number from rank 0 says nothing about
rows still queued for the other ranks. Instead every train row carries where it comes from
(columns added by :mod:`aim_platform.data.tasks`):

- ``item``: its shard (a stable hash of the shard's path:
  :func:`aim_platform.data.pipeline.shard_item`), ``epoch_items`` how many shards the epoch has
  (bad shards skipped by ``data.skip_bad_shards`` not counted);
- ``item_rows``: how many rows that shard gives this epoch (after the mixture's draws);
- ``key``: the row's occurrence, a 56-bit hash of ``source/id`` shifted left by 7 bits, plus
  its repeat number (a row a mixture draws twice has two keys, one id).

Each rank records the rows of the batches it trained (:class:`ConsumedLog`); at every
checkpoint the ranks gather what they consumed since the previous one and rank 0 merges it
into the run's :class:`DataState`, written into the checkpoint as ``data_state.json`` (JSON:
nothing in it can run code). A shard whose rows are all consumed is kept as two counts; a
shard in progress keeps its consumed keys. Resuming, :meth:`DataState.resume_plan` tells the
pipeline which shards to leave out and which rows of the shards in progress to skip: the
stream goes on where the checkpoint left it, reading again at most the shards that were in
progress (a few per rank). An epoch whose every shard is consumed is complete: its rows and
distinct ids (from the keys the workers consumed) are what ``data/epoch_rows`` and
``data/epoch_distinct_rows`` report.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from aim_platform.errors import UnsafeFile

REPEAT_BITS = 7  # a row drawn more than 127 times in an epoch shares its last key
ID_MASK = (1 << 56) - 1
DATA_STATE = "data_state.json"
#: The columns a train batch carries for this record (int32/int64 tensors or arrays).
COLUMNS = ("epoch", "item", "epoch_items", "item_rows", "key")


def row_keys(ids: Iterable[int], repeats: Iterable[int]) -> np.ndarray:
    """Occurrence keys from 64-bit id hashes and repeat numbers.

    Returns:
        (N,) int64 keys, ``(id_hash & ID_MASK) << 7 | min(repeat, 127)``.
    """
    hashes = np.fromiter((int(h) & ID_MASK for h in ids), dtype=np.int64)  # (N,)
    reps = np.minimum(np.fromiter(repeats, dtype=np.int64), (1 << REPEAT_BITS) - 1)  # (N,)
    return (hashes << REPEAT_BITS) | reps


def distinct_ids(keys: Iterable[int]) -> int:
    """How many different ids a set of occurrence keys holds."""
    return len({int(k) >> REPEAT_BITS for k in keys})


class ConsumedLog:
    """One rank's consumed rows since the last checkpoint: (epoch, item) -> keys.

    Args:
        ordered: Rows reach this rank in stream order (``data.preserve_order`` and no
            ``local_shuffle_buffer``): then the latest epoch it trained tells the record that
            every earlier row handed to it was trained (see :meth:`DataState.merge`).
    """

    def __init__(self, ordered: bool = True) -> None:
        self.ordered = ordered
        self.rows: dict[tuple[int, int], list[int]] = {}
        self.sizes: dict[tuple[int, int], tuple[int, int]] = {}  # -> (item_rows, epoch_items)
        self.max_epoch = -1  # the latest epoch this rank trained a row of (this attempt)

    def add(self, batch: Mapping[str, Any]) -> None:
        """Record a trained batch's rows (every row, decodable or not: each was used once).

        Args:
            batch: Columns of :data:`COLUMNS`, each (B,) (tensors or arrays).
        """
        if not all(name in batch for name in COLUMNS):  # a caller's own dataset: no record
            return
        cols = [np.asarray(_numpy(batch[name])) for name in COLUMNS]
        for epoch, item, n_items, n_rows, key in zip(*cols, strict=True):
            where = (int(epoch), int(item))
            self.rows.setdefault(where, []).append(int(key))
            self.sizes[where] = (int(n_rows), int(n_items))
            self.max_epoch = max(self.max_epoch, int(epoch))

    def take(self) -> dict[str, Any]:
        """What was recorded, as plain values (to gather across ranks), and start afresh."""
        out = {
            "rows": {f"{e}:{i}": keys for (e, i), keys in self.rows.items()},
            "sizes": {f"{e}:{i}": list(s) for (e, i), s in self.sizes.items()},
            "max_epoch": self.max_epoch if self.ordered else -1,
        }
        self.rows, self.sizes = {}, {}
        return out


def _numpy(value: Any) -> Any:
    return value.cpu().numpy() if hasattr(value, "cpu") else value


@dataclass
class EpochRecord:
    """One epoch's consumption: finished shards as counts, shards in progress as keys."""

    items: int  # shards in the epoch
    done: dict[int, tuple[int, int]] = field(default_factory=dict)  # item -> (rows, distinct)
    partial: dict[int, set[int]] = field(default_factory=dict)  # item -> consumed keys
    item_rows: dict[int, int] = field(default_factory=dict)  # item -> rows it gives

    def complete(self, superseded: bool = False) -> bool:
        """Every shard consumed; or, once every rank trains a later epoch (``superseded``),
        every shard that gave rows (a shard a mixture draws no row of never shows)."""
        return len(self.done) == self.items or (superseded and not self.partial)

    def rows(self) -> int:
        return sum(r for r, _ in self.done.values()) + sum(len(k) for k in self.partial.values())

    def distinct(self) -> int:
        return sum(d for _, d in self.done.values()) + sum(
            distinct_ids(k) for k in self.partial.values()
        )


@dataclass
class ResumePlan:
    """Where the stream goes on: the first epoch to produce, per epoch the shards to leave
    out and per shard in progress the keys to skip."""

    start_epoch: int = 0
    leave_out: dict[int, set[int]] = field(default_factory=dict)  # epoch -> items
    skip: dict[int, dict[int, set[int]]] = field(default_factory=dict)  # epoch -> item -> keys


class DataState:
    """The run's record of consumed rows per epoch (rank 0 keeps it; checkpoints store it).

    ``repeated`` counts rows consumed again that were already recorded: 0 in a run where the
    stream resumes exactly (a check, not a correction).
    """

    def __init__(self) -> None:
        self.epochs: dict[int, EpochRecord] = {}
        self.reported: set[int] = set()  # complete epochs whose metrics were logged
        self.repeated = 0
        # Every rank trains rows of this epoch or a later one: the stream hands rows out in
        # order (data.preserve_order, the default), so every earlier epoch is consumed.
        self.superseded_below = 0

    def _complete(self, epoch: int) -> bool:
        return self.epochs[epoch].complete(superseded=epoch < self.superseded_below)

    def merge(self, logs: Iterable[Mapping[str, Any]]) -> None:
        """Add what the ranks consumed (:meth:`ConsumedLog.take` of each, every rank's)."""
        logs = list(logs)
        latest = min((int(log.get("max_epoch", -1)) for log in logs), default=-1)
        self.superseded_below = max(self.superseded_below, latest)
        for log in logs:
            for where, keys in log["rows"].items():
                epoch, item = (int(x) for x in where.split(":"))
                n_rows, n_items = log["sizes"][where]
                rec = self.epochs.setdefault(epoch, EpochRecord(items=int(n_items)))
                rec.items = min(rec.items, int(n_items))  # fewer once a bad shard is skipped
                if item in rec.done:
                    self.repeated += len(keys)
                    continue
                seen = rec.partial.setdefault(item, set())
                fresh = set(keys)
                self.repeated += len(keys) - len(fresh - seen)
                seen |= fresh
                rec.item_rows[item] = int(n_rows)
                if len(seen) >= n_rows:  # the shard is consumed: keep two counts
                    rec.done[item] = (len(seen), distinct_ids(seen))
                    del rec.partial[item]

    def newly_complete(self) -> list[tuple[int, int, int]]:
        """Epochs complete since the last call: (epoch, rows, distinct ids) each."""
        out = []
        for epoch in sorted(self.epochs):
            rec = self.epochs[epoch]
            if self._complete(epoch) and epoch not in self.reported:
                self.reported.add(epoch)
                out.append((epoch, rec.rows(), rec.distinct()))
        return out

    def resume_plan(self) -> ResumePlan:
        """What :func:`aim_platform.data.pipeline.build_train_dataset` leaves out on resume."""
        open_epochs = [e for e in self.epochs if not self._complete(e)]
        done_epochs = [e for e in self.epochs if self._complete(e)]
        start = min(open_epochs) if open_epochs else max(done_epochs, default=-1) + 1
        plan = ResumePlan(start_epoch=start)
        for epoch, rec in self.epochs.items():
            if epoch < start or self._complete(epoch):
                continue
            plan.leave_out[epoch] = set(rec.done)
            plan.skip[epoch] = {item: set(keys) for item, keys in rec.partial.items()}
        # a complete epoch after an open one (rows of e+1 consumed while e was in flight)
        for epoch, rec in self.epochs.items():
            if epoch > start and self._complete(epoch):
                plan.leave_out[epoch] = set(rec.done)
        return plan

    def to_json(self) -> str:
        return json.dumps(
            {
                "version": 1,
                "repeated": self.repeated,
                "reported": sorted(self.reported),
                "superseded_below": self.superseded_below,
                "epochs": {
                    str(e): {
                        "items": rec.items,
                        "done": {str(i): list(v) for i, v in rec.done.items()},
                        "partial": {str(i): sorted(k) for i, k in rec.partial.items()},
                        "item_rows": {str(i): n for i, n in rec.item_rows.items()},
                    }
                    for e, rec in sorted(self.epochs.items())
                },
            }
        )

    @classmethod
    def from_json(cls, text: str, where: str) -> DataState:
        """Parse a ``data_state.json`` (a file from storage: checked, plain JSON only).

        Raises:
            UnsafeFile: not a data-state record (one line naming ``where``).
        """
        try:
            raw = json.loads(text)
            state = cls()
            state.repeated = int(raw["repeated"])
            state.reported = {int(e) for e in raw["reported"]}
            state.superseded_below = int(raw.get("superseded_below", 0))
            for e, rec in raw["epochs"].items():
                state.epochs[int(e)] = EpochRecord(
                    items=int(rec["items"]),
                    done={int(i): (int(v[0]), int(v[1])) for i, v in rec["done"].items()},
                    partial={int(i): {int(k) for k in ks} for i, ks in rec["partial"].items()},
                    item_rows={int(i): int(n) for i, n in rec["item_rows"].items()},
                )
        except (ValueError, TypeError, KeyError, IndexError, AttributeError) as exc:
            raise UnsafeFile(f"{where}: not a data-state record ({exc!r})") from None
        return state
