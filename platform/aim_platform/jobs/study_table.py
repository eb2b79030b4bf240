"""A study's results: its trials (variant, seed, metrics or error), the random-trunk floor,
the table in the paper's layout (our probe top-1 beside the paper's, mean +/- std over seeds)
and a verdict per pair of variants (:mod:`aim_platform.jobs.study_verdicts`: the paired
difference over seeds with its 95% interval, read against the paper's direction)."""

from __future__ import annotations

import csv
import io
import math
from dataclasses import dataclass, field

from aim_platform.config import ConfigError, ProbeConfig, StudySpec
from aim_platform.eval.paired import paired_difference
from aim_platform.jobs.study_verdicts import (
    CLEAR_POINTS,
    FLOOR,
    LOSS_ROW,
    ROWS,
    VERDICT_HEADER,
    Verdict,
    metric_of,
    orient_pair,
    pair_verdict,
    scale_of,
    summarize,
)


@dataclass
class TrialOutcome:
    """One trial's result: its MLflow run and final metrics, or its error."""

    variant: str
    run_id: str | None
    metrics: dict[str, float] = field(default_factory=dict)
    error: str | None = None
    seed: int = 0  # index of the seed (0 .. seeds-1), added to the job's seeds
    steps: int | None = None  # pre-training steps of the job (None: the metrics' ``step``)


def trial_name(variant: str, seed: int, seeds: int) -> str:
    """A trial's name in tables, displays and run names: the variant, ``/s<i>`` with seeds."""
    return f"{variant}/s{seed}" if seeds > 1 else variant


def seed_indices(seeds: int, only: list[int] | None = None) -> list[int]:
    """The seed indices a study runs: 0 .. seeds-1, or ``only`` those of them (a study split
    over machines or sessions, one seed index at a time; its per-seed CSVs concatenate)."""
    if seeds < 1:
        raise ConfigError(f"--seeds: {seeds} must be at least 1")
    if only is None:
        return list(range(seeds))
    outside = sorted({i for i in only if not 0 <= i < seeds})
    if not only or outside:
        raise ConfigError(
            f"--only-seeds: {outside or 'none given'}: give seed indices of 0..{seeds - 1} "
            f"(--seeds {seeds})"
        )
    return sorted(set(only))


