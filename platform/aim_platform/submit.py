"""Ray job submission: ``aimctl submit`` and ``aimctl jobs status|logs|stop``.

Jobs go through the Ray dashboard's Jobs API (``JobSubmissionClient``, ``http://HOST:8265``)
with a ``runtime_env`` that carries this repository: the working directory for ``jobs/`` and
configs, and ``platform/aim_platform`` as a ``py_modules`` entry so that the job imports the
submitted code before any installed copy.

What is left out: Ray applies a runtime_env's ``excludes`` to the working directory *and* to
every ``py_modules`` folder, each relative to its own root, so an entry there must be safe at
any depth of the package (:data:`EXCLUDES`: caches, ``*.db``). Folders of the repository root
(``.venv``, ``.git``, ``runs``, ``data``, ...) are listed, anchored, in the repository's
``.rayignore``, which Ray reads for the directory that holds it: the working directory only.

The Ray auth token (found as :func:`aim_platform.cluster.resolve_token` says) is sent as
``Authorization: Bearer <token>``. It never goes into the job's ``runtime_env``, which the
dashboard shows to anyone who can read it; nodes of a cluster get it from their own
environment (a Kubernetes Secret, the launcher's node set-up).

Over 400 lines on purpose: one protocol (what travels with a job, what is checked before
sending, the Jobs API calls and their error messages); each function is small.
"""

from __future__ import annotations

import math
import os
import re
import shlex
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlparse

from aim_platform.cluster import ClusterError, auth_error, resolve_token
from aim_platform.security import check_relative, is_secret_key, redact_text
from aim_platform.tracking import GIT_COMMIT_ENV, git_commit

if TYPE_CHECKING:
    from ray.job_submission import JobSubmissionClient

REPO_ROOT = Path(__file__).resolve().parents[2]
PACKAGE_DIR = Path(__file__).resolve().parent
# Never shipped, at any depth of the working directory or the package (gitignore syntax).
EXCLUDES = ["__pycache__/", "*.pyc", "*.egg-info/", ".pytest_cache/", ".ruff_cache/", "*.db"]
# Root folders never shipped: anchored entries of this file (read by Ray for the working dir).
RAYIGNORE = ".rayignore"
# Non-secret variables forwarded from the submitting shell when they are set.
FORWARD_ENV = (
    "MLFLOW_TRACKING_URI",
    "MLFLOW_EXPERIMENT_NAME",
    "MLFLOW_S3_ENDPOINT_URL",
    "AWS_ENDPOINT_URL",
    "AWS_DEFAULT_REGION",
    "AWS_REGION",
)
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")
# A head that has just started answers HTTP before its job agent is up, and Ray refuses a job
# then ("No available agent to submit job, please try again later"): retried for this long.
AGENT_WAIT_S = 120.0
# Ray's job supervisor sends SIGTERM on `jobs stop` and SIGKILL this many seconds later (Ray's
# default: 3). A pre-training job gets its train.preempt_grace_s plus this margin (the end of
# the step in flight, closing the MLflow run), so a stopped job saves its checkpoint first.
STOP_WAIT_ENV = "RAY_JOB_STOP_WAIT_TIME_S"
STOP_MARGIN_S = 30
NO_AGENT = "No available agent to submit job"


class SubmitError(ClusterError):
    """A job that cannot be submitted or queried; the message says what to do."""


def check_address(address: str | None) -> str:
    """Validate the dashboard address (``http://HOST:8265``); a bare ``HOST:PORT`` gets http://.

    Raises:
        SubmitError: no address, a ``ray://`` client address or another scheme.
    """
    if not address:
        raise SubmitError("no cluster address: pass --address http://HOST:8265 (or RAY_ADDRESS)")
    if "://" not in address:
        address = "http://" + address
    parsed = urlparse(address)
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        raise SubmitError(
            f"address {address!r}: jobs are submitted to the Ray dashboard, "
            f"e.g. http://HOST:8265 (not a ray:// client or GCS address)"
        )
    return address.rstrip("/")


