"""Parity with the official AIM v1 code, through the converter and its command."""

from __future__ import annotations

import torch
from typer.testing import CliRunner

from aim_platform.cli import app
from aim_platform.models.interop import load_converted, load_ml_aim_v1
from aim_platform.models.layers import patchify
from aim_platform.selfcheck import ml_aim_parity, reference_path


def test_block_outputs_and_logits_match_official_code() -> None:
    ref = torch.load(reference_path(), weights_only=True)
    model = load_ml_aim_v1(ref["state_dict"], **ref["ml_aim_config"])
    patches = patchify(ref["images"], 14)
    with torch.no_grad():
        _, blocks = model.trunk(patches)
        probe_input = model.trunk.features(patches, model.layers)
        logits = model(ref["images"])
    assert (torch.stack(blocks) - ref["block_features"]).abs().max() < 1e-5
    assert (probe_input - ref["probe_input"]).abs().max() < 1e-5
    assert (logits - ref["logits"]).abs().max() < 1e-4
    assert ml_aim_parity().ok


def test_converter_rejects_foreign_state_dicts() -> None:
    ref = torch.load(reference_path(), weights_only=True)
    sd = dict(ref["state_dict"])
    sd["trunk.blocks.9.attn.qkv.weight"] = torch.zeros(1)
    try:
        load_ml_aim_v1(sd, **ref["ml_aim_config"])
    except ValueError as exc:
        assert "unexpected" in str(exc)
    else:
        raise AssertionError("a foreign key was accepted")
    sd = {k: v for k, v in ref["state_dict"].items() if "blocks.3" not in k}
    try:
        load_ml_aim_v1(sd, **ref["ml_aim_config"])
    except ValueError as exc:
        assert "missing" in str(exc)
    else:
        raise AssertionError("a missing block was accepted")


def test_convert_command_round_trip(tmp_path) -> None:
    out = tmp_path / "converted.pt"
    result = CliRunner().invoke(app, ["convert-ml-aim", reference_path(), str(out)])
    assert result.exit_code == 0, result.output
    ref = torch.load(reference_path(), weights_only=True)
    model = load_converted(out)
    with torch.no_grad():
        assert (model(ref["images"]) - ref["logits"]).abs().max() < 1e-4
    bad = tmp_path / "bad.pt"
    torch.save({"weights": 1}, bad)
    result = CliRunner().invoke(app, ["convert-ml-aim", str(bad), str(tmp_path / "x.pt")])
    assert result.exit_code == 2 and "ml_aim_config" in result.output
