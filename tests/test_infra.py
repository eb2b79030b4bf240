"""Static checks of everything under infra/: the Dockerfile, KubeRay and Kubernetes manifests,
the Ray cluster launcher YAML and the compose stack (nothing here can start them)."""

from __future__ import annotations

import json
import os
import re
import shlex
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import pytest
import yaml
from net_helpers import REPO

from aim_platform import services, submit
from aim_platform.security import is_secret_key, redact_text

INFRA = REPO / "infra"
K8S = INFRA / "k8s"
COMPOSE = INFRA / "compose" / "compose.yaml"
AWS = INFRA / "aws" / "cluster.yaml"
VERSION = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
RAY_VERSION = re.search(r'"ray\[[^\]]*\]==([\d.]+)"', (REPO / "pyproject.toml").read_text())[1]
OUR_IMAGE = re.compile(rf"^(?:[\w.\-]+(?::\d+)?/)*aim-platform:{re.escape(VERSION)}$")
APP = "/app"  # the image's WORKDIR, where the repository lives
NODE_ENV = {"RAY_AUTH_MODE", "MLFLOW_TRACKING_URI", "AWS_ENDPOINT_URL", "MLFLOW_S3_ENDPOINT_URL"}
# The KubeRay release infra/README.md installs; its RayCluster and RayJob CRD schemas are the
# fixture the Ray manifests are validated against (see tests/fixtures/kuberay/README.md).
KUBERAY = "v1.7.0"
CRD_SCHEMAS = REPO / "tests" / "fixtures" / "kuberay" / KUBERAY
CRD_FILES = {"RayCluster": "rayclusters.json", "RayJob": "rayjobs.json"}
K8S_KINDS = {
    "RayCluster": "ray.io/v1",
    "RayJob": "ray.io/v1",
    "Deployment": "apps/v1",
    "Service": "v1",
    "PersistentVolumeClaim": "v1",
    "Job": "batch/v1",
    "ConfigMap": "v1",
    "NetworkPolicy": "networking.k8s.io/v1",
}
# The Kubernetes releases whose own JSON schemas (the kubernetes-validate package ships them,
# generated from each release's OpenAPI document) the core objects are validated against: the
# oldest still in the package's window we claim and the newest it ships.
KUBERNETES = ("1.30.0", "1.37.0")
PART_OF = {"app.kubernetes.io/part-of": "aim-platform"}  # the label the NetworkPolicies let in


def _docs(path: Path) -> list[dict[str, Any]]:
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    assert docs, f"{path} holds no YAML document"
    assert all(isinstance(d, dict) for d in docs), path
    return docs


def _k8s_docs() -> list[tuple[Path, dict[str, Any]]]:
    return [(p, d) for p in sorted(K8S.glob("*.yaml")) for d in _docs(p)]


def _by_kind(kind: str) -> list[dict[str, Any]]:
    return [d for _, d in _k8s_docs() if d["kind"] == kind]


def _ray_cluster_specs() -> list[tuple[str, dict[str, Any]]]:
    specs = [(d["metadata"]["name"], d["spec"]) for d in _by_kind("RayCluster")]
    specs += [(d["metadata"]["name"], d["spec"]["rayClusterSpec"]) for d in _by_kind("RayJob")]
    return specs


def _pod_specs() -> Iterator[tuple[str, dict[str, Any]]]:
    """Every pod spec in the Kubernetes manifests, with a label saying where it is."""
    for _, d in _k8s_docs():
        name = f"{d['kind']}/{d['metadata']['name']}"
        spec = d.get("spec", {})
        if d["kind"] in ("Deployment", "Job"):
            yield name, spec["template"]["spec"]
        if d["kind"] == "RayJob":
            yield f"{name}/submitter", spec["submitterPodTemplate"]["spec"]
            spec = spec["rayClusterSpec"]
        if d["kind"] in ("RayCluster", "RayJob"):
            yield f"{name}/head", spec["headGroupSpec"]["template"]["spec"]
            for group in spec["workerGroupSpecs"]:
                yield f"{name}/{group['groupName']}", group["template"]["spec"]


def _containers() -> Iterator[tuple[str, dict[str, Any]]]:
    for where, pod in _pod_specs():
        for c in pod["containers"]:
            yield f"{where}/{c['name']}", c


