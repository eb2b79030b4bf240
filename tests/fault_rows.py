"""BENCHMARKS.md's fault table, from the fault tests' own results.

Each fault test, after asserting what its row claims, records the row
(:func:`record`: the fault, the console lines a person sees, the steps redone from
``train/resumed_from_step`` and the logged steps, the rows lost from the epoch's ids) as a
JSON file under ``$AIM_FAULT_ROWS`` (default ``build/fault-rows``). After `make test` and
`make test-faults`::

    .venv/bin/python tests/fault_rows.py    # prints the Markdown table for BENCHMARKS.md
"""

from __future__ import annotations

import json
import os
import re
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
_STAMP = re.compile(r"^\[\s*[\d.]+s\]\s*")


def rows_dir() -> Path:
    return Path(os.environ.get("AIM_FAULT_ROWS") or REPO / "build" / "fault-rows")


@dataclass
class FaultRow:
    """One row: what happened, what the console showed, what it cost, which test proves it."""

    fault: str
    console: list[str]
    steps_redone: str
    data_lost: str
    test: str


def current_test() -> str:
    """The running test's id (``tests/test_x.py::test_y``), from pytest's environment."""
    return os.environ.get("PYTEST_CURRENT_TEST", "").split(" ")[0]


def console_lines(text: str, *patterns: str) -> list[str]:
    """The console lines (time stamps kept) that match any of ``patterns``, in order, each
    once (the first match of each pattern)."""
    out = []
    lines = text.splitlines()
    for pattern in patterns:
        hit = next((ln.strip() for ln in lines if re.search(pattern, ln)), None)
        if hit is not None and hit not in out:
            out.append(hit)
    return out


def record(row: FaultRow) -> Path:
    """Write ``row`` as ``<rows_dir>/<test name>-<fault>.json`` (a test may record several)."""
    folder = rows_dir()
    folder.mkdir(parents=True, exist_ok=True)
    name = re.sub(r"[^\w.-]+", "_", f"{row.test.rsplit('::', 1)[-1]}-{row.fault}")[:150]
    path = folder / f"{name}.json"
    path.write_text(json.dumps(asdict(row), indent=1))
    return path


_LONG_PATH = re.compile(r"(?<![\w:/.])/(?:[^\s/;,()`|]+/){3,}([^\s/;,()`|]+/[^\s/;,()`|]+)")


def short_paths(line: str) -> str:
    """``line`` with each absolute path of 5 or more parts cut to ``.../`` and its last two
    (a test's temporary folders say nothing to a reader)."""
    return _LONG_PATH.sub(r".../\1", line)


def render(folder: Path) -> str:
    """The Markdown table of every recorded row, sorted by fault (long paths shortened)."""
    rows = [FaultRow(**json.loads(p.read_text())) for p in sorted(folder.glob("*.json"))]
    out = [
        "| fault | what the console shows | steps redone | data lost | test |",
        "|---|---|---|---|---|",
    ]
    for r in sorted(rows, key=lambda r: r.fault):
        shown = " → ".join(f"`{short_paths(line).replace('|', '/')}`" for line in r.console)
        out.append(f"| {r.fault} | {shown} | {r.steps_redone} | {r.data_lost} | `{r.test}` |")
    return "\n".join(out)


if __name__ == "__main__":
    folder = Path(sys.argv[1]) if len(sys.argv) > 1 else rows_dir()
    print(render(folder))
