"""The layout of a run's folder, ``<storage>/<name>/`` (a local folder or an ``s3://`` URL).

One object names every path of it, so the job, the workers and the probes agree::

    <root>/latest.json                 newest complete checkpoint (written last, in one piece)
    <root>/checkpoint_00000050/        sharded DCP checkpoints (Ray Train keeps the latest k)
    <root>/mlflow_run_id.json          the MLflow run a restarted job continues
    <root>/tokenizer.safetensors       the codebook of ``tokenizer: auto``
    <root>/trunks/step_00000100/       trunks exported for ``probe.at_steps``
    <root>/final/trunk.safetensors     the consolidated final trunk (+ config.yaml)
    <root>/logs/                       console logs of local runs
"""

from __future__ import annotations

import os
from dataclasses import dataclass


def storage_url(path: str) -> str:
    """Local paths become absolute (Ray needs that); URLs stay as they are."""
    return os.path.abspath(os.path.expanduser(path)) if "://" not in path else path


@dataclass(frozen=True)
class RunPaths:
    """Paths of one run's folder (see the module docstring)."""

    root: str

    @classmethod
    def of(cls, storage_path: str, name: str) -> RunPaths:
        """``<storage>/<name>`` with a local storage made absolute."""
        return cls(f"{storage_url(storage_path).rstrip('/')}/{name}")

    @property
    def is_local(self) -> bool:
        return "://" not in self.root

    @property
    def latest(self) -> str:
        return f"{self.root}/latest.json"

    @property
    def run_id_file(self) -> str:
        return f"{self.root}/mlflow_run_id.json"

    @property
    def tokenizer(self) -> str:
        return f"{self.root}/tokenizer.safetensors"

    @property
    def final(self) -> str:
        return f"{self.root}/final"

    @property
    def final_trunk(self) -> str:
        return f"{self.final}/trunk.safetensors"

    @staticmethod
    def checkpoint_name(step: int) -> str:
        return f"checkpoint_{step:08d}"

    def trunk_at(self, step: int) -> str:
        """Where the trunk exported at ``step`` (``probe.at_steps``) goes."""
        return f"{self.root}/trunks/step_{step:08d}"
