"""What runs are called and tagged with: the experiment's kind, the git commit, probe names."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

#: MLflow 3's experiment type (the UI's "experimentKind"): without it an experiment may open
#: on the GenAI overview (traces, token usage) instead of its runs.
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"
GIT_COMMIT_TAGS = ("git_commit", "mlflow.source.git.commit")
#: Set by ``aimctl submit`` for the job: the commit of the checkout the code was sent from
#: (the copy on the cluster has no ``.git``).
GIT_COMMIT_ENV = "AIM_GIT_COMMIT"


def git_commit(cwd: str | Path | None = None) -> str | None:
    """HEAD of the repository the code runs from, if it is a git checkout; else the commit
    a submitted job was sent from (``$AIM_GIT_COMMIT``)."""
    found = _git_head(cwd)
    return found if found is not None else (os.environ.get(GIT_COMMIT_ENV) or None)


def _git_head(cwd: str | Path | None) -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=cwd or Path(__file__).parent,
            capture_output=True,
            text=True,
            timeout=5,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    if out.returncode != 0:
        return None
    return out.stdout.strip() or None


def short_name(url: str) -> str:
    """Last meaningful part of a path or URL (``builtin:digits`` -> ``digits``)."""
    tail = url.rstrip("/").split("/")[-1].split(":")[-1]
    return Path(tail).stem if tail.endswith((".pt", ".safetensors")) else tail


def trunk_name(path: str) -> str:
    """A trunk's short name: ``runs/demo/final`` -> ``demo``, ``.../trunks/step_00000010`` ->
    ``demo@10``, ``aim.pt`` -> ``aim``."""
    parts = path.rstrip("/").split("/")
    if len(parts) >= 2 and parts[-1] == "final":
        return parts[-2]
    if len(parts) >= 3 and parts[-2] == "trunks" and parts[-1].startswith("step_"):
        return f"{parts[-3]}@{int(parts[-1].removeprefix('step_'))}"
    return short_name(path)


def probe_run_name(trunk_path: str, dataset: str) -> str:
    """``probe demo@10 on digits``: the trunk and the dataset of a probe run."""
    return f"probe {trunk_name(trunk_path)} on {short_name(dataset)}"
