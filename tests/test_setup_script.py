"""``infra/pillow_simd.sh``, the set-up's last step: it waits for another apt's lock instead of
building without WebP, and a PIL that lacks a codec ends ``make setup`` with a warning.

apt-get, id and pkg-config are fakes on PATH (nothing is installed); the script's functions are
sourced, so no Pillow-SIMD is built here.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from net_helpers import REPO

SCRIPT = REPO / "infra" / "pillow_simd.sh"

# A fake apt-get: records each call; `update` says the list lock is held for the first
# $LOCKED_CALLS calls; `install` "installs" libwebp-dev by leaving a file that pkg-config finds.
FAKE_APT = """#!/usr/bin/env bash
echo "$*" >> "$FAKES/apt-calls"
n=$(($(cat "$FAKES/updates" 2>/dev/null || echo 0) + 1))
if [[ " $* " == *" update "* ]]; then
    echo $n > "$FAKES/updates"
    if ((n <= LOCKED_CALLS)); then
        echo "E: Could not get lock /var/lib/apt/lists/lock. It is held by process 4242 (apt-get)" >&2
        exit 100
    fi
    exit 0
fi
touch "$FAKES/libwebp-installed"
"""
FAKE_PKG_CONFIG = '#!/usr/bin/env bash\n[[ -f "$FAKES/libwebp-installed" ]]\n'
FAKE_ROOT_ID = "#!/usr/bin/env bash\necho 0\n"


def _fakes(tmp_path: Path) -> Path:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, body in (
        ("apt-get", FAKE_APT),
        ("pkg-config", FAKE_PKG_CONFIG),
        ("id", FAKE_ROOT_ID),
    ):
        path = bin_dir / name
        path.write_text(body)
        path.chmod(0o755)
    return bin_dir


def _install_headers(
    tmp_path: Path, locked_calls: int, timeout: int
) -> subprocess.CompletedProcess:
    """Source the script and run its libwebp step with the fakes (the system's own headers
    are left out of the check, so that the machine running the tests does not matter)."""
    bin_dir = _fakes(tmp_path)
    env = {
        **os.environ,
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "FAKES": str(tmp_path),
        "LOCKED_CALLS": str(locked_calls),
        "AIM_APT_LOCK_TIMEOUT": str(timeout),
        "AIM_APT_LOCK_RETRY_S": "0.1",
    }
    code = (
        f"source {SCRIPT}\n"
        "webp_headers() { pkg-config --exists libwebp; }\n"
        "install_webp_headers\n"
    )
    return subprocess.run(
        ["bash", "-c", code], env=env, capture_output=True, text=True, timeout=120
    )


def test_libwebp_install_waits_for_another_apts_lock(tmp_path: Path) -> None:
    out = _install_headers(tmp_path, locked_calls=2, timeout=600)
    assert out.returncode == 0, out.stderr
    calls = (tmp_path / "apt-calls").read_text().splitlines()
    assert len(calls) == 4  # update refused twice (lock), then update and install
    assert all(c.startswith("-o DPkg::Lock::Timeout=600 ") for c in calls), calls
    assert calls[-1].endswith("install -y -qq --no-install-recommends libwebp-dev")
    assert (tmp_path / "libwebp-installed").exists()
    waiting = [ln for ln in out.stderr.splitlines() if "holds its lock" in ln]
    assert len(waiting) == 1 and "600s" in waiting[0], out.stderr
    assert "building without WebP" not in out.stderr


def test_a_lock_never_released_is_said_with_apts_own_words(tmp_path: Path) -> None:
    out = _install_headers(tmp_path, locked_calls=10**6, timeout=1)
    assert out.returncode == 1
    assert "Could not get lock /var/lib/apt/lists/lock" in out.stderr
    assert "building without WebP" in out.stderr
    assert not (tmp_path / "libwebp-installed").exists()


def _check(python: str, tmp_path: Path, site: str | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    if site is not None:  # a sitecustomize that changes what PIL reports
        (tmp_path / "sitecustomize.py").write_text(site)
        env["PYTHONPATH"] = str(tmp_path)
    return subprocess.run(
        ["bash", str(SCRIPT), "--check", python],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_setup_ends_with_a_warning_naming_a_missing_codec(tmp_path: Path) -> None:
    no_webp = (
        "from PIL import features\n"
        "_check = features.check\n"
        "features.check = lambda f: f != 'webp' and _check(f)\n"
    )
    out = _check(sys.executable, tmp_path, no_webp)
    assert out.returncode == 0
    (line,) = [ln for ln in out.stderr.splitlines() if ln.startswith("WARNING")]
    assert line.endswith("cannot decode: WebP.")
    assert "bash infra/pillow_simd.sh" in out.stderr
    broken = _check("/bin/false", tmp_path)  # a Python whose PIL does not even import
    assert "cannot decode: JPEG PNG WebP" in broken.stderr


def test_make_setup_runs_the_codec_check_every_time() -> None:
    # as a person types it: not as a sub-make of `make test` (which prints `make[1]: Leaving
    # directory` after the recipe and passes its own flags down)
    env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MAKELEVEL", "MFLAGS")}
    dry = subprocess.run(
        ["make", "--no-print-directory", "-n", "setup"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    assert dry.stdout.splitlines()[-1].startswith("bash infra/pillow_simd.sh --check "), dry.stdout
