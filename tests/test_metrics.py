"""MFU formula, device peaks, matmul peak measurement and the throughput tracker."""

from __future__ import annotations

import math

import pytest
import torch

from aim_platform.config import ModelConfig
from aim_platform.models import AIMForPretraining
from aim_platform.train.metrics import (
    PEAK_FLOPS_ENV,
    Throughput,
    attention_flops_per_image,
    flops_per_image,
    job_peak_flops,
    matmul_parameters,
    measure_matmul_peak,
    peak_flops,
)


def small(head: str = "mlp") -> ModelConfig:
    # K = (8/4)^2 = 4 patches of P = 48 values; D = 8; one trunk block; head W = 16.
    return ModelConfig(
        size=None,
        img_size=8,
        patch_size=4,
        embed_dim=8,
        num_blocks=1,
        num_heads=2,
        head={"kind": head, "num_blocks": 1, "width": 16, "num_heads": 2},
    )


def test_flops_per_image_hand_computed() -> None:
    cfg = small()
    # patch embed 48*8 = 384; trunk block 4*8^2 + 2*32*8 = 768;
    # head: in 8*16 = 128, one MLP block 2*64*16 = 2048, out 16*48 = 768.
    assert matmul_parameters(cfg) == 384 + 768 + 128 + 2048 + 768 == 4096
    # QK^T and AV, full K^2, forward + backward: 6 * 2 * K^2 * D per trunk block.
    assert attention_flops_per_image(cfg) == 6 * 2 * 4**2 * 8 == 1536
    assert flops_per_image(cfg) == 6 * 4096 * 4 + 1536 == 99840
    # a transformer head adds its attention maps (4 W^2) and its own attention term (C = W)
    t = small("transformer")
    assert matmul_parameters(t) == 4096 + 4 * 16 * 16
    assert attention_flops_per_image(t) == 6 * 2 * 16 * (8 + 16)


@pytest.mark.parametrize("head", ["none", "mlp", "transformer"])
def test_matmul_parameters_are_the_models_linear_weights(head: str) -> None:
    """The formula counts exactly the weights of the model's nn.Linear layers."""
    cfg = ModelConfig(
        size="aim-600M", num_blocks=2, head={"kind": head, "num_blocks": 2, "num_heads": 16}
    )
    with torch.device("meta"):
        model = AIMForPretraining(cfg)
    linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    assert matmul_parameters(cfg) == linear


def test_aim_600m_flops_are_about_six_n_k() -> None:
    cfg = ModelConfig(size="aim-600M")
    n = matmul_parameters(cfg)
    assert 1.0e9 < n < 1.2e9  # 0.68B trunk + 0.4B pixel head (12 x 2048)
    assert flops_per_image(cfg) == pytest.approx(6 * n * 256, rel=0.02)


def test_peak_flops_table_override_and_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(PEAK_FLOPS_ENV, raising=False)
    # Device names as torch reports them find their entry: the H200 is an SXM H100-class
    # part, the PCIe H100 a slower one; fp16 reads the bf16 peak, fp32 a lower one.
    h200 = peak_flops("NVIDIA H200", torch.bfloat16)
    assert h200 is not None and h200 == peak_flops("NVIDIA H100 80GB HBM3", torch.bfloat16)
    assert peak_flops("NVIDIA H100 PCIe", torch.bfloat16) < h200
    a100 = peak_flops("NVIDIA A100-SXM4-80GB", torch.bfloat16)
    assert a100 < h200 and peak_flops("NVIDIA A100-SXM4-80GB", torch.float32) < a100
    assert peak_flops("NVIDIA L4", torch.float16) == peak_flops("NVIDIA L4", torch.bfloat16)
    assert peak_flops("NVIDIA L40S", torch.bfloat16) != peak_flops("NVIDIA L4", torch.bfloat16)
    assert peak_flops("AMD EPYC", torch.float32) is None
    assert peak_flops("AMD EPYC", torch.float32, override=7e10) == 7e10
    monkeypatch.setenv(PEAK_FLOPS_ENV, "5e14")
    assert peak_flops("NVIDIA H200", torch.bfloat16) == 5e14  # the variable wins
    assert peak_flops("NVIDIA H200", torch.bfloat16, override=1e15) == 1e15


