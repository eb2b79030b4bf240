"""Paired comparisons over seeds: is variant A better than B, given the noise between seeds?

Two variants run with the same seeds (seed i of A and seed i of B share the pre-training
data order, crops and probe seed) are compared through their per-seed differences
``d_i = a_i - b_i``: the mean of d and a two-sided 95% Student-t interval
``mean +/- t(0.975, n-1) * sd(d) / sqrt(n)`` (scipy's ``stats.t.interval``: the interval of
``stats.ttest_rel``). The interval, not the sign of the mean, says whether the runs can tell
the two apart.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import stats

CONFIDENCE = 0.95
MAX_SEEDS = 1000  # beyond this "seeds to resolve" is reported as "more than"


@dataclass(frozen=True)
class PairedDifference:
    """Mean and 95% t interval of per-seed differences ``a_i - b_i``.

    Attributes:
        n: Seeds both variants finished.
        mean: Mean difference.
        low: Lower end of the interval (``-inf`` with fewer than 2 seeds).
        high: Upper end (``inf`` with fewer than 2 seeds).
        sd: Sample standard deviation of the differences (0 with one seed).
    """

    n: int
    mean: float
    low: float
    high: float
    sd: float

    @property
    def excludes_zero(self) -> bool:
        """The interval lies wholly above or below 0."""
        return self.low > 0 or self.high < 0


def _interval(mean: float, sd: float, n: int) -> tuple[float, float]:
    """The t interval of ``n`` differences of mean ``mean`` and sample deviation ``sd``."""
    if n < 2:
        return -math.inf, math.inf
    if sd == 0:  # scipy needs a positive scale: every difference the same, no spread
        return mean, mean
    low, high = stats.t.interval(CONFIDENCE, n - 1, loc=mean, scale=sd / math.sqrt(n))
    return float(low), float(high)


def paired_difference(a: list[float], b: list[float]) -> PairedDifference:
    """Differences of seed-matched values (``a[i]`` and ``b[i]`` from seed i).

    Raises:
        ValueError: the lists differ in length or are empty.
    """
    if len(a) != len(b) or not a:
        raise ValueError(f"paired values need equal, non-empty lists, got {len(a)} and {len(b)}")
    d = np.subtract(a, b, dtype=np.float64)  # (n,)
    n = len(d)
    mean = float(d.mean())
    sd = float(d.std(ddof=1)) if n > 1 else 0.0
    low, high = _interval(mean, sd, n)
    return PairedDifference(n, mean, low, high, sd)


def seeds_to_resolve(diff: PairedDifference) -> int | None:
    """The fewest seeds whose 95% interval would exclude 0 if the mean difference and its
    spread stayed as observed (None: no difference observed, or more than :data:`MAX_SEEDS`,
    or fewer than 2 seeds to estimate the spread from)."""
    if diff.n < 2 or diff.mean == 0:
        return None
    if diff.sd == 0:
        return 2
    for n in range(2, MAX_SEEDS + 1):
        if _interval(0.0, diff.sd, n)[1] < abs(diff.mean):
            return n
    return None