def _env(entries: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {e["name"]: e for e in entries}


def _compose() -> dict[str, Any]:
    return _docs(COMPOSE)[0]


def _compose_env(service: str) -> dict[str, str]:
    env = _compose()["services"][service].get("environment", {})
    assert isinstance(env, dict), f"compose {service}: environment as a mapping"
    return {k: str(v) for k, v in env.items()}


def test_every_yaml_in_infra_parses() -> None:
    files = sorted(INFRA.rglob("*.yaml")) + sorted(INFRA.rglob("*.yml"))
    assert {K8S / "raycluster.yaml", K8S / "rayjob-pretrain.yaml", COMPOSE, AWS} <= set(files)
    for path in files:
        _docs(path)


def test_kubernetes_kinds_and_required_fields() -> None:
    kinds = set()
    for path, d in _k8s_docs():
        kind = d.get("kind")
        assert kind in K8S_KINDS, f"{path}: unexpected kind {kind!r}"
        assert d.get("apiVersion") == K8S_KINDS[kind], f"{path}: {kind} apiVersion"
        assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", d["metadata"]["name"]), path
        assert isinstance(d.get("spec" if kind != "ConfigMap" else "data"), dict), path
        kinds.add(kind)
    # The list: a Ray cluster, a RayJob, MLflow and MinIO as Deployments with Services.
    assert {"RayCluster", "RayJob", "Deployment", "Service", "NetworkPolicy"} <= kinds
    deployments = {d["metadata"]["name"]: d for d in _by_kind("Deployment")}
    assert {"aim-mlflow", "aim-minio"} <= set(deployments)
    for name, d in deployments.items():
        pod_labels = d["spec"]["template"]["metadata"]["labels"]
        selector = d["spec"]["selector"]["matchLabels"]
        assert selector.items() <= pod_labels.items(), f"{name}: selector does not match pods"
    for where, c in _containers():
        assert c.get("name") and c.get("image"), where


# ------------------------------------------------ the Ray manifests against KubeRay's own CRDs


def closed(schema: dict[str, Any]) -> dict[str, Any]:
    """A copy of a CRD schema in which a field the schema does not list is an error.

    KubeRay's CRD schemas (like every structural Kubernetes schema) leave
    ``additionalProperties`` out: the API server then *prunes* unknown fields, so a
    misspelled one vanishes without a word, and JSON Schema's default lets it through too.
    Here every object schema that lists ``properties``, sets no ``additionalProperties`` and
    does not keep unknown fields (``x-kubernetes-preserve-unknown-fields``) gets
    ``additionalProperties: false``. Maps (``additionalProperties: {schema}``) stay maps.
    """
    out = dict(schema)
    if "properties" in schema:
        out["properties"] = {k: closed(v) for k, v in schema["properties"].items()}
        keeps_unknown = schema.get("x-kubernetes-preserve-unknown-fields") is True
        if "additionalProperties" not in schema and not keeps_unknown:
            out["additionalProperties"] = False
    for key in ("items", "additionalProperties", "not"):
        if isinstance(schema.get(key), dict):
            out[key] = closed(schema[key])
    for key in ("allOf", "anyOf", "oneOf"):
        if key in schema:
            out[key] = [closed(s) for s in schema[key]]
    return out


def _crd_schema(kind: str) -> dict[str, Any]:
    return json.loads((CRD_SCHEMAS / CRD_FILES[kind]).read_text())


def _crd_errors(doc: dict[str, Any], schema: dict[str, Any]) -> list[str]:
    """Every violation of ``schema`` (OpenAPI v3 is JSON Schema draft 4 for these keywords;
    CEL rules, ``x-kubernetes-validations``, are the API server's and not checked here)."""
    import jsonschema

    validator = jsonschema.Draft4Validator(schema)
    return sorted(
        f"{'.'.join(map(str, e.absolute_path)) or '(top)'}: {e.message}"
        for e in validator.iter_errors(doc)
    )


def test_ray_manifests_match_kuberays_crd_schemas() -> None:
    docs = [(p.name, d) for p, d in _k8s_docs() if d["kind"] in CRD_FILES]
    assert sorted(d["kind"] for _, d in docs) == ["RayCluster", "RayJob"]
    readme = (INFRA / "README.md").read_text()
    assert f"kuberay/kuberay-operator --version {KUBERAY.removeprefix('v')}" in readme
    for name, doc in docs:
        assert _crd_errors(doc, closed(_crd_schema(doc["kind"]))) == [], name


@pytest.mark.parametrize(
    ("path", "wrong"),
    [
        (("spec", "enableInTreeAutoscaling"), "enableInTreeAutoScaling"),
        (("spec", "headGroupSpec", "rayStartParams"), "rayStartParam"),
        (("spec", "workerGroupSpecs", 0, "template", "spec", "containers", 0, "imagePullPolicy"),
         "imagePulPolicy"),
        (("spec", "workerGroupSpecs", 0, "template", "spec", "containers", 0, "resources",
          "limits"), "limit"),
    ],
)  # fmt: skip
def test_a_misspelled_field_fails_crd_validation(path: tuple[Any, ...], wrong: str) -> None:
    import copy

    doc = copy.deepcopy(next(d for d in _by_kind("RayCluster")))
    parent = doc
    for key in path[:-1]:
        parent = parent[key]
    parent[wrong] = parent.pop(path[-1])
    schema = _crd_schema("RayCluster")
    assert _crd_errors(doc, schema) == []  # as KubeRay's schema stands: pruned, not refused
    errors = _crd_errors(doc, closed(schema))
    assert len(errors) == 1 and f"'{wrong}' was unexpected" in errors[0], errors


def _quantity(value: str | int) -> float:
    units = {"m": 1e-3, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}
    text = str(value)
    for unit, factor in units.items():
        if text.endswith(unit):
            return float(text.removesuffix(unit)) * factor
    return float(text)


def test_every_container_requests_and_limits_cpu_and_memory() -> None:
    """Every container (the KubeRay autoscaler sidecars too) says what it needs and may use;
    Ray sizes a node from its container's limits, so the Ray containers request exactly their
    limits (KubeRay's recommendation; Guaranteed QoS)."""
    resources = [(w, c.get("resources", {})) for w, c in _containers()]
    for name, spec in _ray_cluster_specs():
        resources.append((f"{name}/autoscaler", spec["autoscalerOptions"].get("resources", {})))
    assert len(resources) >= 12
    for where, res in resources:
        for kind in ("requests", "limits"):
            assert {"cpu", "memory"} <= set(res.get(kind, {})), f"{where}: no {kind} {res}"
        for key in ("cpu", "memory"):
            assert _quantity(res["requests"][key]) <= _quantity(res["limits"][key]), where
        if where.startswith(("RayCluster", "RayJob")):
            assert res["requests"] == res["limits"], f"{where}: requests {res}"


def test_ray_clusters_head_gpu_workers_and_autoscaling() -> None:
    """What the schema cannot say: versions, policy and the numbers that must agree."""
    specs = _ray_cluster_specs()
    assert len(specs) == 2
    for name, spec in specs:
        assert spec["rayVersion"] == RAY_VERSION, f"{name}: rayVersion vs pyproject's ray pin"
        assert spec.get("enableInTreeAutoscaling") is True, name
        head = spec["headGroupSpec"]
        ports = {
            p["name"]: p["containerPort"]
            for p in head["template"]["spec"]["containers"][0]["ports"]
        }
        assert ports == {"gcs-server": 6379, "dashboard": 8265, "client": 10001}, name
        assert spec["workerGroupSpecs"], name
        for group in spec["workerGroupSpecs"]:
            assert 0 <= group["minReplicas"] <= group["replicas"] <= group["maxReplicas"], name
            assert group["maxReplicas"] > group["minReplicas"], f"{name}: no autoscaling range"
            limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
            assert int(limits["nvidia.com/gpu"]) > 0, f"{name}: worker group without GPUs"
    job = _by_kind("RayJob")[0]["spec"]
    assert job["shutdownAfterJobFinishes"] is True
    assert job["entrypoint"].strip()


def _check_aimctl_command(command: str, where: str) -> None:
    """``aimctl SUB ARGS``: SUB is a real command, each --option exists, paths exist in the repo."""
    import typer.main

    from aim_platform.cli import app

    args = shlex.split(command)
    sets = [args[i + 1] for i, a in enumerate(args[:-1]) if a == "--set"]
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert args[0] in scripts, f"{where}: {args[0]!r} is not a console script"
    group = typer.main.get_command(app)
    cmd = group.commands.get(args[1])  # type: ignore[attr-defined]
    assert cmd is not None, f"{where}: aimctl has no command {args[1]!r}"
    rest = args[2:]
    if hasattr(cmd, "commands"):  # a group: `aimctl services user ...`
        cmd = cmd.commands.get(rest[0])
        assert cmd is not None, f"{where}: aimctl {args[1]} has no command {rest[0]!r}"
        rest = rest[1:]
    options = {o for p in cmd.params for o in getattr(p, "opts", [])}
    for arg in rest:
        if arg in sets:
            continue
        if arg.startswith("--"):
            assert arg.split("=", 1)[0] in options, f"{where}: aimctl {args[1]} has no {arg}"
        elif arg.endswith((".yaml", ".yml")):
            path = REPO / arg.removeprefix(APP + "/")
            assert path.is_file(), f"{where}: config {arg} is not in the repository"
            from aim_platform.config import load_config

            load_config(path, sets)  # and it is a valid job config with its --set values


# The recipes' placeholder data URLs, set (jobs/configs/aim-*.yaml).
DATA_URLS = [
    "data.sources.0.url=s3://b/dfn2b",
    "data.sources.1.url=s3://b/in1k",
    "data.val_url=s3://b/in1k-val",
]


def test_entrypoints_and_config_paths_exist() -> None:
    dockerfile = (INFRA / "Dockerfile").read_text()
    assert re.search(rf"^WORKDIR {APP}$", dockerfile, re.M), "manifests assume WORKDIR /app"
    for job in _by_kind("RayJob"):
        _check_aimctl_command(job["spec"]["entrypoint"], f"RayJob/{job['metadata']['name']}")
    for where, c in _containers():
        if c.get("command", [""])[0] == "aimctl":
            _check_aimctl_command(shlex.join(c["command"]), where)
    for name, svc in _compose()["services"].items():
        if svc.get("command", [""])[0] == "aimctl":
            _check_aimctl_command(shlex.join(svc["command"]), f"compose {name}")
    # aimctl submit's default entrypoint must be a command that exists as well.
    _check_aimctl_command(
        submit.default_entrypoint("jobs/configs/aim-600M.yaml", ["seed=1", *DATA_URLS]), "submit"
    )
    compose = _compose()
    for name, svc in compose["services"].items():
        entry = svc.get("entrypoint")
        if entry and entry[0].startswith(APP + "/"):
            script = REPO / entry[0].removeprefix(APP + "/")
            assert script.is_file() and os.access(script, os.X_OK), f"compose {name}: {entry}"
        if "build" in svc:
            context = (COMPOSE.parent / svc["build"]["context"]).resolve()
            assert context == REPO, f"compose {name}: build context is not the repository"
            assert (context / svc["build"]["dockerfile"]).is_file()
    for name, secret in compose["secrets"].items():
        folder = (COMPOSE.parent / secret["file"]).resolve().parent
        assert folder == INFRA / "secrets", f"compose secret {name}: outside infra/secrets"
        assert (folder / ".gitignore").read_text().splitlines()[-2:] == ["*", "!.gitignore"]
        assert Path(secret["file"]).name == name
    # `aimctl services secrets` makes exactly the files compose mounts.
    assert set(compose["secrets"]) == set(services.COMPOSE_SECRETS)


def _dockerfile() -> tuple[str, list[str]]:
    """The Dockerfile's text and its instructions (continuations joined, comments dropped)."""
    text = (INFRA / "Dockerfile").read_text()
    lines = [ln.strip() for ln in text.replace("\\\n", " ").splitlines()]
    return text, [ln for ln in lines if ln and not ln.startswith("#")]


def test_dockerfile_has_what_kuberays_probes_run() -> None:
    """KubeRay injects exec probes running `wget ... /api/local_raylet_healthz | grep success`
    in bash (HTTP probes only from KubeRay 1.6 with Ray 2.53): Ray's own images have wget; on
    our CUDA base it must be installed, and infra/README.md says why."""
    text, lines = _dockerfile()
    base = re.search(r"^ARG CUDA_IMAGE=(\S+)$", text, re.M)[1]
    apt = " ".join(ln for ln in lines if "apt-get install" in ln)
    assert base.startswith("rayproject/ray:") or re.search(r"(^|\s)wget(\s|$)", apt), apt
    readme = (INFRA / "README.md").read_text()
    assert "local_raylet_healthz" in readme and "wget" in readme


def test_dockerfile_installs_dependencies_before_copying_the_code() -> None:
    """A code change must reuse the layers holding Ray, torch and MLflow."""
    _, lines = _dockerfile()
    code = lines.index("COPY platform ./platform")
    deps = [
        i for i, ln in enumerate(lines) if ln.startswith("RUN") and "-r /tmp/requirements" in ln
    ]
    assert deps and deps[0] < code, "the dependencies are installed after the code is copied"
    copied_before = {ln.split()[1] for ln in lines[: deps[0]] if ln.startswith("COPY")}
    assert copied_before == {"infra/constraints.txt", "pyproject.toml"}, copied_before
    package = [ln for ln in lines[code:] if ln.startswith("RUN pip install")]
    assert package == ["RUN pip install --no-deps ."], package


def test_dockerfile_copies_existing_paths_and_ends_with_pillow_simd() -> None:
    text, lines = _dockerfile()
    base = re.search(r"^ARG CUDA_IMAGE=(\S+)$", text, re.M)[1]
    assert base.startswith("nvidia/cuda:") and re.search(r":\d+\.\d+\.\d+-", base), base
    for ln in lines:
        if ln.startswith("COPY"):
            for src in ln.split()[1:-1]:
                assert (REPO / src).exists(), f"Dockerfile: COPY {src} does not exist"
    runs = [ln for ln in lines if ln.startswith("RUN")]
    assert "infra/pillow_simd.sh" in runs[-1], "the Pillow-SIMD swap must be the last RUN"
    assert (INFRA / "pillow_simd.sh").is_file()
    assert "-c infra/constraints.txt" in text
    pins = dict(
        ln.split("==", 1) for ln in (INFRA / "constraints.txt").read_text().splitlines()
        if ln and not ln.startswith("#")
    )  # fmt: skip
    assert pins["ray"] == RAY_VERSION
    import mlflow

    assert pins["mlflow"] == mlflow.__version__
    ignore = (INFRA / "Dockerfile.dockerignore").read_text().split()
    assert {".venv", ".git", "runs", "data", "infra/secrets"} <= set(ignore)


def _all_images() -> Iterator[tuple[str, str]]:
    for where, c in _containers():
        yield where, c["image"]
    for name, svc in _compose()["services"].items():
        yield f"compose/{name}", svc["image"]
    yield "aws/docker", _docs(AWS)[0]["docker"]["image"]


def test_image_references() -> None:
    ours = 0
    for where, image in _all_images():
        if "aim-platform" in image:
            assert OUR_IMAGE.match(image), f"{where}: {image} is not aim-platform:{VERSION}"
            ours += 1
        else:  # third-party images: a release tag and the digest it was published with
            m = re.fullmatch(r"([\w./-]+):([\w.-]+)@sha256:([0-9a-f]{64})", image)
            assert m and m[2] != "latest", f"{where}: {image} is not NAME:TAG@sha256:DIGEST"
    assert ours >= 8
    assert (INFRA / "Dockerfile").is_file()


def _secret_value_ok(name: str, value: str, secret_refs: set[str]) -> bool:
    """A literal env value may not hold a credential; $(VAR) may only expand secret refs."""
    refs = set(re.findall(r"\$\((\w+)\)", value))
    if refs and refs <= secret_refs:
        value = re.sub(r"\$\(\w+\)", "ref", value).replace(":ref@", "@")
    return redact_text(value) == value and not refs - secret_refs


def _strings(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _strings(k)
            yield from _strings(v)
    elif isinstance(node, list):
        for v in node:
            yield from _strings(v)
    elif isinstance(node, str):
        yield node


def _strip_refs(text: str) -> str:
    """Remove what points at a secret without holding it: $(VAR), NAME_FILE/_PATH=/run/secrets."""
    text = re.sub(r"\b\w+_(?:FILE|PATH)=/run/secrets/\S+", "", text)
    text = re.sub(r"\$\$?\(cat /run/secrets/\w+\)", "ref", text)
    return re.sub(r":\$\(\w+\)@", "@", text)


def test_secrets_only_through_secret_references() -> None:
    assert not [d for _, d in _k8s_docs() if d["kind"] == "Secret"], "no Secret with data in git"
    env_lists = [(w, c.get("env", [])) for w, c in _containers()]
    for name, spec in _ray_cluster_specs():
        env_lists.append((f"{name}/autoscaler", spec["autoscalerOptions"]["env"]))
    refs_seen = set()
    for where, entries in env_lists:
        secret_refs = {e["name"] for e in entries if "secretKeyRef" in e.get("valueFrom", {})}
        for e in entries:
            if "valueFrom" in e:
                ref = e["valueFrom"]["secretKeyRef"]
                refs_seen.add((ref["name"], ref["key"]))
                continue
            assert not is_secret_key(e["name"]) or e["name"] == "RAY_AUTH_MODE", (
                f"{where}: {e['name']} holds a literal value; use a secretKeyRef"
            )
            assert _secret_value_ok(e["name"], str(e["value"]), secret_refs), f"{where}: {e}"
    # Every secret the manifests need is documented with the command that creates it.
    readme = (INFRA / "README.md").read_text()
    for name, key in refs_seen:
        assert re.search(rf"create secret generic {name}\b[^\n]*--from-\w+={key}\b", readme), (
            f"infra/README.md does not say how to create secret {name} key {key}"
        )
    # compose: secret-looking variables only as *_FILE / *_PATH pointing into /run/secrets.
    compose = _compose()
    for svc_name, svc in compose["services"].items():
        env = svc.get("environment", {})
        mounted = set(svc.get("secrets", []))
        for key, value in env.items():
            value = str(value)
            if is_secret_key(key) and key != "RAY_AUTH_MODE":
                assert key.endswith(("_FILE", "_PATH")), f"compose {svc_name}: {key} literal"
                assert value.startswith("/run/secrets/"), f"compose {svc_name}: {key}={value}"
                assert value.removeprefix("/run/secrets/") in mounted, f"{svc_name}: {key}"
            assert redact_text(value) == value, f"compose {svc_name}: {key}"
        assert mounted <= set(compose["secrets"]), svc_name
    # aws: docker -e values hold no secrets; S3 through the instance profile.
    cluster = _docs(AWS)[0]
    for opt in cluster["docker"]["run_options"]:
        if opt.startswith("-e "):
            key, value = opt[3:].split("=", 1)
            if is_secret_key(key) and key != "RAY_AUTH_MODE":
                assert key.endswith("_PATH") and value.startswith("/run/secrets/"), opt
    assert "AWS_SECRET_ACCESS_KEY" not in AWS.read_text()
    for path in sorted(INFRA.rglob("*.yaml")):
        for doc in _docs(path):
            leaks = [s for s in _strings(doc) if redact_text(_strip_refs(s)) != _strip_refs(s)]
            assert not leaks, f"{path}: literal credentials in {leaks}"
    for node in cluster["available_node_types"].values():
        assert node["node_config"]["IamInstanceProfile"], "nodes reach S3 by instance profile"


def test_ray_auth_token_mode_in_every_cluster_manifest() -> None:
    for name, spec in _ray_cluster_specs():
        lists = [("autoscaler", spec["autoscalerOptions"]["env"])]
        lists.append(("head", spec["headGroupSpec"]["template"]["spec"]["containers"][0]["env"]))
        for g in spec["workerGroupSpecs"]:
            lists.append((g["groupName"], g["template"]["spec"]["containers"][0]["env"]))
        for where, entries in lists:
            env = _env(entries)
            assert env["RAY_AUTH_MODE"]["value"] == "token", f"{name}/{where}"
            ref = env["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"]
            assert ref == {"name": "aim-ray-auth", "key": "token"}, f"{name}/{where}"
    for job in _by_kind("RayJob"):
        sub_env = _env(job["spec"]["submitterPodTemplate"]["spec"]["containers"][0]["env"])
        assert sub_env["RAY_AUTH_MODE"]["value"] == "token"
        assert "secretKeyRef" in sub_env["RAY_AUTH_TOKEN"]["valueFrom"]
    head = _compose_env("ray-head")
    assert head["RAY_AUTH_MODE"] == "token"
    assert head["RAY_AUTH_TOKEN_FILE"] == "/run/secrets/ray_auth_token"
    cluster = _docs(AWS)[0]
    assert "-e RAY_AUTH_MODE=token" in cluster["docker"]["run_options"]
    assert any("RAY_AUTH_TOKEN_PATH=" in o for o in cluster["docker"]["run_options"])
    for cmd in cluster["head_start_ray_commands"] + cluster["worker_start_ray_commands"]:
        if "ray start" in cmd:
            assert "RAY_AUTH_MODE=token ray start" in cmd, cmd
    assert "RAY_AUTH_MODE=token" in (INFRA / "Dockerfile").read_text()


def _service_port(name: str) -> int:
    svc = next(d for d in _by_kind("Service") if d["metadata"]["name"] == name)
    deployment = next(d for d in _by_kind("Deployment") if d["metadata"]["name"] == name)
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert svc["spec"]["selector"].items() <= pod_labels.items(), f"Service {name} selects nothing"
    container_ports = {
        p["containerPort"] for c in deployment["spec"]["template"]["spec"]["containers"]
        for p in c.get("ports", [])
    }  # fmt: skip
    for p in svc["spec"]["ports"]:
        assert p["targetPort"] in container_ports, f"Service {name}: targetPort {p}"
    return svc["spec"]["ports"][0]["port"]


def _url_host_port(url: str) -> tuple[str, int]:
    u = urlparse(url)
    assert u.scheme == "http" and u.hostname and u.port, url
    return u.hostname, u.port


def test_ports_and_env_names_consistent_across_files() -> None:
    mlflow_port, minio_port = _service_port("aim-mlflow"), _service_port("aim-minio")
    assert _service_port("aim-postgres") == 5432
    assert (mlflow_port, minio_port) == (
        services.DEFAULT_PORTS["mlflow"],
        services.DEFAULT_PORTS["s3"],
    )
    mlflow_cmd = next(c for w, c in _containers() if w.startswith("Deployment/aim-mlflow"))[
        "command"
    ]
    assert mlflow_cmd[mlflow_cmd.index("--port") + 1] == str(mlflow_port)
    mlflow_env = _env(
        next(c for w, c in _containers() if w.startswith("Deployment/aim-mlflow"))["env"]
    )
    assert _url_host_port(mlflow_env["MLFLOW_S3_ENDPOINT_URL"]["value"]) == (
        "aim-minio",
        minio_port,
    )
    assert "@aim-postgres:5432/" in mlflow_env["MLFLOW_BACKEND_STORE_URI"]["value"]

    names = []
    for where, c in _containers():
        if not where.startswith(("RayCluster", "RayJob")) or where.endswith(
            "submitter/ray-job-submitter"
        ):
            continue
        env = _env(c["env"])
        assert NODE_ENV <= set(env), f"{where}: missing {NODE_ENV - set(env)}"
        assert _url_host_port(env["MLFLOW_TRACKING_URI"]["value"]) == ("aim-mlflow", mlflow_port)
        for var in ("AWS_ENDPOINT_URL", "MLFLOW_S3_ENDPOINT_URL"):
            assert _url_host_port(env[var]["value"]) == ("aim-minio", minio_port), where
        names.append(frozenset(env))
    assert len(set(names)) == 1, "Ray nodes of the manifests see different variables"

    compose = _compose()
    head = _compose_env("ray-head")
    assert NODE_ENV <= set(head)
    bare = {k.removesuffix("_FILE") for k in head if k != "AIM_RUN_AS"}
    assert bare == set(names[0]), "compose ray-head vs KubeRay env names"
    ml_host, ml_port = _url_host_port(head["MLFLOW_TRACKING_URI"])
    ml = compose["services"][ml_host]["command"]
    assert ml[ml.index("--port") + 1] == str(ml_port)
    s3_host, s3_port = _url_host_port(head["AWS_ENDPOINT_URL"])
    assert f":{s3_port}" in compose["services"][s3_host]["command"]
    assert _url_host_port(_compose_env("mlflow")["MLFLOW_S3_ENDPOINT_URL"]) == (s3_host, s3_port)
    published = {p for s in compose["services"].values() for p in s.get("ports", [])}
    assert published == {f"127.0.0.1:{p}:{p}" for p in (8265, ml_port, s3_port, 9001)}
    assert "--dashboard-port=8265" in compose["services"]["ray-head"]["command"]
    aws = "\n".join(_docs(AWS)[0]["head_start_ray_commands"])
    assert "--dashboard-port=8265" in aws and "--port=6379" in aws


def test_aws_launcher_yaml_matches_rays_schema() -> None:
    import jsonschema
    import ray

    schema = json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())
    cluster = _docs(AWS)[0]
    jsonschema.validate(cluster, schema)
    nodes = cluster["available_node_types"]
    assert cluster["head_node_type"] in nodes
    gpu = [n for n in nodes.values() if n["resources"].get("GPU", 0) > 0]
    assert gpu and all(n["min_workers"] < n["max_workers"] for n in gpu)
    assert cluster["max_workers"] >= sum(n.get("min_workers", 0) for n in nodes.values())
    assert "--gpus all" in cluster["docker"]["worker_run_options"]


@pytest.mark.parametrize("path", ["infra/compose/with-secrets.sh"])
def test_compose_entrypoint_exports_file_secrets(path: str, tmp_path: Path) -> None:
    import subprocess

    secret = tmp_path / "pw"
    secret.write_text("p@ss/w:rd")
    env = {
        "PATH": f"{Path(os.sys.executable).parent}:/usr/bin:/bin",
        "MLFLOW_DB_HOST": "postgres",
        "MLFLOW_DB_PASSWORD_FILE": str(secret),
        "AWS_SECRET_ACCESS_KEY_FILE": str(secret),
    }
    out = subprocess.run(
        ["sh", str(REPO / path), "sh", "-c", 'echo "$MLFLOW_BACKEND_STORE_URI|$AWS_SECRET_ACCESS_KEY|${MLFLOW_DB_PASSWORD_FILE:-gone}"'],
        env=env, capture_output=True, text=True, check=True,
    )  # fmt: skip
    assert (
        out.stdout.strip()
        == "postgresql://mlflow:p%40ss%2Fw%3Ard@postgres:5432/mlflow|p@ss/w:rd|gone"
    )
    env["AWS_SECRET_ACCESS_KEY_FILE"] = str(tmp_path / "missing")
    bad = subprocess.run(["sh", str(REPO / path), "true"], env=env, capture_output=True, text=True)
    assert bad.returncode != 0 and "not readable" in bad.stderr


# ------------------------------------------- core objects against Kubernetes' own schemas


def _core_errors(doc: dict[str, Any], version: str) -> list[str]:
    """Violations of Kubernetes' own JSON schema (strict: unknown fields are errors) for
    ``doc``'s kind and apiVersion in Kubernetes ``version``."""
    import kubernetes_validate

    try:
        kubernetes_validate.validate(doc, version, strict=True)
    except kubernetes_validate.ValidationError as exc:
        return [f"{'.'.join(map(str, exc.absolute_path)) or '(top)'}: {exc.message}"]
    return []


def test_core_manifests_match_kubernetes_schemas() -> None:
    docs = [(p.name, d) for p, d in _k8s_docs() if d["kind"] not in CRD_FILES]
    kinds = {d["kind"] for _, d in docs}
    assert {"Deployment", "Service", "Job", "ConfigMap", "NetworkPolicy"} <= kinds
    for version in KUBERNETES:
        for name, doc in docs:
            where = f"{name} {doc['kind']}/{doc['metadata']['name']} (Kubernetes {version})"
            assert _core_errors(doc, version) == [], where


@pytest.mark.parametrize(
    ("kind", "path", "wrong"),
    [
        ("Deployment", ("spec", "template", "spec", "containers", 0, "resources", "limits"),
         "limit"),
        ("NetworkPolicy", ("spec", "podSelector"), "podSelecter"),
        ("Job", ("spec", "template", "spec", "restartPolicy"), "restartpolicy"),
    ],
)  # fmt: skip
def test_a_misspelled_field_fails_kubernetes_validation(
    kind: str, path: tuple[Any, ...], wrong: str
) -> None:
    import copy

    doc = copy.deepcopy(_by_kind(kind)[0])
    parent = doc
    for key in path[:-1]:
        parent = parent[key]
    parent[wrong] = parent.pop(path[-1])
    errors = _core_errors(doc, KUBERNETES[-1])
    assert errors and wrong in errors[0], errors


# ---------------------------------------------- who reaches what: NetworkPolicy, users


def _policy_for(deployment: str) -> dict[str, Any]:
    pods = next(d for d in _by_kind("Deployment") if d["metadata"]["name"] == deployment)
    labels = pods["spec"]["template"]["metadata"]["labels"]
    found = [
        p for p in _by_kind("NetworkPolicy")
        if p["spec"]["podSelector"]["matchLabels"].items() <= labels.items()
    ]  # fmt: skip
    assert len(found) == 1, f"{deployment}: {len(found)} NetworkPolicies select its pods"
    return found[0]["spec"]


def _pod_templates() -> Iterator[tuple[str, dict[str, Any], dict[str, Any]]]:
    """(where, labels, pod spec) of every pod the manifests make."""
    for _, d in _k8s_docs():
        name, spec = f"{d['kind']}/{d['metadata']['name']}", d.get("spec", {})
        templates = []
        if d["kind"] in ("Deployment", "Job"):
            templates.append((name, spec["template"]))
        if d["kind"] == "RayJob":
            templates.append((f"{name}/submitter", spec["submitterPodTemplate"]))
            spec = spec["rayClusterSpec"]
        if d["kind"] in ("RayCluster", "RayJob"):
            templates.append((f"{name}/head", spec["headGroupSpec"]["template"]))
            for g in spec["workerGroupSpecs"]:
                templates.append((f"{name}/{g['groupName']}", g["template"]))
        for where, t in templates:
            yield where, t.get("metadata", {}).get("labels", {}), t["spec"]


def test_network_policies_let_only_the_platforms_pods_in() -> None:
    allowed = {}
    for name, port in (("aim-mlflow", 5000), ("aim-minio", 9000), ("aim-postgres", 5432)):
        spec = _policy_for(name)
        assert spec["policyTypes"] == ["Ingress"], name
        (rule,) = spec["ingress"]
        assert rule["ports"] == [{"protocol": "TCP", "port": port}], f"{name}: only {port}"
        # Pods of this namespace only: no namespaceSelector, no ipBlock.
        assert all(set(peer) == {"podSelector"} for peer in rule["from"]), name
        allowed[name] = [peer["podSelector"]["matchLabels"] for peer in rule["from"]]
    assert allowed["aim-mlflow"] == allowed["aim-minio"] == [PART_OF]
    assert allowed["aim-postgres"] == [{"app.kubernetes.io/name": "aim-mlflow"}]
    # Every pod of the manifests that talks to MLflow or MinIO carries the label let in.
    talkers = 0
    for where, labels, pod in _pod_templates():
        text = json.dumps(pod)
        for host, name in (("aim-mlflow:5000", "aim-mlflow"), ("aim-minio:9000", "aim-minio")):
            if host in text:
                talkers += 1
                assert any(sel.items() <= labels.items() for sel in allowed[name]), (
                    f"{where} uses {host} without the label its NetworkPolicy lets in"
                )
    assert talkers >= 8


def _secret_refs(container: dict[str, Any]) -> dict[str, tuple[str, str]]:
    return {
        e["name"]: (e["valueFrom"]["secretKeyRef"]["name"], e["valueFrom"]["secretKeyRef"]["key"])
        for e in container.get("env", [])
        if "secretKeyRef" in e.get("valueFrom", {})
    }


def _policy_buckets(policy: dict[str, Any]) -> set[str]:
    return {
        r.removeprefix("arn:aws:s3:::").split("/", 1)[0]
        for st in policy["Statement"]
        for r in st["Resource"]
    }


def test_one_minio_user_per_consumer_limited_to_its_buckets() -> None:
    (cm,) = [d for d in _by_kind("ConfigMap") if d["metadata"]["name"] == "aim-minio-policies"]
    policies = {k.removesuffix(".json"): json.loads(v) for k, v in cm["data"].items()}
    for name, policy in policies.items():  # compose runs the very same policies
        assert json.loads((INFRA / "compose" / "minio" / f"{name}.json").read_text()) == policy
        assert all(st["Effect"] == "Allow" for st in policy["Statement"])
        assert not any("admin:" in a or a == "s3:*" for st in policy["Statement"]
                       for a in st["Action"]), name  # fmt: skip
    mlflow_cmd = next(c for w, c in _containers() if w.startswith("Deployment/aim-mlflow"))
    artifacts = mlflow_cmd["command"][mlflow_cmd["command"].index("--artifacts-destination") + 1]
    assert _policy_buckets(policies["aim-mlflow"]) == {urlparse(artifacts).netloc}
    ray_buckets = _policy_buckets(policies["aim-ray"])
    for job in _by_kind("RayJob"):
        used = set(re.findall(r"s3://([\w-]+)/", job["spec"]["entrypoint"]))
        assert used and used <= ray_buckets, f"Ray pods use {used}, may use {ray_buckets}"
    assert not ray_buckets & _policy_buckets(policies["aim-mlflow"])

    # Who holds which key: root only MinIO and the setup Job; MLflow and Ray their own.
    setup = next(c for w, c in _containers() if w.startswith("Job/aim-minio-setup"))
    script = setup["command"][-1]
    for where, c in _containers():
        secrets_used = {ref[0] for ref in _secret_refs(c).values()}
        if "aim-minio-root" in secrets_used:
            assert where.startswith(("Deployment/aim-minio/", "Job/aim-minio-setup/")), where
        if where.startswith("Deployment/aim-mlflow/"):
            refs = _secret_refs(c)
            assert refs["AWS_ACCESS_KEY_ID"] == ("aim-s3-mlflow", "access_key_id")
            assert refs["AWS_SECRET_ACCESS_KEY"] == ("aim-s3-mlflow", "secret_access_key")
        if where.startswith(("RayCluster", "RayJob")) and "AWS_ACCESS_KEY_ID" in _secret_refs(c):
            assert _secret_refs(c)["AWS_ACCESS_KEY_ID"] == ("aim-s3-ray", "access_key_id")
    refs = _secret_refs(setup)
    for policy in policies:  # the setup Job gives each policy to the user of its Secret
        line = next(ln for ln in script.splitlines() if ln.strip().startswith(f"user {policy} "))
        key_var, secret_var = re.findall(r'"\$(\w+)"', line)
        assert refs[key_var] == (policy.replace("aim-", "aim-s3-"), "access_key_id"), line
        assert refs[secret_var] == (policy.replace("aim-", "aim-s3-"), "secret_access_key")
    assert "mc admin policy attach" in script and "mc admin user add" in script


def _ini(text: str) -> dict[str, str]:
    import configparser

    parser = configparser.ConfigParser()
    parser.read_string(text)
    return dict(parser["mlflow"])


def test_mlflow_runs_basic_auth_and_ray_pods_log_in_as_their_own_user() -> None:
    (deployment,) = [d for d in _by_kind("Deployment") if d["metadata"]["name"] == "aim-mlflow"]
    pod = deployment["spec"]["template"]["spec"]
    (mlflow,) = pod["containers"]
    cmd = mlflow["command"]
    assert cmd[cmd.index("--app-name") + 1] == "basic-auth"
    env, refs = _env(mlflow["env"]), _secret_refs(mlflow)
    assert refs["MLFLOW_AUTH_ADMIN_PASSWORD"] == ("aim-mlflow-admin", "password")
    assert refs["MLFLOW_FLASK_SERVER_SECRET_KEY"][0] == "aim-mlflow-admin"
    # The configuration file is the ConfigMap, mounted where MLFLOW_AUTH_CONFIG_PATH points.
    config_path = Path(env["MLFLOW_AUTH_CONFIG_PATH"]["value"])
    mount = next(m for m in mlflow["volumeMounts"] if m["mountPath"] == str(config_path.parent))
    volume = next(v for v in pod["volumes"] if v["name"] == mount["name"])
    (cm,) = [
        d for d in _by_kind("ConfigMap") if d["metadata"]["name"] == volume["configMap"]["name"]
    ]
    cluster = _ini(cm["data"][config_path.name])
    # The same configuration as `aimctl services up --auth` (tested live in test_services.py)
    # and the compose stack, apart from where the users' database lives.
    local = _ini(services.basic_auth_ini("sqlite:///x.db"))
    compose = _ini((INFRA / "compose" / "basic_auth.ini").read_text())
    for ini in (cluster, compose):
        assert {k: v for k, v in ini.items() if k != "database_uri"} == {
            k: v for k, v in local.items() if k != "database_uri"
        }
    assert cluster["default_permission"] == "NO_PERMISSIONS" and "admin_password" not in cluster
    db = cluster["database_uri"].removeprefix("sqlite:///")
    assert any(
        Path(db).parent == Path(m["mountPath"])
        and "persistentVolumeClaim" in next(v for v in pod["volumes"] if v["name"] == m["name"])
        for m in mlflow["volumeMounts"]
    ), "the auth database is not on a persistent volume"
    assert (
        _compose_env("mlflow")["MLFLOW_AUTH_CONFIG_PATH"] == f"{APP}/infra/compose/basic_auth.ini"
    )
    assert "basic-auth" in _compose()["services"]["mlflow"]["command"]

    # Ray pods: their own user, by reference; the Job makes that user from the same Secret.
    for where, c in _containers():
        if where.startswith(("RayCluster", "RayJob")) and not where.endswith("submitter"):
            assert _secret_refs(c)["MLFLOW_TRACKING_USERNAME"] == ("aim-mlflow-ray", "username")
            assert _secret_refs(c)["MLFLOW_TRACKING_PASSWORD"] == ("aim-mlflow-ray", "password")
    users = next(c for w, c in _containers() if w.startswith("Job/aim-mlflow-users"))
    refs = _secret_refs(users)
    assert users["command"][:3] == ["aimctl", "services", "user"]
    var = re.fullmatch(r"\$\((\w+)\)", users["command"][3])[1]
    assert refs[var] == ("aim-mlflow-ray", "username")
    assert refs["AIM_MLFLOW_USER_PASSWORD"] == ("aim-mlflow-ray", "password")
    assert refs["MLFLOW_TRACKING_PASSWORD"] == ("aim-mlflow-admin", "password")
    assert _env(users["env"])["MLFLOW_TRACKING_USERNAME"]["value"] == cluster["admin_username"]


def test_compose_entrypoint_drops_root_after_reading_secrets(tmp_path: Path) -> None:
    """Started as root, it reads a 0600 secret and runs the command as AIM_RUN_AS."""
    import subprocess

    if os.geteuid() != 0:
        pytest.skip("needs root, as the compose containers start")
    secret = tmp_path / "pw"
    secret.write_text("s3cr3t")
    secret.chmod(0o600)
    env = {
        "PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
        "AIM_RUN_AS": "nobody",
        "AWS_SECRET_ACCESS_KEY_FILE": str(secret),
    }
    script = str(REPO / "infra/compose/with-secrets.sh")
    out = subprocess.run(
        ["sh", script, "sh", "-c", 'echo "$(id -un)|$AWS_SECRET_ACCESS_KEY|${AIM_RUN_AS:-}"'],
        env=env, capture_output=True, text=True, check=True,
    )  # fmt: skip
    assert out.stdout.strip() == "nobody|s3cr3t|"
    for name in ("mlflow", "mlflow-users", "ray-head"):
        svc = _compose()["services"][name]
        assert svc["user"] == "0:0" and svc["environment"]["AIM_RUN_AS"] == "ray", name
