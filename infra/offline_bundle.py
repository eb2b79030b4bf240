"""Pack what a GPU node without a package index lacks into one offline bundle, and unpack it
there (issue 30 point 1).

Air-gapped clusters, and the GPU machine this project is measured on, have PyTorch but no
Ray, MLflow or pydantic, and take few megabytes along. This script resolves the platform's
runtime dependencies (pyproject.toml's; torch is the node's own) for the node's Python and
platform with pip (``pip install --dry-run --report`` for another interpreter:
``--python-version``, ``--platform``, ``--only-binary=:all:``) at the lock's versions
(``infra/constraints.txt``), downloads the wheels of what the node lacks (a package the node
has is used as it is there: ``unpack.sh`` imports Ray, MLflow, pydantic and s3fs over them,
so a version that does not fit fails when unpacking, not mid-run), drops the parts of Ray and
MLflow a training node never uses (Ray's Java jars, RLlib, Serve, LLM; MLflow's web UI),
stores each wheel uncompressed (xz then compresses the files themselves, far better than
over zip's deflate) and writes one ``.tar.xz`` with the wheels, ``manifest.json`` and
``unpack.sh``::

    python infra/offline_bundle.py --have infra/gpu-node-packages.txt --python 3.12 \\
        --out build/offline-bundle.tar.xz
    # on the node (pip there, no index):
    tar xJf offline-bundle.tar.xz && bash offline-bundle/unpack.sh /tmp/site
    export PYTHONPATH=/tmp/site:$PWD/platform

``--have`` lists the node's packages, one ``name`` or ``name==version`` a line (``python3 -m
pip list --format=freeze`` there gives it); ``--limit-mib`` (60) fails the build when the
bundle would be larger.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import tomllib
import zipfile
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LOCK = ROOT / "infra" / "constraints.txt"
NAME = "offline-bundle"  # the folder the archive unpacks to
# manylinux tags a CPython wheel for x86-64 Linux may carry (pip matches each exactly)
PLATFORMS = [
    *(f"manylinux_2_{n}_x86_64" for n in (39, 35, 34, 31, 28, 27, 24, 17, 12, 5)),
    "manylinux2014_x86_64",
    "manylinux2010_x86_64",
    "manylinux1_x86_64",
    "linux_x86_64",
]
# Never bundled: the node's own build of these is the one that matches its driver.
NEVER = re.compile(r"^(torch|triton|nvidia-.*)$")
# Parts of wheels a training node does not use (file-name prefixes inside the wheel).
SLIM = {
    "ray": ("ray/jars/", "ray/rllib/", "ray/serve/", "ray/llm/"),
    "mlflow": ("mlflow/server/js/",),
}
UNPACK = """\
#!/usr/bin/env bash
# Install the bundle's wheels into DEST (no index, no dependencies resolved: the bundle holds
# exactly what this node lacked), then import what the platform needs from there.
set -euo pipefail
dest="${1:?usage: unpack.sh DEST}"
here="$(cd "$(dirname "$0")" && pwd)"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$dest" \\
    "$here"/wheels/*.whl
PYTHONPATH="$dest${PYTHONPATH:+:$PYTHONPATH}" python3 -c '
import mlflow, pydantic, ray, s3fs
print(f"offline bundle: ray {ray.__version__}, mlflow {mlflow.__version__}, "
      f"pydantic {pydantic.__version__}, s3fs {s3fs.__version__}")'
echo "export PYTHONPATH=$dest\\${PYTHONPATH:+:\\$PYTHONPATH}"
"""


@dataclass(frozen=True)
class Package:
    name: str
    version: str


def normalize(name: str) -> str:
    """PEP 503's normalized project name."""
    return re.sub(r"[-_.]+", "-", name).lower()


def requirements(pyproject: Path = ROOT / "pyproject.toml") -> list[str]:
    """The platform's runtime requirements a node needs: pyproject.toml's, without torch (the
    node's own), without MLflow's server extras (a node is a client) and without Ray's
    ``default`` extra (the dashboard and its job agent, runtime environments: a node that runs
    ``aimctl pretrain`` with its own Ray needs neither)."""
    deps = tomllib.loads(pyproject.read_text())["project"]["dependencies"]
    out = []
    for dep in deps:
        name = re.match(r"[A-Za-z0-9_.-]+", dep)[0]
        if NEVER.match(normalize(name)):
            continue
        dep = re.sub(r"^mlflow\[[^\]]*\]", "mlflow", dep)
        out.append(re.sub(r"(?<=[\[,])default,|,default(?=[\],])", "", dep))
    return out


def read_have(path: Path) -> dict[str, str | None]:
    """The node's packages: normalized name -> version (None where only the name is known)."""
    have: dict[str, str | None] = {}
    for raw in path.read_text().splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        name, _, version = line.partition("==")
        have[normalize(name.strip())] = version.strip() or None
    return have


def constraints(lock: str, have: dict[str, str | None]) -> str:
    """The lock's pins of what the node does not have (its own are not bundled)."""
    out = []
    for raw in lock.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        name = re.split(r"[=<>!~ ;\[]", line, maxsplit=1)[0]
        if normalize(name) not in have:
            out.append(line)
    return "\n".join(out) + "\n"


def _pip_target_args(python: str) -> list[str]:
    platforms = [x for p in PLATFORMS for x in ("--platform", p)]
    return ["--python-version", python, "--implementation", "cp", *platforms,
            "--only-binary=:all:"]  # fmt: skip


def resolve(reqs: list[str], have: dict[str, str | None], python: str) -> list[Package]:
    """Every package the requirements need on the node (pip's resolution for its Python)."""
    with tempfile.TemporaryDirectory() as tmp:
        cons, report = Path(tmp) / "constraints.txt", Path(tmp) / "report.json"
        cons.write_text(constraints(LOCK.read_text(), have))
        subprocess.run(
            [sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed",
             "--quiet", "--report", str(report), "--target", str(Path(tmp) / "target"),
             *_pip_target_args(python), "-c", str(cons), *reqs],
            check=True,
        )  # fmt: skip
        install = json.loads(report.read_text())["install"]
    return sorted(
        (Package(i["metadata"]["name"], i["metadata"]["version"]) for i in install),
        key=lambda p: normalize(p.name),
    )


def lacking(resolved: list[Package], have: dict[str, str | None]) -> list[Package]:
    """What the node lacks: the resolution minus its packages (and never torch or CUDA)."""
    return [
        p for p in resolved if normalize(p.name) not in have and not NEVER.match(normalize(p.name))
    ]


def download(packages: list[Package], dest: Path, python: str) -> list[Path]:
    """The node's wheel of each package (pip download, one call)."""
    dest.mkdir(parents=True, exist_ok=True)
    pins = [f"{p.name}=={p.version}" for p in packages]
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "-d", str(dest),
         *_pip_target_args(python), *pins],
        check=True,
    )  # fmt: skip
    return sorted(dest.glob("*.whl"))


def repack(wheel: Path, drop: tuple[str, ...] = ()) -> int:
    """Rewrite ``wheel`` stored (uncompressed: the archive's xz compresses the files) and
    without the members under ``drop`` (and their RECORD lines); returns the bytes of the
    members removed, uncompressed."""
    removed = 0
    tmp = wheel.with_suffix(".repack")
    with zipfile.ZipFile(wheel) as src, zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED) as out:
        for info in src.infolist():
            if drop and info.filename.startswith(drop):
                removed += info.file_size
                continue
            data = src.read(info)
            if drop and info.filename.endswith(".dist-info/RECORD"):
                lines = data.decode().splitlines(keepends=True)
                data = "".join(x for x in lines if not x.startswith(drop)).encode()
            info.compress_type = zipfile.ZIP_STORED
            out.writestr(info, data)
    tmp.replace(wheel)
    return removed


def _slim_rule(wheel: Path) -> tuple[str, ...]:
    name = normalize(wheel.name.split("-", 1)[0])
    return SLIM.get(name, ())


def pack(wheels: list[Path], manifest: dict, out: Path) -> None:
    """``out`` (.tar.xz): ``offline-bundle/{wheels/*.whl, manifest.json, unpack.sh}``."""
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / NAME
        (folder / "wheels").mkdir(parents=True)
        for wheel in wheels:
            shutil.copy2(wheel, folder / "wheels" / wheel.name)
        (folder / "manifest.json").write_text(json.dumps(manifest, indent=1))
        (folder / "unpack.sh").write_text(UNPACK)
        (folder / "unpack.sh").chmod(0o755)
        out.parent.mkdir(parents=True, exist_ok=True)
        with tarfile.open(out, "w:xz", preset=9) as tar:
            tar.add(folder, arcname=NAME)


def build(have_file: Path, python: str, out: Path, limit_mib: float) -> int:
    have = read_have(have_file)
    packages = lacking(resolve(requirements(), have, python), have)
    with tempfile.TemporaryDirectory() as tmp:
        wheels = download(packages, Path(tmp) / "wheels", python)
        rows = []
        for wheel in wheels:
            cut = repack(wheel, _slim_rule(wheel))
            rows.append({"wheel": wheel.name, "bytes": wheel.stat().st_size, "cut": cut})
        manifest = {"python": python, "have": str(have_file.name), "wheels": rows}
        pack(wheels, manifest, out)
    size = out.stat().st_size / 2**20
    wheels_mib = sum(r["bytes"] for r in rows) / 2**20
    for r in sorted(rows, key=lambda r: -r["bytes"])[:8]:
        cut = f" ({r['cut'] / 2**20:.1f} MiB cut)" if r["cut"] else ""
        print(f"  {r['wheel']}: {r['bytes'] / 2**20:.1f} MiB{cut}")
    print(
        f"{out}: {len(rows)} wheels for Python {python} ({wheels_mib:.1f} MiB of wheels), "
        f"{size:.1f} MiB xz-compressed (limit {limit_mib:g} MiB)"
    )
    if size > limit_mib:
        print(f"error: the bundle is {size:.1f} MiB, over --limit-mib {limit_mib:g}")
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--have", type=Path, required=True, help="the node's packages (a file)")
    ap.add_argument("--python", default="3.12", help="the node's Python (major.minor)")
    ap.add_argument("--out", type=Path, default=ROOT / "build" / f"{NAME}.tar.xz")
    ap.add_argument("--limit-mib", type=float, default=60.0)
    args = ap.parse_args(argv)
    return build(args.have, args.python, args.out, args.limit_mib)


if __name__ == "__main__":
    sys.exit(main())
