"""Objectives the studies need: k-means tokens (Table 3a) and masked image modelling (Table 5)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from model_helpers import random_pixels, tiny

from aim_platform.config import (
    ConfigError,
    DataConfig,
    DataSource,
    JobConfig,
    build_config,
)
from aim_platform.jobs.tokenizer import fit_tokenizer, resolve_tokenizer
from aim_platform.models import (
    AIMForPretraining,
    Tokenizer,
    assign_tokens,
    fit_tokenizer_from_arrays,
    kmeans,
    masked_patch_loss,
    next_token_loss,
    normalize_patches,
    pixels_to_input,
    sample_mask,
)
from aim_platform.models.tokenizer import (
    load_codebook,
    nearest_centroid,
    patch_vectors,
    read_metadata,
)

V = 16  # codebook size of the token tests


def blob_patches(n: int, centres: int, patch_dim: int = 48, seed: int = 0) -> torch.Tensor:
    """uint8 patches around ``centres`` well-separated prototypes (small noise)."""
    gen = torch.Generator().manual_seed(seed)
    protos = torch.randint(0, 256, (centres, patch_dim), generator=gen).float()  # (C, P)
    which = torch.randint(0, centres, (n,), generator=gen)  # (N,)
    noise = torch.randn(n, patch_dim, generator=gen) * 3  # (N, P)
    return (protos[which] + noise).clamp(0, 255).to(torch.uint8)  # (N, P)


@pytest.fixture(scope="module")
def codebook_url(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A small fitted codebook (V tokens of 48 values) saved to a local file."""
    tok = fit_tokenizer_from_arrays(blob_patches(600, 24), num_tokens=V, iters=5, seed=0)
    return tok.save(str(tmp_path_factory.mktemp("tok") / "codebook.safetensors"))


def token_model(codebook_url: str, **kw) -> AIMForPretraining:
    return AIMForPretraining(tiny(target="tokens", tokenizer=codebook_url, num_tokens=V, **kw))


# -- k-means tokenizer -----------------------------------------------------------------------


def test_nearest_centroid_matches_brute_force() -> None:
    gen = torch.Generator().manual_seed(0)
    x, c = torch.randn(300, 12, generator=gen), torch.randn(37, 12, generator=gen)
    ids, d2 = nearest_centroid(x, c, chunk=64)  # several chunks
    brute = (x[:, None, :] - c[None, :, :]).pow(2).sum(-1)  # (N, V)
    torch.testing.assert_close(d2, brute.min(dim=1).values, rtol=1e-4, atol=1e-4)
    assert torch.equal(ids, brute.argmin(dim=1))
    # the Tokenizer assigns (B, K, P) vectors the same way, keeping the leading shape
    tok = Tokenizer(c)
    assert torch.equal(tok.assign(x.reshape(3, 100, 12)), ids.reshape(3, 100))


def test_encode_is_nearest_centroid_of_normalized_patches() -> None:
    tok = fit_tokenizer_from_arrays(blob_patches(200, 5), num_tokens=5, iters=3, seed=1)
    pixels = blob_patches(2 * 64, 5, seed=9).reshape(2, 64, 48)
    vec = normalize_patches(pixels_to_input(pixels))  # (B, K, P), the normalized-pixel target
    brute = (vec[..., None, :] - tok.codebook).pow(2).sum(-1)  # (B, K, V)
    assert torch.equal(tok.encode(pixels), brute.argmin(dim=-1))


def test_fit_is_seeded_and_lowers_the_error() -> None:
    patches = blob_patches(500, 6)
    a = fit_tokenizer_from_arrays(patches, num_tokens=8, iters=10, seed=3)
    b = fit_tokenizer_from_arrays(patches, num_tokens=8, iters=10, seed=3)
    c = fit_tokenizer_from_arrays(patches, num_tokens=8, iters=10, seed=4)
    assert torch.equal(a.codebook, b.codebook)
    assert not torch.equal(a.codebook, c.codebook)
    assert a.codebook.dtype == torch.float32 and a.codebook.shape == (8, 48)
    assert 1 <= a.fitted_on["iterations"] <= 10
    # six tight blobs, eight centroids: the error ends near the noise, far below one centroid
    one = kmeans(patch_vectors(patches), 1, iters=2, seed=0).inertia
    assert a.fitted_on["inertia"] < 0.05 * one