def client(address: str | None, token_file: str | Path | None = None) -> JobSubmissionClient:
    """A ``JobSubmissionClient`` for ``address`` that sends the Ray auth token, if any.

    Raises:
        SubmitError: unreachable dashboard, or the cluster requires a token that is missing or
            wrong (the message says what to set).
    """
    from ray.exceptions import AuthenticationError
    from ray.job_submission import JobSubmissionClient

    address = check_address(address)
    token = resolve_token(token_file)
    headers = {"Authorization": f"Bearer {token}"} if token else None
    try:
        return JobSubmissionClient(address, headers=headers)
    except AuthenticationError as exc:
        raise auth_error(address, token, exc) from None
    except ConnectionError as exc:
        raise SubmitError(
            f"cannot reach the Ray dashboard at {address} ({exc}); is the head up and its "
            f"dashboard port reachable (kubectl port-forward svc/<cluster>-head-svc 8265)?"
        ) from None


def _call(address: str, token_file: str | Path | None, fn: str, *args: Any) -> Any:
    """Call ``JobSubmissionClient.<fn>`` with clear errors for auth and unknown jobs."""
    from ray.exceptions import AuthenticationError

    c = client(address, token_file)
    try:
        return getattr(c, fn)(*args)
    except AuthenticationError as exc:
        raise auth_error(check_address(address), resolve_token(token_file), exc) from None
    except RuntimeError as exc:
        if "does not exist" in str(exc) or "404" in str(exc):
            raise SubmitError(f"no job {args[0]!r} on {address}") from None
        raise


def parse_env(items: Sequence[str]) -> dict[str, str]:
    """``["K=V", ...]`` -> ``{"K": "V"}``, refusing secrets.

    The runtime_env is visible in the Ray dashboard: secrets reach jobs through the cluster's
    own environment (Kubernetes Secrets, the cluster launcher), never through submission.

    Raises:
        SubmitError: an item without ``=``, or a key or value that looks secret.
    """
    out: dict[str, str] = {}
    for item in items:
        if "=" not in item:
            raise SubmitError(f"--env {item!r} is not of the form KEY=VALUE")
        key, value = item.split("=", 1)
        _check_env(key.strip(), value)
        out[key.strip()] = value
    return out


def _check_env(key: str, value: str) -> None:
    if is_secret_key(key) or redact_text(value) != value:
        raise SubmitError(
            f"--env {key}: looks like a secret; the job's runtime_env is shown in the Ray "
            f"dashboard, so give secrets to the cluster's nodes (a Kubernetes Secret, the "
            f"launcher's node environment) instead"
        )


def job_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The job's environment: forwarded non-secret settings plus ``extra``."""
    env = {"PYTHONUNBUFFERED": "1"}
    for key in FORWARD_ENV:
        value = os.environ.get(key)
        if value and redact_text(value) == value:
            env[key] = value
    for key, value in (extra or {}).items():
        _check_env(key, value)
        env[key] = value
    return env


def root_excludes(repo: Path = REPO_ROOT) -> list[str]:
    """The anchored root folders of ``<repo>/.rayignore`` (``/runs/`` -> ``runs``).

    Raises:
        SubmitError: the file is missing (the job would carry ``.venv`` and ``.git``).
    """
    path = repo / RAYIGNORE
    if not path.is_file():
        raise SubmitError(
            f"{path} is missing: it keeps .venv, .git, runs and data out of submitted jobs; "
            f"restore it from the repository (git checkout -- {RAYIGNORE})"
        )
    lines = (line.strip() for line in path.read_text().splitlines())
    return [line.strip("/") for line in lines if line.startswith("/")]


def runtime_env(repo: Path = REPO_ROOT, env_vars: Mapping[str, str] | None = None) -> dict:
    """The ``runtime_env`` that carries this repository's code to the cluster.

    Args:
        repo: the repository root (the job's working directory).
        env_vars: the job's environment (see :func:`job_env`).

    Returns:
        A runtime_env dict: ``working_dir`` (the repo minus :data:`EXCLUDES` and the root
        folders of ``.rayignore``), the whole package as ``py_modules``, and ``env_vars``.
    """
    package = repo / "platform" / "aim_platform"
    if not package.is_dir():
        raise SubmitError(f"{package} not found: run aimctl submit from a checkout of the repo")
    root_excludes(repo)  # refuse to ship .venv and .git when the ignore file is missing
    return {
        "working_dir": str(repo),
        "py_modules": [str(package)],
        "excludes": list(EXCLUDES),
        "env_vars": dict(env_vars or {}),
    }


