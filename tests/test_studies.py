"""Ray Tune ablation studies: specs validate, tiny presets run to a table in MLflow."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

from aim_platform.config import ConfigError
from aim_platform.jobs.study import STUDIES_DIR, load_study, run_study

SPECS = sorted(p for p in STUDIES_DIR.glob("*.yaml") if p.name != "base.yaml")


def test_the_paper_tables_are_all_there() -> None:
    tables = {load_study(p).table for p in SPECS}
    assert {"3b", "3c", "3d", "3e", "4"} <= tables


@pytest.mark.parametrize("path", SPECS, ids=lambda p: p.stem)
def test_every_study_spec_validates_at_every_scale(path: Path) -> None:
    spec = load_study(path)
    for scale in spec.scales:
        for variant in spec.variants:
            job = spec.job(variant, scale)
            assert job.name == f"{spec.name}-{scale}-{variant}"
    paper = spec.job(next(iter(spec.variants)), "paper")
    assert paper.model.embed_dim == 1536 and paper.train.use_gpu


def test_bad_specs_fail_clearly(tmp_path) -> None:
    base = {"name": "x", "table": "3b", "defaults": str(STUDIES_DIR / "base.yaml")}
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({**base, "variants": {"a": ["model.colour=red"], "b": []}}))
    with pytest.raises(ConfigError, match="model.colour"):
        load_study(bad)
    bad.write_text(
        yaml.safe_dump({**base, "variants": {"a": [], "b": []}, "scales": {}} | {"defaults": None})
    )
    with pytest.raises(ConfigError):
        load_study(bad)
    with pytest.raises(ConfigError, match="does not exist"):
        load_study(tmp_path / "missing.yaml")


@pytest.mark.slow
def test_a_failed_trial_is_reported_not_fatal(ray_session, tmp_path) -> None:
    spec_path = tmp_path / "fails.yaml"
    spec_path.write_text(
        yaml.safe_dump(
            {
                "name": "fails",
                "table": "3e",
                "description": "one trial cannot read its data",
                "defaults": str(STUDIES_DIR / "base.yaml"),
                "variants": {
                    "ok": [],
                    "broken": [f"data.sources=[{{url: {tmp_path / 'nothing'}}}]"],
                },
            }
        )
    )
    result = run_study(load_study(spec_path), "tiny", storage=str(tmp_path / "runs"))
    by = {t.variant: t for t in result.trials}
    assert by["ok"].error is None and by["broken"].error
    header, linear = result.table()[:2]
    assert linear[header.index("broken")] == "failed"
    assert linear[header.index("ok")].endswith("*")
    client = MlflowClient(tracking_uri=result.tracking_uri)
    assert "failed.broken" in client.get_run(result.parent_run_id).data.tags
