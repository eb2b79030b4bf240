"""The real job on a GPU beside ``bench step`` (jobs/gpu_real_job.py, issue 30 point 1): the
job it submits is the GPU recipe the issue names, its report says the ratio against the goal,
and its whole path (JPEGs, ``aimctl ingest``, ``aimctl pretrain`` through Ray Train with
MLflow, the metrics read back, ``bench step``) runs on a CPU with ``--smoke``."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from net_helpers import REPO

sys.path.insert(0, str(REPO / "jobs"))
import gpu_real_job as rj  # noqa: E402 - jobs/ is no package

from aim_platform.config import load_config  # noqa: E402


def _job(case: rj.Case, tmp_path: Path):
    sets = rj.job_overrides(case, tmp_path / "shards", tmp_path, "sqlite:///x.db")
    return load_config(REPO / "jobs" / "configs" / "demo.yaml", sets[1::2])


def test_the_gpu_case_is_aim600m_bf16_compiled_on_one_gpu_worker(tmp_path: Path) -> None:
    large, tiny = rj.cases(smoke=False, steps=100, batch=64)
    job = _job(large, tmp_path)
    assert (job.model.size, job.train.precision, job.train.compile) == ("aim-600M", "bf16", True)
    assert (job.train.use_gpu, job.train.num_workers, job.train.steps) == (True, 1, 100)
    # the batch bench step times: one micro-batch a step, no gradient accumulation
    assert job.train.global_batch_size == job.train.micro_batch_size == 64
    # validation and a checkpoint at the last step, MLflow where the report reads it
    assert job.train.val_every == job.train.checkpoint_every == 100
    assert job.tracking.tracking_uri == "sqlite:///x.db" and job.data.val_url is None
    assert _job(tiny, tmp_path).model.size == "aim-tiny"


def test_the_report_says_the_ratio_against_the_goal_and_names_a_failed_case() -> None:
    large, tiny = rj.cases(smoke=False, steps=100, batch=64)
    fed = rj.Measured(large, 290.0, 0.01, 0.49, 0.41, 100, 300.0, 60.0)
    starved = rj.Measured(tiny, problem="RuntimeError: aimctl pretrain exited 1")
    text = rj.report([fed, starved], "NVIDIA H100")
    assert "on NVIDIA H100" in text
    assert "| 290.0 | 300.0 | 0.967 | 1.0% | 49.0% | 0.4100 | step 100 | 60 |" in text
    assert "aim-600M on 224-px JPEGs: real job over bench step: 0.967 (goal >= 0.95: met)" in text
    assert "aim-tiny on CIFAR-10: FAILED: RuntimeError: aimctl pretrain exited 1" in text
    slow = rj.Measured(large, 200.0, 0.3, 0.3, None, 100, 300.0)
    assert "real job over bench step: 0.667 (goal >= 0.95: not met)" in rj.report([slow], "x")


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_the_real_job_path_runs_on_a_cpu(tmp_path: Path) -> None:
    """One smoke case end to end through the script's own entry point (as on the GPU)."""
    out = tmp_path / "real_job.md"
    args = ["--smoke", "--only", "as aim-600M", "--work", str(tmp_path / "w"), "--out", str(out)]
    done = subprocess.run(
        ["bash", str(REPO / "jobs" / "gpu_check.sh"), "--real-job", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=1100,
        env={**__import__("os").environ, "PYTHON": sys.executable},
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    text = out.read_text()
    row = next(line for line in text.splitlines() if line.startswith("| aim-tiny (smoke"))
    cells = [c.strip() for c in row.split("|")[1:-1]]
    job_ips, bench_ips, ratio = float(cells[1]), float(cells[2]), float(cells[3])
    assert job_ips > 0 and bench_ips > 0 and ratio == pytest.approx(job_ips / bench_ips, 1e-2)
    assert cells[6] != "-" and cells[7] == "step 6"  # validated, checkpointed at the end
    assert "real job over bench step:" in done.stdout
    # the job went through aimctl with MLflow: its run is in the case's SQLite store
    assert (tmp_path / "w" / "smoke-large" / "mlflow.db").exists()


def test_cifar_split_archive_unpacks_to_its_class_folders(tmp_path: Path) -> None:
    import tarfile

    rj.make_jpegs(tmp_path / "src" / "test", 4, 32)
    with tarfile.open(tmp_path / "test.tar.gz", "w:gz") as tar:
        tar.add(tmp_path / "src" / "test", arcname="test")
    folder = rj.cifar_folder(tmp_path / "test.tar.gz", tmp_path / "out")
    assert folder == tmp_path / "out" / "test"
    assert sorted(p.name for p in folder.iterdir()) == ["c0", "c1", "c2", "c3"]
    assert rj.cifar_folder(folder, tmp_path / "unused") == folder  # a folder as it is
