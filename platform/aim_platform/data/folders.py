"""Labelled image-folder data sets held in memory, for runs without Ray (no ingest, no object
store): ``train/<class>/*`` and ``test/<class>/*`` (or ``val/``) as folders or ``.tar.gz``
archives, rows in the order ``aimctl ingest`` writes them, decoded and cropped by the
platform's own :func:`~aim_platform.data.transforms.decode_batch`."""

from __future__ import annotations

import tarfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from aim_platform.config import JobConfig
from aim_platform.data.shards import ORDER_SALT
from aim_platform.data.transforms import choose_labelled, decode_batch, id_hash
from aim_platform.errors import DataError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")
VAL_SPLITS = ("val", "test")  # the split scored on, by the folder's name


@dataclass
class ImageSet:
    """One split held in memory: encoded images, their ids and labels."""

    ids: list[str] = field(default_factory=list)
    images: list[bytes] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.ids)


@dataclass
class LocalData:
    """A labelled image-folder data set: ``train`` and the split probes are scored on."""

    train: ImageSet
    val: ImageSet
    classes: list[str]


def _split_files(root: Path) -> Iterator[tuple[str, str, str, bytes]]:
    """(split, class, name, bytes) of every image under ``root/<split>/<class>/`` or in
    ``root/<split>.tar.gz`` (members ``<split>/<class>/<name>``; read, never extracted)."""
    for path in sorted(root.iterdir()):
        if path.is_dir():
            for f in sorted(path.glob("*/*")):
                if f.suffix.lower() in IMAGE_SUFFIXES and f.is_file():
                    yield path.name, f.parent.name, f.name, f.read_bytes()
        elif path.name.endswith((".tar.gz", ".tgz", ".tar")):
            try:
                yield from _tar_files(path)
            except (tarfile.TarError, EOFError, OSError) as exc:  # truncated, not a tar, ...
                raise DataError(f"local data: {path} is not a readable archive ({exc})") from None


def _tar_files(path: Path) -> Iterator[tuple[str, str, str, bytes]]:
    with tarfile.open(path, "r:*") as tar:
        for member in tar:
            parts = member.name.strip("/").split("/")
            if not member.isfile() or len(parts) != 3:
                continue  # links, folders and other layouts are skipped, never followed
            if not parts[2].lower().endswith(IMAGE_SUFFIXES):
                continue
            f = tar.extractfile(member)
            if f is not None:
                yield parts[0], parts[1], parts[2], f.read()


def read_image_folders(root: str | Path) -> LocalData:
    """Read ``root/train/<class>/*`` and ``root/{test,val}/<class>/*`` (folders or
    ``.tar.gz`` archives of them) into memory, rows in the order ``aimctl ingest`` writes
    them (hashed ids); class indices follow the sorted class names.

    Raises:
        DataError: no train split, no test/val split, or a class only the scored split has.
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"local data: {root} is not a folder")
    by_split: dict[str, list[tuple[str, str, bytes]]] = {}
    for split, cls, name, data in _split_files(root):
        by_split.setdefault(split, []).append((cls, f"{split}/{cls}/{name}", data))
    val_name = next((s for s in VAL_SPLITS if s in by_split), None)
    if "train" not in by_split or val_name is None:
        raise DataError(
            f"local data: {root} needs train/<class>/ and test/<class>/ (or val/), as folders "
            f"or <split>.tar.gz; found splits {sorted(by_split) or 'none'}"
        )
    classes = sorted({cls for cls, _, _ in by_split["train"]})
    unknown = sorted({cls for cls, _, _ in by_split[val_name]} - set(classes))
    if unknown:
        raise DataError(f"local data: {val_name} has classes train lacks: {unknown}")
    index = {c: i for i, c in enumerate(classes)}
    splits = {}
    for split in ("train", val_name):
        # ingest's row order (a seeded hash of the id, seed 0): classes mixed, so that the
        # first ``val_limit`` rows are a sample and feature shards hold every class
        rows = sorted(by_split[split], key=lambda r: (id_hash(r[1], f"{ORDER_SALT}0:"), r[1]))
        splits[split] = ImageSet(
            [sid for _, sid, _ in rows], [d for _, _, d in rows], [index[c] for c, _, _ in rows]
        )
    return LocalData(splits["train"], splits[val_name], classes)


class TrainBatches(torch.utils.data.Dataset):
    """Step i's batch of the pre-training stream: epochs of a seeded permutation of the train
    split (the last partial batch of an epoch dropped), decoded and cropped as the platform's
    pipeline does. A map-style data set, so that DataLoader workers decode ahead."""

    def __init__(self, images: ImageSet, job: JobConfig) -> None:
        self.images = images
        self.job = job
        self.batch = job.train.global_batch_size
        self.per_epoch = len(images) // self.batch
        if self.per_epoch == 0:
            raise DataError(f"local data: {len(images)} train images < one batch ({self.batch})")

    def __len__(self) -> int:
        return self.job.train.steps

    def __getitem__(self, step: int) -> tuple[np.ndarray, np.ndarray]:
        epoch, pos = divmod(step, self.per_epoch)
        seed = self.job.seed & 0xFFFFFFFF
        order = np.random.default_rng([seed, epoch]).permutation(len(self.images))
        idx = order[pos * self.batch : (pos + 1) * self.batch]
        m = self.job.model
        return decode_batch(
            [self.images.ids[i] for i in idx],
            [self.images.images[i] for i in idx],
            img_size=m.img_size,
            patch_size=m.patch_size,
            train=True,
            seed=self.job.seed,
            epoch=epoch,
            **self.job.data.crop_args(),
        )  # (B, K, P) uint8, (B,) bool


def eval_patches(images: ImageSet, job: JobConfig, limit: int | None = None) -> np.ndarray:
    """The fixed centre view of the first ``limit`` images (all: None), valid rows only:
    (N, K, P) uint8."""
    n = len(images) if limit is None else min(limit, len(images))
    patches, valid = decode_batch(
        images.ids[:n],
        images.images[:n],
        img_size=job.model.img_size,
        patch_size=job.model.patch_size,
        train=False,
    )
    return patches[valid]


def labelled_rows(images: ImageSet, per_class: int | None, seed: int) -> list[int]:
    """Indices of ``per_class`` train rows a label chosen by a seeded hash of the id, as the
    platform's probe chooses them (all rows: None)."""
    if per_class is None:
        return list(range(len(images)))
    chosen = choose_labelled(zip(images.ids, images.labels, strict=True), per_class, seed)
    return [i for i, sid in enumerate(images.ids) if sid in chosen]
