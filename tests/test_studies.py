"""Ray Tune ablation studies: specs validate, tiny presets run to a table in MLflow."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

from aim_platform.config import ConfigError
from aim_platform.tune.studies import STUDIES_DIR, load_study, run_study

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


def _check_study(result, variants: list[str]) -> MlflowClient:
    client = MlflowClient(tracking_uri=result.tracking_uri)
    parent = client.get_run(result.parent_run_id)
    assert parent.info.status == "FINISHED"
    assert parent.data.tags["git_commit"] and parent.data.tags["kind"] == "study"
    kind = client.get_experiment(parent.info.experiment_id).tags["mlflow.experimentKind"]
    assert kind == "custom_model_development"  # the UI opens on runs, not GenAI traces
    assert [t.variant for t in result.trials] == variants
    assert all(t.error is None and t.run_id for t in result.trials)
    for t in result.trials:  # a child run per trial, nested under the study's run
        child = client.get_run(t.run_id)
        assert child.data.tags["mlflow.parentRunId"] == result.parent_run_id
        assert child.data.tags["variant"] == t.variant
        assert t.variant in child.info.run_name and child.data.tags["git_commit"]
        assert [d.dataset.name for d in child.inputs.dataset_inputs] == ["digits"]
        assert "probe/attentive/top1" in child.data.metrics
        assert "probe/linear/top1" in child.data.metrics
    rows = result.table()
    assert rows[0] == ["probe", *variants] and [r[0] for r in rows[1:]] == ["linear", "attentive"]
    for row in rows[1:]:
        assert sum(cell.endswith("*") for cell in row[1:]) >= 1  # best marked
    artifacts = {a.path for a in client.list_artifacts(result.parent_run_id)}
    assert {"table.md", "table.csv", "loss_per_chunk.png"} <= artifacts
    assert "correlation_across_runs.md" in artifacts
    return client


@pytest.mark.slow
def test_pattern_study_tiny_runs(ray_session, tmp_path) -> None:
    spec = load_study(STUDIES_DIR / "pattern.yaml")
    result = run_study(spec, "tiny", storage=str(tmp_path))
    _check_study(result, ["raster", "spiral", "checkerboard", "random"])
    assert "Table 3b" in result.markdown()


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
