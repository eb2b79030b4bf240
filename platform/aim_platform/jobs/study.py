"""Study spec -> Ray Tune run -> one table in the paper's layout.

Each trial is a pre-training (a ``TorchTrainer`` built by :mod:`.pretrain` inside the Tune trial:
Ray's current Tune-drives-Train pattern, metrics forwarded by ``TuneReportCallback``)
followed by its probes. MLflow: a parent run per study, a child run per trial (the
pre-training run, with its probe runs nested under it); at the end the parent holds the
table (Markdown and CSV), the per-chunk loss curves of every trial on one plot and the
loss-vs-accuracy correlation across trials.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml
from ray import tune

from aim_platform import tracking
from aim_platform.config import ConfigError, JobConfig, Scale, StudySpec
from aim_platform.errors import UnsafeFile
from aim_platform.failures import root_cause
from aim_platform.jobs.study_floor import random_trunk_floor
from aim_platform.jobs.study_table import (
    StudyResult,
    TrialOutcome,
    probe_recipe,
    seed_overrides,
    trial_name,
)
from aim_platform.models.losses import VAL_CHUNKS

STUDIES_DIR = Path(__file__).resolve().parents[3] / "jobs" / "studies"


def load_study(path: str | Path) -> StudySpec:
    """Read and validate a study spec (and every job it can build, at every scale).

    Placeholder data URLs (``set-me:...``, the paper preset's IN-1k) pass here; a run fails
    on them until they are set (``--set data.sources.0.url=...``).
    """
    p = Path(path)
    data = _read_mapping(p)
    if "defaults" in data:
        data = merge_defaults(_read_mapping(p.parent / str(data.pop("defaults"))), data)
    try:
        spec = StudySpec.model_validate(data)
    except Exception as exc:  # pydantic's error already names the field
        raise ConfigError(f"study spec {p.name}: {exc}") from None
    for scale in spec.scales:
        for variant in spec.variants:
            try:
                spec.job(variant, scale, allow_placeholders=True)
            except ConfigError as exc:
                raise ConfigError(
                    f"study {spec.name}, variant {variant!r}, scale {scale}: {exc}"
                ) from None
    return spec


def select_variants(spec: StudySpec, names: list[str]) -> StudySpec:
    """The study restricted to ``names`` (in the spec's order), paper numbers included."""
    unknown = [n for n in names if n not in spec.variants]
    if unknown:
        raise ConfigError(
            f"--variants: {', '.join(unknown)} not in study {spec.name!r} "
            f"(it has {', '.join(spec.variants)})"
        )
    keep = [v for v in spec.variants if v in names]
    if len(keep) < 2:
        raise ConfigError("--variants: a study compares at least 2 variants")
    variants = {v: spec.variants[v] for v in keep}
    paper = {row: {v: x for v, x in cols.items() if v in keep} for row, cols in spec.paper.items()}
    variant_scales = {
        scale: {v: o for v, o in by.items() if v in keep}
        for scale, by in spec.variant_scales.items()
    }
    return spec.model_copy(
        update={"variants": variants, "paper": paper, "variant_scales": variant_scales}
    )


def _read_mapping(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"study file {str(path)!r} does not exist")
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"study file {str(path)!r} must hold a mapping")
    return data


def merge_defaults(defaults: dict[str, Any], spec: dict[str, Any]) -> dict[str, Any]:
    """A spec over its defaults: ``base`` merged deeply, ``scales`` lists appended."""
    unknown = set(defaults) - {"base", "scales"}
    if unknown:
        raise ConfigError(f"defaults: only base and scales may be shared, not {sorted(unknown)}")

    def deep(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
        out = dict(a)
        for k, v in b.items():
            out[k] = deep(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
        return out

    merged = dict(spec)
    merged["base"] = deep(defaults.get("base") or {}, spec.get("base") or {})
    scales = {k: list(v) for k, v in (defaults.get("scales") or {}).items()}
    for k, v in (spec.get("scales") or {}).items():
        scales[k] = [*scales.get(k, []), *v]
    merged["scales"] = scales
    return merged


def trial_job(
    spec: StudySpec, variant: str, scale: Scale, extra: list[str], seed: int, seeds: int
) -> JobConfig:
    """The job of one trial: the variant at the scale, with seed index ``seed``'s seeds and,
    with several seeds, its own run folder."""
    job = spec.job(variant, scale, extra)
    if seeds == 1:
        return job
    shifted = seed_overrides(job.seed, job.probe.seed if job.probe else 0, seed)
    return spec.job(variant, scale, [*extra, *shifted, f"name={job.name}-s{seed}"])


def _trial(config: dict[str, Any]) -> None:
    """One Tune trial: pre-train the variant (TorchTrainer), probe it, report to Tune."""
    import ray.tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from aim_platform.jobs.pretrain import pretrain

    spec = StudySpec.model_validate(config["spec"])
    variant, seed, seeds = config["variant"], config.get("seed", 0), config.get("seeds", 1)
    job = trial_job(spec, variant, config["scale"], config["extra"], seed, seeds)
    tags = {"study": spec.name, "variant": variant, "table": spec.table}
    if seeds > 1:
        tags["seed_index"] = str(seed)
    result = pretrain(
        job,
        tags=tags,
        parent_run_id=config["parent_run_id"],
        callbacks=[TuneReportCallback()],
    )
    final = {k: v for k, v in result.metrics.items() if isinstance(v, int | float)}
    ray.tune.report({**final, "run_id": result.run_id or "", "done": True})


def run_study(
    spec: StudySpec,
    scale: Scale,
    *,
    storage: str = "./runs/studies",
    tracking_uri: str | None = None,
    address: str | None = None,
    resume: bool = False,
    extra: list[str] | None = None,
    on_trial: Callable[[str, str, dict[str, Any]], None] | None = None,
    seeds: int = 1,
    concurrent: int | None = None,
    floor: bool = True,
) -> StudyResult:
    """Run (or resume) a study; every trial's failure is reported, not fatal.

    Args:
        spec: The validated study.
        scale: Budget preset.
        storage: Study folder root (local, ``<runs>/studies``); trials' runs go under
            ``<storage>/<study>``.
        tracking_uri: MLflow; None: the default rules, with the runs folder above ``storage``
            (``runs/studies`` -> ``runs/mlflow.db``, the store of the pre-training runs).
        address: Ray cluster; None: embedded.
        resume: Continue an interrupted study of the same name and scale.
        extra: Overrides applied to every trial (e.g. ``data.sources=...``).
        on_trial: Called as ``on_trial(trial, state, metrics)`` on each trial's start,
            result, end or error (a console display); ``trial`` is :func:`trial_name`, states
            are ``running``, ``done``, ``failed``.
        seeds: Trials per variant, seed index i adding i to the job's and the probe's seed
            (the table then shows mean +/- std).
        concurrent: Trials at once; None: the spec's ``max_concurrent_trials``.
        floor: Also probe a randomly initialized trunk of every variant with every seed
            (shared where trunks and probes are the same): the table's floor row.
    """
    if seeds < 1:
        raise ConfigError(f"--seeds: {seeds} must be at least 1")
    from aim_platform.cluster import connect
    from aim_platform.jobs.ingest import prepare_sources
    from aim_platform.train.paths import storage_url

    connect(address)
    root = Path(storage_url(storage)) / f"{spec.name}-{scale}"
    root.mkdir(parents=True, exist_ok=True)
    extra = [*(extra or []), f"train.storage_path={root / 'trials'}"]
    first = spec.job(next(iter(spec.variants)), scale, extra)
    # Built-ins are ingested once here, before trials race on them.
    urls = [s.url for s in first.data.sources] + [first.probe.dataset if first.probe else None]
    prepare_sources(urls, first.data.storage_options)
    runs_dir = str(Path(storage_url(storage)).parent)
    uri = tracking.resolve_tracking_uri(tracking_uri or first.tracking.tracking_uri, runs_dir)
    # creates the store and the experiment before any trial; its writes never wait for MLflow
    tracker = tracking.Tracker(uri, background=True)
    extra.append(f"tracking.tracking_uri={uri}")
    marker = root / "parent_run.json"
    if resume and marker.exists():
        try:
            parent = json.loads(marker.read_text())["run_id"]
        except (ValueError, KeyError, TypeError) as exc:  # JSON only: never runs code
            raise UnsafeFile(f"{marker}: not a study's parent-run record ({exc!r})") from None
    else:
        params = {
            "study": spec.name,
            "table": spec.table,
            "scale": scale,
            "variants": ",".join(spec.variants),
            "seeds": seeds,
        }
        parent = tracker.start_run(
            first.tracking.experiment,
            f"study-{spec.name}-{scale}",
            params,
            {"kind": "study", "table": spec.table},
        )
        marker.write_text(json.dumps({"run_id": parent}))

    # The trial only drives a TorchTrainer; its workers and the data tasks hold the CPUs.
    trainable = tune.with_resources(_trial, {"CPU": 0.01})
    tune_dir = root / "tune"
    if resume and tune.Tuner.can_restore(str(tune_dir)):
        tuner = tune.Tuner.restore(str(tune_dir), trainable=trainable, resume_errored=True)
    else:
        scheduler = None
        if spec.asha:
            scheduler = tune.schedulers.ASHAScheduler(time_attr="step", grace_period=1)
        tuner = tune.Tuner(
            trainable,
            param_space={
                "spec": spec.model_dump(mode="json"),
                "scale": scale,
                "extra": extra,
                "parent_run_id": parent,
                "variant": tune.grid_search(list(spec.variants)),
                "seed": tune.grid_search(list(range(seeds))),
                "seeds": seeds,
            },
            tune_config=tune.TuneConfig(
                max_concurrent_trials=concurrent or spec.max_concurrent_trials,
                scheduler=scheduler,
                metric=spec.metric if spec.asha else None,
                mode="min" if spec.asha else None,
            ),
            run_config=tune.RunConfig(
                name="tune",
                storage_path=str(root),
                callbacks=[_trial_events(on_trial)] if on_trial else None,
            ),
        )
    grid = tuner.fit()
    trials = []
    for r in grid:
        variant = r.config["variant"] if r.config else "?"
        seed = int(r.config.get("seed", 0)) if r.config else 0
        metrics = {
            k: v
            for k, v in (r.metrics or {}).items()
            if isinstance(v, int | float) and math.isfinite(v)
        }
        run_id = (r.metrics or {}).get("run_id") or None
        error = root_cause(r.error) if r.error else None  # one line; tracebacks: the log
        trials.append(TrialOutcome(variant, run_id, metrics, error, seed))
    floors = (
        random_trunk_floor(
            [
                (v, seed, trial_job(spec, v, scale, extra, seed, seeds))
                for v in spec.variants
                for seed in range(seeds)
            ],
            seeds,
            root,
            tracker,
            parent,
            first.tracking.experiment,
            on_trial,
        )
        if floor
        else {}
    )
    assert first.probe is not None
    recipe = probe_recipe(first.probe)
    result = StudyResult(spec, scale, parent, uri, trials, floors, recipe)
    (root / "table.md").write_text(result.markdown())
    (root / "table.csv").write_text(result.csv())
    try:
        _log_study(result, tracker)
    except tracking.TrackingUnavailable:  # no correlation; the table is queued (and on disk)
        tracker.finish(parent, "FINISHED")
    tracker.close()
    return result


# Trial-event listeners by id: Tune pickles its callbacks with the experiment state, and a
# listener (a console display) cannot be pickled; the callback keeps only the id.
_LISTENERS: dict[int, Callable[[str, str, dict[str, Any]], None]] = {}


class _TrialEvents(tune.Callback):
    """Tune's trial events as ``listener(variant, state, metrics)`` calls; the listener is
    looked up in :data:`_LISTENERS` by ``key`` (this callback is pickled, the listener not)."""

    def __init__(self, key: int) -> None:
        self.key = key

    def _call(self, trial: Any, state: str, result: dict[str, Any] | None = None) -> None:
        listener = _LISTENERS.get(self.key)
        if listener is not None:
            c = trial.config
            name = trial_name(c.get("variant", trial.trial_id), c.get("seed", 0), c.get("seeds", 1))
            listener(name, state, result or {})

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._call(trial, "running")

    def on_trial_result(
        self, iteration: int, trials: list, trial: Any, result: dict, **info: Any
    ) -> None:
        self._call(trial, "running", result)  # the last result (``done``) follows the probes

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._call(trial, "done", trial.last_result)

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._call(trial, "failed")


def _trial_events(on_trial: Callable[[str, str, dict[str, Any]], None]) -> _TrialEvents:
    key = id(on_trial)
    _LISTENERS[key] = on_trial
    return _TrialEvents(key)


def _log_study(result: StudyResult, tracker: tracking.Tracker) -> None:
    """Table (Markdown, CSV), chunk-loss curves of all trials, correlation across trials."""
    from aim_platform.eval.correlation import correlate_runs
    from aim_platform.plots import chunk_curves_figure

    parent = result.parent_run_id
    assert parent is not None
    tracker.log_text(parent, result.markdown(), "table.md")
    tracker.log_text(parent, result.csv(), "table.csv")
    verdicts = {}
    for v in result.verdicts():  # e.g. verdict.linear.mlp-vs-none: agrees +2.6 [+0.4, +4.8] n=3
        ours = v.cells()[2]
        verdicts[f"verdict.{v.row}.{v.a}-vs-{v.b}"] = f"{v.verdict} {ours}"[:500]
    if verdicts:
        tracker.set_tags(parent, verdicts)
    per_variant: dict[str, list[list[float]]] = {}
    for t in result.trials:
        chunks = [t.metrics.get(f"val/loss_chunk_{i}") for i in range(VAL_CHUNKS)]
        if all(c is not None for c in chunks):
            per_variant.setdefault(t.variant, []).append(chunks)  # type: ignore[arg-type]
        if t.error:
            name = trial_name(t.variant, t.seed, result.seeds)
            tracker.set_tags(parent, {f"failed.{name}": t.error[:500]})
    # One curve per variant: the mean over its seeds.
    curves = {
        v: [sum(c) / len(c) for c in zip(*runs, strict=True)] for v, runs in per_variant.items()
    }
    if curves:
        tracker.log_figure(parent, chunk_curves_figure(curves), "loss_per_chunk.png")
    run_ids = [t.run_id for t in result.trials if t.run_id and not t.error]
    if len(run_ids) >= 2:
        correlate_runs(tracker, run_ids, log_to=parent)
    failed = any(t.error for t in result.trials)
    tracker.finish(parent, "FAILED" if failed and not run_ids else "FINISHED")
