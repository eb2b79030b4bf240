"""Numbers anyone can recompute (issue 30, points 4 and 5): every CIFAR-10 verdict table in
BENCHMARKS.md either regenerates from its per-seed CSV under ``docs/results/cifar10/`` with the
platform's own verdict code, or says it is not recomputable; every printed verdict follows the
paper-direction rule (no direction from a paper difference under 1 point, or from one the
paper's two probes disagree on); and the study runners write that CSV for future runs."""

from __future__ import annotations

import functools
import math
import re
from pathlib import Path

import pytest

from aim_platform.eval.paired import PairedDifference
from aim_platform.jobs.study_results import (
    COLUMNS,
    csv_steps,
    read_trials_csv,
    trials_csv,
)
from aim_platform.jobs.study_spec import STUDIES_DIR
from aim_platform.jobs.study_spec import load_study as _load_study
from aim_platform.jobs.study_table import StudyResult, TrialOutcome
from aim_platform.jobs.study_verdicts import (
    FLOOR,
    VERDICT_HEADER,
    orient_pair,
    pair_verdict,
    summarize,
)

REPO = Path(__file__).resolve().parents[1]
load_study = functools.cache(_load_study)  # a spec per printed row: read each file once
BENCHMARKS = REPO / "BENCHMARKS.md"
RESULTS = REPO / "docs" / "results" / "cifar10"
CIFAR10 = "## CIFAR-10 at a small scale"
VERDICT_LINE = "| " + " | ".join(VERDICT_HEADER) + " |"
CSV_REF = re.compile(r"docs/results/cifar10/([A-Za-z0-9_.-]+)\.csv`? \(([\d,]+) steps\)")


def cifar10_sections() -> list[tuple[str, str]]:
    """(heading, text) of each ``###`` subsection of BENCHMARKS' CIFAR-10 section."""
    text = BENCHMARKS.read_text()
    start = text.index(CIFAR10)
    end = text.find("\n## ", start + 1)
    part = text[start : end if end > 0 else len(text)]
    chunks = re.split(r"^### ", part, flags=re.M)[1:]
    return [(c.split("\n", 1)[0], c) for c in chunks]


def section_spec(heading: str, text: str) -> str:
    """The study spec a section reports: the first spec its commands name, else the one
    whose table its heading names (``### Table 3b: ...``)."""
    named = re.search(r"jobs/studies/([a-z_]+)\.yaml", text)
    if named:
        return named.group(1)
    table = re.match(r"Table (\w+)", heading)
    assert table, f"section {heading!r}: names no study spec and no table"
    for path in STUDIES_DIR.glob("*.yaml"):
        if path.name != "base.yaml" and load_study(path).table == table.group(1):
            return path.stem
    raise AssertionError(f"section {heading!r}: no spec for table {table.group(1)}")


def md_tables(text: str, header: str) -> list[list[list[str]]]:
    """Every Markdown table in ``text`` whose header line is ``header``: its body rows' cells."""
    lines = text.splitlines()
    out = []
    for i, line in enumerate(lines):
        if line.strip() == header:
            rows = []
            for body in lines[i + 2 :]:
                if not body.startswith("|"):
                    break
                rows.append([c.strip() for c in body.strip().strip("|").split("|")])
            out.append(rows)
    return out


def printed_number(text: str) -> float:
    """A printed bound; ``-0.0``/``+0.0`` keep their side of 0 (a rounded, not a zero, bound)."""
    x = float(text)
    return math.copysign(1e-9, x) if x == 0 else x


def printed_verdict(spec_name: str, cells: list[str]):
    """The platform's verdict on one printed row, from its printed interval alone."""
    row, pair, ours = cells[0].replace(" ", "_"), cells[1], cells[2]
    a, b = (s.strip() for s in pair.split(" − "))
    m = re.match(r"([+-][\d.]+) \[([+-][\d.]+), ([+-][\d.]+)\] \(n=(\d+)\)", ours)
    assert m, f"{spec_name}: cannot read {ours!r}"
    mean, low, high = (printed_number(g) for g in m.groups()[:3])
    diff = PairedDifference(int(m.group(4)), mean, low, high, sd=1.0)
    return a, b, pair_verdict(load_study(STUDIES_DIR / f"{spec_name}.yaml"), row, a, b, diff)


def verdict_sections() -> list[tuple[str, str, str]]:
    """(heading, spec, text) of each CIFAR-10 subsection that prints a verdict table."""
    return [
        (heading, section_spec(heading, text), text)
        for heading, text in cifar10_sections()
        if VERDICT_LINE in text
    ]