def seed_overrides(job_seed: int, probe_seed: int, seed: int) -> list[str]:
    """Overrides of seed index ``seed``: pre-training and probe seeds shifted by it."""
    return [f"seed={job_seed + seed}", f"probe.seed={probe_seed + seed}"] if seed else []


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for one value)."""
    n = len(values)
    mean = sum(values) / n
    var = sum((v - mean) ** 2 for v in values) / (n - 1) if n > 1 else 0.0
    return mean, math.sqrt(var)


def probe_recipe(cfg: ProbeConfig) -> str:
    """How the table's probes were trained, for the note under it: one fixed recipe for
    every variant and the floor, nothing chosen on the split that scores them."""
    labels = (
        "every train label"
        if cfg.labels_per_class is None
        else f"{cfg.labels_per_class} train labels a class"
    )
    views = "1 view" if cfg.views == 1 else f"{cfg.views} augmented views"
    text = (
        f"Probes: one fixed recipe for every variant and the random trunk (lr {cfg.lr:g}, "
        f"{cfg.steps} steps, batch {cfg.batch_size}, weight decay {cfg.weight_decay:g}, "
        f"{views}, {labels}), trained on the train split and scored once on the val split: "
        "no setting is chosen on the split that scores them."
    )
    if cfg.sweep:
        text += " (The per-block sweep's best block, not in this table, is picked on it.)"
    return text


@dataclass
class StudyResult:
    """What a study produced: its trials and, per variant and seed, the random-trunk floor
    (the same probes on a trunk that was never pre-trained)."""

    spec: StudySpec
    scale: str
    parent_run_id: str | None
    tracking_uri: str
    trials: list[TrialOutcome]
    floor: dict[str, dict[int, dict[str, float]]] = field(default_factory=dict)
    probe_recipe: str = ""

    @property
    def seeds(self) -> int:
        """The study's seed count as its trials are named (``/s<i>``): 1 + the highest index."""
        return 1 + max((t.seed for t in self.trials), default=0)

    @property
    def seeds_run(self) -> int:
        """How many seed indices have trials here (fewer than :attr:`seeds` for a study run
        with ``--only-seeds``)."""
        return len({t.seed for t in self.trials}) or 1

    def per_seed(self, row: str) -> dict[str, dict[int, float]]:
        """Variant -> seed index -> value (as logged: top-1 as a fraction, or the loss) of
        every trial that finished."""
        out: dict[str, dict[int, float]] = {v: {} for v in self.spec.variants}
        for t in self.trials:
            x = t.metrics.get(metric_of(row))
            if not t.error and x is not None and t.variant in out:
                out[t.variant][t.seed] = x
        return out

    def values(self, row: str) -> dict[str, list[float]]:
        """Variant -> the values of its finished seeds, in seed order."""
        return {v: [s[i] for i in sorted(s)] for v, s in self.per_seed(row).items()}

    def floor_per_seed(self, row: str) -> dict[str, dict[int, float]]:
        """Variant -> seed index -> the random trunk's value for ``row`` (probe rows only)."""
        return {
            v: {i: m[metric_of(row)] for i, m in seeds.items() if metric_of(row) in m}
            for v, seeds in self.floor.items()
        }

    def means(self, row: str) -> dict[str, float]:
        """Variant -> mean over seeds, in the table's unit; variants with a result only."""
        k = scale_of(row)
        return {v: k * mean_std(xs)[0] for v, xs in self.values(row).items() if xs}

    def _cells(self, values: dict[str, list[float]], row: str, mark_best: bool) -> list[str]:
        k, digits = scale_of(row), (4 if row == LOSS_ROW else 1)
        failed = {t.variant for t in self.trials if t.error}
        means = {v: k * mean_std(xs)[0] for v, xs in values.items() if xs}
        best = (min if row == LOSS_ROW else max)(means.values()) if means else None
        cells = []
        for v in self.spec.variants:
            xs = values.get(v) or []
            if not xs:
                cells.append("failed" if v in failed and mark_best else "-")
                continue
            mean, std = mean_std([k * x for x in xs])
            spread = f" ± {std:.{digits}f}" if len(xs) > 1 else ""
            star = "*" if mark_best and means[v] == best else ""
            cells.append(f"{mean:.{digits}f}{spread}{star}")
        return cells

    def table(self) -> list[list[str]]:
        """Rows linear/attentive (and the val loss) x variant columns: the mean over seeds
        ``+/- std`` when there are several, best mean marked ``*``; then the random-trunk
        floor's rows when it was measured."""
        rows = [["probe", *self.spec.variants]]
        for row in ROWS:
            rows.append([row, *self._cells(self.values(row), row, True)])
        if any(self.values(LOSS_ROW).values()):
            rows.append(["val loss", *self._cells(self.values(LOSS_ROW), LOSS_ROW, True)])
        for row in ROWS:
            floor = {v: [s[i] for i in sorted(s)] for v, s in self.floor_per_seed(row).items()}
            if any(floor.values()):
                rows.append([f"{FLOOR} ({row})", *self._cells(floor, row, False)])
        return rows

    def verdicts(self) -> list[Verdict]:
        """Every pair of variants on every probe row (and on the loss row where the paper
        gives a direction), oriented with the paper's better variant first when it has one;
        then every variant against its random-trunk floor. Paired over the seeds both
        finished."""
        out = []
        names = list(self.spec.variants)
        for row in (*ROWS, LOSS_ROW):
            k = scale_of(row)
            seeds = self.per_seed(row)
            for i, first in enumerate(names):
                for second in names[i + 1 :]:
                    pair = orient_pair(self.spec, row, first, second)
                    if pair is None:
                        continue  # losses of different objectives are not comparable
                    a, b = pair
                    common = sorted(set(seeds[a]) & set(seeds[b]))
                    if common:
                        diff = paired_difference(
                            [k * seeds[a][s] for s in common], [k * seeds[b][s] for s in common]
                        )
                        out.append(pair_verdict(self.spec, row, a, b, diff))
        for row in ROWS:
            k = scale_of(row)
            seeds, floor = self.per_seed(row), self.floor_per_seed(row)
            for v in names:
                common = sorted(set(seeds[v]) & set(floor.get(v, {})))
                if common:
                    diff = paired_difference(
                        [k * seeds[v][s] for s in common], [k * floor[v][s] for s in common]
                    )
                    out.append(Verdict(row, v, FLOOR, diff, None, 1))
        return out

    def verdict_summary(self) -> list[str]:
        """The summary lines under the verdicts (:func:`summarize`)."""
        return summarize(self.verdicts())

    def paper_rows(self) -> list[list[str]]:
        """The paper's top-1 (%) per probe row, beside ours: ``paper (linear)``, ... ("-" where
        the paper has no number for a variant)."""
        out = []
        for row in (*ROWS, *(r for r in self.spec.paper if r not in ROWS)):
            cols = self.spec.paper.get(row)
            if cols:
                cells = [f"{cols[v]:.1f}" if v in cols else "-" for v in self.spec.variants]
                out.append([f"paper ({row})", *cells])
        return out

    def markdown(self) -> str:
        """The table as Markdown (best per row in bold), with the paper's numbers if given,
        then the verdicts."""
        rows = self.table()
        out = [f"### Table {self.spec.table}: {self.spec.description} (scale {self.scale})", ""]
        out += _md_table([*rows, *self.paper_rows()], bold_marked=True)
        notes = []
        if self.seeds_run > 1:
            notes.append(
                f"Mean ± standard deviation over {self.seeds_run} seeds (pre-training and probe)."
            )
        if self.floor:
            notes.append(
                f"`{FLOOR}`: the same probes on a randomly initialized trunk of each variant, "
                "same seeds: what pre-training adds is the distance to it."
            )
        if self.probe_recipe:
            notes.append(self.probe_recipe)
        if notes:
            out += ["", " ".join(notes)]
        if not self.spec.paper:
            directions = " (its directions are taken from the text)" if self.spec.directions else ""
            out += [
                "",
                f"(the paper's Table {self.spec.table} has no numbers in its text{directions})",
            ]
        verdicts = self.verdicts()
        if verdicts:
            out += [
                "",
                "Verdicts: per-seed differences a − b of seed-matched trials (points of top-1; "
                "the loss as it is), mean and 95% t interval; **agrees** / **opposite**: the "
                "interval excludes 0 with the paper's sign / the other sign; **inconclusive**: "
                "it holds 0; **paper: no clear direction**: the paper's a − b is under "
                f"{CLEAR_POINTS:g} point or its other probe orders the pair the other way (that "
                "probe's a − b beside it), so the pair is neither agrees nor opposite. `seeds`: "
                "how many seeds would resolve the observed mean at the observed spread.",
                "",
            ]
            out += _md_table([VERDICT_HEADER, *(v.cells() for v in verdicts)])
            out += ["", *(f"- {line}" for line in self.verdict_summary())]
        return "\n".join(out) + "\n"

    def csv(self) -> str:
        """Our rows then the paper's rows, one column per variant; a blank line; then the
        verdicts, one pair a row."""
        buf = io.StringIO()
        w = csv.writer(buf)
        w.writerows([*self.table(), *self.paper_rows()])
        verdicts = self.verdicts()
        if verdicts:
            w.writerow([])
            w.writerow(["row", "a", "b", "n", "mean", "low", "high", "paper", "verdict", "seeds"])
            for v in verdicts:
                d = v.diff
                w.writerow(
                    [v.row, v.a, v.b, d.n, f"{d.mean:.4f}", f"{d.low:.4f}", f"{d.high:.4f}"]
                    + [v.cells()[3], v.verdict, v.seeds_needed or ""]
                )
        return buf.getvalue()


def _md_table(rows: list[list[str]], bold_marked: bool = False) -> list[str]:
    out = ["| " + " | ".join(rows[0]) + " |", "|" + " --- |" * len(rows[0])]
    for r in rows[1:]:
        cells = [f"**{c[:-1]}**" if bold_marked and c.endswith("*") else c for c in r]
        out.append("| " + " | ".join(cells) + " |")
    return out