def test_converged_kmeans_centroids_are_the_means_of_their_rows() -> None:
    """Lloyd's fixed point: each row's nearest centroid (assigned in torch, as training
    does) is the one whose mean it belongs to, and the inertia is that assignment's error."""
    x = torch.randn(400, 8, generator=torch.Generator().manual_seed(0))  # no clusters at all
    result = kmeans(x, 10, iters=300, seed=0)
    assert result.iterations < 300  # converged: no row changed cluster in the last iteration
    ids, d2 = nearest_centroid(x, result.centroids)  # (N,), (N,)
    assert torch.bincount(ids, minlength=10).min() > 0
    means = torch.zeros(10, 8).index_add_(0, ids, x) / torch.bincount(ids)[:, None]  # (V, P)
    torch.testing.assert_close(result.centroids, means, rtol=1e-4, atol=1e-4)
    assert result.inertia == pytest.approx(float(d2.mean()), rel=1e-4)
    fewer = kmeans(x, 10, iters=1, seed=0)  # the seeds after one Lloyd step
    assert result.inertia < fewer.inertia
    with pytest.raises(ValueError, match="num_tokens"):
        kmeans(x[:5], 10)


def test_codebook_save_load_round_trip(tmp_path: Path) -> None:
    tok = fit_tokenizer_from_arrays(blob_patches(100, 4), num_tokens=4, iters=2, seed=0)
    url = tok.save(str(tmp_path / "sub" / "codebook.safetensors"))
    data = Path(url).read_bytes()
    meta = read_metadata(data)
    assert meta["num_tokens"] == "4" and meta["patch_dim"] == "48"
    back = Tokenizer.load(url)
    assert torch.equal(back.codebook, tok.codebook) and back.eps == tok.eps
    assert back.fitted_on == tok.fitted_on and back.fitted_on["patches"] == 100
    with pytest.raises(ValueError, match="tokenizer: .* 4 tokens"):
        load_codebook(url, num_tokens=8, patch_dim=48)
    with pytest.raises(ValueError, match="auto"):
        Tokenizer.load("auto")
    with pytest.raises(FileNotFoundError, match="tokenizer"):
        Tokenizer.load(str(tmp_path / "missing.safetensors"))
    with pytest.raises(ValueError, match="format"):
        Tokenizer.from_bytes(data.replace(b"kmeans-codebook-v1", b"kmeans-codebook-v9"))


# -- configuration ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        (["model.target=tokens"], "model.tokenizer"),
        (["model.tokenizer=/x/codebook.safetensors"], "model.tokenizer"),
        (["model.attention=bidirectional"], "model.attention"),
        (["model.objective=masked"], "model.attention"),
        (["model.objective=masked", "model.attention=causal"], "model.attention"),
        (
            ["model.objective=masked", "model.attention=bidirectional", "model.pattern=spiral"],
            "model.pattern",
        ),
        (["model.mask_ratio=1.0"], "model.mask_ratio"),
        (["model.mask_ratio=0"], "model.mask_ratio"),
        (["model.objective=mae"], "model.objective"),
        (["model.num_tokens=1"], "model.num_tokens"),
    ],
)
def test_objective_config_errors_name_the_field(overrides: list[str], field: str) -> None:
    with pytest.raises(ConfigError) as info:
        build_config(JobConfig, {}, overrides)
    assert f"{field}:" in str(info.value)


def test_auto_tokenizer_validates_without_a_file_but_cannot_build_a_model() -> None:
    job = build_config(JobConfig, {}, ["model.target=tokens", "model.tokenizer=auto"])
    assert job.model.tokenizer == "auto"
    masked = build_config(
        JobConfig, {}, ["model.objective=masked", "model.attention=bidirectional"]
    )
    assert masked.model.mask_ratio == 0.75
    with pytest.raises(ValueError, match="auto"):
        AIMForPretraining(tiny(target="tokens", tokenizer="auto", num_tokens=V))


# -- discrete-token target --------------------------------------------------------------------