def test_every_cifar10_verdict_table_regenerates_from_a_csv_or_says_it_cannot() -> None:
    sections = [(h, t) for h, t in cifar10_sections() if "| verdict |" in t]
    assert len(sections) >= 6  # 3b, 3e, 3c, 5, Fig. 4, 3d, capacity: none may slip out
    for heading, text in sections:
        refs = CSV_REF.findall(text)
        for name, _ in refs:
            assert (RESULTS / f"{name}.csv").is_file(), f"{heading}: {name}.csv is missing"
        assert refs or "not recomputable" in text.lower(), (
            f"BENCHMARKS section {heading!r}: neither a per-seed CSV under docs/results/cifar10/ "
            "nor 'not recomputable'"
        )


def test_printed_verdicts_follow_the_paper_direction_rule() -> None:
    """Each printed verdict and paper cell is what the platform's code says of its printed
    interval: a paper difference under 1 point, or one the paper's other probe orders the
    other way, is 'no clear direction', never agrees/opposite; and the summary lines (counts
    and what chance would give) are regenerated from the same rows."""
    checked = 0
    for heading, spec_name, text in verdict_sections():
        spec = load_study(STUDIES_DIR / f"{spec_name}.yaml")
        for rows in md_tables(text, VERDICT_LINE):
            verdicts = []
            for cells in rows:
                a, b, v = printed_verdict(spec_name, cells)
                if b != FLOOR:  # printed with the paper's better (or higher) variant first
                    assert orient_pair(spec, v.row, a, b) == (a, b), f"{heading}: {cells[1]}"
                got = v.cells()
                assert [cells[3], cells[4]] == [got[3], got[4]], f"{heading}: {cells}"
                verdicts.append(v)
                checked += 1
            lines = [f"- {line}" for line in summarize(verdicts)]
            missing = [line for line in lines if line not in text]
            assert not missing, f"{heading}: the summary lines should read\n" + "\n".join(lines)
    assert checked >= 80


def csv_tables() -> list[tuple[str, str, int, str]]:
    """(heading, CSV name, steps, text) of each table BENCHMARKS says regenerates from a CSV."""
    return [
        (heading, name, int(steps.replace(",", "")), text)
        for heading, text in cifar10_sections()
        for name, steps in CSV_REF.findall(text)
    ]


@pytest.mark.parametrize(("heading", "name", "steps", "text"), csv_tables())
def test_a_committed_csv_regenerates_the_verdict_table_benchmarks_prints(
    heading: str, name: str, steps: int, text: str
) -> None:
    spec = load_study(STUDIES_DIR / f"{section_spec(heading, text)}.yaml")
    data = (RESULTS / f"{name}.csv").read_text()
    assert steps in csv_steps(data)
    result = read_trials_csv(spec, data, "cifar10", steps, source=f"{name}.csv")
    [regenerated] = md_tables(result.markdown(), VERDICT_LINE)
    after = text[text.index(f"{name}.csv") :]  # the table that follows the reference
    printed = md_tables(after, VERDICT_LINE)[0]
    assert printed == regenerated, f"{heading}: BENCHMARKS differs from {name}.csv"


def test_committed_csvs_have_the_columns_and_one_row_a_trial() -> None:
    for path in sorted(RESULTS.glob("*.csv")):
        lines = path.read_text().splitlines()
        assert lines[0] == ",".join(COLUMNS), path.name
        keys = [tuple(line.split(",")[:3]) for line in lines[1:]]
        assert len(keys) == len(set(keys)), f"{path.name}: a (variant, seed, steps) twice"


# The rule itself, on the paper's own numbers (jobs/studies/*.yaml, from the paper's tables).


def trials_of(values: dict[str, list[tuple[float, float]]]) -> list[TrialOutcome]:
    """Trials from (linear, attentive) top-1 fractions per variant, one a seed."""
    return [
        TrialOutcome(
            v, None, {"probe/linear/top1": lin, "probe/attentive/top1": att}, seed=i, steps=300
        )
        for v, seeds in values.items()
        for i, (lin, att) in enumerate(seeds)
    ]


