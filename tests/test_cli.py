"""The command line: doctor (versions, the device a job uses), selfcheck, and the cluster
address taken from RAY_ADDRESS as Ray's own tools take it."""

from __future__ import annotations

import ast

import pytest
from net_helpers import REPO, free_port
from typer.testing import CliRunner

from aim_platform.cli import app


def test_doctor_reports_versions_pil_and_devices() -> None:
    result = CliRunner().invoke(app, ["doctor"])
    assert result.exit_code == 0, result.output
    for key in ("python", "torch", "ray", "mlflow", "PIL", "libjpeg-turbo", "devices", "cpu:"):
        assert key in result.output
    assert "Pillow" in result.output


def test_selfcheck_parity_and_loss_falls() -> None:
    result = CliRunner().invoke(app, ["selfcheck", "--steps", "40"])
    assert result.exit_code == 0, result.output
    assert "ml-aim parity" in result.output and "OK" in result.output


# --- GPUs: train.use_gpu auto, and what doctor says --------------------------------------------


def test_use_gpu_defaults_to_auto_and_resolves_to_a_bool_from_the_clusters_gpus() -> None:
    from aim_platform.cluster import resolve_devices, resolve_use_gpu
    from aim_platform.config import ConfigError, load_config

    assert [resolve_use_gpu("auto", n) for n in (0, 0.5, 8)] == [False, True, True]
    assert resolve_use_gpu(True, 0) is True and resolve_use_gpu(False, 8) is False
    job = load_config(REPO / "jobs" / "configs" / "demo.yaml")
    assert job.train.use_gpu == "auto"
    for gpus, expected in ((0, False), (4, True)):
        resolved = resolve_devices(job, gpus=gpus)
        assert resolved.train.use_gpu is expected  # a bool: `if tc.use_gpu` reads it right
    forced = load_config(REPO / "jobs" / "configs" / "demo.yaml", ["train.use_gpu=false"])
    assert resolve_devices(forced, gpus=4).train.use_gpu is False
    with pytest.raises(ConfigError, match="train.use_gpu"):
        load_config(REPO / "jobs" / "configs" / "demo.yaml", ["train.use_gpu=maybe"])


def test_every_reader_of_use_gpu_gets_the_resolved_bool() -> None:
    """`"auto"` is truthy: only the driver's resolved job may reach a `tc.use_gpu` test."""
    pretrain = (REPO / "platform" / "aim_platform" / "jobs" / "pretrain.py").read_text()
    body = pretrain[pretrain.index("\ndef pretrain(") :]
    resolved = body.index("job = resolve_devices(job)")
    assert resolved < body.index("tc = job.train")
    readers = sorted(
        path.name
        for path in (REPO / "platform").rglob("*.py")
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.Attribute) and node.attr == "use_gpu"
    )
    # cluster.py resolves it; pretrain.py reads it after resolve_devices (above).
    assert set(readers) == {"cluster.py", "pretrain.py"}, readers


def test_doctor_says_which_device_a_job_uses() -> None:
    from aim_platform.doctor import job_device

    gpu = job_device(["NVIDIA H100 80GB HBM3"], ["GPU 0: NVIDIA H100"], "2.13.0+cu128", "12.8")
    assert gpu.startswith("GPU:") and "NVIDIA H100" in gpu
    cpu_build = job_device([], ["GPU 0: NVIDIA H100"], "2.13.0+cpu", None)
    assert cpu_build.startswith("CPU:") and "TORCH_BUILD=cuda" in cpu_build
    broken = job_device([], ["GPU 0: NVIDIA H100"], "2.13.0+cu128", "12.8")
    assert broken.startswith("CPU:") and "driver" in broken
    assert job_device([], [], "2.13.0+cpu", None).startswith("CPU: no GPU here")


def test_doctor_prints_the_job_device(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    from aim_platform import doctor

    monkeypatch.setattr(doctor, "nvidia_gpus", lambda: ["GPU 0: NVIDIA H100 (UUID: GPU-1)"])
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.version, "cuda", None)
    result = CliRunner().invoke(app, ["doctor"])
    assert result.exit_code == 0, result.output
    (line,) = [ln for ln in result.output.splitlines() if ln.startswith("job device:")]
    assert "CPU: nvidia-smi lists 1 GPU(s)" in line and "TORCH_BUILD=cuda" in line


# --- RAY_ADDRESS, where Ray's own tools read it -----------------------------------------------


@pytest.fixture
def no_ray_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
        monkeypatch.delenv(var, raising=False)


@pytest.mark.parametrize("command", [["submit", "--entrypoint", "true"], ["jobs", "status", "x"]])
def test_submit_and_jobs_take_the_dashboard_from_ray_address(
    command: list[str], no_ray_env: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    closed = f"http://127.0.0.1:{free_port()}"
    monkeypatch.setenv("RAY_ADDRESS", closed)
    result = CliRunner().invoke(app, command)
    assert result.exit_code == 2 and f"cannot reach the Ray dashboard at {closed}" in result.output
    other = f"http://127.0.0.1:{free_port()}"
    monkeypatch.setenv("RAY_API_SERVER_ADDRESS", other)  # Ray's order: this one first
    result = CliRunner().invoke(app, command)
    assert f"at {other}" in result.output, result.output


@pytest.mark.parametrize("command", ["pretrain", "study"])
def test_drivers_take_the_cluster_from_ray_address(
    command: str, no_ray_env: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = {"pretrain": "jobs/configs/demo.yaml", "study": "jobs/studies/head.yaml"}[command]
    monkeypatch.setenv("RAY_ADDRESS", "http://127.0.0.1:8265")  # the Jobs CLI's kind of address
    result = CliRunner().invoke(app, [command, str(REPO / target)])
    assert result.exit_code == 2, result.output
    assert "RAY_ADDRESS) http://127.0.0.1:8265: that is a dashboard URL" in result.output
