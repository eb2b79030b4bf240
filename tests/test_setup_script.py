"""``infra/pillow_simd.sh``, the set-up's last step: it waits for another apt's lock instead of
building without WebP, and a PIL that lacks a codec ends ``make setup`` with a warning.

apt-get, id and pkg-config are fakes on PATH (nothing is installed); the script's functions are
sourced, so no Pillow-SIMD is built here.
"""

from __future__ import annotations

import os
import re
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


# --- One lock for every install (infra/constraints.txt) ---------------------------------------

LOCK = REPO / "infra" / "constraints.txt"
# The installer, and the package itself: never in a lock.
NOT_LOCKED = {"pip", "aim-platform"}
# What torch's CUDA build adds (torch pins them itself): only where torch is a CUDA build.
CUDA_EXTRAS = ("nvidia-", "triton")


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _lock() -> dict[str, str]:
    pins = {}
    for line in LOCK.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            assert line.count("==") == 1, f"{LOCK.name}: {line!r} is not name==version"
            name, version = line.split("==")
            pins[_canonical(name)] = version
    return pins


def _pillow_simd_version() -> str:
    """The Pillow-SIMD release infra/pillow_simd.sh builds (its default)."""
    m = re.search(r"^VERSION=\$\{PILLOW_SIMD_VERSION:-(\S+)\}$", SCRIPT.read_text(), re.M)
    assert m, "infra/pillow_simd.sh: no default VERSION"
    return m[1]


def lock_mismatches(installed: dict[str, str], pins: dict[str, str], simd: str) -> list[str]:
    """How an environment (``{canonical name: version}``) differs from the lock, one line per
    package; empty when it matches. Named exceptions: the Pillow-SIMD swap (pillow absent,
    pillow-simd at ``simd``; or pillow at the lock's version when the swap could not build),
    torch's build label (2.13.0+cpu matches 2.13.0), and nvidia-*/triton beside a CUDA torch."""
    installed = dict(installed)
    for name in NOT_LOCKED:
        installed.pop(name, None)
    if "pillow-simd" in installed:
        if installed.pop("pillow-simd") != simd:
            return [f"pillow-simd is not {simd}, the release infra/pillow_simd.sh builds"]
        if "pillow" not in installed:  # the swap: Pillow uninstalled, Pillow-SIMD in its place
            installed["pillow"] = pins.get("pillow", "?")
    torch = installed.get("torch", "")
    if "+" in torch:
        installed["torch"] = torch.split("+", 1)[0]
    if "+cu" in torch:
        installed = {k: v for k, v in installed.items() if not k.startswith(CUDA_EXTRAS)}
    problems = []
    for name in sorted(set(installed) | set(pins)):
        have, want = installed.get(name), pins.get(name)
        if have != want:
            problems.append(f"{name}: installed {have or '-'}, locked {want or '-'}")
    return problems


def test_the_environment_make_setup_made_matches_the_lock() -> None:
    """The suite's own environment (.venv, made by `make setup`) holds exactly the lock."""
    import sysconfig
    from importlib import metadata

    # The venv's own site-packages only: another test of this process may have put the base
    # interpreter's on sys.path (it holds packages the venv does not, e.g. colorama).
    venv = sorted({sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]})
    installed = {
        _canonical(d.metadata["Name"]): d.version for d in metadata.distributions(path=venv)
    }
    problems = lock_mismatches(installed, _lock(), _pillow_simd_version())
    assert not problems, (
        f"{sys.prefix} differs from {LOCK.relative_to(REPO)} (a dependency added to "
        "pyproject.toml: `make lock`; then, or for the rest: `make setup`):\n  "
        + "\n  ".join(problems)
    )


def test_lock_comparison_names_its_exceptions() -> None:
    pins = {"pillow": "13.0.0", "torch": "2.13.0", "ray": "2.60.0"}
    swapped = {"pillow-simd": "12.1.1.post0", "torch": "2.13.0+cpu", "ray": "2.60.0", "pip": "1"}
    assert lock_mismatches(swapped, pins, "12.1.1.post0") == []
    kept = {"pillow": "13.0.0", "torch": "2.13.0+cu128", "ray": "2.60.0", "nvidia-nccl-cu12": "2"}
    assert lock_mismatches(kept, pins, "12.1.1.post0") == []
    drifted = {"pillow": "13.0.0", "torch": "2.13.0", "ray": "2.61.0", "triton": "3"}
    assert lock_mismatches(drifted, pins, "x") == [
        "ray: installed 2.61.0, locked 2.60.0",
        "triton: installed 3, locked -",
    ]


