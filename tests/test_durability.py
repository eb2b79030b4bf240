"""Durable by default: checkpoints on a cluster live where every node reaches them.

- the check itself (aim_platform.jobs.durable), without Ray;
- the recipes (aim-600M/1B/3B/7B) and every RayJob manifest: object storage, restarts on,
  the RayJob retried;
- the refusal through the real CLI: ``aimctl submit`` of a config with a local storage path,
  and ``aimctl pretrain`` joining a two-node local cluster (tests/test_node_loss.py's).
"""

from __future__ import annotations

import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from net_helpers import REPO, free_port
from test_node_loss import two_nodes  # noqa: F401 - the two-node cluster fixture, reused
from typer.testing import CliRunner

from aim_platform import submit as sub
from aim_platform.cli import app
from aim_platform.config import ConfigError, TrainConfig, load_config
from aim_platform.jobs.durable import check_durable_storage
from aim_platform.storage import is_remote

RECIPES = ["aim-600M", "aim-1B", "aim-3B", "aim-7B"]
# The recipes' placeholder data URLs, set as a user sets them.
DATA_URLS = [
    "data.sources.0.url=s3://b/dfn2b",
    "data.sources.1.url=s3://b/in1k",
    "data.val_url=s3://b/in1k-val",
]
APP = "/app"  # the image's WORKDIR: the repository


def test_node_local_storage_is_refused_on_several_nodes_only() -> None:
    local = TrainConfig(storage_path="./runs")
    check_durable_storage(local, nodes=1)  # make demo: embedded one-node Ray, ./runs
    with pytest.raises(ConfigError) as refused:
        check_durable_storage(local, nodes=2)
    text = str(refused.value)
    assert "\n" not in text
    assert text.startswith("train.storage_path ./runs is on this node's disk")
    assert "the cluster has 2 nodes" in text and "s3://" in text
    assert "train.storage_shared: true" in text and "train.storage_options" in text
    with pytest.raises(ConfigError, match="train.storage_path ./runs is a local folder and the"):
        check_durable_storage(local)  # submitted: the driver runs somewhere on the cluster
    with pytest.raises(ConfigError, match="file:///mnt/x"):
        check_durable_storage(TrainConfig(storage_path="file:///mnt/x"), nodes=3)
    for durable in (
        TrainConfig(storage_path="s3://bucket/runs"),
        TrainConfig(storage_path="gs://bucket/runs"),
        TrainConfig(storage_path="/mnt/nfs/runs", storage_shared=True),
    ):
        check_durable_storage(durable, nodes=8)
        check_durable_storage(durable)


@pytest.mark.parametrize("recipe", RECIPES)
def test_recipes_keep_checkpoints_on_object_storage_and_restart(recipe: str) -> None:
    job = load_config(REPO / "jobs" / "configs" / f"{recipe}.yaml", DATA_URLS)
    assert is_remote(job.train.storage_path), job.train.storage_path
    assert not job.train.storage_shared
    assert job.train.max_failures >= 3  # never -1: a failure that repeats ends the run
    check_durable_storage(job.train, nodes=16)


