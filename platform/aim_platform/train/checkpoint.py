"""Sharded DCP checkpoints (model, optimizer, scheduler, train state, config) and the final
consolidated trunk.

A checkpoint folder holds the DCP shards (``__{rank}_0.distcp`` from every rank, ``.metadata``
from rank 0), ``train_state.json`` (step, epoch, data seed) and ``config.yaml`` (the resolved
job config: YAML, never a pickled object). Each rank writes its own files into a local folder
and hands it to ``ray.train.report`` with :func:`upload` as the upload function: each rank
copies its files into the one checkpoint folder in storage, checks that every file arrived
whole (its size, listed back from the store) and copies again if not; Ray Train registers the
checkpoint only once every rank's upload returned, and the job writes ``latest.json`` only
after that. A crash or an upload that fails past its retries during a save leaves the
previous checkpoint as the one to resume from.

DCP writes ``.metadata`` with pickle, and torch reads it back with a plain ``pickle.load``: a
crafted ``.metadata`` would run code on every rank that resumes. :func:`load` reads it with
an unpickler that builds only DCP's own metadata classes, torch sizes, dtypes and layouts
(:class:`SafeMetadataReader`), and refuses anything else with one line naming the file.
The shards' non-tensor items (an optimizer's ``lr``, ``betas``, a scheduler's counters) are
pickles too, and DCP's own planner reads them with ``torch.load(weights_only=False)``:
:class:`SafeLoadPlanner` reads them with torch's ``weights_only`` unpickler (plain values,
containers and tensors only) and refuses anything else with one line naming the shard file.
"""

from __future__ import annotations

import enum
import io
import json
import logging
import pickle
import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs
import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint._traverse import set_element
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta
from torch.distributed.checkpoint.planner import ReadItem
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_state_dict,
)
from torch.distributed.checkpoint.stateful import Stateful

from aim_platform.errors import StorageError, UnsafeFile

TRAIN_STATE = "train_state.json"
CONFIG = "config.yaml"
UPLOAD_ATTEMPTS = 4  # whole uploads, on top of each request's own retries
UPLOAD_BACKOFF_S = 5.0  # first wait before uploading again; doubles each time
log = logging.getLogger(__name__)


@dataclass
class TrainState:
    """Where the run is: optimizer steps done, current epoch, data seed."""

    step: int = 0
    epoch: int = 0
    data_seed: int = 0


