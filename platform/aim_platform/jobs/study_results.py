"""A study's per-seed results as a CSV that anyone can recompute its verdicts from: one row a
finished trial, columns :data:`COLUMNS` (top-1 in points, the floor being the random trunk of
that variant and seed). The study runners write it beside their tables (``trials.csv`` in an
``aimctl study`` folder, ``<study>-trials.csv`` in ``jobs/gpu_study.py``'s ``--out``); the
repository keeps those behind BENCHMARKS' tables as ``docs/results/<dataset>/<spec>.csv``,
where ``tests/test_results.py`` regenerates each verdict table from them."""

from __future__ import annotations

import csv
import io

from aim_platform.config import StudySpec
from aim_platform.errors import DataError
from aim_platform.jobs.study_table import StudyResult, TrialOutcome

COLUMNS = (
    "variant",
    "seed",
    "steps",
    "linear",
    "attentive",
    "val_loss",
    "floor_linear",
    "floor_attentive",
)
_METRICS = {  # column -> (metric as logged, points per logged unit)
    "linear": ("probe/linear/top1", 100.0),
    "attentive": ("probe/attentive/top1", 100.0),
    "val_loss": ("val/loss", 1.0),
}


def _cell(metrics: dict[str, float], column: str) -> str:
    metric, scale = _METRICS[column]
    value = metrics.get(metric)
    return "" if value is None else f"{scale * value:.10g}"  # float32 metrics stay distinct


def trials_csv(result: StudyResult) -> str:
    """The per-seed CSV of ``result``: its finished trials in variant then seed order."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(COLUMNS)
    order = {v: i for i, v in enumerate(result.spec.variants)}
    finished = [t for t in result.trials if not t.error]
    for t in sorted(finished, key=lambda t: (order.get(t.variant, len(order)), t.seed)):
        steps = t.steps if t.steps is not None else t.metrics.get("step")
        floor = result.floor.get(t.variant, {}).get(t.seed, {})
        w.writerow(
            [
                t.variant,
                t.seed,
                "" if steps is None else int(steps),
                _cell(t.metrics, "linear"),
                _cell(t.metrics, "attentive"),
                _cell(t.metrics, "val_loss"),
                _cell(floor, "linear"),
                _cell(floor, "attentive"),
            ]
        )
    return buf.getvalue()


def read_trials_csv(
    spec: StudySpec, text: str, scale: str, steps: int | None = None, source: str = "CSV"
) -> StudyResult:
    """The study behind a per-seed CSV (its rows with ``steps`` pre-training steps, or all):
    the same :class:`StudyResult` the runner built, so its table and verdicts regenerate.

    Raises:
        DataError: a header other than :data:`COLUMNS`, a variant not in ``spec`` or a cell
            that is not a number (named with ``source`` and the line).
    """
    from aim_platform.jobs.study_spec import select_variants

    rows = list(csv.reader(io.StringIO(text)))
    if not rows or tuple(rows[0]) != COLUMNS:
        raise DataError(f"{source}: the header must be {','.join(COLUMNS)}")
    trials: list[TrialOutcome] = []
    floor: dict[str, dict[int, dict[str, float]]] = {}
    for line, row in enumerate(rows[1:], start=2):
        cells = dict(zip(COLUMNS, row, strict=False))
        try:
            seed = int(cells["seed"])
            row_steps = int(cells["steps"]) if cells.get("steps") else None
            values = {c: float(cells[c]) for c in COLUMNS[3:] if cells.get(c)}
        except (ValueError, KeyError) as exc:
            raise DataError(f"{source}: line {line}: not a number ({exc})") from None
        variant = cells["variant"]
        if variant not in spec.variants:
            raise DataError(f"{source}: line {line}: variant {variant!r} not in {spec.name}")
        if steps is not None and row_steps != steps:
            continue
        metrics = {_METRICS[c][0]: values[c] / _METRICS[c][1] for c in _METRICS if c in values}
        trials.append(TrialOutcome(variant, None, metrics, None, seed, row_steps))
        random = {
            _METRICS[c][0]: values[f"floor_{c}"] / 100.0
            for c in ("linear", "attentive")
            if f"floor_{c}" in values
        }
        if random:
            floor.setdefault(variant, {})[seed] = random
    ran = [v for v in spec.variants if any(t.variant == v for t in trials)]
    if len(ran) >= 2 and len(ran) < len(spec.variants):
        spec = select_variants(spec, ran)
    return StudyResult(spec, scale, None, "", trials, floor)


def csv_steps(text: str) -> list[int]:
    """The distinct ``steps`` values of a per-seed CSV, ascending (one table each)."""
    rows = csv.DictReader(io.StringIO(text))
    return sorted({int(r["steps"]) for r in rows if r.get("steps")})
