"""Joining a cluster: where the Ray auth token comes from (no cluster needed here; the
token-auth head of test_submit.py checks the real connection)."""

from __future__ import annotations

from pathlib import Path

import pytest

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