def _config_in_repo(config: str | Path, repo: Path) -> str:
    """The config's path relative to the repo (it travels in the working_dir)."""
    path = Path(config).expanduser()
    if not path.is_file():
        raise SubmitError(f"config file {str(config)!r} does not exist")
    try:
        rel = path.resolve().relative_to(repo.resolve())
    except ValueError:
        raise SubmitError(
            f"config {str(config)!r} is outside the repository {repo}; only the repository "
            f"travels to the cluster: put it under jobs/configs/"
        ) from None
    rel_text = check_relative(rel.as_posix(), field="config")
    if any(rel_text.startswith(folder + "/") for folder in root_excludes(repo)):
        raise SubmitError(f"config {rel_text!r} lies in an excluded folder; move it to jobs/")
    return rel_text


def default_entrypoint(
    config_rel: str,
    overrides: Sequence[str] = (),
    *,
    study_scale: str | None = None,
    seeds: int = 1,
    variants: str = "",
) -> str:
    """The command a submitted CONFIG runs, joining the job's cluster (``--address auto``):
    ``aimctl pretrain CONFIG --set ...``, or for a study spec (``study_scale`` given)
    ``aimctl study SPEC --scale S [--seeds N] [--variants a,b] --set ...``."""
    if study_scale is None:
        parts = ["aimctl", "pretrain", config_rel]
    else:
        parts = ["aimctl", "study", config_rel, "--scale", study_scale]
        if seeds != 1:
            parts += ["--seeds", str(seeds)]
        if variants:
            parts += ["--variants", variants]
    for item in overrides:
        parts += ["--set", item]
    parts += ["--address", "auto"]
    return shlex.join(parts)


def _validate(
    config_path: Path, overrides: Sequence[str], scale: str, seeds: int = 1, variants: str = ""
) -> tuple[str | None, float | None]:
    """Validate a job config or a study spec (and its study options) here, before anything
    is sent.

    Returns:
        ``scale`` when the file is a study spec (it has ``variants``), else None; and a
        pre-training job's ``train.preempt_grace_s`` (None for a study).
    """
    import yaml

    from aim_platform.config import ConfigError, load_config, yaml_problem

    try:
        data = yaml.safe_load(config_path.read_text()) or {}
    except yaml.YAMLError as exc:  # a tag that would build an object is only ever this
        raise SubmitError(f"{config_path}: not valid YAML: {yaml_problem(exc)}") from None
    try:
        if isinstance(data, dict) and "variants" in data:
            from aim_platform.jobs.study_spec import load_study, select_variants

            spec = load_study(config_path)
            if variants:
                spec = select_variants(spec, [v.strip() for v in variants.split(",")])
            if seeds < 1:
                raise ConfigError(f"--seeds: {seeds} must be at least 1")
            spec.job(next(iter(spec.variants)), scale, list(overrides))
            return scale, None
        if seeds != 1 or variants:
            raise ConfigError("--seeds and --variants apply to study specs (jobs/studies/)")
        from aim_platform.jobs.durable import check_durable_storage

        # The job runs on the cluster, on whichever node: never with node-local checkpoints.
        train = load_config(config_path, list(overrides)).train
        check_durable_storage(train)
    except ConfigError as exc:
        raise SubmitError(str(exc)) from None
    return None, train.preempt_grace_s