def _declared() -> list[str]:
    """Every requirement pyproject.toml declares: dependencies and every extra but the
    screenshots tool (not installed by `make setup`)."""
    import tomllib

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    return project["dependencies"] + [r for k, v in extras.items() if k != "screenshots" for r in v]


def test_lock_pins_every_declared_dependency_and_the_torch_setup_installs() -> None:
    pins = _lock()
    names = {_canonical(re.split(r"[\s\[<>=!~;]", req, maxsplit=1)[0]) for req in _declared()}
    missing = sorted(names - set(pins))
    assert not missing, f"declared in pyproject.toml but not locked ({missing}): run `make lock`"
    makefile = (REPO / "Makefile").read_text()
    assert f"TORCH_VERSION ?= {pins['torch']}\n" in makefile
    docker = (REPO / "infra" / "Dockerfile").read_text()
    assert f"ARG TORCH_SPEC=torch=={pins['torch']}+" in docker


def test_version_caps_carry_their_reason() -> None:
    """An upper bound (<, <=, ==, ~=) in pyproject.toml says why on its line."""
    text = (REPO / "pyproject.toml").read_text()
    capped = [r for r in _declared() if re.search(r"(<|==|~=)", r)]
    assert capped, "no caps at all: then this test is moot"
    for req in capped:
        (line,) = [ln for ln in text.splitlines() if f'"{req}"' in ln]
        assert "#" in line.split(f'"{req}"', 1)[1], f"pyproject.toml: {req} has no reason beside it"


def _make_setup_dry(tmp_path: Path, nvidia_smi: str | None, *args: str) -> list[str]:
    """`make -n setup` for a fresh venv, with a fake nvidia-smi (None: one that fails, as
    on a machine without a GPU driver)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    fake = bin_dir / "nvidia-smi"
    fake.write_text(f"#!/bin/sh\necho '{nvidia_smi}'\n" if nvidia_smi else "#!/bin/sh\nexit 9\n")
    fake.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MAKELEVEL", "MFLAGS")}
    env["PATH"] = f"{bin_dir}:{env['PATH']}"
    env.pop("TORCH_BUILD", None)
    dry = subprocess.run(
        ["make", "--no-print-directory", "-n", "setup", f"VENV={tmp_path / 'venv'}", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    assert dry.returncode == 0, dry.stderr
    return [ln for ln in dry.stdout.splitlines() if " pip install " in ln]


def test_make_setup_installs_from_the_lock_with_the_torch_build_the_machine_wants(
    tmp_path: Path,
) -> None:
    torch_version = _lock()["torch"]
    cpu = _make_setup_dry(tmp_path, None)
    assert len(cpu) == 3 and all("-c infra/constraints.txt" in ln for ln in cpu), cpu
    assert cpu[0].endswith(f'"torch=={torch_version}"') and "--index-url" not in cpu[0]
    # uv, pinned by the lock, installs the package and the rest of the lock into the venv
    assert " -m pip install " in cpu[1] and cpu[1].endswith(" uv"), cpu
    assert cpu[2].startswith(f"{tmp_path / 'venv'}/bin/uv pip install "), cpu
    assert f"--python {tmp_path / 'venv'}/bin/python" in cpu[2], cpu
    assert cpu[2].endswith('-e ".[dev,server]"'), cpu
    # bytecode compiled at install (pip's default; uv's on request): where PYTHONDONTWRITEBYTECODE
    # is set, each process would otherwise compile every module it imports, every time
    assert "--compile-bytecode" in cpu[2] and "--no-compile" not in cpu[0], cpu

    gpu = _make_setup_dry(tmp_path, "GPU 0: NVIDIA H100 80GB HBM3 (UUID: GPU-0)")
    assert gpu[0].endswith(f'"torch=={torch_version}+cu128"'), gpu
    assert "--no-deps --index-url https://download.pytorch.org/whl/cu128" in gpu[0]
    assert "-c infra/constraints.txt" in gpu[2]  # torch's own dependencies: the lock's

    chosen = _make_setup_dry(tmp_path, "GPU 0: NVIDIA H100", "TORCH_BUILD=cpu")
    assert chosen == cpu
    forced = _make_setup_dry(tmp_path, None, "TORCH_BUILD=cuda", "TORCH_CUDA=cu126")
    assert forced[0].endswith(f'"torch=={torch_version}+cu126"') and "whl/cu126" in forced[0]


def _readme_versions() -> dict[str, str]:
    """The README's versions table: component -> version."""
    text = (REPO / "README.md").read_text()
    section = text[text.index("### Versions\n") :]
    section = section[: section.index("\n## ")]
    rows = [ln.split("|")[1:3] for ln in section.splitlines() if ln.startswith("| ")]
    return {name.strip(): version.strip() for name, version in rows[1:]}


