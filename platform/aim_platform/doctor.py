"""``aimctl doctor``: what is really installed and imported, and which devices are seen."""

from __future__ import annotations

import importlib.metadata as md
import os
import platform
import shutil
import subprocess
import sys


def _version(dist: str) -> str | None:
    try:
        return md.version(dist)
    except md.PackageNotFoundError:
        return None


def pil_report() -> dict[str, str]:
    """Which PIL is imported (Pillow or Pillow-SIMD) and whether it decodes with libjpeg-turbo."""
    import PIL
    from PIL import features

    simd = _version("pillow-simd")
    plain = _version("pillow")
    imported = PIL.__version__
    if simd and imported == simd:
        flavour = "Pillow-SIMD"
    else:
        flavour = "Pillow"
    report = {
        "PIL": f"{flavour} {imported} ({os.path.dirname(PIL.__file__)})",
        "libjpeg-turbo": f"{features.check_feature('libjpeg_turbo')} (jpeg {features.version('jpg')})",
    }
    report["codecs"] = ", ".join(f"{name} {'yes' if ok else 'NO'}" for name, ok in codecs().items())
    if not codecs().get("webp"):
        report["webp"] = (
            "this PIL cannot decode WebP (WebP images are rejected at ingest): install "
            "libwebp-dev and run `bash infra/pillow_simd.sh .venv/bin/python`"
        )
    if simd and plain:
        report["warning"] = (
            f"both Pillow {plain} and Pillow-SIMD {simd} are installed; a later pip install put "
            "Pillow back: run `bash infra/pillow_simd.sh .venv/bin/python`"
        )
    return report


CODECS = {"jpeg": "jpg", "png": "zlib", "webp": "webp", "avif": "avif", "jpeg2000": "jpg_2000"}


def codecs() -> dict[str, bool]:
    """Which image formats the imported PIL can decode (``jpeg``, ``png``, ``webp``, ...)."""
    from PIL import features

    out = {}
    for name, feature in CODECS.items():
        try:
            out[name] = bool(features.check(feature))
        except ValueError:  # a PIL that does not know this feature at all
            out[name] = False
    return out


def device_report() -> list[str]:
    """Devices torch can use."""
    import torch

    lines = [f"cpu: {os.cpu_count()} logical cores, torch threads {torch.get_num_threads()}"]
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            lines.append(
                f"cuda:{i}: {p.name}, {p.total_memory / 2**30:.0f} GiB, sm_{p.major}{p.minor}"
            )
    else:
        lines.append("cuda: not available")
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        lines.append("mps: available")
    return lines


def nvidia_gpus() -> list[str]:
    """The GPUs ``nvidia-smi -L`` lists (the driver's view, whatever torch was built for)."""
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return []
    try:
        out = subprocess.run([exe, "-L"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return []
    return [line.strip() for line in out.stdout.splitlines() if line.startswith("GPU ")]


def job_device(
    torch_gpus: list[str], driver_gpus: list[str], torch_version: str, torch_cuda: str | None
) -> str:
    """Which device a job started here uses with ``train.use_gpu: auto`` (the default), and
    what to do when a GPU is present that torch cannot use.

    Args:
        torch_gpus: the GPUs torch sees (names), what an embedded Ray offers the workers.
        driver_gpus: the GPUs ``nvidia-smi -L`` lists.
        torch_version: ``torch.__version__``.
        torch_cuda: ``torch.version.cuda`` (None for a CPU build).
    """
    if torch_gpus:
        return (
            f"GPU: train.use_gpu auto gives each worker one of {len(torch_gpus)} GPU(s) "
            f"({torch_gpus[0]}), bf16 mixed precision; `--set train.use_gpu=false` for CPUs"
        )
    if driver_gpus and torch_cuda is None:
        return (
            f"CPU: nvidia-smi lists {len(driver_gpus)} GPU(s) but torch {torch_version} is a "
            f"CPU build: run `make clean setup TORCH_BUILD=cuda` for the CUDA build"
        )
    if driver_gpus:
        return (
            f"CPU: nvidia-smi lists {len(driver_gpus)} GPU(s) but torch {torch_version} (CUDA "
            f"{torch_cuda}) cannot use them: check the driver against that CUDA version"
        )
    return (
        "CPU: no GPU here, so train.use_gpu auto trains on CPUs, float32 (a job submitted to a "
        "cluster uses GPUs when the cluster has any)"
    )


def report() -> dict[str, object]:
    """Everything ``aimctl doctor`` prints."""
    import torch

    info: dict[str, object] = {
        "python": f"{sys.version.split()[0]} ({sys.executable})",
        "platform": platform.platform(),
        "aim-platform": _version("aim-platform") or "not installed",
        "torch": f"{torch.__version__} (cuda {torch.version.cuda})",
        "ray": _version("ray") or "not installed",
        "mlflow": _version("mlflow") or "not installed",
        "pyarrow": _version("pyarrow") or "not installed",
    }
    info.update(pil_report())
    info["devices"] = device_report()
    gpus = [
        torch.cuda.get_device_name(i)
        for i in range(torch.cuda.device_count() if torch.cuda.is_available() else 0)
    ]
    info["job device"] = job_device(gpus, nvidia_gpus(), torch.__version__, torch.version.cuda)
    return info