def test_token_loss_is_cross_entropy_after_the_prefix_only() -> None:
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 8, 5, generator=gen)  # (B, K, V)
    ids = torch.randint(0, 5, (3, 8), generator=gen)  # (B, K)
    prefix = torch.tensor([1, 3, 7])
    out = next_token_loss(logits, ids, prefix)
    terms = [
        F.cross_entropy(logits[b, t - 1], ids[b, t])  # prediction t-1 targets patch t
        for b, s in enumerate(prefix.tolist())
        for t in range(s, 8)
    ]
    torch.testing.assert_close(out.loss, torch.stack(terms).mean())
    # logits that predict prefix patches (t < S) carry no loss
    bad = logits.clone()
    bad[1, :2] += torch.randn(2, 5, generator=gen) * 10  # S=3: predictions of patches 1, 2
    bad[2, :6] += torch.randn(6, 5, generator=gen) * 10  # S=7: predictions of patches 1..6
    torch.testing.assert_close(next_token_loss(bad, ids, prefix).loss, out.loss)
    bad[2, 6] += torch.randn(5, generator=gen) * 10  # predicts patch 7 >= S: counted
    assert not torch.isclose(next_token_loss(bad, ids, prefix).loss, out.loss)
    torch.testing.assert_close(out.per_position.sum() / out.per_position_count.sum(), out.loss)
    assert out.per_position_count.tolist() == [0, 1, 1, 2, 2, 2, 2, 3]


