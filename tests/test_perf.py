"""Performance paths: FlexAttention parity, activation checkpointing, the benchmarks, the GPU
check's smoke mode. No timed assertions: speed is what the benchmarks print."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from model_helpers import random_pixels, tiny
from typer.testing import CliRunner

from aim_platform.bench.attention import run_attention_bench
from aim_platform.bench.step import run_step_bench
from aim_platform.cli import app
from aim_platform.config import ModelConfig
from aim_platform.models import AIMForPretraining, attention_mask
from aim_platform.models.layers import flex_block_mask
from aim_platform.train.metrics import flops_per_image

REPO = Path(__file__).resolve().parents[1]

# -- FlexAttention: the same mask, the same numbers ----------------------------------------


@pytest.mark.parametrize("kind", ["prefix_causal", "causal"])
def test_flex_mask_mod_equals_attention_mask(kind: str) -> None:
    k = 40
    prefix = torch.tensor([1, 7, 39]) if kind == "prefix_causal" else None
    block_mask = flex_block_mask(kind, k, prefix)
    dense = attention_mask(kind, k, prefix)  # (B, 1, K, K) or (K, K)
    idx = torch.arange(k)
    for b in range(3):
        got = block_mask.mask_mod(
            torch.tensor(b), torch.tensor(0), idx.view(-1, 1), idx.view(1, -1)
        )  # (K, K)
        want = dense[b, 0] if dense.dim() == 4 else dense
        assert torch.equal(got, want), (kind, b)


def test_flex_block_mask_skips_blocks_nothing_may_attend() -> None:
    """With 128-token blocks and K=256 the upper-right block is empty unless the prefix
    reaches into the second block: FlexAttention skips it (the point of the block mask)."""
    prefix = torch.tensor([10, 200])
    blocks = flex_block_mask("prefix_causal", 256, prefix).to_dense()  # (B, 1, 2, 2)
    assert blocks[0, 0].tolist() == [[1, 0], [1, 1]]
    assert blocks[1, 0].tolist() == [[1, 1], [1, 1]]
    assert flex_block_mask("bidirectional", 256) is None
    with pytest.raises(ValueError, match="prefix_len"):
        flex_block_mask("prefix_causal", 256)


@pytest.mark.slow
@pytest.mark.parametrize("attention", ["prefix_causal", "causal"])
def test_flex_model_equals_sdpa_model(attention: str) -> None:
    """Compiled FlexAttention (CPU, forward: it has no CPU backward) gives the SDPA path's
    predictions and loss to 1e-5 in float32."""
    sdpa = AIMForPretraining(tiny(attention=attention)).eval()
    flex = AIMForPretraining(tiny(attention=attention, attention_backend="flex")).eval()
    flex.load_state_dict(sdpa.state_dict())
    tokens = torch.randn(3, 64, 48)  # (B, K, P)
    prefix = torch.tensor([1, 17, 63])
    with torch.no_grad():
        torch.testing.assert_close(
            flex(tokens, None, prefix), sdpa(tokens, None, prefix), rtol=1e-5, atol=1e-5
        )
        pixels = random_pixels(3, sdpa.cfg)
        got, want = flex.loss(pixels, prefix), sdpa.loss(pixels, prefix)
    torch.testing.assert_close(got.loss, want.loss, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got.per_position, want.per_position, rtol=1e-5, atol=1e-5)
    # inside compiled blocks (the GPU set-up) FlexAttention is traced into the blocks' graph
    flex.compile_blocks()
    with torch.no_grad():
        torch.testing.assert_close(
            flex(tokens, None, prefix.flip(0)),
            sdpa(tokens, None, prefix.flip(0)),
            rtol=1e-5,
            atol=1e-5,
        )


def test_masks_are_built_on_the_device_they_are_used_on() -> None:
    """No mask is built on the host and copied per step (``meta`` stands in for a GPU)."""
    assert attention_mask("causal", 8, device="meta").device.type == "meta"
    prefix = torch.tensor([2, 5], device="meta")
    assert attention_mask("prefix_causal", 8, prefix).device.type == "meta"


def test_flex_backend_is_a_config_choice() -> None:
    assert ModelConfig().attention_backend == "sdpa"
    with pytest.raises(ValueError, match="attention_backend"):
        ModelConfig(attention_backend="flash")


# -- activation checkpointing ----------------------------------------------------------------


def saved_numel(model: AIMForPretraining, pixels: torch.Tensor, prefix: torch.Tensor) -> int:
    """Elements autograd keeps for the backward outside checkpointed regions."""
    total = 0

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal total
        total += t.numel()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model.loss(pixels, prefix)
    return total


def test_activation_checkpointing_same_loss_and_gradients_less_saved() -> None:
    cfg = tiny(num_blocks=3)
    plain = AIMForPretraining(cfg)
    ckpt = AIMForPretraining(cfg, activation_checkpointing=True)
    ckpt.load_state_dict(plain.state_dict())
    pixels, prefix = random_pixels(3, cfg), torch.tensor([2, 9, 40])
    a, b = plain.loss(pixels, prefix), ckpt.loss(pixels, prefix)
    torch.testing.assert_close(b.loss, a.loss, rtol=0, atol=0)
    a.loss.backward()
    b.loss.backward()
    for (name, p), q in zip(plain.named_parameters(), ckpt.parameters(), strict=True):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-6, atol=1e-7, msg=name)
    # the trunk blocks' activations are really recomputed, not kept
    assert saved_numel(ckpt, pixels, prefix) < 0.5 * saved_numel(plain, pixels, prefix)
    # no recomputation (and no checkpoint) without gradients: features run as usual
    with torch.no_grad():
        feats = ckpt.trunk.features(torch.randn(2, 64, 48), layers=[-1])
    assert feats.shape == (2, 64, 32)


# -- benchmarks: run and print their fields (no timed assertion) ----------------------------


def test_bench_step_small_configuration() -> None:
    lines: list[str] = []
    r = run_step_bench(
        size="aim-tiny", blocks=1, head_blocks=1, batch=2, rounds=2, matmul_n=64, echo=lines.append
    )
    cfg = ModelConfig(size="aim-tiny", num_blocks=1, head={"num_blocks": 1})
    assert r.flops_per_step == flops_per_image(cfg) * 2
    assert len(r.step_s) == len(r.matmul_peak) == len(r.optimizer_s) == 2 == len(lines)
    assert len(r.cpu_utilization) == len(r.peak_spread) == 2
    assert all(s > 0 for s in r.step_s) and 0 < r.optimizer_share < 1
    assert set(r.breakdown) == {"matmul", "attention", "optimizer", "other"}
    assert sum(r.breakdown.values()) == pytest.approx(1.0, abs=0.05)
    text = r.summary()
    assert 0 < r.best_utilization
    for field in ("GFLOP/step", "images/s", "matmul peak", "utilization", "MFU n/a", "best step"):
        assert field in text


def test_bench_step_bf16_mixed_precision_path() -> None:
    """The GPU's bf16 policy (autocast, float32 weights and optimizer) runs end to end."""
    r = run_step_bench(
        size="aim-tiny",
        blocks=1,
        head_blocks=1,
        batch=1,
        dtype="bf16",
        rounds=1,
        matmul_n=32,
        echo=lambda _: None,
    )
    assert "bf16" in r.label and r.step_s[0] > 0 and r.matmul_peak[0] > 0