def submit(
    address: str | None,
    config: str | Path | None = None,
    *,
    overrides: Sequence[str] = (),
    entrypoint: str | None = None,
    token_file: str | Path | None = None,
    env: Mapping[str, str] | None = None,
    submission_id: str | None = None,
    entrypoint_num_gpus: float | None = None,
    scale: str = "tiny",
    seeds: int = 1,
    variants: str = "",
    repo: Path = REPO_ROOT,
    on_wait: Callable[[str], None] | None = None,
) -> str:
    """Submit a platform job; returns its submission id.

    Args:
        address: the Ray dashboard, ``http://HOST:8265``.
        config: a job config or a study spec (``jobs/studies/*.yaml``) inside the repository
            (required without ``entrypoint``); it is validated here before anything is sent.
        overrides: ``a.b=c`` overrides for the default entrypoint.
        entrypoint: a command to run instead of ``aimctl pretrain CONFIG ...``.
        token_file: a file holding the Ray auth token (see :func:`resolve_token`).
        env: extra non-secret environment variables for the job.
        submission_id: a chosen id (default: Ray generates one).
        entrypoint_num_gpus: GPUs reserved for the driver itself (usually none).
        scale: the budget preset when ``config`` is a study spec.
        seeds: trials per variant of a study spec (``aimctl study --seeds``).
        variants: the variants of a study spec to run, comma-separated (all when empty).
        repo: the repository root that travels as the working directory.
        on_wait: told once, in a sentence, when the cluster's job agent is not up yet and
            the submission is retried (for up to :data:`AGENT_WAIT_S`).

    Returns:
        The job's submission id.

    Raises:
        SubmitError: invalid input, unreachable cluster, missing or wrong token.
    """
    metadata = {"aim.submitter": "aimctl"}
    grace: float | None = None  # a pre-training job's train.preempt_grace_s
    if entrypoint is None:
        if config is None:
            raise SubmitError("give a CONFIG (a job or a study spec) or an --entrypoint")
        config_rel = _config_in_repo(config, repo)
        study_scale, grace = _validate(repo / config_rel, overrides, scale, seeds, variants)
        entrypoint = default_entrypoint(
            config_rel, overrides, study_scale=study_scale, seeds=seeds, variants=variants
        )
        metadata["aim.config"] = config_rel
    elif overrides:
        raise SubmitError("--set applies to the default entrypoint; put them in --entrypoint")
    commit = git_commit(repo)
    extra_env = dict(env or {})
    if grace is not None and STOP_WAIT_ENV not in extra_env:  # `jobs stop` lets it checkpoint
        extra_env[STOP_WAIT_ENV] = str(math.ceil(grace) + STOP_MARGIN_S)
    if commit:
        metadata["aim.git_commit"] = commit
        extra_env[GIT_COMMIT_ENV] = commit  # runs of the job record the submitted commit
    renv = runtime_env(repo, job_env(extra_env))
    kwargs: dict[str, Any] = {}
    if entrypoint_num_gpus:
        kwargs["entrypoint_num_gpus"] = entrypoint_num_gpus
    return _submit(address, token_file, entrypoint, renv, submission_id, metadata, kwargs, on_wait)


def _submit(
    address: str | None,
    token_file: str | Path | None,
    entrypoint: str,
    renv: dict,
    submission_id: str | None,
    metadata: dict[str, str],
    kwargs: dict[str, Any],
    on_wait: Callable[[str], None] | None = None,
) -> str:
    from ray.exceptions import AuthenticationError

    c = client(address, token_file)
    deadline = time.monotonic() + AGENT_WAIT_S
    delay = 1.0
    while True:
        try:
            return c.submit_job(
                entrypoint=entrypoint,
                runtime_env=renv,
                submission_id=submission_id,
                metadata=metadata,
                **kwargs,
            )
        except AuthenticationError as exc:
            raise auth_error(check_address(address), resolve_token(token_file), exc) from None
        except RuntimeError as exc:  # the Jobs API's HTTP errors
            if NO_AGENT not in str(exc):
                raise
            if time.monotonic() + delay > deadline:
                raise SubmitError(
                    f"{check_address(address)}: the cluster's job agent did not come up in "
                    f"{AGENT_WAIT_S:.0f} s (Ray: {NO_AGENT}); see `ray status` on the head"
                ) from None
            if on_wait is not None and delay == 1.0:
                on_wait(
                    "the cluster's job agent is not up yet (a head that has just started): "
                    f"retrying for up to {AGENT_WAIT_S:.0f} s"
                )
            time.sleep(delay)
            delay = min(delay * 2, 10.0)


@dataclass
class JobState:
    """A job's status as the dashboard reports it."""

    job_id: str
    status: str
    message: str | None
    entrypoint: str
    start_time: int | None
    end_time: int | None


