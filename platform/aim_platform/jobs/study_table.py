"""A study's results: its trials (variant, seed, metrics or error) and the table in the
paper's layout, our probe top-1 beside the paper's, mean +/- std over seeds, and how many
pairs of variants are ordered as in the paper."""

from __future__ import annotations

import csv
import io
import math
from dataclasses import dataclass, field

from aim_platform.config import StudySpec

ROWS = ("linear", "attentive")


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


def agreement(ours: dict[str, float], paper: dict[str, float]) -> tuple[int, int]:
    """Pairs of variants whose order (which is better) is the same in ours and the paper's:
    ``(agreeing, compared)`` over pairs both have and the paper does not tie."""
    names = [v for v in paper if v in ours]
    agree = total = 0
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            if paper[a] == paper[b]:
                continue
            total += 1
            agree += (ours[a] - ours[b]) * (paper[a] - paper[b]) > 0
    return agree, total


@dataclass
class StudyResult:
    """What a study produced."""

    spec: StudySpec
    scale: str
    parent_run_id: str | None
    tracking_uri: str
    trials: list[TrialOutcome]

    @property
    def seeds(self) -> int:
        return 1 + max((t.seed for t in self.trials), default=0)

    def values(self, row: str) -> dict[str, list[float]]:
        """Variant -> probe top-1 (fraction) of each seed that finished, for ``row``."""
        out: dict[str, list[float]] = {v: [] for v in self.spec.variants}
        for t in sorted(self.trials, key=lambda t: t.seed):
            x = t.metrics.get(f"probe/{row}/top1")
            if not t.error and x is not None and t.variant in out:
                out[t.variant].append(x)
        return out

    def means(self, row: str) -> dict[str, float]:
        """Variant -> mean top-1 (%) over seeds, variants with a result only."""
        return {v: 100 * mean_std(xs)[0] for v, xs in self.values(row).items() if xs}

    def table(self) -> list[list[str]]:
        """Rows linear/attentive x variant columns of probe top-1 (%), the mean over seeds
        ``+/- std`` when there are several, best mean marked ``*``."""
        cols = list(self.spec.variants)
        failed = {t.variant for t in self.trials if t.error}
        rows = [["probe", *cols]]
        for row in ROWS:
            values = self.values(row)
            means = self.means(row)
            best = max(means.values()) if means else None
            cells = []
            for v in cols:
                if v not in means:
                    cells.append("failed" if v in failed else "-")
                    continue
                mean, std = mean_std([100 * x for x in values[v]])
                spread = f" ± {std:.1f}" if len(values[v]) > 1 else ""
                cells.append(f"{mean:.1f}{spread}{'*' if means[v] == best else ''}")
            rows.append([row, *cells])
        return rows

    def agreement_lines(self) -> list[str]:
        """Per probe row the paper has: how many pairs of variants are ordered as in the
        paper, and the best variant of each."""
        out = []
        for row, paper in self.spec.paper.items():
            ours = self.means(row)
            agree, total = agreement(ours, paper)
            if not total or not ours:
                continue
            best_paper = max(paper, key=paper.__getitem__)
            best_ours = max(ours, key=ours.__getitem__)
            out.append(
                f"{row}: {agree}/{total} pairs of variants ordered as in the paper; "
                f"best: paper {best_paper}, ours {best_ours}"
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
        """The table as Markdown (best per row in bold), with the paper's numbers if given."""
        rows = self.table()
        out = [f"### Table {self.spec.table}: {self.spec.description} (scale {self.scale})", ""]
        out.append("| " + " | ".join(rows[0]) + " |")
        out.append("|" + " --- |" * len(rows[0]))
        for r in [*rows[1:], *self.paper_rows()]:
            cells = [f"**{c[:-1]}**" if c.endswith("*") else c for c in r]
            out.append("| " + " | ".join(cells) + " |")
        if self.seeds > 1:
            out += [
                "",
                f"Mean ± standard deviation over {self.seeds} seeds (pre-training and probe).",
            ]
        agreeing = self.agreement_lines()
        if agreeing:
            out += ["", *(f"- {line}" for line in agreeing)]
        if not self.spec.paper:
            out += ["", f"(the paper's Table {self.spec.table} has no numbers in its text)"]
        return "\n".join(out) + "\n"

    def csv(self) -> str:
        """Our rows then the paper's rows, one column per variant."""
        buf = io.StringIO()
        csv.writer(buf).writerows([*self.table(), *self.paper_rows()])
        return buf.getvalue()
