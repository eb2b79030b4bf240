"""Joining a cluster: where the Ray auth token comes from (no cluster needed here; the
token-auth head of test_submit.py checks the real connection)."""

from __future__ import annotations

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
