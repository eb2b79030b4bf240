"""Shared fixtures: one local Ray per test session, a real S3 endpoint over HTTP on
127.0.0.1 (moto's threaded server) and a real ``mlflow server`` process.

Tests that need a Ray of another shape (a multi-node ``Cluster``, a ``ray start --head``)
run it in a subprocess, so that the session's Ray stays up.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator

import pytest
import torch

# Keep tests deterministic and light on this 2-core machine.
torch.set_num_threads(min(2, os.cpu_count() or 1))
# Ray 2.59+ token auth: never depend on what ~/.ray holds on the machine running the tests.
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
# No test reads Ray's own metrics: every Ray process the tests start (theirs and their
# subprocesses') skips collecting them. A 4-step demo pretrain alone, 2 cores: 90 core-s
# without against 97 with (six and three runs alternated, 2026-12-07; BENCHMARKS.md).
os.environ.setdefault("RAY_enable_metrics_collection", "0")
# Nobody opens the dashboard of the embedded Rays the tests' jobs start (`aimctl pretrain`,
# a study): AIM_RAY_DASHBOARD=0 leaves it out (aim_platform.cluster.start_embedded). A 4-step
# demo pretrain alone, 2 cores: 78.5 core-s without it against 85.4 with (four runs each,
# alternated, 2026-12-07; BENCHMARKS.md). The submit journeys' heads keep theirs: jobs go
# through it.
os.environ.setdefault("AIM_RAY_DASHBOARD", "0")

from net_helpers import free_port, wait_for_http  # noqa: E402

# Fixtures that start a Ray, a server or an S3 endpoint: their tests are `cluster` tests,
# left out of the fast lane (`make test-fast`: -m "not slow and not cluster").
CLUSTER_FIXTURES = {"ray_session", "ray_head", "mlflow_server", "s3_endpoint"}
FAST_LANE = os.environ.get("AIM_TEST_FAST") == "1"


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "faults: the fault-injection journeys (S3 through the fault proxy, an MLflow outage, "
        "a lost node, a head loss, a preemption, a second writer, a killed worker, a hung "
        "rank, a bad shard, a killed ingest, a study driver killed mid-trial); "
        "`make test-faults` runs them (CI too, after `make test`), `make test` leaves them out "
        "to fit its 25 minutes",
    )


# The files whose journeys take minutes, heaviest first. pytest-xdist hands out whole files in
# this order (`--no-loadscope-reorder` in the Makefile), so no long file starts last while the
# other process has nothing left; the rest keep collection order. One order serves both lanes
# (test seconds of each file's tests in the lane, working-tree runs of 2026-12-08): `make
# test`: submit about 680, train 300, probe streaming 155, S3 data 130, real job 125, then
# under 100 each; `make test-faults`: S3 faults about 450, lost node then head 350, killed
# study 270, the exact-resume journey (with the second writer and the hung rank) 240,
# preemption 230, bad shards 190, tracking outage 90, killed ingest 65. Longest first, as greedy list
# scheduling on two processes wants: a 320-s file handed out last had ended the fault lane
# 250 s after the other process.
HEAVY_FIRST = (
    "test_submit.py",
    "test_s3_faults.py",  # faults: the demo through the proxy, uploads retried and failing
    "test_head_loss.py",  # a lost node, then the whole cluster: two cluster and job starts
    "test_study_cluster.py",  # two tiny `aimctl study` runs (one killed), each starting Ray
    "test_exact_resume_journeys.py",  # a second writer, a killed worker, a hung rank: one run
    "test_train.py",
    "test_preemption.py",  # two `aimctl pretrain` runs, each starting Ray
    "test_bad_shards.py",  # two in-process pre-trainings, both meeting a truncated shard
    "test_tracking_outage.py",
    "test_data_resume.py",  # faults: a killed ingest and its own Ray
    "test_eval_stream.py",
    "test_data_s3.py",
    "test_gpu_real_job.py",  # one `aimctl ingest` + `aimctl pretrain` + bench step on a CPU
    "test_durability.py",  # a two-node cluster for one refused job
    "test_submit_failures.py",  # a head and two failing submitted jobs
    "test_services.py",  # three real MLflow servers (one behind basic-auth): about 150 s
    "test_perf.py",
    "test_objectives.py",
    "test_tracking.py",
    "test_artifact_store_errors.py",
    "test_data_pipeline.py",
    "test_data_resume.py",
    "test_data_ingest.py",
    "test_cli.py",
)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    rank = {name: i for i, name in enumerate(HEAVY_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: file order kept
    for item in items:
        if CLUSTER_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.cluster)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _no_ray_in_the_fast_lane(monkeypatch: pytest.MonkeyPatch) -> None:
    """In the fast lane a test that starts Ray fails, naming itself: mark it `cluster`."""
    if not FAST_LANE:
        return
    import ray

    def refuse(*args: object, **kwargs: object) -> None:
        pytest.fail("this test starts Ray: mark it @pytest.mark.cluster (fast lane)")

    monkeypatch.setattr(ray, "init", refuse)


@pytest.fixture(scope="session")
def ray_session(s3_endpoint: dict[str, str]) -> Iterator[None]:
    """One local Ray for the whole session: 2 logical CPUs, no dashboard.

    Started after the S3 endpoint so that Ray's workers inherit its ``AWS_*`` variables.
    """
    import ray

    if not ray.is_initialized():
        ray.init(
            num_cpus=2,
            include_dashboard=False,
            log_to_driver=False,
            runtime_env={"env_vars": {"RAY_AUTH_MODE": os.environ["RAY_AUTH_MODE"]}},
        )
    yield
    ray.shutdown()


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[dict[str, str]]:
    """A real S3 endpoint over HTTP on 127.0.0.1 (moto), with dummy credentials in the
    environment. Yields ``{"endpoint_url": ..., "bucket": ...}`` with one bucket created."""
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    env = {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing-secret",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": endpoint,
    }
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    import boto3

    boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket="aim-test")
    yield {"endpoint_url": endpoint, "bucket": "aim-test"}
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    server.stop()


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real ``mlflow server`` process on 127.0.0.1 with a SQLite store; yields its URI."""
    root = tmp_path_factory.mktemp("mlflow-server")
    port = free_port()
    log = open(root / "server.log", "w")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mlflow",
            "server",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "1",
            "--backend-store-uri",
            f"sqlite:///{root / 'mlflow.db'}",
            "--artifacts-destination",
            str(root / "artifacts"),
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        process_group=0,  # as services start it (a new session makes it start slowly)
        env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},  # as services do
    )
    uri = f"http://127.0.0.1:{port}"
    try:
        wait_for_http(f"{uri}/health", timeout=120)
    except TimeoutError:
        os.killpg(proc.pid, signal.SIGKILL)  # the server's uvicorn child too, not only mlflow
        raise RuntimeError((root / "server.log").read_text()[-3000:]) from None
    yield uri
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
    log.close()