def test_measure_matmul_peak_on_cpu() -> None:
    flops = measure_matmul_peak("cpu", torch.float32, n=64, iters=2, repeats=2)
    assert math.isfinite(flops) and flops > 0


def test_throughput_excludes_warmup_steps() -> None:
    t = Throughput(flops_per_image=1e9, patches_per_image=256, peak_flops=1e12, warmup_steps=2)
    t.update(images=32, seconds=100.0)  # compilation
    t.update(images=32, seconds=50.0)
    assert t.steps == 2 and t.images_per_s is None and t.mfu is None and t.metrics() == {}
    t.update(images=32, seconds=1.0)
    t.update(images=32, seconds=3.0)
    assert t.images_per_s == 64 / 4.0
    assert t.patches_per_s == 16.0 * 256
    assert t.mfu == pytest.approx(16.0 * 1e9 / 1e12)
    assert t.metrics() == {
        "train/images_per_s": 16.0,
        "train/patches_per_s": 4096.0,
        "train/mfu": pytest.approx(0.016),
    }


def test_throughput_devices_and_unknown_peak() -> None:
    t = Throughput(flops_per_image=1e9, patches_per_image=4, peak_flops=4e12)  # 4 devices
    for _ in range(4):  # default: 3 warm-up steps
        t.update(images=100, seconds=1.0)
    assert t.images_per_s == 100.0
    assert t.mfu == pytest.approx(100 * 1e9 / 4e12)  # images and peak both of all devices
    no_peak = Throughput(flops_per_image=1e9, patches_per_image=4, warmup_steps=0)
    no_peak.update(images=10, seconds=2.0)
    assert no_peak.mfu is None
    assert set(no_peak.metrics(prefix="")) == {"images_per_s", "patches_per_s"}


def _peak_on_rank(rank: int, port: int, out: str) -> None:
    """One of two gloo ranks: rank 1 arrives a second late; each "measures" a different peak
    (as ranks measuring at different moments of a shared machine do)."""
    import json
    import time

    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    if rank == 1:
        time.sleep(1.0)
    arrived = time.time()
    measured_at: list[float] = []

    def measure(device: torch.device | str, dtype: torch.dtype) -> float:
        measured_at.append(time.time())
        return [3e9, 1e9][rank]

    cpu = job_peak_flops("cpu", torch.float32, measure=measure)
    gpu = job_peak_flops("cpu", torch.float32, override=989e12, measure=measure)
    meter = Throughput(flops_per_image=1e9, patches_per_image=4, peak_flops=cpu, warmup_steps=0)
    meter.update(images=64, seconds=32.0)  # 2 images/s of 1 GFLOP each, all ranks together
    dist.destroy_process_group()
    result = {"arrived": arrived, "measured": measured_at, "cpu": cpu, "gpu": gpu, "mfu": meter.mfu}
    with open(f"{out}/{rank}.json", "w") as f:
        json.dump(result, f)


def test_every_rank_gets_the_jobs_peak_measured_together(tmp_path) -> None:
    """MFU's denominator is the sum of all ranks' peaks, measured at one moment, so every rank
    reports one MFU (each rank's own, measured alone, made rank 1 report 1.22 beside 0.56)."""
    import json

    import torch.multiprocessing as mp
    from net_helpers import free_port

    mp.spawn(_peak_on_rank, args=(free_port(), str(tmp_path)), nprocs=2, join=True)
    ranks = [json.loads((tmp_path / f"{r}.json").read_text()) for r in range(2)]
    assert [r["cpu"] for r in ranks] == [4e9, 4e9]  # 3e9 + 1e9 on both ranks
    assert [r["gpu"] for r in ranks] == [2 * 989e12] * 2  # a known peak: per device x world
    assert [r["mfu"] for r in ranks] == [pytest.approx(0.5)] * 2  # 2e9 FLOP/s of 4e9
    assert [len(r["measured"]) for r in ranks] == [1, 1]  # measured only without a peak
    # Rank 0 measured only once the late rank 1 had arrived: both at the same moment.
    assert ranks[0]["measured"][0] >= ranks[1]["arrived"]
