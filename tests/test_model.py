"""The AIM model: causality (no leakage), masks, patterns, targets, loss, gradients, sizes."""

from __future__ import annotations

import math

import pytest
import torch
from model_helpers import random_pixels, tiny

from aim_platform.config import ModelConfig
from aim_platform.models import (
    SIZES,
    AIMForPretraining,
    AttentiveProbe,
    LinearProbe,
    attention_mask,
    build_trunk,
    chunk_losses,
    count_parameters,
    next_patch_loss,
    normalize_patches,
    patchify,
    pattern_order,
    pixels_to_input,
    unpatchify,
)
from aim_platform.models.layers import Attention

# -- no prediction can see what it predicts ------------------------------------------------


@pytest.mark.parametrize("head", ["none", "mlp", "transformer"])
@pytest.mark.parametrize("pattern", ["raster", "spiral"])
@pytest.mark.parametrize("attention", ["prefix_causal", "causal"])
def test_no_prediction_sees_its_target(head: str, pattern: str, attention: str) -> None:
    """Changing patch j beyond the prefix leaves every prediction for patches <= j unchanged
    (predictions come from positions < j) and changes some later prediction."""
    cfg = tiny(
        head={"kind": head, "num_blocks": 1, "width": 32, "num_heads": 4},
        pattern=pattern,
        attention=attention,
    )
    model = AIMForPretraining(cfg).eval()
    k = cfg.num_patches
    gen = torch.Generator().manual_seed(1)
    for trial in range(4):
        tokens = torch.randn(3, k, cfg.patch_dim, generator=gen)  # (B, K, P) sequence order
        prefix = torch.randint(1, k - 1, (3,), generator=gen)
        if attention == "causal":
            prefix = torch.ones(3, dtype=torch.long)
        j = int(prefix.max()) + int(
            torch.randint(0, k - 1 - int(prefix.max()), (1,), generator=gen)
        )
        changed = tokens.clone()
        changed[:, j] += torch.randn(3, cfg.patch_dim, generator=gen) * 3
        with torch.no_grad():
            before = model(tokens, model.order, prefix)
            after = model(changed, model.order, prefix)
        # output k predicts patch k+1: predictions of patches <= j are outputs < j
        torch.testing.assert_close(after[:, :j], before[:, :j], rtol=0, atol=1e-5)
        assert (after[:, j:] - before[:, j:]).abs().max() > 1e-3, f"trial {trial}: no effect"


def test_prefix_mask_semantics() -> None:
    k = 6
    prefix = torch.tensor([1, 3, 5])
    mask = attention_mask("prefix_causal", k, prefix)  # (B, 1, K, K)
    assert mask.shape == (3, 1, k, k)
    for b, s in enumerate(prefix.tolist()):
        for i in range(k):
            for j in range(k):
                expected = j <= i or j < s
                assert bool(mask[b, 0, i, j]) == expected, (b, i, j)
        # prefix positions see exactly the prefix: each other, and nothing after it
        assert mask[b, 0, :s, :s].all() and not mask[b, 0, :s, s:].any()
    assert torch.equal(attention_mask("causal", k), torch.ones(k, k, dtype=torch.bool).tril())
    assert attention_mask("bidirectional", k) is None
    with pytest.raises(ValueError, match="prefix_len"):
        attention_mask("prefix_causal", k)


def test_prefix_is_bidirectional_and_downstream_trunk_too() -> None:
    cfg = tiny()
    model = AIMForPretraining(cfg).eval()
    k = cfg.num_patches
    x = torch.randn(2, k, cfg.patch_dim)
    y = x.clone()
    y[:, 4] += 1.0  # inside a prefix of 8: reaches position 0
    prefix = torch.tensor([8, 8])
    mask = attention_mask("prefix_causal", k, prefix)
    with torch.no_grad():
        a, _ = model.trunk(x, mask=mask)
        b, _ = model.trunk(y, mask=mask)
    assert (a[:, 0] - b[:, 0]).abs().max() > 1e-4
    # downstream: bidirectional, so the last patch reaches the first position
    z = x.clone()
    z[:, -1] += 1.0
    with torch.no_grad():
        fa = model.trunk.features(x, layers=[-1])
        fz = model.trunk.features(z, layers=[-1])
    assert (fa[:, 0] - fz[:, 0]).abs().max() > 1e-4


