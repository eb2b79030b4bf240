"""Sharded DCP checkpoints (model, optimizer, scheduler, train state, config) and the final
consolidated trunk.

A checkpoint folder holds the DCP shards (``__{rank}_0.distcp`` from every rank, ``.metadata``
from rank 0), ``train_state.json`` (step, epoch, data seed) and ``config.yaml`` (the resolved
job config: YAML, never a pickled object). Each rank writes its own files into a local folder
and hands it to ``ray.train.report``, which merges the ranks' files into one checkpoint folder
in storage and registers it only once every rank's upload finished: a crash during a save
leaves the previous registered checkpoint as the one to resume from.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_state_dict,
)
from torch.distributed.checkpoint.stateful import Stateful

TRAIN_STATE = "train_state.json"
CONFIG = "config.yaml"


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


def load(folder: Path, app: AppState) -> TrainState:
    """Restore ``app`` in place from a checkpoint folder (collective) and return its state."""
    dcp.load({"app": app}, checkpoint_id=str(folder))
    return TrainState(**json.loads((folder / TRAIN_STATE).read_text()))


def full_trunk_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The unsharded trunk weights on CPU (collective; meaningful on rank 0)."""
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    full = get_model_state_dict(model, options=options)
    return {k.removeprefix("trunk."): v for k, v in full.items() if k.startswith("trunk.")}
