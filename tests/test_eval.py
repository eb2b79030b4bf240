"""Downstream evaluation: probes, LoRA, features API, correlation, MLflow logging."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from aim_platform.config import JobConfig, ModelConfig, ProbeConfig, build_config
from aim_platform.eval import embed, load_trunk
from aim_platform.eval.correlation import Correlation, pearson, spearman
from aim_platform.eval.features import block_outputs
from aim_platform.eval.lora import add_lora, fit_lora_probe, merge_lora, trained_fraction
from aim_platform.eval.probe import (
    ProbeReport,
    ProbeScore,
    accuracy,
    fit_probe,
    make_probe,
    report_metrics,
)
from aim_platform.jobs.probe import log_probe
from aim_platform.models.aim import build_trunk
from aim_platform.models.trunk_file import write_trunk

CFG = ModelConfig(size="aim-tiny", embed_dim=32, num_blocks=2, num_heads=4)


def small_trunk(tmp_path, seed: int = 0) -> str:
    job = build_config(JobConfig, {"model": CFG.model_dump()})
    torch.manual_seed(seed)
    path = str(tmp_path / f"trunk{seed}")
    write_trunk(build_trunk(job.model).state_dict(), job, path)
    return path


def toy_task(n: int = 64, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 patches whose class is their brightness (dark, mid, bright) under noise."""
    gen = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 3, (n,), generator=gen)
    pixels = torch.randint(0, 70, (n, CFG.num_patches, CFG.patch_dim), generator=gen)
    pixels += (labels * 90).view(-1, 1, 1)
    return pixels.to(torch.uint8), labels


def test_attentive_probe_parameter_count_and_accuracy_metric() -> None:
    d, c = 32, 7
    probe = make_probe("attentive", d, c, num_heads=4)
    assert sum(p.numel() for p in probe.parameters()) == 2 * d * d + d + d * c
    logits = torch.tensor([[0.1, 0.9, 0.0], [0.8, 0.1, 0.1]])
    score = accuracy(logits, torch.tensor([1, 2]))
    assert score.top1 == 0.5 and score.top5 == 1.0
    with pytest.raises(ValueError, match="unknown probe kind"):
        make_probe("knn", d, c, 4)


