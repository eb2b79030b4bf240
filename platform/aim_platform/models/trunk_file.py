"""The consolidated trunk file: one safetensors file plus the config it was trained with.

Pre-training writes it (``train/loop.py``); probes, feature extraction and sharing read it
(``eval/features.py``). It lives with the model, below both, so neither reaches into the
other. It holds no optimizer state and no pickled objects. ``folder`` is any fsspec URL
(local folder or ``s3://``).
"""

from __future__ import annotations

from typing import Any

import torch
import yaml
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from aim_platform.config import JobConfig, dump_config, yaml_problem
from aim_platform.errors import MissingInput, UnsafeFile
from aim_platform.models.aim import AIMTrunk, build_trunk
from aim_platform.storage import filesystem

TRUNK_FILE = "trunk.safetensors"
CONFIG_FILE = "config.yaml"


def write_trunk(state_dict: dict[str, torch.Tensor], job: JobConfig, folder: str) -> str:
    """Write trunk weights and the job config into ``folder``; return the weights' URL."""
    fs, root = filesystem(folder, job.train.storage_options)
    fs.makedirs(root, exist_ok=True)
    tensors = {k: v.detach().contiguous().cpu() for k, v in state_dict.items()}
    with fs.open(f"{root}/{TRUNK_FILE}", "wb") as f:
        f.write(st_save(tensors, metadata={"format": "aim-platform/trunk-v1"}))
    with fs.open(f"{root}/{CONFIG_FILE}", "w") as f:
        f.write(dump_config(job))
    return f"{folder.rstrip('/')}/{TRUNK_FILE}"


def read_trunk(
    folder: str, storage_options: dict[str, Any] | None = None
) -> tuple[AIMTrunk, JobConfig]:
    """Load a trunk written by :func:`write_trunk` (float32, eval mode) and its job config."""
    fs, root = filesystem(folder, storage_options)
    if not fs.exists(f"{root}/{TRUNK_FILE}"):
        raise MissingInput(
            f"no {TRUNK_FILE} in {folder}: give a run's final/ or trunks/step_N folder"
        )
    config_url, weights_url = (
        f"{folder.rstrip('/')}/{CONFIG_FILE}",
        f"{folder.rstrip('/')}/{TRUNK_FILE}",
    )
    with fs.open(f"{root}/{CONFIG_FILE}", "r") as f:
        text = f.read()
    try:  # safe_load: a tag that would build a Python object is an error, never a call
        job = JobConfig.model_validate(yaml.safe_load(text))
    except yaml.YAMLError as exc:
        raise UnsafeFile(f"{config_url}: not valid YAML: {yaml_problem(exc)}") from None
    except ValueError as exc:  # pydantic: a config that is not a job's
        raise UnsafeFile(f"{config_url}: not a job config ({_first(exc)})") from None
    with fs.open(f"{root}/{TRUNK_FILE}", "rb") as f:
        data = f.read()
    try:  # safetensors: a JSON header and raw tensor bytes, nothing that can run
        tensors = st_load(data)
    except Exception as exc:  # noqa: BLE001 - safetensors raises its own error types
        raise UnsafeFile(f"{weights_url}: not a safetensors file ({_first(exc)})") from None
    trunk = build_trunk(job.model)
    try:
        trunk.load_state_dict({k: v.float() for k, v in tensors.items()})
    except RuntimeError as exc:
        raise UnsafeFile(f"{weights_url}: does not fit its config.yaml ({_first(exc)})") from None
    return trunk.eval(), job


def _first(exc: BaseException, limit: int = 200) -> str:
    text = " ".join(str(exc).split())  # one line
    return text if len(text) <= limit else text[: limit - 3] + "..."
