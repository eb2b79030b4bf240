"""A submitted job that fails is one line, as a local command's failure is: its root cause
(``aimctl submit --wait``, ``aimctl jobs status``); the job's log keeps the tracebacks.

The journey runs the real ``aimctl`` against a one-node token-auth head (``test_submit``'s).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from net_helpers import REPO
from test_submit import _job_id, ray_head, token_env  # noqa: F401 - fixtures, imported

from aim_platform.submit import failure_cause

AIMCTL = str(Path(sys.executable).parent / "aimctl")

TRACEBACK_LOG = """\
pre-training demo: aim-tiny, 150 steps at batch 64 on 2 worker(s)
Traceback (most recent call last):
  File "/app/x.py", line 3, in <module>
    main()
ray.exceptions.RayTaskError(ValueError): ray::train_fn() (pid=12)
  File "/app/y.py", line 9, in f
    raise ValueError("patch_size 5 does not divide 32")
ValueError: patch_size 5 does not divide 32
"""


def test_failure_cause_prefers_the_platforms_line_then_the_exception_then_the_last_line() -> None:
    platform_line = "pre-training failed: ValueError: bad (worker rank 0, raised at y.py:9)"
    log = TRACEBACK_LOG + platform_line + "\nthe whole story is in the log: /x/pretrain.log\n"
    assert failure_cause(log) == platform_line
    assert failure_cause("header\nerror: sources: no _manifest.json at '/d'\n") == (
        "sources: no _manifest.json at '/d'"
    )
    assert failure_cause(TRACEBACK_LOG) == (
        "ray.exceptions.RayTaskError(ValueError): ray::train_fn() (pid=12)"
    )
    assert failure_cause("setting up\nthe data bucket is empty\n") == "the data bucket is empty"
    assert failure_cause("", "runtime_env setup failed: no pip\nmore") == (
        "runtime_env setup failed: no pip"
    )


def _aimctl(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [AIMCTL, *args], capture_output=True, text=True, timeout=600, cwd=REPO
    )  # fmt: skip


@pytest.mark.slow
def test_a_submitted_job_that_fails_on_the_cluster_prints_its_root_cause(
    ray_head: dict[str, str],  # noqa: F811
    token_env: None,  # noqa: F811
    tmp_path: Path,
) -> None:
    """A data source the cluster does not have: valid config, so submit accepts it; the job
    fails on the cluster, and the console says why in the words `aimctl pretrain` uses."""
    address = ray_head["address"]
    missing = tmp_path / "no-such-dataset"
    run = _aimctl(
        "submit", "jobs/configs/demo.yaml", "--address", address,
        "--set", f"data.sources.0.url={missing}", "--set", f"train.storage_path={tmp_path}",
        "--set", "train.storage_shared=true", "--wait",  # one node: its folder is shared
    )  # fmt: skip
    seen = [line for line in (run.stdout + run.stderr).splitlines() if line.strip()]
    assert run.returncode == 1, seen
    job_id = _job_id(run.stdout)
    cause = f"sources: no _manifest.json at '{missing}'; run `aimctl ingest`"
    assert seen == [
        f"submitted {job_id}",
        f"  aimctl jobs logs {job_id} --follow --address {address}",
        f"{job_id}: FAILED: {cause}",
        f"  the whole log: aimctl jobs logs {job_id} --address {address}",
    ]
    status = _aimctl("jobs", "status", job_id, "--address", address)
    assert status.stdout.splitlines() == [f"{job_id}: FAILED: {cause}"], status.stdout

    # An entrypoint that dies with a traceback: the exception line; the log keeps the rest.
    command = "python -c \"import json; json.loads('{')\""
    run = _aimctl("submit", "--address", address, "--entrypoint", command, "--wait")
    job_id = _job_id(run.stdout)
    assert run.returncode == 1
    (line,) = [ln for ln in run.stdout.splitlines() if ln.startswith(f"{job_id}: FAILED")]
    assert line.startswith(f"{job_id}: FAILED: json.decoder.JSONDecodeError: Expecting"), line
    assert "Traceback" not in run.stdout
    logs = _aimctl("jobs", "logs", job_id, "--address", address)
    assert "Traceback (most recent call last)" in logs.stdout