def test_probe_on_frozen_trunk_learns_and_leaves_trunk_unchanged(tmp_path) -> None:
    trunk, cfg = load_trunk(small_trunk(tmp_path))
    before = {k: v.clone() for k, v in trunk.state_dict().items()}
    assert not any(p.requires_grad for p in trunk.parameters())
    x, y = toy_task(96)
    feats = block_outputs(trunk, x, [0, 1]).mean(1)  # (N, K, D)
    for kind in ("attentive", "linear"):
        torch.manual_seed(0)
        score = fit_probe(
            make_probe(kind, 32, 3, 4),
            feats[:64],
            y[:64],
            feats[64:],
            y[64:],
            steps=60,
            batch_size=32,
            lr=1e-2,
            weight_decay=0.0,
            seed=0,
        )
        assert score.top1 > 0.9, (kind, score)
    for k, v in trunk.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_lora_trains_only_adapters_and_merges_exactly(tmp_path) -> None:
    trunk, _ = load_trunk(small_trunk(tmp_path))
    base = {k: v.clone() for k, v in trunk.state_dict().items()}
    x, y = toy_task(48)
    cfg = ProbeConfig(lora_rank=4, steps=20, batch_size=16, lr=1e-2, weight_decay=0.0)
    result = fit_lora_probe(trunk, [1], (x[:32], y[:32]), (x[32:], y[32:]), 3, cfg)
    assert 0 < result["trained_fraction"] < 0.2
    assert result["trained_fraction"] == pytest.approx(trained_fraction(trunk))
    trainable = {n for n, p in trunk.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    state = trunk.state_dict()
    for k, v in base.items():  # every original weight untouched
        key = k.replace("attn.qkv.", "attn.qkv.base.").replace("attn.proj.", "attn.proj.base.")
        assert torch.equal(state[key], v), k
    assert any(state[k].abs().sum() > 0 for k in state if k.endswith("lora_b"))  # adapters moved
    with torch.no_grad():
        unmerged = block_outputs(trunk, x[:8], [0, 1])
        merge_lora(trunk)
        merged = block_outputs(trunk, x[:8], [0, 1])
    assert not any("lora_" in n for n, _ in trunk.named_parameters())
    torch.testing.assert_close(merged, unmerged, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("placement", ["official", "qkv_proj"])
def test_lora_parameter_count_per_placement(placement: str) -> None:
    trunk = build_trunk(CFG)
    r, d = 2, CFG.embed_dim
    params = add_lora(trunk, r, placement)
    # official: (A, B) = (r d, d r) for each of q, v and proj: 6 r d per block;
    # qkv_proj: qkv (r d + 3 d r) and proj (r d + d r): also 6 r d, spread differently
    assert sum(p.numel() for p in params) == CFG.num_blocks * 6 * r * d


def test_lora_official_placement_adapts_q_and_v_not_k_with_scale_one_over_r() -> None:
    """apple/ml-aim's LoraAttention: loralib MergedLinear(enable_lora=[True, False, True]) on
    qkv and loralib Linear on proj, loralib's default alpha 1 (scale 1/r)."""
    torch.manual_seed(0)
    trunk = build_trunk(CFG)
    d, r = CFG.embed_dim, 4
    add_lora(trunk, r)  # the default placement is the official one
    qkv, proj = trunk.blocks[0].attn.qkv, trunk.blocks[0].attn.proj
    assert qkv.scale == pytest.approx(1 / r) and proj.scale == pytest.approx(1 / r)
    with torch.no_grad():
        for layer in (qkv, proj):
            layer.lora_b.normal_()
    x = torch.randn(5, d)
    with torch.no_grad():
        dq, dk, dv = (qkv(x) - qkv.base(x)).split(d, dim=-1)  # (5, d) each
        a, b = qkv.lora_a, qkv.lora_b  # (2, r, d), (2, d, r): q and v
        torch.testing.assert_close(dq, x @ a[0].T @ b[0].T / r)
        torch.testing.assert_close(dv, x @ a[1].T @ b[1].T / r)
        assert torch.equal(dk, torch.zeros_like(dk))  # k carries no adapter
        dp = proj(x) - proj.base(x)
        torch.testing.assert_close(dp, x @ proj.lora_a[0].T @ proj.lora_b[0].T / r)
        merged = qkv.merged()
        torch.testing.assert_close(merged(x), qkv(x), rtol=1e-5, atol=1e-5)
    ours = build_trunk(CFG)
    add_lora(ours, r, "qkv_proj")
    assert ours.blocks[0].attn.qkv.scale == 1.0


def test_lora_official_placement_trains_a_tenth_of_a_percent_of_aim_7b() -> None:
    """The paper (Section 5.5): rank 8 on AIM-7B fine-tunes ~0.1% of the trunk parameters."""
    with torch.device("meta"):
        trunk = build_trunk(ModelConfig(size="aim-7B"))
        add_lora(trunk, 8)
    assert trained_fraction(trunk) == pytest.approx(0.001, rel=0.05)


def test_embed_accepts_pil_arrays_and_patches(tmp_path) -> None:
    trunk, cfg = load_trunk(small_trunk(tmp_path))
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (3, cfg.img_size, cfg.img_size, 3), dtype=np.uint8)
    from aim_platform.data.transforms import patchify_hwc

    patches = np.stack([patchify_hwc(im, cfg.patch_size) for im in images])
    a = embed(trunk, cfg, images)
    b = embed(trunk, cfg, patches)
    assert a.shape == (3, cfg.embed_dim)
    torch.testing.assert_close(a, b)
    # PIL images of any size get the evaluation view (the validation pipeline's): resize
    # the shorter side to 37 (32 * 256 / 224) then centre crop 32
    from aim_platform.data.transforms import eval_view

    shapes = [(40, 50, 3), (49, 50, 3), (58, 50, 3)]
    pil = [Image.fromarray(rng.integers(0, 256, s, dtype=np.uint8)) for s in shapes]
    views = np.stack([eval_view(im, cfg.img_size) for im in pil])
    torch.testing.assert_close(embed(trunk, cfg, pil), embed(trunk, cfg, views))
    assert not torch.allclose(embed(trunk, cfg, pil[:1]), embed(trunk, cfg, views[1:2]))
    tokens = embed(trunk, cfg, patches, layers=[0, 1], pool=False)
    assert tokens.shape == (3, cfg.num_patches, cfg.embed_dim)
    with pytest.raises(ValueError, match="images must be"):
        embed(trunk, cfg, images[:, :8])


def test_correlation_coefficients_on_constructed_cases() -> None:
    assert pearson([1, 2, 3, 4], [2, 4, 6, 8]) == pytest.approx(1.0)
    assert pearson([1, 2, 3, 4], [8, 6, 4, 2]) == pytest.approx(-1.0)
    assert spearman([1, 2, 3, 4], [1, 8, 27, 64]) == pytest.approx(1.0)  # monotone, not linear
    assert pearson([1, 2, 3, 4], [1, 8, 27, 64]) < 0.99
    assert spearman([1, 2, 2, 3], [1, 2, 2, 3]) == pytest.approx(1.0)  # ties
    # By hand: ranks differ by d = (-1, 1, -1, 1, 0), so rho = 1 - 6 * 4 / (5 * 24) = 0.8.
    assert spearman([1, 2, 3, 4, 5], [20, 10, 40, 30, 50]) == pytest.approx(0.8)
    # Ties share their average rank: x -> (1, 2.5, 2.5, 4), y -> (1, 2, 3, 4); Pearson of
    # those ranks is 4.5 / sqrt(4.5 * 5) = sqrt(0.9).
    assert spearman([1, 5, 5, 9], [1, 2, 3, 4]) == pytest.approx(0.9**0.5)
    with warnings.catch_warnings():  # undefined is NaN, quietly (scipy would warn)
        warnings.simplefilter("error")
        assert np.isnan(pearson([1], [2])) and np.isnan(spearman([1, 1], [2, 3]))
        assert np.isnan(pearson([1, 2, 3], [4, 4, 4]))
    with pytest.raises(ValueError, match="differ in length"):
        spearman([1, 2, 3], [1, 2])
    corr = Correlation(["a", "b", "c"], [1.0, 0.8, 0.6], [0.5, 0.6, 0.7])
    assert corr.spearman == pytest.approx(-1.0) and "Spearman -1.000" in corr.table()


def test_correlate_within_gives_each_runs_coefficients_and_a_verdict_over_seeds(
    tmp_path,
) -> None:
    """Fig. 4 over seeds, as a user runs it: `aimctl correlate --within RUN...` prints each
    run's own coefficients and the mean with its interval over runs and a verdict; a run
    with too few probed checkpoints is listed but not counted."""
    from typer.testing import CliRunner

    from aim_platform import tracking
    from aim_platform.cli import app
    from aim_platform.eval.correlation import correlate_within

    uri = tracking.resolve_tracking_uri(None, str(tmp_path / "runs"))
    tracker = tracking.Tracker(uri)

    def run(name: str, points: dict[int, tuple[float, float, float]]) -> str:
        rid = tracker.start_run("fig4", name)
        for step, (loss, attentive, linear) in points.items():
            metrics = {"val/loss": loss, "probe/attentive/top1": attentive}
            tracker.log_metrics(rid, {**metrics, "probe/linear/top1": linear}, step=step)
        tracker.log_metrics(rid, {"val/loss": 0.1}, step=999)  # validated, never probed
        return rid

    # Loss falls and the attentive probe rises in every run; the linear probe is noise.
    a = run("s0", {50: (0.9, 0.30, 0.20), 100: (0.7, 0.35, 0.25), 200: (0.6, 0.37, 0.21)})
    b = run("s1", {50: (0.8, 0.31, 0.22), 100: (0.7, 0.33, 0.20), 200: (0.5, 0.38, 0.24)})
    c = run("s2", {50: (0.9, 0.32, 0.20), 100: (0.6, 0.36, 0.26), 200: (0.5, 0.39, 0.19)})
    short = run("s3", {50: (0.9, 0.10, 0.10), 100: (0.8, 0.90, 0.90)})  # 2 points: not counted

    within = correlate_within(tracker, [a, b, c, short])
    assert within.names == ["s0", "s1", "s2", "s3"]
    assert within.points["attentive"] == [3, 3, 3, 2] and within.usable("attentive") == [0, 1, 2]
    assert within.spearmans["attentive"][:3] == pytest.approx([-1.0, -1.0, -1.0])
    assert within.verdict("attentive", "spearman") == "agrees"
    assert within.verdict("attentive", "pearson") == "agrees"
    pearson_interval = within.interval("attentive", "pearson")
    assert pearson_interval is not None and pearson_interval.n == 3 and pearson_interval.high < 0
    assert within.verdict("linear", "pearson") == "inconclusive"  # signs differ over runs
    # Each run got its own coefficients logged, as `aimctl correlate RUN` would.
    assert tracker.metric_history(a, "corr/spearman") == [(0, pytest.approx(-1.0))]

    # The opposite finding is called so: accuracy falls with the loss in every run.
    up = [
        run(f"u{i}", {10: (0.9, 0.40 + i / 100, 0.3), 20: (0.7, 0.35, 0.3), 30: (0.5, 0.30, 0.3)})
        for i in range(3)
    ]
    assert correlate_within(tracker, up).verdict("attentive", "pearson") == "opposite"
    assert correlate_within(tracker, up[:1]).verdict("attentive", "pearson") == "inconclusive"

    res = CliRunner().invoke(app, ["correlate", "--within", a, b, c, short, "--tracking-uri", uri])
    assert res.exit_code == 0, res.output
    lines = res.output.splitlines()
    mean_row = next(line for line in lines if line.startswith("| mean [95% CI]"))
    assert "3 runs" in mean_row and "-1.000 [-1.000, -1.000]" in mean_row
    verdict_row = next(line for line in lines if line.startswith("| verdict"))
    assert verdict_row.count("agrees") == 2 and "inconclusive" in verdict_row
    res = CliRunner().invoke(
        app, ["correlate", "--within", a, "--log-to", b, "--tracking-uri", uri]
    )
    assert res.exit_code == 2 and "--log-to is for across runs" in res.output
    res = CliRunner().invoke(app, ["correlate", "--within", a, "deadbeef", "--tracking-uri", uri])
    assert res.exit_code == 2 and "run deadbeef: not found" in res.output, res.output


def test_probe_run_logged_to_mlflow_server_nested_under_pretraining(mlflow_server) -> None:
    from mlflow.tracking import MlflowClient

    from aim_platform import tracking
    from aim_platform.eval.correlation import correlate_run

    tracker = tracking.Tracker(mlflow_server)
    parent = tracker.start_run("probe-tests", "pretrain")
    logger = tracking.RunLogger(mlflow_server, parent)
    for step, (loss, acc) in {10: (0.9, 0.5), 20: (0.7, 0.6), 30: (0.6, 0.65)}.items():
        logger.log_metrics({"val/loss": loss}, step=step)
        report = ProbeReport(
            layers=[1],
            main={"attentive": ProbeScore(acc, 0.9)},
            per_block={"attentive": {0: ProbeScore(acc - 0.1, 0.8), 1: ProbeScore(acc, 0.9)}},
            train_images=100,
            val_images=50,
        )
        child = log_probe(
            tracker,
            report,
            ProbeConfig(),
            experiment="probe-tests",
            run_name=f"probe-{step}",
            trunk_path="/x",
            dataset="/d",
            parent_run_id=parent,
            step=step,
        )
    assert logger.close(timeout=600)[1] == []  # its queued val/loss points are written
    client = MlflowClient(tracking_uri=mlflow_server)
    run = client.get_run(child)
    assert run.data.tags["mlflow.parentRunId"] == parent
    assert run.data.metrics["probe/attentive/top1"] == pytest.approx(0.65)
    assert run.data.metrics["probe/attentive/best_block"] == 1
    assert "accuracy_per_block.png" in {a.path for a in client.list_artifacts(child)}
    corr = correlate_run(tracker, parent)
    assert corr.losses == [0.9, 0.7, 0.6] and corr.spearman == pytest.approx(-1.0)
    parent_run = client.get_run(parent)
    assert parent_run.data.metrics["corr/spearman"] == pytest.approx(-1.0)
    assert {"loss_vs_probe.png", "correlation.md"} <= {
        a.path for a in client.list_artifacts(parent)
    }
    assert set(report_metrics(report)) >= {"probe/attentive/block_0/top1", "probe/attentive/top5"}


def spiral_trunk(tmp_path) -> str:
    """A random aim-tiny-shaped trunk saved with the spiral pattern (and causal attention)."""
    model = {**CFG.model_dump(), "pattern": "spiral", "attention": "causal"}
    job = build_config(JobConfig, {"model": model})
    torch.manual_seed(0)
    path = str(tmp_path / "spiral")
    write_trunk(build_trunk(job.model).state_dict(), job, path)
    return path


def test_causal_probe_of_a_spiral_trunk_runs_in_spiral_order(tmp_path) -> None:
    """Table 3b: a spiral trunk's first spiral position (the centre patch) sees only itself
    under a causal probe, so changing a patch that comes later in the spiral but earlier in
    raster order (the top-left corner) must leave its feature unchanged."""
    from aim_platform.jobs.probe import FeatureActor
    from aim_platform.models.patterns import spiral_order

    path = spiral_trunk(tmp_path)
    order = spiral_order(CFG.grid_size)  # (K,) raster index of each spiral position
    first, corner = int(order[0]), 0  # the centre; raster 0 comes late in the spiral
    assert first != corner and int((order == corner).nonzero()) > 0
    gen = torch.Generator().manual_seed(1)
    pixels = torch.randint(0, 256, (2, CFG.num_patches, CFG.patch_dim), generator=gen)
    pixels = pixels.to(torch.uint8)
    changed = pixels.clone()
    changed[:, corner] = 255 - changed[:, corner]

    def centre_feature(batch: torch.Tensor) -> np.ndarray:
        actor = FeatureActor(path, [0, 1], "causal")
        out = actor(
            {
                "patches": list(batch.numpy()),
                "valid": np.ones(len(batch), bool),
                "label": np.zeros(len(batch), np.int64),
                "id": np.array([f"r{i}" for i in range(len(batch))]),
            }
        )
        return out["features"][:, :, first].astype(np.float32)  # (B, L, D), raster index

    np.testing.assert_array_equal(centre_feature(pixels), centre_feature(changed))
    # ... and the corner's own feature does move (the inputs really differ there).
    trunk, cfg = load_trunk(path)
    from aim_platform.eval.features import sequence_order

    a = block_outputs(trunk, pixels, [1], "causal", sequence_order(cfg))
    b = block_outputs(trunk, changed, [1], "causal", sequence_order(cfg))
    assert not torch.allclose(a[:, :, corner], b[:, :, corner])
    # In raster order (the defect) the centre would have seen the corner.
    r_a = block_outputs(trunk, pixels, [1], "causal")
    r_b = block_outputs(trunk, changed, [1], "causal")
    assert not torch.allclose(r_a[:, :, first], r_b[:, :, first])


def test_bidirectional_features_do_not_depend_on_the_sequence_order(tmp_path) -> None:
    """Run in a pattern's order, bidirectional features come back in raster order and equal
    the raster run's (each patch keeps its own position embedding)."""
    trunk, cfg = load_trunk(spiral_trunk(tmp_path))
    from aim_platform.eval.features import sequence_order

    x, _ = toy_task(4)
    spiral = block_outputs(trunk, x, [0, 1], order=sequence_order(cfg))
    raster = block_outputs(trunk, x, [0, 1])
    torch.testing.assert_close(spiral, raster, atol=1e-5, rtol=1e-5)
