"""Sharded on-storage cache of the averaged features the probes read (no Ray).

Layout under ``root`` (any fsspec URL: a local folder, ``s3://...`` on the run's storage)::

    {split}/labels/{i:06d}.npy          (B,) int64
    {split}/{input}/{i:06d}.npy         (B, K, D) float16, the mean of the input's blocks

One shard per streamed batch, written as it arrives; training reads shards back a few at a
time in a seeded random order. Memory: one batch while writing, one batch plus one shard
while reading, whatever the number of rows.
"""

from __future__ import annotations

import io
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch

from aim_platform import storage
from aim_platform.errors import UnsafeFile


class FeatureCache:
    """Shards of averaged features per split and probe input (see the module docstring)."""

    def __init__(self, root: str, storage_options: dict[str, Any] | None = None) -> None:
        self.fs, self.root = storage.filesystem(root, storage_options)
        self.shards: dict[str, int] = {}
        self.rows: dict[str, int] = {}

    def _path(self, split: str, name: str, i: int) -> str:
        return f"{self.root}/{split}/{name}/{i:06d}.npy"

    def _save(self, path: str, array: np.ndarray) -> None:
        buf = io.BytesIO()
        np.save(buf, array)
        self.fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
        with self.fs.open(path, "wb") as f:
            f.write(buf.getvalue())

    def _load(self, path: str) -> np.ndarray:
        with self.fs.open(path, "rb") as f:
            data = f.read()
        try:  # a plain array; an object array (pickles) is refused, never unpickled
            return np.load(io.BytesIO(data), allow_pickle=False)
        except (ValueError, OSError, EOFError) as exc:
            first = " ".join(str(exc).split())[:200]
            raise UnsafeFile(f"{path}: refused: not a plain feature array ({first})") from None

    def add(
        self,
        split: str,
        features: np.ndarray,
        labels: np.ndarray,
        blocks: Sequence[int],
        inputs: Mapping[str, Sequence[int]],
    ) -> None:
        """Write one batch: labels and, per input, the mean of its blocks.

        Args:
            features: (B, L, K, D) outputs of ``blocks`` (float16).
            labels: (B,).
            inputs: input name -> blocks it averages (each in ``blocks``).
        """
        i = self.shards.get(split, 0)
        self._save(self._path(split, "labels", i), np.asarray(labels, dtype=np.int64))
        for name, chosen in inputs.items():
            pos = [list(blocks).index(b) for b in chosen]
            mean = features[:, pos].astype(np.float32).mean(1)  # (B, K, D)
            self._save(self._path(split, name, i), mean.astype(np.float16))
        self.shards[split] = i + 1
        self.rows[split] = self.rows.get(split, 0) + len(labels)

    def batches(
        self, split: str, name: str, batch_size: int, seed: int
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Endless shuffled training batches ((b, K, D) float16, (b,) int64), b = batch_size
        (fewer only when the split has fewer rows): shards in a seeded random order per pass,
        rows shuffled within the buffer."""
        n = self.shards.get(split, 0)
        if not n:
            raise ValueError(f"the feature cache has no {split!r} rows")
        rng = np.random.default_rng(seed)
        want = min(batch_size, self.rows[split])
        xs: list[np.ndarray] = []
        ys: list[np.ndarray] = []
        have = 0
        while True:
            for i in rng.permutation(n):
                xs.append(self._load(self._path(split, name, i)))
                ys.append(self._load(self._path(split, "labels", i)))
                have += len(ys[-1])
                if have < want:
                    continue
                x, y = np.concatenate(xs), np.concatenate(ys)
                perm = rng.permutation(len(y))
                x, y = x[perm], y[perm]
                while len(y) >= want:
                    yield torch.from_numpy(x[:want]), torch.from_numpy(y[:want])
                    x, y = x[want:], y[want:]
                xs, ys, have = [x], [y], len(y)

    def iterate(self, split: str, name: str) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Every row once, shard by shard, in the order written (for validation)."""
        for i in range(self.shards.get(split, 0)):
            x = self._load(self._path(split, name, i))
            yield torch.from_numpy(x), torch.from_numpy(self._load(self._path(split, "labels", i)))

    def remove(self) -> None:
        """Delete every shard."""
        if self.fs.exists(self.root):
            self.fs.rm(self.root, recursive=True)
