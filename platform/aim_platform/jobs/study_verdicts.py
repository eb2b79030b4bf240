"""Verdicts of a study: per pair of variants, the paired difference over seeds with its 95%
interval, read against the paper's direction (agrees / opposite / inconclusive).

The paper's direction for a pair comes from its numbers only where they are clear: a paper
difference under :data:`CLEAR_POINTS`, or one that its other probe orders the other way, sets
no direction ("paper: no clear direction"), so that pair is never counted as agreeing or
opposite. Each row's summary says how many agreements chance alone would give."""

from __future__ import annotations

import math
from dataclasses import dataclass

from aim_platform.config import StudySpec
from aim_platform.eval.paired import PairedDifference, seeds_to_resolve

ROWS = ("linear", "attentive")
LOSS_ROW = "val_loss"  # the final validation loss: lower is better
FLOOR = "random trunk"
# A paper difference under this many points of top-1 sets no direction: the paper reports one
# run per setting, and its ablation tables move by about this much between neighbours.
CLEAR_POINTS = 1.0
# With no true difference, a 95% interval excludes 0 on the paper's side 2.5% of the time.
CHANCE_AGREE = 0.025


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
    paper's better variant, -1: a lower), None when it says nothing about the pair or its
    numbers give no clear direction; ``unclear`` then says why (:func:`paper_unclear`).
    """

    row: str
    a: str
    b: str
    diff: PairedDifference
    paper: float | None
    expected: int | None
    unclear: str = ""

    @property
    def verdict(self) -> str:
        """``agrees`` / ``opposite`` (interval excludes 0, same / other sign as the paper),
        ``inconclusive`` (interval holds 0, or fewer than 2 seeds), or, without a paper
        direction, ``a > b`` / ``a < b`` when the interval excludes 0; against the floor
        ``above floor`` / ``below floor``. A pair whose paper numbers give no clear direction
        adds ``(paper: no clear direction)`` and is never ``agrees`` or ``opposite``."""
        note = " (paper: no clear direction)" if self.unclear else ""
        if not self.diff.excludes_zero:
            return "inconclusive" + note
        sign = 1 if self.diff.mean > 0 else -1
        if self.b == FLOOR:
            return "above floor" if sign > 0 else "below floor"
        if self.expected is None:
            return f"{self.a} {'>' if sign > 0 else '<'} {self.b}{note}"
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
            paper = f"{self.paper:+.1f}" + (f" ({self.unclear})" if self.unclear else "")
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


def paper_unclear(spec: StudySpec, row: str, a: str, b: str) -> str:
    """Why the paper's numbers give no direction for ``a - b`` on ``row``: its difference is
    under :data:`CLEAR_POINTS`, or its other probe orders the pair the other way (that probe's
    ``a - b`` is named). Empty when they give one, or when the paper has no numbers for it."""
    cols = spec.paper.get(row, {})
    if a not in cols or b not in cols:
        return ""
    diff = round(cols[a] - cols[b], 6)  # 69.5 - 68.5 is 1 point, not 0.999...
    reasons = []
    if abs(diff) < CLEAR_POINTS:
        reasons.append(f"under {CLEAR_POINTS:g} point")
    for other in ROWS:
        theirs = spec.paper.get(other, {})
        if other != row and a in theirs and b in theirs:
            other_diff = round(theirs[a] - theirs[b], 6)
            if other_diff * diff < 0:
                reasons.append(f"{other} {other_diff:+.1f}")
    return ", ".join(reasons)


def orient_pair(spec: StudySpec, row: str, a: str, b: str) -> tuple[str, str] | None:
    """The pair as its verdict shows it: the paper's better variant first (on the loss row
    too), or, where its numbers give no clear direction, the one with the higher number;
    otherwise as given. None: a loss pair the paper does not order (losses of different
    objectives are not comparable)."""
    paper, expected = paper_direction(spec, row, a, b)
    if row == LOSS_ROW and expected is None:
        return None
    if expected == -1 or (expected is None and paper is not None and paper < 0):
        return b, a
    return a, b


def pair_verdict(spec: StudySpec, row: str, a: str, b: str, diff: PairedDifference) -> Verdict:
    """The verdict on ``diff`` (our ``a - b`` on ``row``; ``b`` may be :data:`FLOOR`) read
    against the paper: its ``a - b``, the sign it implies (on the loss row, better is lower),
    or why its numbers give none."""
    if b == FLOOR:
        return Verdict(row, a, b, diff, None, 1)
    paper, expected = paper_direction(spec, row, a, b)
    if row == LOSS_ROW and expected is not None:
        expected = -expected  # better = lower loss
    return Verdict(row, a, b, diff, paper, expected, paper_unclear(spec, row, a, b))


def paper_direction(spec: StudySpec, row: str, a: str, b: str) -> tuple[float | None, int | None]:
    """The paper's ``a - b`` (points, when it has both numbers) and its sign in "better"
    terms (+1: a is better), from the numbers or the text's ``directions``; the sign is None
    where the numbers give no clear direction (:func:`paper_unclear`)."""
    cols = spec.paper.get(row, {})
    if a in cols and b in cols:
        diff = cols[a] - cols[b]
        if paper_unclear(spec, row, a, b):
            return diff, None
        return diff, (1 if diff > 0 else -1)
    for text in spec.directions.get(row, []):
        better, worse = (s.strip() for s in text.split(">"))
        if (better, worse) == (a, b):
            return None, 1
        if (better, worse) == (b, a):
            return None, -1
    return None, None


VERDICTS = ("agrees", "opposite", "inconclusive")


def summarize(verdicts: list[Verdict]) -> list[str]:
    """Per row: how many pairs with a paper direction agree, are opposite or inconclusive,
    how many agreements chance alone would give (:func:`chance_line`), how many pairs the
    paper's numbers leave without a clear direction, and how many variants stand above their
    random-trunk floor."""
    out = []
    for row in (*ROWS, LOSS_ROW):
        name = row.replace("_", " ")
        mine = [v for v in verdicts if v.row == row and v.b != FLOOR and v.expected]
        if mine:
            counts = {s: sum(v.verdict == s for v in mine) for s in VERDICTS}
            out.append(
                f"{name}: of {len(mine)} pair(s) the paper orders, "
                + ", ".join(f"{n} {s}" for s, n in counts.items())
            )
            out.append(chance_line(name, mine))
        unclear = [v for v in verdicts if v.row == row and v.unclear]
        if unclear:
            out.append(
                f"{name}: {len(unclear)} pair(s) with the paper's numbers but no clear "
                f"direction (under {CLEAR_POINTS:g} point, or its probes disagree): "
                "not counted"
            )
        floors = [v for v in verdicts if v.row == row and v.b == FLOOR]
        if floors:
            above = sum(v.verdict == "above floor" for v in floors)
            out.append(
                f"{row}: {above} of {len(floors)} variants above the random-trunk floor "
                "(95% interval over seeds)"
            )
    return out


def chance_line(name: str, pairs: list[Verdict]) -> str:
    """How many of a row's paper-ordered ``pairs`` would agree by chance: with no true
    differences, each 95% interval excludes 0 on the paper's side with probability
    :data:`CHANCE_AGREE`; with true differences whose signs are unrelated to the paper's, each
    resolved pair agrees with probability 1/2, so ``k`` agreements of ``r`` resolved pairs or
    more come with the binomial tail ``sum(C(r, j), j >= k) / 2**r`` (pairs that share a
    variant are not independent, so this understates how easily they agree together)."""
    n = len(pairs)
    resolved = sum(v.diff.excludes_zero for v in pairs)
    agree = sum(v.verdict == "agrees" for v in pairs)
    text = (
        f"{name}, by chance: with no true differences {n} × {100 * CHANCE_AGREE:g}% = "
        f"{n * CHANCE_AGREE:.3g} of these pairs would agree"
    )
    if resolved:
        tail = sum(math.comb(resolved, j) for j in range(agree, resolved + 1)) / 2**resolved
        text += (
            f"; with signs unrelated to the paper's, {resolved / 2:g} of the {resolved} "
            f"resolved would agree on average, and {agree} or more with probability {tail:.3f} "
            "(binomial, 1/2 a pair; pairs sharing a variant are not independent)"
        )
    return text
