"""Decode, crop, flip, patchify (no Ray): layout, determinism, image modes, bad input."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from data_helpers import bad_images, jpeg, mode_images, rgb_array
from PIL import Image

from aim_platform.config import ConfigError, DataConfig, JobConfig, build_config
from aim_platform.data import transforms as T
from aim_platform.data.pipeline import mixture_rates
from aim_platform.data.shards import split_of
from aim_platform.data.tasks import draw_counts
from aim_platform.models.layers import patchify


def test_transforms_import_without_ray() -> None:
    import subprocess
    import sys

    code = "import sys, aim_platform.data.transforms; assert 'ray' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("size,patch", [(32, 4), (224, 14), (48, 16)])
def test_patchify_hwc_matches_model_patchify(size: int, patch: int) -> None:
    img = rgb_array(size, size, seed=size)  # (S, S, 3)
    ours = T.patchify_hwc(img, patch)  # (K, P)
    ref = patchify(torch.from_numpy(img.copy()).permute(2, 0, 1)[None], patch)[0]  # (K, P)
    assert ours.dtype == np.uint8
    assert ours.shape == ((size // patch) ** 2, patch * patch * 3)
    assert np.array_equal(ours, ref.numpy())


def test_train_patches_are_patchify_of_the_crop() -> None:
    data = jpeg(120, 160, seed=1)
    ids = ["a", "b", "c"]
    patches, valid = T.decode_batch(
        ids, [data] * 3, img_size=32, patch_size=8, train=True, seed=5, epoch=2
    )
    assert valid.all() and patches.shape == (3, 16, 192) and patches.dtype == np.uint8
    for i, sid in enumerate(ids):
        img = T.train_image(data, 32, T.sample_rng(5, 2, sid))  # (32, 32, 3)
        ref = patchify(torch.from_numpy(img.copy()).permute(2, 0, 1)[None], 8)[0]
        assert np.array_equal(patches[i], ref.numpy())


def test_crops_reproducible_by_seed_and_differ_across_epochs() -> None:
    data = jpeg(120, 160, seed=2)

    def view(seed: int, epoch: int) -> np.ndarray:
        return T.train_image(data, 32, T.sample_rng(seed, epoch, "img-1"))

    assert np.array_equal(view(0, 0), view(0, 0))
    assert not np.array_equal(view(0, 0), view(0, 1))
    assert not np.array_equal(view(0, 0), view(1, 0))


def test_random_resized_crop_box_follows_scale_and_ratio() -> None:
    rng = np.random.default_rng(0)
    w, h = 1024, 768
    areas, ratios = [], []
    for _ in range(2000):
        left, top, cw, ch = T.random_resized_crop_box(w, h, rng, (0.4, 1.0), (3 / 4, 4 / 3))
        assert 0 <= left and left + cw <= w and 0 <= top and top + ch <= h
        areas.append(cw * ch / (w * h))
        ratios.append(cw / ch)
    assert 0.39 <= min(areas) and max(areas) <= 1.0
    assert min(ratios) >= 0.74 and max(ratios) <= 1.34
    assert min(areas) < 0.42 and max(areas) > 0.97  # the whole range is sampled
    left, top, cw, ch = T.random_resized_crop_box(100, 10, rng, (0.9, 1.0), (1.0, 1.0))
    assert (cw, ch) == (10, 10) and (left, top) == (45, 0)  # fallback: centred crop


def test_draft_decode_matches_full_decode() -> None:
    """JPEG draft mode maps the crop box correctly: same picture as a full-size decode."""
    data = jpeg(768, 1024, seed=3)
    for s in range(5):
        rng_a, rng_b = np.random.default_rng(s), np.random.default_rng(s)
        ours = T.train_image(data, 64, rng_a).astype(float)
        img = Image.open(io.BytesIO(data)).convert("RGB")
        left, top, w, h = T.random_resized_crop_box(*img.size, rng_b)
        ref = img.resize((64, 64), Image.BICUBIC, box=(left, top, left + w, top + h))
        if rng_b.random() < 0.5:
            ref = ref.transpose(Image.FLIP_LEFT_RIGHT)
        assert np.abs(ours - np.asarray(ref, float)).mean() < 6.0


def test_flip_probability() -> None:
    data = jpeg(64, 64, seed=4)
    never = T.train_image(data, 32, np.random.default_rng(1), flip_prob=0.0, scale=(1, 1))
    always = T.train_image(data, 32, np.random.default_rng(1), flip_prob=1.0, scale=(1, 1))
    assert np.array_equal(never[:, ::-1], always)


def official_eval_reference(img: Image.Image, size: int) -> np.ndarray:
    """apple/ml-aim's val transform written here with PIL alone: shorter side resized
    bicubically to round(size * 256 / 224) (= ceil(size / 0.875) for 32 and 224), long side
    truncated as torchvision does, then a centre crop of ``size``."""
    short = round(size * 256 / 224)
    w, h = img.size
    nw, nh = (short, short * h // w) if w <= h else (short * w // h, short)
    resized = img.convert("RGB").resize((nw, nh), Image.BICUBIC)
    left, top = int(round((nw - size) / 2.0)), int(round((nh - size) / 2.0))
    return np.asarray(resized.crop((left, top, left + size, top + size)))


@pytest.mark.parametrize("size", [32, 224])
@pytest.mark.parametrize("shape", [(300, 451), (451, 300), (260, 260), (37, 90)])
def test_eval_view_equals_official_transform(size: int, shape: tuple[int, int]) -> None:
    img = Image.fromarray(rgb_array(*shape, seed=shape[0]))
    assert T.eval_resize_size(size) == round(size * 256 / 224)
    ours = T.eval_view(img, size)
    assert ours.shape == (size, size, 3) and ours.dtype == np.uint8
    assert np.array_equal(ours, official_eval_reference(img, size))
    # not the old view (whole shorter side resized to size): the ratio is really applied
    side = min(img.size)
    box = ((img.width - side) // 2, (img.height - side) // 2)
    old = img.resize((size, size), Image.BICUBIC, box=(*box, box[0] + side, box[1] + side))
    assert not np.array_equal(ours, np.asarray(old))


def test_eval_resize_size_follows_the_official_ceil() -> None:
    assert T.eval_resize_size(224) == 256 and T.eval_resize_size(64) == 74  # ceil(73.14)
    assert T.eval_resize_size(32, crop_ratio=1.0) == 32
    with pytest.raises(ValueError, match="crop_ratio"):
        T.eval_resize_size(32, crop_ratio=0.0)


def test_val_view_is_the_eval_view_of_the_decoded_image() -> None:
    png = io.BytesIO()
    Image.fromarray(rgb_array(60, 100, seed=5)).save(png, format="PNG")
    img = Image.open(io.BytesIO(png.getvalue()))
    assert np.array_equal(T.val_image(png.getvalue(), 32), T.eval_view(img, 32))
    data = jpeg(600, 1000, seed=5)  # JPEG: decoded in draft mode, then the same view
    a, b = T.val_image(data, 32), T.val_image(data, 32)
    assert np.array_equal(a, b) and a.shape == (32, 32, 3)
    ref = T.eval_view(Image.open(io.BytesIO(data)), 32).astype(float)
    assert np.abs(a.astype(float) - ref).mean() < 3.0


@pytest.mark.parametrize("name", sorted(mode_images()))
def test_modes_are_accepted_and_converted(name: str) -> None:
    data = mode_images()[name]
    assert T.inspect_image(data) == (56, 40)
    out = T.train_image(data, 16, np.random.default_rng(0))
    assert out.shape == (16, 16, 3) and out.dtype == np.uint8
    assert 20 < out.mean() < 235  # real content, not a blank from a botched conversion


def test_sixteen_bit_is_scaled_not_clipped() -> None:
    gray = rgb_array(20, 20, 1)[..., 0]  # (H, W) uint8
    img16 = Image.fromarray(gray.astype(np.uint16) * 257)
    rgb = np.asarray(T.to_rgb(img16))  # (H, W, 3)
    assert np.array_equal(rgb[..., 0], gray) and np.array_equal(rgb[..., 2], gray)


def test_transparency_goes_over_white() -> None:
    img = Image.new("RGBA", (4, 4), (0, 0, 0, 0))
    assert np.asarray(T.to_rgb(img)).min() == 255


@pytest.mark.parametrize("name", sorted(bad_images()))
def test_bad_input_rejected_with_reason(name: str) -> None:
    data, reason = bad_images()[name]
    with pytest.raises(T.ImageRejected) as info:
        T.inspect_image(data)
    assert str(info.value).startswith(reason)


def test_pixel_limit_is_configurable() -> None:
    data = jpeg(100, 100)
    assert T.inspect_image(data, max_pixels=10_000) == (100, 100)
    with pytest.raises(T.ImageRejected, match="decompression bomb"):
        T.inspect_image(data, max_pixels=9_999)


def test_bad_image_at_decode_time_is_marked_invalid_and_dropped() -> None:
    good = jpeg(40, 40)
    images = [good, b"", good[:300], b"not an image", good]
    patches, valid = T.decode_batch(
        [str(i) for i in range(5)], images, img_size=16, patch_size=4, train=True
    )
    assert valid.tolist() == [True, False, False, False, True]
    assert not patches[~valid].any()


def test_split_is_deterministic_and_close_to_fraction() -> None:
    ids = [f"class/{i:05d}.jpg" for i in range(5000)]
    first = [split_of(i, 0.1) for i in ids]
    assert first == [split_of(i, 0.1) for i in ids]
    assert abs(first.count("val") / len(ids) - 0.1) < 0.015
    assert all(split_of(i, 0.0) == "train" for i in ids[:100])
    # Growing the fraction only moves ids from train to val.
    assert {i for i in ids if split_of(i, 0.05) == "val"} <= {
        i for i in ids if split_of(i, 0.1) == "val"
    }


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_mixture_share_within_two_points_over_10k_samples(seed: int) -> None:
    sizes = {"dfn": 3000, "imagenet": 700, "tiny": 150}
    weights = {"dfn": 0.7, "imagenet": 0.2, "tiny": 0.1}
    total = 10_000
    rates = mixture_rates(list(sizes.values()), list(weights.values()), total)
    counts = {
        name: int(
            draw_counts(
                [f"{name}/{i}" for i in range(n)], rate, seed=seed, epoch=3, source=name
            ).sum()
        )
        for (name, n), rate in zip(sizes.items(), rates, strict=True)
    }
    drawn = sum(counts.values())
    assert abs(drawn - total) < 0.02 * total
    for name, w in weights.items():
        assert abs(counts[name] / drawn - w) < 0.02, (name, counts)


def test_mixture_draws_change_with_epoch_and_repeat_small_sources() -> None:
    ids = [str(i) for i in range(1000)]
    a = draw_counts(ids, 0.5, seed=0, epoch=0, source="s")
    b = draw_counts(ids, 0.5, seed=0, epoch=1, source="s")
    assert not np.array_equal(a, b)
    assert np.array_equal(a, draw_counts(ids, 0.5, seed=0, epoch=0, source="s"))
    c = draw_counts(ids, 2.25, seed=0, epoch=0, source="s")
    assert set(np.unique(c)) == {2, 3} and abs(c.mean() - 2.25) < 0.05


def test_data_config_defaults_and_errors() -> None:
    cfg = JobConfig()
    assert cfg.data.sources[0].url == "builtin:digits" and cfg.data.crop_scale == (0.4, 1.0)
    with pytest.raises(ConfigError, match=r"data\.crop_scale: lower bound 1.5 > upper 1.0"):
        build_config(JobConfig, {"data": {"crop_scale": [1.5, 1.0]}})
    with pytest.raises(ConfigError, match=r"data\.crop_ratio: lower bound 2"):
        build_config(JobConfig, {"data": {"crop_ratio": [2, 1]}})
    with pytest.raises(ConfigError, match=r"data\.sources\.0\.weight"):
        build_config(JobConfig, {"data": {"sources": [{"url": "x", "weight": 0}]}})
    with pytest.raises(ConfigError, match=r"data\.sources: names"):
        build_config(JobConfig, {"data": {"sources": [{"url": "a/x"}, {"url": "b/x"}]}})
    with pytest.raises(ConfigError, match=r"data\.shuffle"):
        build_config(JobConfig, {"data": {"shuffle": 3}})
    mixed = DataConfig(sources=[{"url": "s3://b/dfn", "weight": 0.8}, {"url": "/d/in1k"}])
    assert [s.source_name for s in mixed.sources] == ["dfn", "in1k"]


def test_benchmark_compares_like_with_like() -> None:
    """``aimctl bench data`` times two paths that produce the same picture (same crop box)."""
    from aim_platform.bench.data import baseline_image, make_jpegs, ours_image

    for data in make_jpegs(3):
        assert Image.open(io.BytesIO(data)).size in {(1024, 768), (768, 1024)}
        ours = ours_image(data, 224, np.random.default_rng(1)).astype(float)
        base = baseline_image(data, 224, np.random.default_rng(1)).astype(float)
        assert ours.shape == base.shape == (224, 224, 3)
        assert np.abs(ours - base).mean() < 6.0
