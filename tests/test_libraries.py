"""Libraries where they serve, one home per concern: paired t intervals from scipy, brace
patterns by bash's rules (bracex), system metrics through MLflow's own monitor, and the
tracking package split so that no module holds more than one concern."""

from __future__ import annotations

import ast
import random
from pathlib import Path

import pytest

from aim_platform import tracking
from aim_platform.data.sources import expand_pattern
from aim_platform.eval.paired import paired_difference, seeds_to_resolve

TRACKING = Path(tracking.__file__).resolve().parent


def test_paired_interval_is_scipys_paired_t_interval() -> None:
    from scipy import stats

    rng = random.Random(0)
    for n in (2, 3, 5, 12):
        a = [rng.uniform(50, 80) for _ in range(n)]
        b = [x + rng.gauss(-1.0, 2.0) for x in a]
        d = paired_difference(a, b)
        ci = stats.ttest_rel(a, b).confidence_interval(0.95)
        assert d.low == pytest.approx(ci.low, abs=1e-9)
        assert d.high == pytest.approx(ci.high, abs=1e-9)
    same = paired_difference([1.0, 2.0, 3.0], [0.0, 1.0, 2.0])  # no spread: a point
    assert (same.low, same.high, same.sd) == (1.0, 1.0, 0.0) and seeds_to_resolve(same) == 2
    one = paired_difference([0.5], [0.4])
    assert one.low == float("-inf") and one.high == float("inf")


def test_brace_patterns_follow_bash(tmp_path: Path) -> None:
    """What a user writes in a shell works the same in a source URL: nested lists, steps,
    descending and letter ranges; a brace that expands to nothing stays as written."""
    import fsspec

    from aim_platform.data.sources import expand_braces

    assert expand_braces("{a,{b,c}}.tar") == ["a.tar", "b.tar", "c.tar"]
    assert expand_braces("s-{0..4..2}.tar") == ["s-0.tar", "s-2.tar", "s-4.tar"]
    assert expand_braces("s-{3..1}") == ["s-3", "s-2", "s-1"]
    assert expand_braces("{a..c}") == ["a", "b", "c"]
    assert expand_braces("s-{08..10}.tar") == ["s-08.tar", "s-09.tar", "s-10.tar"]
    assert expand_braces("s-{x}.tar") == ["s-{x}.tar"]
    assert expand_braces("s-{0..2.tar") == ["s-{0..2.tar"]  # unbalanced: as written
    for name in ("a.tar", "b.tar", "c.tar"):
        (tmp_path / name).write_bytes(b"")
    fs = fsspec.filesystem("file")
    found = expand_pattern(fs, f"{tmp_path}/{{a,{{b,z}}}}.tar")
    assert [Path(f).name for f in found] == ["a.tar", "b.tar"]  # z.tar does not exist


def _tracking_modules() -> dict[str, ast.Module]:
    return {p.stem: ast.parse(p.read_text()) for p in sorted(TRACKING.glob("*.py"))}


def test_tracking_is_one_module_per_concern() -> None:
    """The tracker, its queue wiring, system metrics, reports, URIs, failure classes and
    dataset inputs each live in a module of their own, none over 400 lines; the package
    re-exports every name (``tracking.Tracker``)."""
    assert TRACKING.name == "tracking" and (TRACKING / "__init__.py").is_file()
    homes = {
        "tracker": tracking.Tracker,
        "queue wiring": tracking.QueuedWriter,
        "system metrics": tracking.SystemMetrics,
        "reports": tracking.TrackingReport,
        "where runs go": tracking.resolve_tracking_uri,
        "failure classes": tracking.is_unreachable,
        "dataset inputs": tracking.dataset_info,
    }
    modules = {what: obj.__module__ for what, obj in homes.items()}
    assert len(set(modules.values())) == len(modules), modules
    for path in TRACKING.glob("*.py"):
        assert len(path.read_text().splitlines()) <= 400, path.name


def test_system_metrics_use_no_mlflow_internals() -> None:
    """MLflow's monitor through its documented constructor, start and finish only: none of
    its samplers or sampling steps (which change between releases)."""
    internals = {"monitors", "collect_metrics", "aggregate_metrics", "clear_metrics"}
    used = {
        node.attr
        for tree in _tracking_modules().values()
        for node in ast.walk(tree)
        if isinstance(node, ast.Attribute)
    }
    assert not used & internals
    imported = {
        node.module
        for tree in _tracking_modules().values()
        for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom) and node.module
    }
    assert not {m for m in imported if m.startswith("mlflow.system_metrics.metrics")}
