"""Study spec -> Ray Tune run -> one table in the paper's layout.

Each trial is a pre-training (a ``TorchTrainer`` built by :mod:`.pretrain` inside the Tune trial:
Ray's current Tune-drives-Train pattern, metrics forwarded by ``TuneReportCallback``)
followed by its probes. MLflow: a parent run per study, a child run per trial (the
pre-training run, with its probe runs nested under it); at the end the parent holds the
table (Markdown and CSV), the per-chunk loss curves of every trial on one plot and the
loss-vs-accuracy correlation across trials.

Over 400 lines on purpose: the Tune driver and the trial function it runs belong together
(what a trial reports is what the driver reads); the table and verdicts live in
:mod:`.study_table` and :mod:`.study_verdicts`, the floor in :mod:`.study_floor`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ray import tune

from aim_platform import tracking
from aim_platform.config import ConfigError, JobConfig, Scale, StudySpec
from aim_platform.errors import UnsafeFile
from aim_platform.failures import root_cause
from aim_platform.jobs.study_floor import random_trunk_floor
from aim_platform.jobs.study_results import trials_csv
from aim_platform.jobs.study_spec import pretraining_groups, trial_job
from aim_platform.jobs.study_table import (
    StudyResult,
    TrialOutcome,
    probe_recipe,
    seed_indices,
    trial_name,
)
from aim_platform.models.losses import VAL_CHUNKS
from aim_platform.storage import filesystem, is_remote, pyarrow_filesystem, read_json


def _trial(config: dict[str, Any]) -> None:
    """One Tune trial: pre-train the variant (TorchTrainer), probe it, report to Tune.

    The variant leads a group (``config["groups"]``) when other variants' jobs differ from its
    own only in the probe: the trial pre-trains once, probes the final trunk with each
    variant's probe (nested runs under the one pre-training run) and reports their metrics
    as :data:`SHARED` (JSON).
    """
    import ray.tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from aim_platform.jobs.pretrain import pretrain, run_paths

    spec = StudySpec.model_validate(config["spec"])
    variant, seed, seeds = config["variant"], config.get("seed", 0), config.get("seeds", 1)
    variants = (config.get("groups") or {}).get(variant, [variant])
    gpus = config.get("gpus_per_trial")
    jobs = [
        _on_gpus(trial_job(spec, v, config["scale"], config["extra"], seed, seeds), gpus)
        for v in variants
    ]
    tags = {"study": spec.name, "variant": variant, "table": spec.table}
    if len(variants) > 1:
        tags["variants"] = ",".join(variants)  # the pre-training these variants share
    if seeds > 1:
        tags["seed_index"] = str(seed)
    result = pretrain(
        jobs[0],
        tags=tags,
        parent_run_id=config["parent_run_id"],
        callbacks=[TuneReportCallback()],
    )
    final = {k: v for k, v in result.metrics.items() if isinstance(v, int | float)}
    shared = {}
    if len(jobs) > 1 and result.final_trunk and not result.error and result.run_id:
        trunk = run_paths(jobs[0]).final  # the shared pre-training's trunk folder
        shared = _probe_shared(result, trunk, jobs[1:], variants[1:])
    ray.tune.report(
        {**final, "run_id": result.run_id or "", "done": True, SHARED: json.dumps(shared)}
    )


# What a shared pre-training's other variants got from their probes, in the trial's last
# result as JSON: ``{variant: {"metrics": {metric: value}, "error": None or one line}}``.
SHARED = "shared_variants"


def _on_gpus(job: JobConfig, gpus_per_trial: float | None) -> JobConfig:
    """The job with its workers on ``gpus_per_trial`` GPUs (None: as configured): a fraction
    puts several trials on one GPU, as Ray Tune allows."""
    if not gpus_per_trial:
        return job
    per_worker = gpus_per_trial / job.train.num_workers
    train = job.train.model_copy(update={"use_gpu": True, "gpus_per_worker": per_worker})
    return job.model_copy(update={"train": train})


def check_gpus_per_trial(gpus: float, workers: int) -> None:
    """``--gpus-per-trial`` must give each of a trial's workers one whole GPU or, for a
    one-worker trial, a share of one (two workers of one trial on one GPU: NCCL refuses)."""
    if gpus <= 0:
        raise ConfigError(f"--gpus-per-trial: {gpus} must be positive")
    if workers > 1 and gpus != workers:
        raise ConfigError(
            f"--gpus-per-trial: {gpus} GPUs for {workers} workers a trial; give {workers} "
            "(one GPU a worker) or set train.num_workers=1 to share a GPU between trials"
        )
    if workers == 1 and gpus > 1:
        raise ConfigError(f"--gpus-per-trial: {gpus} for one worker, which uses at most 1")


def _probe_shared(
    result: Any, trunk: str, jobs: list[JobConfig], variants: list[str]
) -> dict[str, dict[str, Any]]:
    """Probe the shared pre-training's final trunk (the folder ``trunk``) with each other
    variant's probe, each a probe run nested under the pre-training run. Returns
    :data:`SHARED`'s mapping: the pre-training's own metrics (losses) with the variant's
    probe metrics, or the one-line error of a probe that failed (never fatal)."""
    from aim_platform.eval.probe import report_metrics
    from aim_platform.jobs.probe import log_probe, run_probe

    trained = {k: v for k, v in result.metrics.items() if not str(k).startswith("probe/")}
    trained = {k: v for k, v in trained.items() if isinstance(v, int | float)}
    tracker = tracking.Tracker(result.tracking_uri, background=True)
    out: dict[str, dict[str, Any]] = {}
    try:
        for variant, job in zip(variants, jobs, strict=True):
            assert job.probe is not None
            dataset = job.probe.dataset or job.data.sources[0].url
            try:
                report = run_probe(
                    trunk, job.probe, dataset=dataset, storage_options=job.train.storage_options
                )
            except Exception as exc:  # noqa: BLE001 - one variant's probe, never the trial
                out[variant] = {"metrics": {}, "error": root_cause(exc)}
                continue
            log_probe(
                tracker,
                report,
                job.probe,
                experiment=job.tracking.experiment,
                run_name=f"probe-{job.name}",
                trunk_path=trunk,
                dataset=dataset,
                parent_run_id=result.run_id,
                step=result.steps,
            )
            out[variant] = {"metrics": {**trained, **report_metrics(report)}, "error": None}
    finally:
        tracker.close()
    return out


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
    storage_options: dict[str, Any] | None = None,
    gpus_per_trial: float | None = None,
    only_seeds: list[int] | None = None,
) -> StudyResult:
    """Run (or resume) a study; every trial's failure is reported, not fatal.

    Args:
        spec: The validated study.
        scale: Budget preset.
        storage: Study folder root, a local folder or an ``s3://`` URL; everything of the
            study lives in ``<storage>/<study>-<scale>/``: the trials' runs (checkpoints,
            trunks) under ``trials/``, Tune's state under ``tune/``, the parent-run record,
            the floor and the tables. On object storage a trial restarted on another node,
            or a study resumed by another driver, finds all of it there.
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
        storage_options: fsspec options of ``storage`` (``endpoint_url``, ...), passed to every
            trial as ``train.storage_options``; None: the spec's (or ``--set``'s)
            ``train.storage_options``.
        gpus_per_trial: GPUs each trial's workers take together; a fraction (one-worker
            trials) puts several trials on one GPU. None: as the jobs say (``train.use_gpu``).
        only_seeds: Run only these seed indices of ``seeds`` (named and seeded as in the
            whole study): a study split over sessions or machines, one seed at a time.

    Variants whose jobs differ only in the probe (Table 3d's probe attention) share one
    trial: one pre-training, probed with each variant's probe
    (:func:`~.study_spec.pretraining_groups`).
    """
    indices = seed_indices(seeds, only_seeds)
    from aim_platform.cluster import connect
    from aim_platform.jobs.ingest import prepare_sources
    from aim_platform.train.paths import storage_url

    connect(address)
    base = storage_url(storage).rstrip("/")
    root = f"{base}/{spec.name}-{scale}"  # a local folder or a URL: every trial's storage
    extra = [*(extra or []), f"train.storage_path={root}/trials"]
    if storage_options is not None:
        extra.append(f"train.storage_options={json.dumps(storage_options)}")
    first = spec.job(next(iter(spec.variants)), scale, extra)
    opts = first.train.storage_options
    fs, root_path = filesystem(root, opts)
    fs.makedirs(root_path, exist_ok=True)
    # Built-ins are ingested once here, before trials race on them.
    urls = [s.url for s in first.data.sources] + [first.probe.dataset if first.probe else None]
    prepare_sources(urls, first.data.storage_options)
    runs_dir = None if is_remote(base) else str(Path(base).parent)  # remote: ./runs
    uri = tracking.resolve_tracking_uri(tracking_uri or first.tracking.tracking_uri, runs_dir)
    # creates the store and the experiment before any trial; its writes never wait for MLflow
    tracker = tracking.Tracker(uri, background=True)
    extra.append(f"tracking.tracking_uri={uri}")
    marker = f"{root_path}/parent_run.json"
    if resume and fs.exists(marker):
        saved = read_json(fs, marker, "a study's parent-run record")  # JSON: never runs code
        if not isinstance(saved, dict) or not isinstance(saved.get("run_id"), str):
            raise UnsafeFile(f"{marker}: not a study's parent-run record (no run_id)")
        parent = saved["run_id"]
    else:
        params = {
            "study": spec.name,
            "table": spec.table,
            "scale": scale,
            "variants": ",".join(spec.variants),
            "seeds": seeds,
        }
        if only_seeds is not None:  # a part of the study: which seed indices
            params["only_seeds"] = ",".join(map(str, indices))
        parent = tracker.start_run(
            first.tracking.experiment,
            f"study-{spec.name}-{scale}",
            params,
            {"kind": "study", "table": spec.table},
        )
        fs.pipe_file(marker, json.dumps({"run_id": parent}).encode())

    groups = pretraining_groups(spec, scale, extra, seeds)
    if gpus_per_trial is not None:
        for v in spec.variants:
            check_gpus_per_trial(gpus_per_trial, spec.job(v, scale, extra).train.num_workers)
    # The trial only drives a TorchTrainer; its workers and the data tasks hold the CPUs
    # (and the GPUs: ``gpus_per_trial`` is the workers' share, see :func:`_on_gpus`).
    trainable = tune.with_resources(_trial, {"CPU": 0.01})
    # Tune's experiment state on the study's storage (pyarrow's S3 client with the endpoint
    # override, as the trials' own checkpoints), so that another driver can resume it.
    tune_fs, tune_root = pyarrow_filesystem(root, opts) if is_remote(root) else (None, root)
    if on_trial is not None:  # Tune's callback finds it by the study's root, resumed or not
        _LISTENERS[root] = on_trial
    tune_dir = f"{tune_root}/tune"
    if resume and tune.Tuner.can_restore(tune_dir, storage_filesystem=tune_fs):
        tuner = tune.Tuner.restore(
            tune_dir, trainable=trainable, resume_errored=True, storage_filesystem=tune_fs
        )
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
                # one trial a pre-training: variants that differ only in the probe share one
                "variant": tune.grid_search([g[0] for g in groups]),
                "groups": {g[0]: g for g in groups},
                "gpus_per_trial": gpus_per_trial,
                "seed": tune.grid_search(indices),
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
                storage_path=tune_root,
                storage_filesystem=tune_fs,
                callbacks=[_TrialEvents(root)],  # a resumed study restores it with the root
            ),
        )
    grid = tuner.fit()
    trials = []
    for r in grid:
        config = r.config or {}
        variant = config.get("variant", "?")
        seed = int(config.get("seed", 0))
        run_id = (r.metrics or {}).get("run_id") or None
        error = root_cause(r.error) if r.error else None  # one line; tracebacks: the log
        shared = json.loads((r.metrics or {}).get(SHARED) or "{}")
        for v in (config.get("groups") or {}).get(variant, [variant]):
            # a shared pre-training's other variants: their own probes (SHARED)
            own = {"metrics": r.metrics or {}, "error": None} if v == variant else shared.get(v)
            own = own or {"metrics": {}, "error": "its probe did not run"}
            metrics = {
                k: x
                for k, x in own["metrics"].items()
                if isinstance(x, int | float) and math.isfinite(x)
            }
            trials.append(TrialOutcome(v, run_id, metrics, error or own["error"], seed))
    floors = (
        random_trunk_floor(
            [
                (v, seed, trial_job(spec, v, scale, extra, seed, seeds))
                for v in spec.variants
                for seed in indices
            ],
            seeds,
            f"{root}/floor.json",
            opts,
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
    fs.pipe_file(f"{root_path}/table.md", result.markdown().encode())
    fs.pipe_file(f"{root_path}/table.csv", result.csv().encode())
    # per seed, to recompute verdicts
    fs.pipe_file(f"{root_path}/trials.csv", trials_csv(result).encode())
    try:
        _log_study(result, tracker)
    except tracking.TrackingUnavailable:  # no correlation; the table is queued (and on disk)
        tracker.finish(parent, "FINISHED")
    tracker.close()
    return result


# Trial-event listeners by study root: Tune pickles its callbacks with the experiment state,
# and a listener (a console display) cannot be pickled; the callback keeps only the root, which
# a resumed study (another driver process, restoring that callback) registers its display under.
_LISTENERS: dict[str, Callable[[str, str, dict[str, Any]], None]] = {}


class _TrialEvents(tune.Callback):
    """Tune's trial events as ``listener(variant, state, metrics)`` calls; the listener is
    looked up in :data:`_LISTENERS` by ``key`` (this callback is pickled, the listener not)."""

    def __init__(self, key: str) -> None:
        self.key = key

    def _call(self, trial: Any, state: str, result: dict[str, Any] | None = None) -> None:
        listener = _LISTENERS.get(self.key)
        if listener is None:
            return
        c = trial.config
        variant, seed, seeds = c.get("variant", trial.trial_id), c.get("seed", 0), c.get("seeds", 1)
        result = result or {}
        shared = json.loads(result.get(SHARED) or "{}")
        for v in (c.get("groups") or {}).get(variant, [variant]):  # one row a variant
            # a shared pre-training's other variants: its progress, then their own probes
            shown = result if v == variant else shared.get(v, {}).get("metrics", result)
            listener(trial_name(v, seed, seeds), state, shown)

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
    # once each: the trials of a shared pre-training name one run
    run_ids = list(dict.fromkeys(t.run_id for t in result.trials if t.run_id and not t.error))
    if len(run_ids) >= 2:
        correlate_runs(tracker, run_ids, log_to=parent)
    failed = any(t.error for t in result.trials)
    tracker.finish(parent, "FAILED" if failed and not run_ids else "FINISHED")