def _manifests(kind: str) -> list[tuple[Path, dict]]:
    found = []
    for path in sorted((REPO / "infra").rglob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if isinstance(doc, dict) and doc.get("kind") == kind:
                found.append((path, doc))
    return found


def _job_of(entrypoint: str, where: str) -> tuple[Path, list[str]]:
    """The config and ``--set`` overrides of an ``aimctl pretrain`` entrypoint."""
    words = shlex.split(entrypoint)
    assert words[:2] == ["aimctl", "pretrain"], f"{where}: {entrypoint}"
    config = REPO / Path(words[2]).relative_to(APP)
    sets = [words[i + 1] for i, word in enumerate(words) if word == "--set"]
    return config, sets


def test_rayjobs_resume_from_object_storage_after_a_lost_head() -> None:
    jobs = _manifests("RayJob")
    assert jobs, "no RayJob manifest under infra/"
    for path, manifest in jobs:
        where = f"{path.relative_to(REPO)} ({manifest['metadata']['name']})"
        spec = manifest["spec"]
        # A lost head fails the job: KubeRay resubmits it on a new cluster, which resumes by name.
        assert spec.get("backoffLimit", 0) >= 2, where
        config, sets = _job_of(spec["entrypoint"], where)
        job = load_config(config, sets)
        assert is_remote(job.train.storage_path), f"{where}: {job.train.storage_path}"
        assert job.train.max_failures >= 3, where
        check_durable_storage(job.train, nodes=2)
        check_durable_storage(job.train)


def test_ray_pods_give_a_preempted_job_time_to_checkpoint() -> None:
    """A deleted pod (a reclaimed spot node) gets SIGTERM and, after
    terminationGracePeriodSeconds (Kubernetes' default: 30 s), SIGKILL; `jobs stop` gets Ray's
    RAY_JOB_STOP_WAIT_TIME_S (default 3 s). Both must exceed train.preempt_grace_s, or the
    checkpoint of the step a job stops at is cut off."""
    grace = TrainConfig().preempt_grace_s
    found = 0
    for path, manifest in [*_manifests("RayJob"), *_manifests("RayCluster")]:
        cluster = manifest["spec"].get("rayClusterSpec", manifest["spec"])
        groups = [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]
        for group in groups:
            pod = group["template"]["spec"]
            where = f"{path.relative_to(REPO)}: {pod['containers'][0]['name']}"
            assert pod.get("terminationGracePeriodSeconds", 30) > grace, where
            env = {e["name"]: e.get("value") for e in pod["containers"][0]["env"]}
            assert float(env[sub.STOP_WAIT_ENV]) > grace, where
            found += 1
    assert found >= 4  # a head and a worker group in each of the two manifests


def test_submit_refuses_node_local_storage_before_sending(tmp_path: Path) -> None:
    demo = REPO / "jobs" / "configs" / "demo.yaml"
    nowhere = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(sub.SubmitError, match=r"train.storage_path ./runs is a local folder"):
        sub.submit(nowhere, demo)
    # Through the command line: one line, exit code 2, nothing sent.
    result = CliRunner().invoke(app, ["submit", "jobs/configs/demo.yaml", "--address", nowhere])
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(" ".join(lines).split("error: ")) == 2, result.output
    assert "train.storage_path ./runs" in result.output and "s3://" in result.output
    # Durable storage passes the check and goes on to the cluster (here: nobody answers).
    for ok in (["train.storage_path=s3://b/runs"], ["train.storage_shared=true"]):
        with pytest.raises(sub.SubmitError, match="cannot reach the Ray dashboard"):
            sub.submit(nowhere, demo, overrides=ok)


@pytest.mark.slow
@pytest.mark.cluster
def test_pretrain_on_two_nodes_with_local_storage_is_refused_before_any_step(
    two_nodes: dict[str, str],  # noqa: F811 - the fixture imported above
    tmp_path: Path,
) -> None:
    storage = tmp_path / "runs"
    env = {**two_nodes["env"], "HOME": str(tmp_path), "AIM_DATA_CACHE": str(tmp_path / "cache")}
    cmd = [str(Path(sys.executable).parent / "aimctl"), "pretrain", "jobs/configs/demo.yaml"]
    cmd += ["--address", two_nodes["gcs"], "--set", f"train.storage_path={storage}"]
    cmd += ["--set", f"tracking.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}"]
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    said = " ".join(done.stdout.split())
    assert done.returncode == 2, done.stdout + done.stderr
    assert f"error: train.storage_path {storage} is on this node's disk and the cluster has 2 " in (
        said
    )
    assert "checkpoints would die with the node" in said and "s3://" in said
    assert "Traceback" not in done.stdout + done.stderr
    run = storage / "demo"
    for made in ("latest.json", "mlflow_run_id.json", "lease.json", "final"):
        assert not (run / made).exists(), made  # refused before the run started
    assert not (tmp_path / "mlflow.db").exists()