def test_bench_step_cli_and_fused_optimizer() -> None:
    args = ["bench", "step", "--size", "aim-tiny", "--blocks", "1", "--head-blocks", "1"]
    args += ["--batch", "2", "--rounds", "1", "--matmul-n", "64", "--optimizer", "fused"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "round 1/1" in result.output and "fused AdamW" in result.output
    assert "utilization" in result.output
    bad = CliRunner().invoke(app, ["bench", "step", "--size", "aim-tiny", "--dtype", "fp8"])
    assert bad.exit_code == 2 and "dtype" in bad.output


def test_bench_attention_prints_ratios() -> None:
    r = run_attention_bench(size="aim-tiny", batch=2, rounds=2, iters=1, echo=lambda _: None)
    assert set(r.times) == {"prefix-causal sdpa", "causal sdpa", "bidirectional sdpa"}
    assert r.ratio("causal sdpa") == 1.0
    assert r.shape == (2, 4, 64, 32)
    result = CliRunner().invoke(
        app, ["bench", "attention", "--size", "aim-tiny", "--batch", "2", "--rounds", "1"]
    )
    assert result.exit_code == 0, result.output
    assert "x causal sdpa" in result.output and "prefix-causal sdpa" in result.output


@pytest.mark.slow
def test_gpu_check_smoke_runs(tmp_path) -> None:
    """The prepared GPU script runs end to end on tiny shapes (compile and checkpointing
    included), so that it works the first time a GPU is lent."""
    out = tmp_path / "gpu_check.md"
    proc = subprocess.run(
        [sys.executable, str(REPO / "jobs" / "gpu_check.py"), "--smoke", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = out.read_text()
    diff = re.search(r"parity flex vs sdpa \(fp32\): loss diff (\S+)", report)
    assert diff is not None and float(diff.group(1).rstrip(",")) < 1e-5, report
    for row in ("| eager, sdpa |", "| compiled, sdpa, act. ckpt |", "| causal sdpa |"):
        assert row in report, report
    assert "skipped" not in report and "failed" not in report, report
