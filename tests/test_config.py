"""Config loading, overrides and the errors a user sees for impossible values."""

from __future__ import annotations

import pytest

from aim_platform.config import (
    ConfigError,
    JobConfig,
    ModelConfig,
    apply_overrides,
    build_config,
    dump_config,
    flatten,
    load_config,
)


def test_size_fills_shapes_and_explicit_fields_win() -> None:
    cfg = ModelConfig(size="aim-600M")
    assert (cfg.embed_dim, cfg.num_blocks, cfg.num_heads, cfg.num_patches) == (1536, 24, 12, 256)
    assert (cfg.head.num_blocks, cfg.head.width) == (12, 2048)
    cfg = ModelConfig(size="aim-tiny", embed_dim=64, head={"kind": "none"})
    assert cfg.embed_dim == 64 and cfg.head.kind == "none"
    assert cfg.head.width == 256  # still filled from the size


def test_yaml_and_overrides(tmp_path) -> None:
    path = tmp_path / "job.yaml"
    path.write_text("name: exp1\nmodel:\n  size: aim-tiny\n  pattern: spiral\n")
    cfg = load_config(path, ["model.head.num_blocks=3", "seed=7", "model.pattern=checkerboard"])
    assert cfg.name == "exp1" and cfg.seed == 7
    assert cfg.model.head.num_blocks == 3 and cfg.model.pattern == "checkerboard"
    # round trip through YAML keeps every value
    again = tmp_path / "again.yaml"
    again.write_text(dump_config(cfg))
    assert load_config(again) == cfg


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        (["model.embed_dim=100", "model.num_heads=3"], "model.embed_dim"),
        (["model.img_size=30"], "model.img_size"),
        (["model.prefix_min=0"], "model.prefix_min"),
        (["model.prefix_max=64"], "model.prefix_max"),  # aim-tiny has K=64: S <= 63
        (["model.prefix_min=10", "model.prefix_max=5"], "model.prefix_min"),
        (["model.colour=red"], "model.colour"),
        (["model.head.kind=giant"], "model.head.kind"),
        (["model.size=aim-huge"], "model.size"),
        (["model.attention=bidirectional"], "model.attention"),
        (
            ["model.head.kind=transformer", "model.head.width=100", "model.head.num_heads=3"],
            "model.head.width",
        ),
        (["trainer=fast"], "trainer"),
    ],
)
def test_impossible_values_name_the_field(overrides: list[str], field: str) -> None:
    with pytest.raises(ConfigError) as info:
        build_config(JobConfig, {}, overrides)
    assert f"{field}:" in str(info.value)


def test_override_errors() -> None:
    with pytest.raises(ConfigError, match="key.path=value"):
        apply_overrides({}, ["model.size"])
    with pytest.raises(ConfigError, match="is a value, not a section"):
        apply_overrides({"seed": 1}, ["seed.x=2"])


def test_bad_files(tmp_path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("- a list\n- not a mapping\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(bad)
    broken = tmp_path / "broken.yaml"
    broken.write_text("model: {size: [\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(broken)


def test_flatten() -> None:
    assert flatten({"a": {"b": 1, "c": {"d": 2}}, "e": 3}) == {"a.b": 1, "a.c.d": 2, "e": 3}