def test_a_paper_difference_under_a_point_or_split_by_its_probes_sets_no_direction() -> None:
    spec = load_study(STUDIES_DIR / "pattern.yaml")
    # paper linear raster 69.5, spiral 67.7, checkerboard 68.2, random 65.8;
    # attentive 77.4, 76.3, 76.0, 75.7. Ours: checkerboard clearly below spiral (linear), and
    # spiral, checkerboard clearly above random on both probes.
    up = [0.0, 0.004, 0.008]
    values = {
        "raster": [(0.40 + d, 0.46 + d) for d in up],
        "spiral": [(0.40 + d, 0.45 + d) for d in up],
        "checkerboard": [(0.38 + d, 0.44 + d) for d in up],
        "random": [(0.34 + d, 0.40 + d) for d in up[::-1]],
    }
    result = StudyResult(spec, "cifar10", None, "", trials_of(values))
    v = {(x.row, x.a, x.b): x for x in result.verdicts()}
    # checkerboard - spiral: linear +0.5 (under 1 point), and the attentive probe has it -0.3
    cs = v[("linear", "checkerboard", "spiral")]
    assert cs.expected is None and cs.verdict == "checkerboard < spiral (paper: no clear direction)"
    assert cs.cells()[3] == "+0.5 (under 1 point, attentive -0.3)"
    # spiral - checkerboard attentive: +0.3 under a point, the linear probe the other way
    sc = v[("attentive", "spiral", "checkerboard")]
    assert (
        "no clear direction" in sc.verdict and sc.cells()[3] == "+0.3 (under 1 point, linear -0.5)"
    )
    # spiral - random: linear +1.9 is clear (agrees); attentive +0.6 is not
    assert v[("linear", "spiral", "random")].verdict == "agrees"
    assert (
        v[("attentive", "spiral", "random")].verdict
        == "spiral > random (paper: no clear direction)"
    )
    md = result.markdown()
    [table] = md_tables(md, VERDICT_LINE)
    assert not [r for r in table if r[4] in ("agrees", "opposite") and "no clear" in r[3]]
    assert "opposite" not in {r[4] for r in table}  # checkerboard < spiral was 'opposite'
    assert "linear: of 5 pair(s) the paper orders, 4 agrees, 0 opposite, 1 inconclusive" in md
    assert "linear: 1 pair(s) with the paper's numbers but no clear direction" in md
    assert "attentive: of 3 pair(s) the paper orders" in md


def test_the_two_probes_disagreeing_set_no_direction_even_over_a_point() -> None:
    from aim_platform.config import StudySpec

    spec = StudySpec.model_validate(
        {
            **load_study(STUDIES_DIR / "crop_scale.yaml").model_dump(),
            "paper": {
                "linear": {"s0.4": 70.0, "s1.0": 68.0},
                "attentive": {"s0.4": 76.0, "s1.0": 78.5},
            },
        }
    )
    d = PairedDifference(3, 2.0, 1.0, 3.0, 0.4)
    lin = pair_verdict(spec, "linear", "s0.4", "s1.0", d)
    assert lin.expected is None and lin.cells()[3] == "+2.0 (attentive -2.5)"
    assert orient_pair(spec, "attentive", "s0.4", "s1.0") == ("s1.0", "s0.4")


def test_each_row_says_how_many_agreements_chance_would_give() -> None:
    spec = load_study(STUDIES_DIR / "capacity.yaml")  # linear and the loss: text directions
    lines = summarize(
        [
            pair_verdict(spec, "linear", a, b, PairedDifference(3, m, m - 0.5, m + 0.5, 0.2))
            for a, b, m in (
                ("medium", "small", 2.0),
                ("large", "small", 4.0),
                ("large", "medium", 0.3),
            )
        ]
    )
    assert lines[0] == "linear: of 3 pair(s) the paper orders, 2 agrees, 0 opposite, 1 inconclusive"
    # 3 pairs x 2.5% with no true differences; 2 resolved, 1 expected with unrelated signs,
    # P(2 or more of 2) = 1/4
    assert lines[1].startswith("linear, by chance: with no true differences 3 × 2.5% = 0.075 of")
    assert (
        "1 of the 2 resolved would agree on average, and 2 or more with probability 0.250"
        in lines[1]
    )


