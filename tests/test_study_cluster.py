"""Studies on a cluster (issue 28 point 6): a study whose storage is object storage keeps
everything of its trials there (checkpoints, trunks, Tune's state, the floor, the tables), and
``aimctl study --resume`` after its driver is killed mid-trial finishes the killed trial from
its checkpoint, each step once, and prints the whole table. The same journey counts the
pre-trainings of trials that differ only in the probe (issue 30 point 2): they share one (the
two trials here, one pre-training).

That a resumed pre-training goes on exactly as an uninterrupted one would, number for number,
is tests/test_train.py's checkpoint test (model, optimizer and schedule) and
tests/test_data_exact_resume.py's (the data stream); a clean third study to compare tables
with cost this journey a third of its 430 s and is left out to keep CI within its budget.

A fault journey (a SIGKILLed driver, two studies each starting Ray), so it runs in
`make test-faults` and records its row of the fault table."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from fault_rows import FaultRow, console_lines, current_test, record

from aim_platform.jobs.study_spec import STUDIES_DIR
from aim_platform.storage import filesystem

AIMCTL = str(Path(sys.executable).parent / "aimctl")
# Two trials of Table 3d, one causal pre-training probed two ways (so one pre-training), cut
# to a few steps with a checkpoint every 2; one worker a trial (the tiny preset's two would
# need more CPUs than a 2-core machine lends).
VARIANTS = ["causal-pt.causal-probe", "causal-pt.bidir-probe"]
CUT = [
    "train.steps=4",
    "train.checkpoint_every=2",
    "train.val_every=4",
    "train.log_every=1",
    "train.num_workers=1",
    "train.cpus_per_worker=0.4",
    "data.cpus_per_task=0.5",
    "probe.steps=5",
]
STUDY = [AIMCTL, "study", str(STUDIES_DIR / "attention.yaml"), "--variants", ",".join(VARIANTS)]
STUDY += ["--scale", "tiny", *[x for c in CUT for x in ("--set", c)]]


def _table(output: str) -> list[str]:
    """The printed table and verdict rows (Markdown lines starting with ``|``)."""
    return [line.strip() for line in output.splitlines() if line.startswith("|")]


def _end_session(sid: int) -> None:
    """Processes the killed driver left in its session (Ray's agents), started by this test."""
    for p in psutil.process_iter():
        try:
            if os.getsid(p.pid) == sid:
                p.kill()
        except (ProcessLookupError, psutil.Error):
            pass


@pytest.mark.slow
@pytest.mark.faults  # `make test-faults` (CI runs it after `make test`)
@pytest.mark.timeout(2400)  # two studies, each starting Ray: minutes each on a loaded machine
def test_study_on_s3_killed_mid_trial_resumes_its_trial_from_the_checkpoint(
    s3_endpoint: dict[str, str], tmp_path: Path
) -> None:
    endpoint = s3_endpoint["endpoint_url"]
    # The endpoint reaches the study through --storage-options only.
    env = {k: v for k, v in os.environ.items() if k not in ("AWS_ENDPOINT_URL",)}
    env.pop("MLFLOW_TRACKING_URI", None)  # each run's own SQLite store under its cwd
    storage = f"s3://{s3_endpoint['bucket']}/study-{tmp_path.name}"
    on_s3 = [
        *STUDY,
        "--storage",
        storage,
        "--storage-options",
        json.dumps({"endpoint_url": endpoint}),
    ]
    fs, root = filesystem(f"{storage}/attention-tiny", {"endpoint_url": endpoint})
    driver = tmp_path / "driver"  # the driver's working folder: logs and MLflow only
    driver.mkdir()

    with open(tmp_path / "killed.txt", "w") as out:
        killed = subprocess.Popen(
            on_s3, cwd=driver, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        deadline = time.monotonic() + 900  # a loaded CI machine
        saved: list[str] = []
        while not saved:
            assert killed.poll() is None, (tmp_path / "killed.txt").read_text()[-3000:]
            assert time.monotonic() < deadline, (tmp_path / "killed.txt").read_text()[-3000:]
            time.sleep(0.5)
            fs.invalidate_cache()
            saved = fs.glob(f"{root}/trials/*/latest.json")
        os.kill(killed.pid, signal.SIGKILL)  # the study driver, mid-trial
        killed.wait(timeout=60)
    finally:
        killed.kill()
        _end_session(killed.pid)
    first_trial = saved[0].split("/")[-2]  # the first pre-training's run
    step = json.loads(fs.cat_file(saved[0]))["step"]
    assert step in (2, 4), step
    # Nothing of a trial on the driver's disk: its checkpoints are on S3.
    assert fs.exists(f"{root}/tune") and fs.exists(f"{root}/parent_run.json")
    assert not [p for p in driver.rglob("*") if p.name in ("latest.json", "trials", "tune")]

    resumed = subprocess.run(
        [*on_s3, "--resume"], cwd=driver, env=env, capture_output=True, text=True, timeout=1200
    )
    (tmp_path / "resumed.txt").write_text(resumed.stdout + resumed.stderr)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    fs.invalidate_cache()  # s3fs keeps the listings it made while polling
    assert "(1 pre-training: trials that differ only in the probe share one)" in resumed.stdout
    # the resumed study shows its trials as the clean one does (Tune restores its callback)
    assert all(f"trial {v}: done" in resumed.stdout for v in VARIANTS), resumed.stdout
    assert f"table: {storage}/attention-tiny/table.md" in resumed.stdout
    # one pre-training a group: the shared one is named after its first variant
    runs = sorted(p.rstrip("/").split("/")[-1] for p in fs.ls(f"{root}/trials"))
    runs = [r for r in runs if r and r != "trials"]  # s3fs lists the folder's own marker
    assert runs == [f"attention-tiny-{VARIANTS[0]}"]
    trial = f"{root}/trials/attention-tiny-{VARIANTS[0]}"
    assert json.loads(fs.cat_file(f"{trial}/latest.json"))["step"] == 4
    assert fs.exists(f"{trial}/final/trunk.safetensors")
    assert {"table.md", "table.csv", "floor.json"} <= {p.split("/")[-1] for p in fs.ls(root)}
    assert not [p for p in driver.rglob("*") if p.name in ("latest.json", "trials", "tune")]

    # The killed trial went on from its checkpoint, in its own MLflow run, each step once.
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{driver / 'runs' / 'mlflow.db'}")
    parent = json.loads(fs.cat_file(f"{root}/parent_run.json"))["run_id"]
    exp = client.get_run(parent).info.experiment_id
    children = client.search_runs([exp], f"tags.mlflow.parentRunId = '{parent}'")
    pretrainings = [r for r in children if r.info.run_name.startswith("attention-tiny-")]
    assert len(pretrainings) == 1, [r.info.run_name for r in children]
    runs = [r for r in pretrainings if r.info.run_name == first_trial]
    assert len(runs) == 1
    resumed_at = client.get_metric_history(runs[0].info.run_id, "train/resumed_from_step")
    assert resumed_at and resumed_at[-1].value >= step, resumed_at
    logged = [m.step for m in client.get_metric_history(runs[0].info.run_id, "train/loss")]
    assert len(logged) == len(set(logged)) and {3, 4} <= set(logged), logged

    # The whole table: both trials probed (the shared pre-training too), the floor beside them.
    table = _table(resumed.stdout)
    rows = [line.split("|")[1].strip() for line in table]
    assert {"linear", "attentive", "random trunk (linear)"} <= set(rows), resumed.stdout
    assert table[0].split("|")[2:4] == [f" {v} " for v in VARIANTS]  # every trial a column
    for name in ("linear", "attentive"):
        line = next(x for x in table if x.startswith(f"| {name} |"))
        cells = [c.strip() for c in line.split("|")[2:4]]
        assert all(re.fullmatch(r"\**\d+\.\d\**", c) for c in cells), line  # not failed or -
    resumed_from = int(resumed_at[-1].value)
    record(
        FaultRow(
            fault="study driver (`aimctl study`, storage on S3) SIGKILLed mid-trial, the same "
            "command with `--resume`",
            console=console_lines(resumed.stdout, r"trial .*: done", r"^table: "),
            steps_redone=(
                f"the steps after {resumed_from} run before the kill (killed as step {step}'s "
                f"checkpoint appeared; `train/resumed_from_step` {resumed_from}); each logged "
                "step once in the trial's one MLflow run"
            ),
            data_lost="0: the killed trial resumed from its checkpoint, each step logged once; "
            "every cell of the table a number",
            test=current_test(),
        )
    )
