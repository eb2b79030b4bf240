"""A study's results: its trials (variant, seed, metrics or error), the random-trunk floor,
the table in the paper's layout (our probe top-1 beside the paper's, mean +/- std over seeds)
and a verdict per pair of variants: the paired difference over seeds with its 95% interval,
read against the paper's direction (agrees / opposite / inconclusive)."""

from __future__ import annotations

import csv
import io
import math
from dataclasses import dataclass, field

from aim_platform.config import ProbeConfig, StudySpec
from aim_platform.eval.paired import PairedDifference, paired_difference, seeds_to_resolve

ROWS = ("linear", "attentive")
LOSS_ROW = "val_loss"  # the final validation loss: lower is better
FLOOR = "random trunk"


@dataclass
class TrialOutcome:
    """One trial's result: its MLflow run and final metrics, or its error."""

    variant: str
    run_id: str | None
    metrics: dict[str, float] = field(default_factory=dict)
    error: str | None = None
    seed: int = 0  # index of the seed (0 .. seeds-1), added to the job's seeds


def trial_name(variant: str, seed: int, seeds: int) -> str:
    """A trial's name in tables, displays and run names: the variant, ``/s<i>`` with seeds."""
    return f"{variant}/s{seed}" if seeds > 1 else variant


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


def metric_of(row: str) -> str:
    """The trial metric behind a table row."""
    return "val/loss" if row == LOSS_ROW else f"probe/{row}/top1"


def scale_of(row: str) -> float:
    """Accuracies are shown in points (%), losses as they are."""
    return 1.0 if row == LOSS_ROW else 100.0


@dataclass
class Verdict:
    """One paired comparison ``a - b`` of a row (probe top-1 in points, or the val loss).

    ``paper`` is the paper's ``a - b`` in points when it gives numbers, ``expected`` the sign
    of ``a - b`` the paper implies (+1: a above b, -1: below; on the loss row, where a is the
    paper's better variant, -1: a lower), None when it says nothing about the pair.
    """

    row: str
    a: str
    b: str
    diff: PairedDifference
    paper: float | None
    expected: int | None

    @property
    def verdict(self) -> str:
        """``agrees`` / ``opposite`` (interval excludes 0, same / other sign as the paper),
        ``inconclusive`` (interval holds 0, or fewer than 2 seeds), or, without a paper
        direction, ``a > b`` / ``a < b`` when the interval excludes 0; against the floor
        ``above floor`` / ``below floor``."""
        if not self.diff.excludes_zero:
            return "inconclusive"
        sign = 1 if self.diff.mean > 0 else -1
        if self.b == FLOOR:
            return "above floor" if sign > 0 else "below floor"
        if self.expected is None:
            return f"{self.a} {'>' if sign > 0 else '<'} {self.b}"
        return "agrees" if sign == self.expected else "opposite"

    @property
    def seeds_needed(self) -> int | None:
        return seeds_to_resolve(self.diff)

    def cells(self) -> list[str]:
        """Row, pair, ours with interval and n, paper, verdict, seeds to resolve."""
        d, digits = self.diff, (3 if self.row == LOSS_ROW else 1)
        interval = (
            f"[{d.low:+.{digits}f}, {d.high:+.{digits}f}]" if d.n > 1 else "[no interval: 1 seed]"
        )
        if self.b == FLOOR:
            paper = "-"
        elif self.paper is not None:
            paper = f"{self.paper:+.1f}"
        elif self.expected is not None and self.row == LOSS_ROW:  # the sign of a - b
            paper = f"{self.a} {'higher' if self.expected > 0 else 'lower'} (text)"
        elif self.expected is not None:
            paper = f"{self.a} {'better' if self.expected > 0 else 'worse'} (text)"
        else:
            paper = "-"
        need = self.seeds_needed
        if d.n < 2 or d.mean == 0:
            resolve = "-"  # no spread to extrapolate from, or no difference to resolve
        else:
            resolve = str(need) if need else "> 1000"
        return [
            self.row.replace("_", " "),
            f"{self.a} − {self.b}",
            f"{d.mean:+.{digits}f} {interval} (n={d.n})",
            paper,
            self.verdict,
            resolve,
        ]


VERDICT_HEADER = ["row", "pair", "ours a − b [95% CI]", "paper a − b", "verdict", "seeds"]


def paper_direction(spec: StudySpec, row: str, a: str, b: str) -> tuple[float | None, int | None]:
    """The paper's ``a - b`` (points, when it has both numbers) and its sign in "better"
    terms (+1: a is better), from the numbers or the text's ``directions``."""
    cols = spec.paper.get(row, {})
    if a in cols and b in cols and cols[a] != cols[b]:
        diff = cols[a] - cols[b]
        return diff, (1 if diff > 0 else -1)
    for text in spec.directions.get(row, []):
        better, worse = (s.strip() for s in text.split(">"))
        if (better, worse) == (a, b):
            return None, 1
        if (better, worse) == (b, a):
            return None, -1
    return None, None


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
        return 1 + max((t.seed for t in self.trials), default=0)

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
                    a, b = first, second
                    paper, expected = paper_direction(self.spec, row, a, b)
                    if row == LOSS_ROW and expected is None:
                        continue  # losses of different objectives are not comparable
                    if expected == -1:  # the paper's better variant first
                        a, b = b, a
                        paper, expected = (-paper if paper is not None else None), 1
                    if row == LOSS_ROW and expected is not None:
                        expected = -expected  # better = lower loss
                    common = sorted(set(seeds[a]) & set(seeds[b]))
                    if common:
                        diff = paired_difference(
                            [k * seeds[a][s] for s in common], [k * seeds[b][s] for s in common]
                        )
                        out.append(Verdict(row, a, b, diff, paper, expected))
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
        """Per row: how many pairs with a paper direction agree, are opposite or inconclusive,
        and how many variants stand above their random-trunk floor."""
        out = []
        verdicts = self.verdicts()
        for row in (*ROWS, LOSS_ROW):
            mine = [v for v in verdicts if v.row == row and v.b != FLOOR and v.expected]
            if mine:
                counts = {s: sum(v.verdict == s for v in mine) for s in VERDICTS}
                out.append(
                    f"{row.replace('_', ' ')}: of {len(mine)} pair(s) the paper orders, "
                    + ", ".join(f"{n} {s}" for s, n in counts.items())
                )
            floors = [v for v in verdicts if v.row == row and v.b == FLOOR]
            if floors:
                above = sum(v.verdict == "above floor" for v in floors)
                out.append(
                    f"{row}: {above} of {len(floors)} variants above the random-trunk floor "
                    "(95% interval over seeds)"
                )
        return out

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
        if self.seeds > 1:
            notes.append(
                f"Mean ± standard deviation over {self.seeds} seeds (pre-training and probe)."
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
                "it holds 0. `seeds`: how many seeds would resolve the observed mean at the "
                "observed spread.",
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


VERDICTS = ("agrees", "opposite", "inconclusive")


def _md_table(rows: list[list[str]], bold_marked: bool = False) -> list[str]:
    out = ["| " + " | ".join(rows[0]) + " |", "|" + " --- |" * len(rows[0])]
    for r in rows[1:]:
        cells = [f"**{c[:-1]}**" if bold_marked and c.endswith("*") else c for c in r]
        out.append("| " + " | ".join(cells) + " |")
    return out