def status(address: str | None, job_id: str, token_file: str | Path | None = None) -> JobState:
    """The job's status (``PENDING``, ``RUNNING``, ``SUCCEEDED``, ``FAILED``, ``STOPPED``)."""
    info = _call(address, token_file, "get_job_info", job_id)
    return JobState(
        job_id=job_id,
        status=str(info.status.value if hasattr(info.status, "value") else info.status),
        message=info.message,
        entrypoint=info.entrypoint,
        start_time=info.start_time,
        end_time=info.end_time,
    )


# The one line a platform command prints when it fails (cli/app.py): ``error: ...`` for an
# expected failure, ``<what> failed: <root cause>`` (aim_platform.failures.root_cause) for
# the rest. A submitted job runs such a command, so its log holds that line.
_PLATFORM_CAUSE = re.compile(r"^(?:error: (?P<error>.+)|(?P<failed>[\w -]+ failed: .+))$")
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def failure_cause(log: str, message: str | None = None) -> str:
    """A failed job's root cause in one line, read from its log; the tracebacks stay there.

    In order: the platform's own failure line (what the command would have printed on this
    machine: ``pre-training failed: ValueError: ... (worker rank 0, ...)`` or, without its
    ``error:``, an expected failure's message), else the exception line of the log's last
    Python traceback, else the log's last line, else the first line of Ray's message.

    Args:
        log: the job's log (``aimctl jobs logs``).
        message: Ray's status message for the job.
    """
    lines = [_ANSI.sub("", line).rstrip() for line in log.splitlines()]
    lines = [line for line in lines if line.strip()]
    for line in reversed(lines):
        m = _PLATFORM_CAUSE.match(line)
        if m:
            return m["error"] or m["failed"]
    headers = [i for i, line in enumerate(lines) if line.startswith("Traceback (most recent")]
    if headers:
        after = lines[headers[-1] + 1 :]
        raised = next((line for line in after if not line[:1].isspace()), None)
        if raised:
            return raised
    if lines:
        return lines[-1].strip()
    said = (message or "").strip().splitlines()
    return said[0] if said else "no log and no message from Ray"


def logs(address: str | None, job_id: str, token_file: str | Path | None = None) -> str:
    """Everything the job has printed so far."""
    return _call(address, token_file, "get_job_logs", job_id)


def follow_logs(
    address: str | None, job_id: str, token_file: str | Path | None = None
) -> Iterator[str]:
    """The job's log as it is written, chunk by chunk, until the job ends.

    Connection and authentication errors are raised here, before the first chunk.
    """
    status(address, job_id, token_file)  # unknown job or bad token: fail now, clearly
    return _tail(client(address, token_file), job_id)


def _tail(c: JobSubmissionClient, job_id: str) -> Iterator[str]:
    import asyncio

    agen = c.tail_job_logs(job_id)
    loop = asyncio.new_event_loop()
    try:
        while True:
            try:
                yield loop.run_until_complete(agen.__anext__())
            except StopAsyncIteration:
                return
    finally:
        loop.run_until_complete(agen.aclose())
        loop.close()


def stop(
    address: str | None,
    job_id: str,
    token_file: str | Path | None = None,
    *,
    wait: float = 0.0,
) -> str:
    """Ask the job to stop; with ``wait`` > 0, wait up to that many seconds for it to end.

    Returns:
        The job's status afterwards.
    """
    _call(address, token_file, "stop_job", job_id)
    if wait > 0:
        return wait_for(address, job_id, token_file, timeout=wait)
    return status(address, job_id, token_file).status


def wait_for(
    address: str | None,
    job_id: str,
    token_file: str | Path | None = None,
    *,
    timeout: float = 600.0,
    poll: float = 1.0,
) -> str:
    """Poll until the job reaches a terminal status; returns it.

    Raises:
        SubmitError: still not finished after ``timeout`` seconds.
    """
    deadline = time.monotonic() + timeout
    while True:
        state = status(address, job_id, token_file).status
        if state in TERMINAL:
            return state
        if time.monotonic() > deadline:
            raise SubmitError(f"job {job_id} is still {state} after {timeout:.0f}s")
        time.sleep(poll)