def test_token_model_predicts_the_next_patch_token(codebook_url: str) -> None:
    model = token_model(codebook_url).eval()
    tok = Tokenizer.load(codebook_url)
    assert torch.equal(model.codebook, tok.codebook)
    assert "codebook" not in model.state_dict()  # read from cfg.tokenizer, not checkpointed
    pixels = random_pixels(2, model.cfg)
    prefix = torch.tensor([5, 40])
    with torch.no_grad():
        got = model.loss(pixels, prefix)
        logits = model(pixels_to_input(pixels), prefix_len=prefix)  # (B, K, V)
    assert logits.shape == (2, 64, V)
    ids = tok.encode(pixels)  # (B, K): nearest centroid of each normalized patch
    terms = [
        F.cross_entropy(logits[b, t - 1], ids[b, t])
        for b, s in enumerate(prefix.tolist())
        for t in range(s, 64)
    ]
    torch.testing.assert_close(got.loss, torch.stack(terms).mean(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("head", ["mlp", "transformer"])
def test_token_head_never_sees_its_target(codebook_url: str, head: str) -> None:
    model = token_model(
        codebook_url, head={"kind": head, "num_blocks": 1, "width": 32}, pattern="spiral"
    ).eval()
    k, p = model.cfg.num_patches, model.cfg.patch_dim
    gen = torch.Generator().manual_seed(1)
    for _ in range(3):
        tokens = torch.randn(2, k, p, generator=gen)  # (B, K, P) sequence order
        prefix = torch.randint(1, k // 2, (2,), generator=gen)
        j = int(prefix.max()) + int(torch.randint(0, k - 1 - int(prefix.max()), (1,)))
        changed = tokens.clone()
        changed[:, j] += torch.randn(2, p, generator=gen) * 3
        with torch.no_grad():
            before = model(tokens, model.order, prefix)  # (B, K, V)
            after = model(changed, model.order, prefix)
        torch.testing.assert_close(after[:, :j], before[:, :j], rtol=0, atol=1e-5)
        assert (after[:, j:] - before[:, j:]).abs().max() > 1e-4


def test_token_ids_are_computed_in_float32_under_autocast(codebook_url: str) -> None:
    """bf16 distances cannot separate close centroids: assignment runs with autocast off."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 64, 48, generator=gen)  # (B, K, P)
    close = x[0, :1] + 0.05 * torch.randn(32, 48, generator=gen)  # (V, P) near-ties
    brute = (x[..., None, :] - close).pow(2).sum(-1).argmin(dim=-1)  # (B, K)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = assign_tokens(x, close)
        model = token_model(codebook_url)
        ids = model.targets(pixels_to_input(random_pixels(2, model.cfg)))
    assert got.dtype == torch.int64 and torch.equal(got, brute)
    assert torch.equal(ids, model.targets(pixels_to_input(random_pixels(2, model.cfg))))


def test_token_model_every_parameter_gets_a_gradient(codebook_url: str) -> None:
    model = token_model(codebook_url, head={"kind": "transformer", "num_blocks": 1, "width": 32})
    out = model.loss(random_pixels(2, model.cfg), torch.tensor([2, 30]))
    out.loss.backward()
    assert torch.isfinite(out.loss)
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert all(n != "codebook" for n, _ in model.named_parameters())


# -- masked image modelling ------------------------------------------------------------------


def masked_model(**kw) -> AIMForPretraining:
    return AIMForPretraining(tiny(objective="masked", attention="bidirectional", **kw))


@pytest.mark.parametrize("ratio", [0.5, 0.75, 0.3])
def test_mask_ratio_is_respected(ratio: float) -> None:
    mask = sample_mask(8, 64, ratio, torch.Generator().manual_seed(0))  # (B, K)
    assert mask.dtype == torch.bool and mask.shape == (8, 64)
    assert mask.sum(dim=1).tolist() == [round(ratio * 64)] * 8
    assert len({tuple(row.tolist()) for row in mask}) == 8  # a fresh mask per sample
    again = sample_mask(8, 64, ratio, torch.Generator().manual_seed(0))
    assert torch.equal(mask, again)
    # the model draws the same masks from the same generator: one counted target per masked
    model = masked_model(mask_ratio=ratio)
    out = model.loss(random_pixels(8, model.cfg), generator=torch.Generator().manual_seed(0))
    assert out.per_position_count.sum().item() == 8 * round(ratio * 64)
    torch.testing.assert_close(out.per_position_count, mask.sum(dim=0).float())


def test_masked_loss_counts_masked_patches_only() -> None:
    gen = torch.Generator().manual_seed(0)
    pred, target = torch.randn(2, 16, 6, generator=gen), torch.randn(2, 16, 6, generator=gen)
    masked = sample_mask(2, 16, 0.5, torch.Generator().manual_seed(1))
    out = masked_patch_loss(pred, target, masked)
    want = (pred - target).pow(2).mean(-1)[masked].mean()
    torch.testing.assert_close(out.loss, want)
    visible = target.clone()
    visible[~masked] += 5.0  # the targets of visible patches: no effect
    torch.testing.assert_close(masked_patch_loss(pred, visible, masked).loss, out.loss)
    hidden = target.clone()
    b, t = masked.nonzero()[0].tolist()
    hidden[b, t] += 5.0  # the target of one masked patch: counted
    assert masked_patch_loss(pred, hidden, masked).loss > out.loss + 0.1


def test_masked_model_loss_is_mse_on_masked_normalized_patches() -> None:
    model = masked_model().eval()
    pixels = random_pixels(3, model.cfg)
    with torch.no_grad():
        got = model.loss(
            pixels, torch.tensor([1, 2, 3]), generator=torch.Generator().manual_seed(4)
        )
        masked = sample_mask(3, 64, 0.75, torch.Generator().manual_seed(4))
        x = pixels_to_input(pixels)
        pred = model(x, masked=masked)  # (B, K, P): each position predicts its own patch
    err = (pred - normalize_patches(x)).pow(2).mean(-1)  # (B, K)
    torch.testing.assert_close(got.loss, err[masked].mean(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("head", ["mlp", "transformer"])
def test_masked_pixels_never_reach_the_model(head: str) -> None:
    """Replacing the pixels of masked patches changes no output; a visible patch reaches every
    position (bidirectional attention, also in a transformer head)."""
    model = masked_model(head={"kind": head, "num_blocks": 1, "width": 32}).eval()
    pixels = random_pixels(3, model.cfg)
    masked = sample_mask(3, 64, 0.75, torch.Generator().manual_seed(2))  # (B, K)
    noise = random_pixels(3, model.cfg, seed=5)
    swapped = torch.where(masked.unsqueeze(-1), noise, pixels)  # masked patches' pixels differ
    assert not torch.equal(swapped, pixels)
    with torch.no_grad():
        before = model(pixels_to_input(pixels), masked=masked)
        after = model(pixels_to_input(swapped), masked=masked)
    assert torch.equal(before, after)
    b, t = (~masked).nonzero()[-1].tolist()  # a visible patch late in a sequence
    moved = pixels.clone()
    moved[b, t] = 255 - moved[b, t]
    with torch.no_grad():
        out = model(pixels_to_input(moved), masked=masked)
    assert (out[b, 0] - before[b, 0]).abs().max() > 1e-5  # reaches position 0 before it
    with pytest.raises(ValueError, match="masked"):
        model(pixels_to_input(pixels))
    feats = torch.randn(1, 64, 32)  # (B, K, D): the head alone attends both ways too
    later = feats.clone()
    later[:, -1] += 1.0
    with torch.no_grad():
        moved_head = (model.head(later) - model.head(feats))[:, 0].abs().max()
    assert (moved_head > 1e-5) == (head == "transformer")  # the MLP head is per patch


def test_masked_every_parameter_gets_a_gradient() -> None:
    model = masked_model(head={"kind": "transformer", "num_blocks": 1, "width": 32})
    assert model.mask_token is not None and model.mask_token.shape == (32,)
    out = model.loss(random_pixels(2, model.cfg), torch.tensor([2, 30]))
    out.loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert AIMForPretraining(tiny()).mask_token is None  # only the masked objective has one


def test_masked_objective_with_token_target(codebook_url: str) -> None:
    model = AIMForPretraining(
        tiny(
            objective="masked",
            attention="bidirectional",
            target="tokens",
            tokenizer=codebook_url,
            num_tokens=V,
        )
    ).eval()
    pixels = random_pixels(2, model.cfg)
    with torch.no_grad():
        got = model.loss(pixels, generator=torch.Generator().manual_seed(0))
        masked = sample_mask(2, 64, 0.75, torch.Generator().manual_seed(0))
        logits = model(pixels_to_input(pixels), masked=masked)  # (B, K, V)
    ids = Tokenizer.load(codebook_url).encode(pixels)  # (B, K)
    want = F.cross_entropy(logits[masked], ids[masked])
    torch.testing.assert_close(got.loss, want, rtol=1e-5, atol=1e-6)


# -- the offline job and its CLI ---------------------------------------------------------------


def test_fit_tokenizer_job_cli_and_auto(ray_session, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from aim_platform.cli import app
    from aim_platform.jobs.ingest import ingest

    root = str(tmp_path / "d")
    ingest("builtin:digits", root, image_size=32, val_fraction=0.2, shard_size_mb=1)
    data = DataConfig(sources=[DataSource(url=root)])
    cfg = tiny()
    out = fit_tokenizer(
        data, cfg, str(tmp_path / "tok.safetensors"), num_tokens=8, max_patches=1000, iters=3
    )
    tok = Tokenizer.load(out)
    assert (tok.num_tokens, tok.patch_dim) == (8, 48)
    assert tok.fitted_on["patches"] == 1000 and tok.fitted_on["images"] >= 1000 // 64
    assert tok.fitted_on["sources"] == [root] and tok.fitted_on["img_size"] == 32
    model = AIMForPretraining(tiny(target="tokens", tokenizer=out, num_tokens=8))
    assert torch.isfinite(model.loss(random_pixels(2, cfg), torch.tensor([1, 9])).loss)

    cli_out = tmp_path / "cli" / "codebook.safetensors"
    args = ["tokenizer-fit", root, str(cli_out), "--num-tokens", "4", "--max-patches", "300"]
    result = CliRunner().invoke(app, [*args, "--size", "32", "--iters", "2"])
    assert result.exit_code == 0, result.output
    assert "4 tokens" in result.output
    assert Tokenizer.load(str(cli_out)).num_tokens == 4
    bad = CliRunner().invoke(app, [*args, "--size", "30"])  # 30 px is not a multiple of 4
    assert bad.exit_code == 2 and "img_size" in bad.output

    # what the launcher does with `model.tokenizer=auto`: fit once, then reuse
    auto = tiny(target="tokens", tokenizer="auto", num_tokens=8)
    run_url = str(tmp_path / "run" / "tokenizer.safetensors")
    resolved = resolve_tokenizer(auto, data, run_url, max_patches=600)
    assert resolved.tokenizer == run_url and Tokenizer.load(run_url).fitted_on["patches"] == 600
    stamp = Path(run_url).stat().st_mtime_ns
    assert resolve_tokenizer(auto, data, run_url).tokenizer == run_url
    assert Path(run_url).stat().st_mtime_ns == stamp  # reused, not refitted
    assert resolve_tokenizer(tiny(), data, run_url) == tiny()