def test_readme_versions_table_agrees_with_the_lock_and_manifests() -> None:
    import tomllib

    table = _readme_versions()
    pins = _lock()
    assert table["Ray"] == pins["ray"] and table["torch"] == pins["torch"], table
    assert table["MLflow"] == pins["mlflow"], table
    assert table["Pillow-SIMD"] == _pillow_simd_version(), table
    for manifest in (REPO / "infra" / "k8s").glob("*.yaml"):
        for found in re.findall(r'rayVersion: "?([\d.]+)', manifest.read_text()):
            assert found == table["Ray"], f"{manifest.name}: rayVersion {found}"
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert project["requires-python"] == f">={table['Python']}"
    docker = (REPO / "infra" / "Dockerfile").read_text()
    assert f"ARG PYTHON_VERSION={table['Python']}\n" in docker
    (schemas,) = (REPO / "tests" / "fixtures" / "kuberay").glob("v*")
    assert schemas.name == f"v{table['KubeRay']}"
    helm = f"kuberay/kuberay-operator --version {table['KubeRay']}"
    assert helm in (REPO / "infra" / "README.md").read_text()


# A fake Python for swap(): pip builds a tiny wheel (a real zip) and installs nothing; PIL is
# Pillow 13.0.0 with WebP; every call is recorded.
FAKE_PY = """#!/usr/bin/env bash
echo "$*" >> "$FAKES/py-calls"
case "$*" in
    *"-m pip wheel"*)
        prev=""; for a in "$@"; do [[ $prev == -w ]] && out=$a; prev=$a; done
        exec "$REAL_PY" -c 'import sys, zipfile; zipfile.ZipFile(sys.argv[1], "w").writestr("PIL/x", "1")' \\
            "$out/pillow_simd-12.1.1.post0-cp311-cp311-linux_x86_64.whl" ;;
    *"-m pip"*) exit 0 ;;
    *sysconfig*) echo "cp311-linux_x86_64" ;;
    *testzip*) exec "$REAL_PY" "$@" ;;
    *PIL.__version__*) echo "13.0.0" ;;
    *) exit 0 ;;
esac
"""


def _swap(tmp_path: Path, webp: bool) -> tuple[str, list[str]]:
    """infra/pillow_simd.sh's swap with the fake Python; what it said and the fake's calls."""
    fake = tmp_path / "python"
    fake.write_text(FAKE_PY)
    fake.chmod(0o755)
    calls = tmp_path / "py-calls"
    calls.unlink(missing_ok=True)
    env = {
        **os.environ,
        "FAKES": str(tmp_path),
        "REAL_PY": sys.executable,
        "AIM_WHEEL_CACHE": str(tmp_path / "cache"),
    }
    code = (
        f"source {SCRIPT}\nPY={fake}\n"
        "install_webp_headers() { :; }\n"
        f"webp_headers() {{ {'true' if webp else 'false'}; }}\n"
        "swap\n"
    )
    out = subprocess.run(["bash", "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return out.stdout + out.stderr, calls.read_text().splitlines()


def test_a_second_setup_installs_the_wheel_built_before_instead_of_compiling(
    tmp_path: Path,
) -> None:
    """Each clean-clone set-up (CI) compiled Pillow-SIMD again: about 45 s of a 2-core
    machine. The wheel is kept per version, Python, flags and WebP; a damaged one, or one
    built without WebP where the headers are now there, is built again."""
    said, calls = _swap(tmp_path, webp=True)
    assert any(c.startswith("-m pip wheel") for c in calls), calls
    assert "replaced by Pillow-SIMD" in said and "built before" not in said
    (cached,) = (tmp_path / "cache").glob("*/pillow_simd-*.whl")
    assert cached.parent.name.endswith("-webp") and "12.1.1.post0-cp311-linux_x86_64" in str(cached)

    said, calls = _swap(tmp_path, webp=True)  # the next clone: no compiler
    assert not any(c.startswith("-m pip wheel") for c in calls), calls
    assert any(c.startswith("-m pip install -q --no-deps") and c.endswith(".whl") for c in calls)
    assert f"a wheel built before on this machine: {cached.parent}" in said, said

    cached.write_bytes(cached.read_bytes()[:20])  # cut short: built again, and kept whole
    _, calls = _swap(tmp_path, webp=True)
    assert any(c.startswith("-m pip wheel") for c in calls), calls
    assert len(cached.read_bytes()) > 20

    _, calls = _swap(tmp_path, webp=False)  # no WebP headers: not the WebP build's wheel
    assert any(c.startswith("-m pip wheel") for c in calls), calls
    assert sorted(p.name.rsplit("-", 1)[1] for p in (tmp_path / "cache").iterdir()) == [
        "nowebp",
        "webp",
    ]
