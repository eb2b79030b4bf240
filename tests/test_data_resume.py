"""An ingest killed half way resumes: finished shards are kept, no id is lost or doubled."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from fault_rows import FaultRow, console_lines, current_test, record

GROUPS = 30  # 60 photos at 0.3 MB a shard: groups of 2 photos
RUNNER = """
import sys
from aim_platform.cluster import start_embedded  # started again when Ray's agent is too slow
start_embedded(num_cpus=1, include_dashboard=False, log_to_driver=False)
from aim_platform.cli import app
app(sys.argv[1:])
"""


@pytest.mark.faults  # a fault journey: `make test-faults` (CI runs it after `make test`)
def test_killed_ingest_resumes_without_redoing_finished_shards(tmp_path: Path) -> None:
    dest = tmp_path / "photos"
    cmd = [sys.executable, "-c", RUNNER, "ingest", "builtin:photos", str(dest)]
    cmd += ["--num-photos", "60", "--shard-size-mb", "0.3", "--val-fraction", "0.1"]
    proc = subprocess.Popen(
        cmd, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    markers: list[Path] = []
    try:
        deadline = time.monotonic() + 120
        while not markers and time.monotonic() < deadline and proc.poll() is None:
            markers = sorted(dest.glob("_progress/*/group-*.json"))
            time.sleep(0.05)  # polling for the first finished group
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the CLI and the Ray it started
        proc.wait()
    assert markers, proc.stderr.read().decode()[-2000:] if proc.stderr else "no marker"
    assert not (dest / "_manifest.json").exists()  # killed before the end
    # A Ray worker that was mid-task can still write its group's marker for a moment after
    # its raylet died: wait until the markers stop changing before taking stock.
    done = sorted(dest.glob("_progress/*/group-*.json"))
    stable_since = time.monotonic()
    while time.monotonic() - stable_since < 3:
        time.sleep(0.2)
        now = sorted(dest.glob("_progress/*/group-*.json"))
        if now != done:
            done, stable_since = now, time.monotonic()
    kept = {p: p.stat().st_mtime_ns for p in dest.glob("*/part-*.parquet")}
    assert len(done) < GROUPS

    # run again, as a person does: the same command
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stdout + again.stderr
    m = json.loads((dest / "_manifest.json").read_text())
    assert m["resumed_groups"] == len(done) >= 1
    kept_line = f"resumed an interrupted ingest: {len(done)} finished group(s) kept, not redone"
    assert kept_line in again.stdout, again.stdout
    ids = [
        i
        for split in ("train", "val")
        for i in pq.read_table(dest / split).column("id").to_pylist()
    ]
    assert sorted(ids) == [f"photos/{i:05d}" for i in range(60)]  # each exactly once
    assert m["counts"]["train"] + m["counts"]["val"] == 60
    finished = {int(p.stem.split("-")[1]) for p in done}
    untouched = [p for p in kept if int(p.stem.split("-")[1]) in finished]
    assert untouched and all(p.stat().st_mtime_ns == kept[p] for p in untouched)
    assert not (dest / "_progress").exists()
    record(
        FaultRow(
            fault="killed ingest (SIGKILL of `aimctl ingest` and its Ray mid-way), run again",
            console=console_lines(again.stdout, r"^resumed an interrupted ingest", r": written;"),
            steps_redone=f"0 of the {len(done)} finished shard group(s) (files untouched)",
            data_lost="0: all 60 ids once across train and val",
            test=current_test(),
        )
    )
