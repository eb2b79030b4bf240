"""Ray Tune ablation studies: specs validate, tiny presets run to a table in MLflow."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from aim_platform.config import ConfigError
from aim_platform.jobs.study_spec import STUDIES_DIR, load_study
from aim_platform.jobs.study_table import StudyResult, TrialOutcome

SPECS = sorted(p for p in STUDIES_DIR.glob("*.yaml") if p.name != "base.yaml")


def test_the_paper_tables_are_all_there() -> None:
    tables = {load_study(p).table for p in SPECS}
    assert {"3b", "3c", "3d", "3e", "4"} <= tables


@pytest.mark.parametrize("path", SPECS, ids=lambda p: p.stem)
def test_every_study_spec_validates_at_every_scale(path: Path) -> None:
    spec = load_study(path)
    for scale in spec.scales:
        for variant in spec.variants:
            job = spec.job(variant, scale, allow_placeholders=True)
            assert job.name == f"{spec.name}-{scale}-{variant}"
    first = next(iter(spec.variants))
    paper = spec.job(first, "paper", allow_placeholders=True)
    assert paper.model.embed_dim == 1536 and paper.train.use_gpu
    # Section 5.2: the ablations pre-train and probe on IN-1k, a URL the user must set.
    assert [s.source_name for s in paper.data.sources] == ["in1k"] and paper.probe.dataset is None
    with pytest.raises(ConfigError, match=r"data\.sources\.0\.url: is a placeholder.*--set"):
        spec.job(first, "paper")
    job = spec.job(first, "paper", ["data.sources.0.url=s3://bucket/in1k"])
    assert job.data.sources[0].url == "s3://bucket/in1k" and job.data.sources[0].name == "in1k"


# Paper numbers copied from the text (table named in each spec): spot checks per table.
PAPER = {
    "pattern": ("raster", 69.5, 77.4),
    "crop_scale": ("s1.0", 49.6, 63.5),
    "head": ("transformer", 70.5, 78.5),
    "head_shape": ("depth.half", 65.3, 76.2),
    "masked": ("masked-0.5", None, 70.3),
}


@pytest.mark.parametrize("name", sorted(PAPER))
def test_spec_holds_the_paper_numbers_and_the_table_shows_them(name: str) -> None:
    spec = load_study(STUDIES_DIR / f"{name}.yaml")
    variant, linear, attentive = PAPER[name]
    assert spec.paper["attentive"][variant] == attentive
    assert spec.paper.get("linear", {}).get(variant) == linear
    ours = {"probe/linear/top1": 0.5, "probe/attentive/top1": 0.6}
    result = StudyResult(spec, "tiny", None, "", [TrialOutcome(variant, "r", ours)])
    md = result.markdown().splitlines()
    col = 1 + list(spec.variants).index(variant)
    paper_att = next(line for line in md if line.startswith("| paper (attentive)"))
    assert paper_att.strip("| ").split(" | ")[col] == f"{attentive:.1f}"
    rows = {r[0]: r for r in csv_rows(result.csv())}
    assert rows["paper (attentive)"][col] == f"{attentive:.1f}"
    assert rows["attentive"][col] == "60.0*"  # ours beside the paper's
    assert ("paper (linear)" in rows) == (linear is not None)


def csv_rows(text: str) -> list[list[str]]:
    import csv
    import io

    return list(csv.reader(io.StringIO(text)))


def test_tables_without_numbers_in_the_text_say_so() -> None:
    for name in ("targets", "attention"):  # Tables 3a and 3d are images in our text
        spec = load_study(STUDIES_DIR / f"{name}.yaml")
        md = StudyResult(spec, "tiny", None, "", []).markdown()
        assert "paper (" not in md and "has no numbers" in md


@pytest.mark.parametrize("scale", ["tiny", "small", "cifar10", "paper"])
def test_head_shape_is_two_sweeps_at_every_scale(scale: str) -> None:
    """Table 4: widths 1/4, 1/2, 1 of the full head at full depth; depths 1/2, 2/3, 1 at
    full width; the paper scale has the paper's values."""
    spec = load_study(STUDIES_DIR / "head_shape.yaml")
    heads = {v: spec.job(v, scale, allow_placeholders=True).model.head for v in spec.variants}
    shapes = {v: (h.width, h.num_blocks) for v, h in heads.items()}
    w, d = shapes["full"]
    assert shapes["width.quarter"] == (w // 4, d) and shapes["width.half"] == (w // 2, d)
    assert shapes["depth.half"] == (w, d // 2) and shapes["depth.two-thirds"] == (w, 2 * d // 3)
    assert all(h.kind == "mlp" for h in heads.values())
    trunk = spec.job("full", scale, allow_placeholders=True).model.embed_dim
    if scale == "paper":
        assert (w, d) == (2048, 12)
        assert sorted({x for x, _ in shapes.values()}) == [512, 1024, 2048]
        assert sorted({y for _, y in shapes.values()}) == [6, 8, 12]
    else:
        assert w == trunk  # scaled to the preset's trunk


def test_pattern_study_is_causal_as_table_3b() -> None:
    spec = load_study(STUDIES_DIR / "pattern.yaml")
    for scale in spec.scales:
        for variant in spec.variants:
            job = spec.job(variant, scale, allow_placeholders=True)
            assert job.model.attention == "causal" and job.probe.attention == "causal"


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


def crop_trials(values: dict[str, dict[str, list[float]]]) -> list[TrialOutcome]:
    """Trials of the crop-scale study: row -> variant -> per-seed top-1 (fractions)."""
    out = []
    for v in values["linear"]:
        for i, (lin, att) in enumerate(
            zip(values["linear"][v], values["attentive"][v], strict=False)
        ):
            out.append(
                TrialOutcome(
                    v, f"r{v}{i}", {"probe/linear/top1": lin, "probe/attentive/top1": att}, seed=i
                )
            )
    return out


def test_seeds_give_mean_std_and_a_paired_verdict_per_pair_beside_the_paper() -> None:
    spec = load_study(STUDIES_DIR / "crop_scale.yaml")
    # paper linear: s0.08 68.4, s0.4 70.0, s1.0 49.6; attentive 77.7, 78.2, 63.5
    values = {
        "linear": {
            "s0.08": [0.58, 0.64, 0.60],
            "s0.4": [0.60, 0.63, 0.63, 0.70],
            "s1.0": [0.50, 0.52, 0.54],
        },
        "attentive": {
            "s0.08": [0.70, 0.70, 0.70],
            "s0.4": [0.60, 0.61, 0.63, 0.70],
            "s1.0": [0.70, 0.72, 0.74],
        },
    }
    trials = crop_trials(values)
    trials.append(TrialOutcome("s1.0", None, {}, error="boom", seed=3))  # a failed seed
    floor = {
        v: {
            i: {"probe/linear/top1": 0.30, "probe/attentive/top1": 0.40 + i / 100} for i in range(3)
        }
        for v in spec.variants
    }
    result = StudyResult(spec, "small", None, "", trials, floor=floor)
    header, row = result.table()[:2]
    assert row[header.index("s1.0")] == "52.0 ± 2.0"  # the failed seed is left out
    rows = {r[0]: r for r in result.table()}
    assert rows["random trunk (linear)"][1:] == ["30.0 ± 0.0"] * 3
    verdicts = {(v.row, v.a, v.b): v for v in result.verdicts()}
    # s0.4 - s1.0, linear: per seed +10, +11, +9 (seed 3 has no s1.0): t interval by hand
    # 10 +/- 4.303 * 1 / sqrt(3) = [7.5, 12.5], the paper's sign (+20.4): agrees.
    v = verdicts[("linear", "s0.4", "s1.0")]
    assert v.cells()[2:5] == ["+10.0 [+7.5, +12.5] (n=3)", "+20.4", "agrees"]
    # attentive: -10, -11, -11 against the paper's +14.7: opposite.
    assert verdicts[("attentive", "s0.4", "s1.0")].verdict == "opposite"
    # s0.4 - s0.08, linear: +2, -1, +3 (mean 1.33, sd 2.08): inconclusive; 12 seeds would
    # resolve it (t(11) * 2.08 / sqrt(12) = 1.32 < 1.33; t(10) * 2.08 / sqrt(11) = 1.40).
    v = verdicts[("linear", "s0.4", "s0.08")]
    assert (v.verdict, v.seeds_needed) == ("inconclusive", 12)
    # Every variant against its floor, paired over the same seeds.
    assert verdicts[("linear", "s0.4", "random trunk")].verdict == "above floor"
    md = result.markdown()
    assert "over 4 seeds" in md and "| linear | s0.4 − s1.0 | +10.0 [+7.5, +12.5] (n=3)" in md
    assert "linear: of 3 pair(s) the paper orders, 2 agrees, 0 opposite, 1 inconclusive" in md
    assert "linear: 3 of 3 variants above the random-trunk floor" in md
    lines = csv_rows(result.csv())
    assert ["row", "a", "b", "n", "mean", "low", "high", "paper", "verdict", "seeds"] in lines
    assert any(r[:3] == ["attentive", "s0.4", "s1.0"] and r[8] == "opposite" for r in lines)


def test_paired_interval_matches_scipys_paired_t_test() -> None:
    from scipy import stats

    from aim_platform.eval.paired import paired_difference, seeds_to_resolve

    a, b = [71.2, 69.8, 73.5, 70.1], [68.0, 69.9, 70.2, 66.3]
    d = paired_difference(a, b)
    ci = stats.ttest_rel(a, b).confidence_interval(0.95)
    assert d.low == pytest.approx(ci.low) and d.high == pytest.approx(ci.high)
    assert d.excludes_zero == (ci.low > 0 or ci.high < 0)
    one = paired_difference([0.5], [0.4])  # one seed: no interval, never resolved
    assert not one.excludes_zero and seeds_to_resolve(one) is None
    with pytest.raises(ValueError, match="equal"):
        paired_difference([1.0], [1.0, 2.0])


def test_text_directions_give_verdicts_where_the_paper_has_no_numbers() -> None:
    spec = load_study(STUDIES_DIR / "attention.yaml")  # Table 3d: an image in our text
    causal_causal, causal_bidir = "causal-pt.causal-probe", "causal-pt.bidir-probe"
    trials = [
        TrialOutcome(v, "r", {"probe/linear/top1": x + i / 100, "probe/attentive/top1": x}, seed=i)
        for v, x in {
            causal_causal: 0.5,
            causal_bidir: 0.3,
            "prefix-pt.causal-probe": 0.5,
            "prefix-pt.bidir-probe": 0.6,
        }.items()
        for i in range(3)
    ]
    verdicts = {
        (v.row, v.a, v.b): v for v in StudyResult(spec, "small", None, "", trials).verdicts()
    }
    v = verdicts[("linear", causal_causal, causal_bidir)]
    assert v.paper is None and v.expected == 1 and v.verdict == "agrees"
    assert verdicts[("linear", "prefix-pt.bidir-probe", causal_causal)].verdict == "agrees"


def test_the_loss_row_says_the_paper_expects_a_lower_loss_of_its_better_variant() -> None:
    spec = load_study(STUDIES_DIR / "capacity.yaml")  # text: bigger trunks, lower val loss
    trials = [
        TrialOutcome(v, "r", {"val/loss": x + i / 1000}, seed=i)
        for v, x in {"small": 0.52, "medium": 0.50, "large": 0.47}.items()
        for i in range(3)
    ]
    verdicts = {
        (v.row, v.a, v.b): v for v in StudyResult(spec, "cifar10", None, "", trials).verdicts()
    }
    cells = verdicts[("val_loss", "large", "small")].cells()
    assert cells[3:5] == ["large lower (text)", "agrees"]  # a lower loss is the paper's way


def test_seed_index_shifts_the_pretraining_and_probe_seeds_and_names_the_run() -> None:
    from aim_platform.jobs.study_table import seed_overrides, trial_name

    spec = load_study(STUDIES_DIR / "head.yaml")
    base = spec.job("mlp", "small")
    assert seed_overrides(base.seed, base.probe.seed, 0) == []  # seed 0: the job as written
    job = spec.job("mlp", "small", [*seed_overrides(base.seed, base.probe.seed, 2)])
    assert (job.seed, job.probe.seed) == (base.seed + 2, base.probe.seed + 2)
    assert trial_name("mlp", 2, 3) == "mlp/s2" and trial_name("mlp", 0, 1) == "mlp"


def test_a_study_can_run_a_subset_of_its_variants() -> None:
    from aim_platform.jobs.study_spec import select_variants

    spec = select_variants(load_study(STUDIES_DIR / "targets.yaml"), ["raw", "normalized"])
    assert list(spec.variants) == ["normalized", "raw"]  # the spec's order
    spec = select_variants(load_study(STUDIES_DIR / "crop_scale.yaml"), ["s1.0", "s0.4"])
    assert spec.paper["linear"] == {"s0.4": 70.0, "s1.0": 49.6}
    with pytest.raises(ConfigError, match="s9 not in study 'crop_scale'"):
        select_variants(spec, ["s9", "s0.4"])
    with pytest.raises(ConfigError, match="at least 2"):
        select_variants(spec, ["s0.4"])
    # a subset keeps the text's directions between its own variants: each Tune trial
    # validates the spec again
    from aim_platform.config import StudySpec

    kept = ["causal-pt.causal-probe", "causal-pt.bidir-probe", "prefix-pt.bidir-probe"]
    spec = select_variants(load_study(STUDIES_DIR / "attention.yaml"), kept)
    assert StudySpec.model_validate(spec.model_dump(mode="json")).directions["linear"] == [
        "causal-pt.causal-probe > causal-pt.bidir-probe",
        "prefix-pt.bidir-probe > causal-pt.causal-probe",
        "prefix-pt.bidir-probe > causal-pt.bidir-probe",
    ]


def test_variants_that_differ_only_in_the_probe_share_one_pretraining() -> None:
    from aim_platform.jobs.study_spec import pretraining_groups

    spec = load_study(STUDIES_DIR / "attention.yaml")  # Table 3d: 2 pre-trainings x 2 probes
    for seeds in (1, 3):
        assert pretraining_groups(spec, "tiny", [], seeds) == [
            ["causal-pt.causal-probe", "causal-pt.bidir-probe"],
            ["prefix-pt.causal-probe", "prefix-pt.bidir-probe"],
        ]
    head = load_study(STUDIES_DIR / "head.yaml")  # every variant its own pre-training
    assert pretraining_groups(head, "tiny", []) == [[v] for v in head.variants]


def test_gpus_per_trial_shares_a_gpu_between_one_worker_trials() -> None:
    from typer.testing import CliRunner

    from aim_platform.cli import app
    from aim_platform.jobs.study import _on_gpus, check_gpus_per_trial

    job = load_study(STUDIES_DIR / "head.yaml").job("mlp", "small")  # one worker a trial
    assert job.train.num_workers == 1
    shared = _on_gpus(job, 0.25).train
    assert shared.use_gpu is True and shared.gpus_per_worker == 0.25  # four trials a GPU
    assert _on_gpus(job, None) == job
    check_gpus_per_trial(2, 2)  # one whole GPU a worker
    with pytest.raises(ConfigError, match="--gpus-per-trial: 1 GPUs for 2 workers"):
        check_gpus_per_trial(1, 2)  # two workers of one trial on one GPU: NCCL refuses
    with pytest.raises(ConfigError, match="--gpus-per-trial"):
        check_gpus_per_trial(1.5, 1)
    out = CliRunner().invoke(
        app, ["study", str(STUDIES_DIR / "head.yaml"), "--scale", "tiny", "--gpus-per-trial", "0.5"]
    )
    assert out.exit_code != 0 and "--gpus-per-trial: 0.5 GPUs for 2 workers" in out.output


def test_a_study_split_over_sessions_runs_named_seed_indices_whose_csvs_concatenate() -> None:
    """``--only-seeds``: one seed index of a 3-seed study at a time (a CPU session cannot hold
    all three); each part's trials are named and seeded as in the whole study, and the parts'
    per-seed CSVs, concatenated, give the whole study's table."""
    from typer.testing import CliRunner

    from aim_platform.cli import app
    from aim_platform.jobs.study_results import read_trials_csv, trials_csv
    from aim_platform.jobs.study_table import StudyResult, TrialOutcome, seed_indices

    assert seed_indices(3) == [0, 1, 2] and seed_indices(3, [2, 0, 2]) == [0, 2]
    with pytest.raises(ConfigError, match=r"--only-seeds: \[3\]: give seed indices of 0..2"):
        seed_indices(3, [1, 3])
    with pytest.raises(ConfigError, match="--seeds: 0 must be at least 1"):
        seed_indices(0)
    study = str(STUDIES_DIR / "attention.yaml")
    out = CliRunner().invoke(app, ["study", study, "--seeds", "2", "--only-seeds", "2"])
    assert out.exit_code != 0 and "--only-seeds: [2]: give seed indices of 0..1" in out.output
    out = CliRunner().invoke(app, ["study", study, "--only-seeds", "one"])
    assert out.exit_code != 0 and "--only-seeds: 'one' is not a comma-separated" in out.output

    spec = load_study(STUDIES_DIR / "head.yaml")
    variants = list(spec.variants)

    def part(seeds: list[int]) -> str:  # what one session's study writes as trials.csv
        trials = [
            TrialOutcome(v, None, {"probe/linear_top1": (40 + i + s) / 100, "step": 9}, None, s)
            for i, v in enumerate(variants)
            for s in seeds
        ]
        floor = {v: {s: {"probe/linear_top1": 0.3}} for v in variants for s in seeds}
        return trials_csv(StudyResult(spec, "small", None, "", trials, floor))

    # a part's own table says how many seeds it holds, not the whole study's count
    seed2 = read_trials_csv(spec, part([2]), "small")
    assert seed2.seeds == 3 and seed2.seeds_run == 1
    assert "Mean ± standard deviation over" not in seed2.markdown()
    assert "over 2 seeds" in read_trials_csv(spec, part([0, 2]), "small").markdown()
    whole = part([0, 1, 2])
    parts = part([0, 1]) + "".join(part([2]).splitlines(keepends=True)[1:])  # header once
    assert (
        read_trials_csv(spec, parts, "small").markdown()
        == read_trials_csv(spec, whole, "small").markdown()
    )
