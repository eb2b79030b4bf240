"""The offline bundle for a GPU node without a package index (infra/offline_bundle.py, issue
30 point 1): what it resolves, what it leaves out, how it repacks wheels, and a whole bundle
built, unpacked and imported through its own unpack.sh."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest
from net_helpers import REPO

sys.path.insert(0, str(REPO / "infra"))
import offline_bundle as ob  # noqa: E402 - infra/ is no package


def test_a_node_gets_the_runtime_requirements_without_torch_or_server_parts() -> None:
    reqs = ob.requirements()
    names = [r.split("[")[0].split("=")[0].split(">")[0].split("<")[0] for r in reqs]
    assert "torch" not in names  # the node's own build, matched to its driver
    assert {"ray", "mlflow", "pydantic", "s3fs"} <= set(names)
    assert "ray[train,data,tune]==2.60.0" in reqs  # no dashboard/job agent on a node
    assert next(r for r in reqs if r.startswith("mlflow")).startswith("mlflow>=")  # no [auth]


def test_what_the_node_has_is_neither_pinned_nor_bundled(tmp_path: Path) -> None:
    have_file = tmp_path / "have.txt"
    have_file.write_text("# a node\nNumPy==2.5.2\npyarrow\n\ntyping_extensions  # no version\n")
    have = ob.read_have(have_file)
    assert have == {"numpy": "2.5.2", "pyarrow": None, "typing-extensions": None}
    lock = "# header\nnumpy==2.4.6\npyarrow==25.0.1\nray==2.60.0\ntyping-extensions==4.16.0\n"
    assert ob.constraints(lock, have) == "ray==2.60.0\n"
    resolved = [ob.Package(n, "1") for n in ("numpy", "ray", "torch", "nvidia-nccl-cu13", "x")]
    assert [p.name for p in ob.lacking(resolved, have)] == ["ray", "x"]


def _wheel(path: Path, files: dict[str, bytes]) -> Path:
    record = "".join(f"{name},sha256=x,{len(data)}\n" for name, data in files.items())
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        for name, data in files.items():
            z.writestr(name, data)
        z.writestr("ray-2.60.0.dist-info/RECORD", record)
    return path


def test_repack_stores_the_wheel_and_drops_what_a_node_never_uses(tmp_path: Path) -> None:
    wheel = _wheel(
        tmp_path / "ray-2.60.0-cp312-cp312-manylinux2014_x86_64.whl",
        {
            "ray/__init__.py": b"x = 1\n" * 100,
            "ray/jars/ray_dist.jar": b"j" * 5000,
            "ray/serve/api.py": b"s" * 300,
            "ray/train/__init__.py": b"t",
        },
    )
    rule = ob._slim_rule(wheel)
    assert "ray/jars/" in rule and "ray/train/" not in rule
    assert ob.repack(wheel, rule) == 5300
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        assert names == ["ray/__init__.py", "ray/train/__init__.py", "ray-2.60.0.dist-info/RECORD"]
        assert {i.compress_type for i in z.infolist()} == {zipfile.ZIP_STORED}
        record = z.read("ray-2.60.0.dist-info/RECORD").decode()
    assert "jars" not in record and "serve" not in record and "ray/train/__init__.py" in record


@pytest.mark.slow
@pytest.mark.skipif(platform.machine() != "x86_64", reason="the bundle's wheels are x86-64")
def test_a_bundle_built_here_unpacks_and_imports_through_its_own_script(tmp_path: Path) -> None:
    """A node that has everything but bracex (a small pure-Python wheel): pip resolves the
    whole requirement set for this Python from the index, the bundle holds bracex alone, and
    unpack.sh installs it without an index and imports Ray, MLflow, pydantic and s3fs."""
    lock = (REPO / "infra" / "constraints.txt").read_text().splitlines()
    names = [ln.split("==")[0] for ln in lock if ln and not ln.startswith("#")]
    have = tmp_path / "have.txt"
    have.write_text("\n".join(n for n in names if ob.normalize(n) != "bracex") + "\n")
    out = tmp_path / "bundle.tar.xz"
    python = f"{sys.version_info.major}.{sys.version_info.minor}"
    assert ob.main(["--have", str(have), "--python", python, "--out", str(out)]) == 0

    with tarfile.open(out) as tar:
        members = tar.getnames()
        tar.extractall(tmp_path, filter="data")
    bundle = tmp_path / ob.NAME
    assert sorted(m for m in members if m.endswith(".whl")) == [
        f"{ob.NAME}/wheels/{p.name}" for p in (bundle / "wheels").glob("*.whl")
    ]
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert [w["wheel"].split("-")[0] for w in manifest["wheels"]] == ["bracex"]

    site = tmp_path / "site"
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    env.pop("PYTHONPATH", None)
    done = subprocess.run(
        ["bash", str(bundle / "unpack.sh"), str(site)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "offline bundle: ray 2.60.0, mlflow 3.17" in done.stdout
    assert f"export PYTHONPATH={site}" in done.stdout
    assert (site / "bracex" / "__init__.py").is_file()