class AppState(Stateful):
    """Model + optimizer + scheduler as one DCP ``Stateful`` (sharded save and load)."""

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler: torch.optim.lr_scheduler.LRScheduler,
    ) -> None:
        self.model = model
        self.optimizer = optimizer
        self.scheduler = scheduler

    def state_dict(self) -> dict[str, Any]:
        model_sd, optim_sd = get_state_dict(self.model, self.optimizer)
        return {"model": model_sd, "optim": optim_sd, "scheduler": self.scheduler.state_dict()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        set_state_dict(
            self.model,
            self.optimizer,
            model_state_dict=state_dict["model"],
            optim_state_dict=state_dict["optim"],
        )
        self.scheduler.load_state_dict(state_dict["scheduler"])


def save(folder: Path, app: AppState, state: TrainState, config_yaml: str, rank: int) -> None:
    """Write this rank's part of a checkpoint into ``folder`` (collective: every rank calls)."""
    folder.mkdir(parents=True, exist_ok=True)
    dcp.save({"app": app}, checkpoint_id=str(folder))
    if rank == 0:
        (folder / TRAIN_STATE).write_text(json.dumps(asdict(state)))
        (folder / CONFIG).write_text(config_yaml)


#: What a DCP ``.metadata`` pickle may name: DCP's own record classes, torch sizes, dtypes
#: (below) and layouts, paths, plain containers.
_METADATA_GLOBALS = {
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("pathlib", "PosixPath"),
    ("pathlib", "WindowsPath"),
    ("collections", "OrderedDict"),
    ("builtins", "set"),
    ("builtins", "frozenset"),
} | {
    (dcp.metadata.__name__, name)
    for name, obj in vars(dcp.metadata).items()
    if isinstance(obj, type) and obj.__module__ == dcp.metadata.__name__
}


class _MetadataUnpickler(pickle.Unpickler):
    """Builds DCP metadata and nothing else: any other global is refused before it is
    looked up, so nothing a file names is ever called."""

    def __init__(self, file: Any, path: str) -> None:
        super().__init__(file)
        self.path = path

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _METADATA_GLOBALS:
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        if (module, name) == ("builtins", "getattr"):  # an enum member pickled by its name
            return self._enum_member
        raise UnsafeFile(
            f"{self.path}: refused: it names {module}.{name}, which checkpoint metadata never "
            "holds (loading it could run code)"
        )

    def _enum_member(self, cls: Any, name: Any) -> Any:
        """``getattr(cls, name)`` where it names a member of one of DCP's metadata enums (Python
        3.12 pickles enum members as ``getattr(cls, name)``, and so may a process whose enum
        pickling another library changed); any other use of ``getattr`` is refused."""
        if (
            isinstance(cls, type)
            and issubclass(cls, enum.Enum)
            and (cls.__module__, cls.__name__) in _METADATA_GLOBALS
            and isinstance(name, str)
            and name in cls.__members__
        ):
            return cls[name]
        raise UnsafeFile(
            f"{self.path}: refused: it calls getattr({getattr(cls, '__name__', type(cls))!s}, "
            f"{name!r}), which is no member of checkpoint metadata (loading it could run code)"
        )


class SafeMetadataReader(FileSystemReader):
    """DCP's file-system reader with ``.metadata`` read by :class:`_MetadataUnpickler`."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        path = self._get_metadata_path(kwargs.get("rank"))
        with self.fs.create_stream(path, "rb") as f:
            try:
                metadata = _MetadataUnpickler(f, str(path)).load()
            except UnsafeFile:
                raise
            except Exception as exc:  # noqa: BLE001 - a torn or foreign file: one line
                raise UnsafeFile(f"{path}: not DCP checkpoint metadata ({exc})") from None
        if not isinstance(metadata, Metadata):
            raise UnsafeFile(f"{path}: not DCP checkpoint metadata ({type(metadata).__name__})")
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class SafeLoadPlanner(DefaultLoadPlanner):
    """DCP's load planner with the shards' byte items read by torch's ``weights_only``
    unpickler instead of ``torch.load(weights_only=False)``: a byte item that names anything
    but plain values, containers and tensors is refused before any of it is built."""

    def __init__(self, folder: Path) -> None:
        super().__init__()
        self.folder = folder

    def load_bytes(self, read_item: ReadItem, value: io.BytesIO) -> None:
        try:
            obj = torch.load(value, weights_only=True)
        except Exception as exc:  # noqa: BLE001 - weights_only refuses with UnpicklingError
            assert self.metadata is not None  # set by set_up_planner before any read
            info = self.metadata.storage_data.get(read_item.storage_index)
            name = info.relative_path if info is not None else "a shard"
            # torch's message goes on to say how to load it anyway: keep only what it names
            said = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(exc))
            reason = f"it names {said.group(1)}" if said else type(exc).__name__
            raise UnsafeFile(
                f"{self.folder / name}: refused: the item {read_item.dest_index.fqn} is not a "
                f"plain value ({reason}; loading it could run code)"
            ) from None
        fqn = read_item.dest_index.fqn
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[fqn], obj)
        else:
            self.state_dict[fqn] = obj


def load(folder: Path, app: AppState) -> TrainState:
    """Restore ``app`` in place from a checkpoint folder (collective) and return its state.

    Raises:
        UnsafeFile: ``.metadata`` names anything but DCP's own records, a shard's byte item
            is not a plain value, or the train state is malformed (one line naming the file).
    """
    # Checked here first: inside dcp.load a refusal would come back wrapped in torch's errors.
    SafeMetadataReader(str(folder)).read_metadata()
    try:
        dcp.load(
            {"app": app},
            storage_reader=SafeMetadataReader(str(folder)),
            planner=SafeLoadPlanner(folder),
        )
    except CheckpointException as exc:  # a refusal on any rank comes back wrapped
        refused = [e for e, _ in exc.failures.values() if isinstance(e, UnsafeFile)]
        if refused:
            raise refused[0] from None
        raise
    path = folder / TRAIN_STATE
    try:
        return TrainState(**json.loads(path.read_text()))
    except (ValueError, TypeError) as exc:
        raise UnsafeFile(f"{path}: not a train state ({exc})") from None


def upload(
    local: Path,
    fs: pafs.FileSystem,
    dest: str,
    *,
    attempts: int = UPLOAD_ATTEMPTS,
    backoff_s: float = UPLOAD_BACKOFF_S,
) -> None:
    """Copy this rank's checkpoint files from ``local`` into ``dest`` on ``fs`` and check
    that each one is there whole; copy again (up to ``attempts`` times) if not.

    Raises:
        StorageError: the files are still not all there after the last attempt.
    """
    sizes = {
        p.relative_to(local).as_posix(): p.stat().st_size for p in local.rglob("*") if p.is_file()
    }
    problem = ""
    for attempt in range(1, attempts + 1):
        try:
            fs.create_dir(dest, recursive=True)
            pafs.copy_files(
                str(local),
                dest,
                source_filesystem=pafs.LocalFileSystem(),
                destination_filesystem=fs,
            )
            missing = _not_whole(fs, dest, sizes)
            if not missing:
                return
            problem = f"{len(missing)} file(s) missing or short after the copy: {missing[:3]}"
        except OSError as exc:
            problem = str(exc)
        if attempt < attempts:
            wait = backoff_s * 2 ** (attempt - 1)
            log.warning(
                "checkpoint upload to %s failed (%s); again in %.0f s (attempt %d of %d)",
                dest, problem, wait, attempt + 1, attempts,
            )  # fmt: skip
            time.sleep(wait)
    raise StorageError(f"checkpoint upload to {dest} failed {attempts} times: {problem}")


def _not_whole(fs: pafs.FileSystem, dest: str, sizes: dict[str, int]) -> list[str]:
    """The files of ``sizes`` that are not in ``dest`` with that size."""
    infos = fs.get_file_info([f"{dest}/{name}" for name in sizes])
    return [
        name
        for (name, size), info in zip(sizes.items(), infos, strict=True)
        if info.type != pafs.FileType.File or info.size != size
    ]


def full_trunk_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The unsharded trunk weights on CPU (collective; meaningful on rank 0)."""
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    full = get_model_state_dict(model, options=options)
    return {k.removeprefix("trunk."): v for k, v in full.items() if k.startswith("trunk.")}
