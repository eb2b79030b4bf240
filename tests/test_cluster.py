"""Joining a cluster: where the Ray auth token comes from (no cluster needed here; the
token-auth head of test_submit.py checks the real connection)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from aim_platform import cluster
from aim_platform.cluster import ClusterError, connect, resolve_token


def test_token_precedence(tmp_path: Path) -> None:
    f1, f2, home = tmp_path / "f1", tmp_path / "f2", tmp_path / "home"
    f1.write_text("from-file\n")
    f2.write_text("from-path-env")
    (home / ".ray").mkdir(parents=True)
    (home / ".ray" / "auth_token").write_text("from-home")
    env = {"RAY_AUTH_TOKEN": "from-env", "RAY_AUTH_TOKEN_PATH": str(f2), "HOME": str(home)}
    assert resolve_token(f1, env) == "from-file"
    assert resolve_token(None, env) == "from-env"
    env.pop("RAY_AUTH_TOKEN")
    assert resolve_token(None, env) == "from-path-env"
    env.pop("RAY_AUTH_TOKEN_PATH")
    assert resolve_token(None, env) is None  # ~/.ray only counts with RAY_AUTH_MODE=token
    assert resolve_token(None, {**env, "RAY_AUTH_MODE": "token"}) == "from-home"
    with pytest.raises(ClusterError, match="--token-file: cannot read"):
        resolve_token(tmp_path / "missing", env)
    (tmp_path / "empty").write_text(" \n")
    with pytest.raises(ClusterError, match="RAY_AUTH_TOKEN_PATH: token file .* is empty"):
        resolve_token(None, {"RAY_AUTH_TOKEN_PATH": str(tmp_path / "empty")})


def test_a_dashboard_url_is_refused_with_the_reason() -> None:
    with pytest.raises(ClusterError, match="dashboard URL, which `aimctl submit` takes"):
        connect("http://127.0.0.1:8265")


def _driver(code: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    return subprocess.run(
        [sys.executable, "-c", code], env={**clean, **env}, capture_output=True, text=True,
        timeout=120,
    )  # fmt: skip


def test_the_token_reaches_rays_environment_before_ray_is_imported(tmp_path: Path) -> None:
    """Ray's documented way: RAY_AUTH_MODE and RAY_AUTH_TOKEN in the environment before Ray
    reads them (when it is imported); no private Ray call refreshes them afterwards."""
    token = tmp_path / "token"
    token.write_text("from-the-file\n")
    ok = _driver(
        "import os, sys; from aim_platform.cluster import use_token; "
        f"use_token('10.0.0.1:6379', {str(token)!r}); import ray; "
        "print(os.environ['RAY_AUTH_MODE'], os.environ['RAY_AUTH_TOKEN'])",
        {"HOME": str(tmp_path)},
    )
    assert ok.stdout.split() == ["token", "from-the-file"], ok.stderr[-2000:]
    late = _driver(
        "import ray; from aim_platform.cluster import connect; "
        "connect('127.0.0.1:1', token_file=" + repr(str(token)) + ")",
        {"HOME": str(tmp_path)},
    )
    assert late.returncode != 0
    assert "ClusterError: Ray was imported before the auth token was set" in late.stderr
    already = _driver(  # the shell set both: nothing to change, Ray may come first
        "import ray; from aim_platform.cluster import use_token; print(use_token('10.0.0.1:6379'))",
        {"HOME": str(tmp_path), "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": "from-env"},
    )
    assert already.stdout.strip() == "from-env", already.stderr[-2000:]
    embedded = _driver(  # no address: an embedded Ray, no token business at all
        "import os; from aim_platform.cluster import use_token; "
        f"print(use_token(None, {str(token)!r}), 'RAY_AUTH_TOKEN' in os.environ)",
        {"HOME": str(tmp_path)},
    )
    assert embedded.stdout.split() == ["None", "False"], embedded.stderr[-2000:]


def test_no_private_ray_api_in_the_package() -> None:
    package = Path(__file__).resolve().parents[1] / "platform" / "aim_platform"
    private = [
        f"{path.relative_to(package)}: {line.strip()}"
        for path in package.rglob("*.py")
        for line in path.read_text().splitlines()
        if "ray._raylet" in line or "ray._private" in line
    ]
    assert private == []


def test_no_address_starts_this_process_own_ray_not_the_last_ray_start_cluster(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``ray.init()`` joins the cluster named in ``ray_current_cluster`` (``ray start``,
    ``ray.cluster_utils``): a demo on a shared machine joined another user's test cluster and
    died with it. Without an address the platform asks Ray for a local one; ``RAY_ADDRESS``
    (inside a Ray job) still decides."""
    import ray
    from ray._private.services import canonicalize_bootstrap_address

    (tmp_path / "ray_current_cluster").write_text("127.0.0.1:9")
    assert canonicalize_bootstrap_address(None, temp_dir=str(tmp_path)).endswith(":9")  # joined
    assert canonicalize_bootstrap_address("local", temp_dir=str(tmp_path)) is None

    calls: list[str | None] = []
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda address=None, **kw: calls.append(address))
    monkeypatch.setattr(cluster, "_quiet_ray_data", lambda: None)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert connect(None) is True
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")
    assert connect(None) is True
    assert calls == ["local", None]


