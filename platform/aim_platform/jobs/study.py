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

from ray import tune

from aim_platform import tracking
from aim_platform.config import ConfigError, Scale, StudySpec
from aim_platform.errors import UnsafeFile
from aim_platform.failures import root_cause
from aim_platform.jobs.study_floor import random_trunk_floor
from aim_platform.jobs.study_spec import trial_job
from aim_platform.jobs.study_table import StudyResult, TrialOutcome, probe_recipe, trial_name
from aim_platform.models.losses import VAL_CHUNKS


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
