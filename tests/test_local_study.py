"""Studies without Ray (``jobs/gpu_study.py``): the same jobs, probes, table and verdicts as
``aimctl study``, run in local processes on one device, on the committed CIFAR-10 fixture."""

from __future__ import annotations

import json
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from aim_platform.data.folders import read_image_folders
from aim_platform.errors import DataError
from aim_platform.jobs.local_study import run_local_studies
from aim_platform.jobs.study_spec import STUDIES_DIR, load_study, select_variants

REPO = Path(__file__).resolve().parents[1]
MINI = REPO / "tests" / "assets" / "cifar10-mini"  # 160 train + 40 test JPEGs, 10 classes
TINY = ["train.global_batch_size=16", "train.micro_batch_size=16", "train.steps=6"]


def test_image_folders_and_their_tar_archives_read_the_same(tmp_path: Path) -> None:
    folders = read_image_folders(MINI)
    assert (len(folders.train), len(folders.val), len(folders.classes)) == (160, 40, 10)
    # ingest's hashed order, not the listing's: the first rows (val_limit's sample, the first
    # feature shard) mix the classes
    assert len(set(folders.val.labels[:8])) >= 4 and len(set(folders.train.labels[:16])) >= 6
    for split in ("train", "test"):
        with tarfile.open(tmp_path / f"{split}.tar.gz", "w:gz") as tar:
            tar.add(MINI / split, arcname=split)
    archives = read_image_folders(tmp_path)
    assert archives.classes == folders.classes
    assert archives.train.ids == folders.train.ids and archives.val.labels == folders.val.labels
    assert archives.train.images == folders.train.images  # byte for byte
    (tmp_path / "train.tar.gz").unlink()
    with pytest.raises(DataError, match="needs train/<class>/ and test/<class>/"):
        read_image_folders(tmp_path)


def test_bad_data_is_one_clear_error_before_any_trial(tmp_path: Path) -> None:
    script = [sys.executable, str(REPO / "jobs" / "gpu_study.py"), str(STUDIES_DIR / "head.yaml")]
    for data, says in (
        (tmp_path / "missing", "is not a folder"),
        (tmp_path, "needs train/<class>/ and test/<class>/"),  # empty
    ):
        out = subprocess.run(
            [*script, "--data", str(data), "--scale", "tiny", "--device", "cpu"],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert out.returncode == 2 and says in out.stderr and "Traceback" not in out.stderr
        assert "trials" not in out.stdout  # nothing started
    (tmp_path / "train.tar.gz").write_bytes(b"\x1f\x8b truncated")  # a corrupt archive
    with pytest.raises(DataError, match="not a readable archive"):
        read_image_folders(tmp_path)


def test_a_study_runs_without_ray_and_gives_the_table_verdicts_and_floor(tmp_path: Path) -> None:
    spec = select_variants(load_study(STUDIES_DIR / "head.yaml"), ["none", "mlp"])
    [result] = run_local_studies(
        [spec],
        "tiny",
        str(MINI),
        seeds=2,
        extra=[f"data.sources.0.url={MINI}", *TINY],
        parallel=1,  # one spawned worker (importing torch is most of the cost here)
        out=tmp_path,
        say=lambda text: None,
    )
    assert sorted((t.variant, t.seed, t.error) for t in result.trials) == [
        ("mlp", 0, None),
        ("mlp", 1, None),
        ("none", 0, None),
        ("none", 1, None),
    ]
    for t in result.trials:
        assert 0 <= t.metrics["probe/linear/top1"] <= 1 and t.metrics["val/loss"] > 0
    assert set(result.floor) == {"none", "mlp"} and set(result.floor["mlp"]) == {0, 1}
    rows = {r[0] for r in result.table()}
    assert {"linear", "attentive", "val loss", "random trunk (linear)"} <= rows
    pairs = {(v.row, v.a, v.b) for v in result.verdicts()}
    assert ("linear", "mlp", "none") in pairs and ("attentive", "mlp", "random trunk") in pairs
    saved = json.loads((tmp_path / "results.json").read_text())
    assert sorted(r["kind"] for r in saved) == ["floor"] * 2 + ["trial"] * 4  # one floor a seed
    md = (tmp_path / "head.md").read_text()
    assert "Verdicts:" in md and "random trunk (attentive)" in md


def test_trials_that_differ_only_in_the_probe_share_one_pretraining(tmp_path: Path) -> None:
    causal, bidir = "causal-pt.causal-probe", "causal-pt.bidir-probe"
    spec = select_variants(load_study(STUDIES_DIR / "attention.yaml"), [causal, bidir])
    [result] = run_local_studies(
        [spec],
        "tiny",
        str(MINI),
        extra=[f"data.sources.0.url={MINI}", *TINY],
        parallel=1,
        out=tmp_path,
        say=lambda text: None,
    )
    saved = json.loads((tmp_path / "results.json").read_text())
    trials = {r["variant"]: r for r in saved if r["kind"] == "trial"}
    assert trials[causal]["shared_with"] == [bidir] and trials[bidir]["shared_with"] == [causal]
    m = {t.variant: t.metrics for t in result.trials}
    assert m[causal]["val/loss"] == m[bidir]["val/loss"]  # one trunk, pre-trained once
    # probed twice: causally and bidirectionally (the floors differ the same way)
    assert m[causal]["probe/attentive/top1"] != m[bidir]["probe/attentive/top1"] or (
        m[causal]["probe/linear/top1"] != m[bidir]["probe/linear/top1"]
    )
    assert len([r for r in saved if r["kind"] == "floor"]) == 2


def test_past_the_deadline_no_trial_starts_and_the_script_says_so(tmp_path: Path) -> None:
    out = subprocess.run(
        [
            sys.executable,
            str(REPO / "jobs" / "gpu_study.py"),
            str(STUDIES_DIR / "head.yaml"),
            "--data",
            str(MINI),
            "--scale",
            "tiny",
            "--seeds",
            "2",
            "--variants",
            "mlp,transformer",
            "--parallel",
            "1",
            "--device",
            "cpu",
            "--deadline-s",
            "0",
            "--out",
            str(tmp_path),
            *(a for kv in TINY for a in ("--set", kv)),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 1, out.stderr  # nothing finished
    assert "head: mlp/s0: failed (not started: deadline" in out.stdout
    assert "| linear | failed | failed |\n" in out.stdout  # the two variants asked for
    assert "none/s0" not in out.stdout
    assert json.loads((tmp_path / "results.json").read_text())


def test_only_some_seed_indices_are_planned_named_and_seeded_as_in_the_whole_study() -> None:
    from aim_platform.config import ConfigError
    from aim_platform.jobs.local_study import plan_tasks

    spec = load_study(STUDIES_DIR / "attention.yaml")
    whole, _ = plan_tasks([spec], "tiny", 3, [])
    part, floor_of = plan_tasks([spec], "tiny", 3, [], only_seeds=[2])
    assert {t.seed for t in part} == {2} and all(t.seeds == 3 for t in part)
    # the same jobs, seeds and names (a Task compares by identity: it keys the results)
    assert [repr(t) for t in part] == [repr(t) for t in whole if t.seed == 2]
    assert set(floor_of["attention"]) == {(v, 2) for v in spec.variants}
    with pytest.raises(ConfigError, match="--only-seeds"):
        plan_tasks([spec], "tiny", 2, [], only_seeds=[2])