def test_fused_attention_matches_reference() -> None:
    attn = Attention(32, 4)
    x = torch.randn(2, 10, 32)
    mask = attention_mask("prefix_causal", 10, torch.tensor([3, 7]))
    out = attn(x, mask)
    q, k, v = attn.qkv(x).reshape(2, 10, 3, 4, 8).permute(2, 0, 3, 1, 4)
    scores = (q @ k.transpose(-2, -1)) / math.sqrt(8)
    scores = scores.masked_fill(~mask, float("-inf"))
    ref = attn.proj((scores.softmax(-1) @ v).transpose(1, 2).reshape(2, 10, 32))
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


# -- patterns ----------------------------------------------------------------------------------


@pytest.mark.parametrize("grid", [1, 2, 3, 4, 7, 8, 16])
@pytest.mark.parametrize("name", ["raster", "spiral", "checkerboard", "random"])
def test_each_pattern_is_a_permutation(name: str, grid: int) -> None:
    order = pattern_order(name, grid, seed=3)
    assert sorted(order.tolist()) == list(range(grid * grid))


def test_pattern_specifics() -> None:
    assert torch.equal(pattern_order("raster", 4), torch.arange(16))
    spiral = pattern_order("spiral", 5).tolist()
    assert spiral[:9] == [12, 13, 18, 17, 16, 11, 6, 7, 8]  # centre, right, down, left, up...
    board = pattern_order("checkerboard", 4).tolist()
    assert all((i // 4 + i % 4) % 2 == 0 for i in board[:8])
    assert torch.equal(pattern_order("random", 4, 1), pattern_order("random", 4, 1))
    assert not torch.equal(pattern_order("random", 4, 1), pattern_order("random", 4, 2))
    with pytest.raises(ValueError, match="unknown pattern"):
        pattern_order("zigzag", 4)


@pytest.mark.parametrize("pattern", ["spiral", "checkerboard", "random"])
def test_pattern_loss_equals_hand_permuted_batch(pattern: str) -> None:
    """A pattern model equals a raster model fed patches (and their positions) permuted by hand."""
    cfg = tiny(pattern=pattern, pattern_seed=5)
    model = AIMForPretraining(cfg).eval()
    raster = AIMForPretraining(tiny()).eval()
    raster.load_state_dict(model.state_dict())
    order = pattern_order(pattern, cfg.grid_size, 5)
    raster.trunk.pos_embed = model.trunk.pos_embed[order].clone()  # positions follow patches
    pixels = random_pixels(4, cfg)
    prefix = torch.tensor([1, 5, 20, 63])
    with torch.no_grad():
        got = model.loss(pixels, prefix)
        want = raster.loss(pixels[:, order], prefix)
    torch.testing.assert_close(got.loss, want.loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got.per_position, want.per_position, rtol=1e-4, atol=1e-5)


# -- targets and loss ---------------------------------------------------------------------------


def test_normalized_targets_have_zero_mean_unit_variance() -> None:
    patches = torch.rand(5, 16, 48) * 200 + 20
    t = normalize_patches(patches)
    torch.testing.assert_close(t.mean(-1), torch.zeros(5, 16), atol=1e-5, rtol=0)
    torch.testing.assert_close(t.var(-1, unbiased=False), torch.ones(5, 16), atol=1e-4, rtol=0)


def test_loss_zero_for_perfect_prediction_and_only_after_prefix() -> None:
    target = torch.randn(3, 8, 12)
    pred = torch.zeros_like(target)
    pred[:, :-1] = target[:, 1:]  # position k predicts patch k+1
    prefix = torch.tensor([1, 3, 7])
    out = next_patch_loss(pred, target, prefix)
    assert out.loss.item() == 0.0
    # errors on prefix targets (t < S) do not count
    bad = pred.clone()
    bad[2, :6] += 10.0  # sample 2 has S=7: predictions 0..5 target patches 1..6 < 7
    assert next_patch_loss(bad, target, prefix).loss.item() == 0.0
    bad[2, 6] += 1.0  # predicts patch 7: counted
    assert next_patch_loss(bad, target, prefix).loss.item() > 0


def test_per_position_loss_adds_up_to_the_loss() -> None:
    pred, target = torch.randn(4, 16, 6), torch.randn(4, 16, 6)
    prefix = torch.tensor([1, 2, 9, 15])
    out = next_patch_loss(pred, target, prefix)
    total = out.per_position.sum() / out.per_position_count.sum()
    torch.testing.assert_close(total, out.loss)
    assert out.per_position_count[0] == 0 and out.per_position_count[15] == 4
    assert out.per_position_count[1] == 1  # only the sample with S=1
    chunks = chunk_losses(out.per_position, out.per_position_count, chunks=4)
    assert len(chunks) == 4 and all(c > 0 for c in chunks)


def test_raw_target_differs_from_normalized() -> None:
    pixels = random_pixels(2, tiny())
    prefix = torch.tensor([3, 4])
    a = AIMForPretraining(tiny(target="raw"))
    b = AIMForPretraining(tiny())
    b.load_state_dict(a.state_dict())
    assert not torch.isclose(a.loss(pixels, prefix).loss, b.loss(pixels, prefix).loss)


def test_pixels_to_input_and_patchify_round_trip() -> None:
    images = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    patches = patchify(images, 4)
    assert patches.shape == (2, 64, 48) and patches.dtype == torch.uint8
    assert torch.equal(unpatchify(patches, 4), images)
    # channel is the last index within a patch: the first patch's first pixel is (0, 0)
    assert patches[0, 0, :3].tolist() == images[0, :, 0, 0].tolist()
    x = pixels_to_input(patches)
    assert x.dtype == torch.float32 and abs(x.mean().item()) < 0.5


# -- gradients, precision, registry --------------------------------------------------------------


@pytest.mark.parametrize("head", ["none", "mlp", "transformer"])
def test_every_parameter_gets_a_gradient(head: str) -> None:
    model = AIMForPretraining(tiny(head={"kind": head, "num_blocks": 1, "width": 32}))
    out = model.loss(random_pixels(2, model.cfg), torch.tensor([2, 30]))
    out.loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_bf16_autocast_forward_backward_is_finite() -> None:
    cfg = ModelConfig(
        size="aim-tiny",
        img_size=8,
        patch_size=4,
        embed_dim=16,
        num_blocks=1,
        num_heads=2,
        head={"num_blocks": 1, "width": 16},
    )
    model = AIMForPretraining(cfg)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model.loss(random_pixels(2, cfg), torch.tensor([1, 2]))
    out.loss.backward()
    assert torch.isfinite(out.loss)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


TABLE1 = {"aim-600M": 0.68e9, "aim-1B": 1.21e9, "aim-3B": 2.72e9, "aim-7B": 6.44e9}


@pytest.mark.parametrize("size", list(SIZES))
def test_registry_parameter_counts(size: str) -> None:
    cfg = ModelConfig(size=size)
    with torch.device("meta"):
        trunk = build_trunk(cfg)
        model = AIMForPretraining(cfg)
    d, n = cfg.embed_dim, cfg.num_blocks
    # 12 L d^2 for the blocks, plus LayerNorms and the patch embedding
    extra = n * 4 * d + 2 * d + (cfg.patch_dim * d + d) + 2 * d
    assert count_parameters(trunk) == 12 * n * d * d + extra
    if size in TABLE1:
        assert count_parameters(trunk) == pytest.approx(TABLE1[size], rel=2e-3)
    assert count_parameters(model) > count_parameters(trunk)


@pytest.mark.parametrize("size", [s for s, spec in SIZES.items() if spec.img_size <= 64])
def test_small_registered_sizes_run(size: str) -> None:
    cfg = ModelConfig(size=size)
    model = AIMForPretraining(cfg)
    out = model.loss(random_pixels(2, cfg), torch.tensor([1, cfg.num_patches - 1]))
    assert torch.isfinite(out.loss)


def test_probe_heads_shapes_and_parameter_counts() -> None:
    d, c = 64, 10
    probe = AttentiveProbe(d, c, num_heads=4)
    assert count_parameters(probe) == 2 * d * d + d + d * c
    x = torch.randn(5, 16, d)
    assert probe(x).shape == (5, c)
    lin = LinearProbe(d, c)
    assert count_parameters(lin) == d * c + c
    assert lin(x).shape == (5, c)


def test_features_average_the_chosen_blocks() -> None:
    trunk = build_trunk(tiny(num_blocks=3))
    x = torch.randn(2, 64, 48)
    _, blocks = trunk(x)
    feats = trunk.features(x, layers=[1, 2])
    torch.testing.assert_close(feats, (blocks[1] + blocks[2]) / 2)
    torch.testing.assert_close(trunk.features(x, layers=[-1]), blocks[2])
    # a causal downstream trunk is available too (Table 3d probes)
    assert not torch.allclose(trunk.features(x, [-1], attention="causal"), blocks[2])
    # ... in which the first position sees only itself: later patches cannot move it
    moved = x.clone()
    moved[:, 1:] += 1.0
    causal = trunk.features(x, [-1], attention="causal")
    torch.testing.assert_close(trunk.features(moved, [-1], attention="causal")[:, 0], causal[:, 0])