SLOW_AGENT = """
import os, sys, time
from pathlib import Path
marker = Path(os.environ["SLOW_AGENT_MARKER"])
if any(a.endswith(os.path.join("dashboard", "agent.py")) for a in sys.argv) and not marker.exists():
    marker.touch()
    time.sleep(30)  # past the raylet's 15 s wait for the agent's port files
"""

START = """
import ray
from aim_platform.cluster import start_embedded
start_embedded(num_cpus=1)
print("answer", ray.get(ray.remote(lambda: 41 + 1).remote()), flush=True)
ray.shutdown()
"""


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_an_embedded_ray_whose_agent_starts_too_slowly_is_started_again(tmp_path: Path) -> None:
    """Ray's raylet aborts when its dashboard agent writes its ports after 15 s
    (ray-project/ray#65983): two CI runs on a loaded 2-core box failed a job at start with
    "The current node timed out during startup". Here the first agent sleeps 30 s."""
    (tmp_path / "sitecustomize.py").write_text(SLOW_AGENT)
    marker = tmp_path / "agent-slept"
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")]),
        "SLOW_AGENT_MARKER": str(marker),
    }
    env.pop("RAY_ADDRESS", None)
    out = subprocess.run(
        [sys.executable, "-c", START], env=env, cwd=tmp_path, capture_output=True, text=True,
        timeout=540,
    )  # fmt: skip
    assert marker.exists(), "the fault did not happen: no dashboard agent slept"
    assert out.returncode == 0, out.stderr[-3000:]
    assert "answer 42" in out.stdout
    assert "Ray's local node did not start (try 1 of 3" in out.stderr, out.stderr[-3000:]


def test_aim_ray_dashboard_0_starts_an_embedded_ray_without_its_dashboard(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """`AIM_RAY_DASHBOARD=0` (CI, a shared box): no dashboard, about 5 core-s a start less;
    unset or 1: Ray's default; an explicit argument wins; anything else is refused."""
    import ray

    from aim_platform.cluster import ClusterError, embedded_dashboard, start_embedded

    seen: list[object] = []
    monkeypatch.setattr(
        ray, "init", lambda address=None, **kw: seen.append(kw["include_dashboard"])
    )
    for value, expected in (("0", False), ("off", False), ("1", None), ("", None)):
        monkeypatch.setenv("AIM_RAY_DASHBOARD", value)
        assert embedded_dashboard() is expected
        start_embedded(num_cpus=1)
    start_embedded(num_cpus=1, include_dashboard=True)
    assert seen == [False, False, None, None, True]
    monkeypatch.setenv("AIM_RAY_DASHBOARD", "maybe")
    with pytest.raises(ClusterError, match="AIM_RAY_DASHBOARD='maybe': use 0"):
        start_embedded()