def test_a_per_seed_csv_gives_back_the_same_table_and_verdicts() -> None:
    spec = load_study(STUDIES_DIR / "head.yaml")
    up = [0.0, 0.003, 0.007]
    trials = trials_of(
        {
            "none": [(0.381 + d, 0.438 + d) for d in up],
            "mlp": [(0.40 + d, 0.457 - d) for d in up],
            "transformer": [(0.379 + d / 2, 0.444 + d) for d in up],
        }
    )
    trials[0].metrics["val/loss"] = 0.4487
    trials.append(TrialOutcome("mlp", None, {}, error="boom", seed=3))  # not a result: no row
    floor = {
        v: {i: {"probe/linear/top1": 0.329, "probe/attentive/top1": 0.408} for i in range(3)}
        for v in spec.variants
    }
    result = StudyResult(spec, "cifar10", None, "", trials, floor)
    text = trials_csv(result)
    assert text.splitlines()[0] == ",".join(COLUMNS)
    assert text.splitlines()[1] == "none,0,300,38.1,43.8,0.4487,32.9,40.8"
    assert len(text.splitlines()) == 1 + 9 and csv_steps(text) == [300]
    again = read_trials_csv(spec, text, "cifar10", 300)
    finished = StudyResult(spec, "cifar10", None, "", trials[:-1], floor)  # no 'failed' mark
    assert again.markdown() == finished.markdown()
    assert read_trials_csv(spec, text, "cifar10", 1500).trials == []  # another table's rows


def test_a_csv_with_other_columns_or_variants_is_refused_by_name() -> None:
    from aim_platform.errors import DataError

    spec = load_study(STUDIES_DIR / "head.yaml")
    with pytest.raises(DataError, match="x.csv: the header must be variant,seed,steps"):
        read_trials_csv(spec, "variant,seed,top1\n", "cifar10", source="x.csv")
    bad = ",".join(COLUMNS) + "\nlarge,0,300,1,2,0.4,1,2\n"
    with pytest.raises(DataError, match="x.csv: line 2: variant 'large' not in head"):
        read_trials_csv(spec, bad, "cifar10", source="x.csv")


def test_the_local_runner_writes_the_per_seed_csv_its_verdicts_regenerate_from(
    tmp_path: Path,
) -> None:
    from aim_platform.jobs.local_study import run_local_studies
    from aim_platform.jobs.study_spec import select_variants

    mini = REPO / "tests" / "assets" / "cifar10-mini"
    spec = select_variants(load_study(STUDIES_DIR / "head.yaml"), ["none", "mlp"])
    steps = ["train.global_batch_size=16", "train.micro_batch_size=16", "train.steps=6"]
    [result] = run_local_studies(
        [spec],
        "tiny",
        str(mini),
        seeds=2,
        extra=[f"data.sources.0.url={mini}", *steps],
        parallel=1,
        out=tmp_path,
        say=lambda text: None,
    )
    text = (tmp_path / "head-trials.csv").read_text()
    rows = [line.split(",") for line in text.splitlines()[1:]]
    assert sorted((r[0], r[1], r[2]) for r in rows) == [
        ("mlp", "0", "6"),
        ("mlp", "1", "6"),
        ("none", "0", "6"),
        ("none", "1", "6"),
    ]
    assert all(r[6] and r[7] for r in rows)  # each trial's random-trunk floor beside it
    again = read_trials_csv(spec, text, "tiny", 6)
    assert md_tables(again.markdown(), VERDICT_LINE) == md_tables(result.markdown(), VERDICT_LINE)


def test_a_partial_csv_gives_the_seed_table_benchmarks_prints() -> None:
    """Table 3d at 1,500 steps runs a seed a session: until its three seeds are in, BENCHMARKS
    prints each finished seed's values (beside the 300-step means), and they must be the
    CSV's, every seed of it."""
    spec = load_study(STUDIES_DIR / "attention.yaml")
    result = read_trials_csv(spec, (RESULTS / "attention.csv").read_text(), "cifar10", 1500)
    [text] = [t for h, t in cifar10_sections() if h.startswith("Table 3d")]
    header = "| 1,500 steps, per seed | " + " | ".join(spec.variants) + " |"
    [rows] = md_tables(text, header)
    printed = {r[0]: r[1:] for r in rows}
    seeds = sorted({t.seed for t in result.trials})
    assert seeds and {f"linear, seed {s}" for s in seeds} <= set(printed)
    for s in seeds:
        got = {t.variant: t.metrics for t in result.trials if t.seed == s}
        floor = {v: f[s] for v, f in result.floor.items()}
        for row, metric, scale, fmt, source in (
            ("linear", "probe/linear/top1", 100, ".1f", got),
            ("attentive", "probe/attentive/top1", 100, ".1f", got),
            ("val loss", "val/loss", 1, ".4f", got),
            ("random trunk (linear)", "probe/linear/top1", 100, ".1f", floor),
            ("random trunk (attentive)", "probe/attentive/top1", 100, ".1f", floor),
        ):
            want = [format(scale * source[v][metric], fmt) for v in spec.variants]
            assert printed[f"{row}, seed {s}"] == want, f"{row}, seed {s}"
