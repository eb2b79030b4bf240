"""Studies without Ray: every trial of one or more study specs pre-trained and probed in local
processes sharing one device (a GPU machine with no cluster: ``jobs/gpu_study.py``).

The same jobs as ``aimctl study`` (:func:`~.study_spec.trial_job`: the spec's variant at the
scale, seed index i adding i to the pre-training and probe seeds), the same model, objective,
optimizer, decode and crop (:func:`~aim_platform.data.transforms.decode_batch`), the same probes
(:func:`~aim_platform.eval.probe.probe_cached`) and the same table with its verdicts and
random-trunk floor (:class:`~.study_table.StudyResult`). Trials whose jobs differ only in
the probe (Table 3d's probe attention) share one pre-training, as they would share its trunk:
the same seed gives the same trunk. What differs from a Ray study: the
images are read once into each process's memory from an image-folder tree (or its ``.tar.gz``
archives), the model runs in float32 (TF32 matmuls on CUDA) on one device with no FSDP, and nothing is tracked in
MLflow: the results are a JSON file and the tables.

A deadline bounds the whole run (a lent GPU is short): a trial still training then stops and is
recorded as not finished, and trials not yet started are skipped; the tables show what finished.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import Future, ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from aim_platform.config import DataConfig, DataSource, JobConfig, Scale, StudySpec
from aim_platform.data.folders import (
    ImageSet,
    LocalData,
    TrainBatches,
    eval_patches,
    labelled_rows,
    read_image_folders,
)
from aim_platform.data.transforms import decode_batch
from aim_platform.jobs.study_floor import floor_key
from aim_platform.jobs.study_results import trials_csv
from aim_platform.jobs.study_spec import pretraining_key, trial_job
from aim_platform.jobs.study_table import (
    StudyResult,
    TrialOutcome,
    probe_recipe,
    seed_indices,
    trial_name,
)

# Images per forward of the frozen trunk, and so rows per feature-cache shard: the probes read
# a few shards at a time in a seeded order, so shards as small as the platform's (its feature
# stream's batch of 64) keep the probes' batches as mixed as there.
FEATURE_BATCH = 64


def _can_fork() -> bool:
    return "fork" in multiprocessing.get_all_start_methods()


class DeadlinePassed(RuntimeError):
    """The run's deadline came before this trial finished."""


def pretrain(
    job: JobConfig,
    data: LocalData,
    device: torch.device,
    deadline: float,
    say: Callable[[str], None],
    workers: int = 2,
) -> tuple[torch.nn.Module, dict[str, float]]:
    """Pre-train ``job``'s model on ``data.train``; returns the trunk and the final metrics
    (``train/loss`` of the last step, ``val/loss`` over ``data.val_limit`` scored images).

    Raises:
        DeadlinePassed: at the first step past ``deadline`` (a ``time.time()``).
    """
    from aim_platform.models.aim import sample_prefix_lengths
    from aim_platform.train.trainer import Trainer

    tc = job.train
    trainer = Trainer.setup(job, device, "fp32")  # no process group here: no FSDP
    lo, hi = job.model.prefix_range
    val = torch.from_numpy(eval_patches(data.val, job, job.data.val_limit))  # (N, K, P)
    loader = torch.utils.data.DataLoader(
        TrainBatches(data.train, job),
        batch_size=None,
        shuffle=False,
        num_workers=workers,
        prefetch_factor=4 if workers else None,
        # forked decoders share the images with this process; spawned ones (a spawned
        # trial's default) would each import torch and receive a pickled copy of them
        multiprocessing_context="fork" if workers and _can_fork() else None,
    )
    metrics: dict[str, float] = {}
    quarter = max(1, tc.steps // 4)
    for step, (patches, valid) in enumerate(loader):
        if time.time() > deadline:
            raise DeadlinePassed(f"stopped at step {step} of {tc.steps}")
        pixels = patches[valid].to(device, non_blocking=True)  # (B', K, P) uint8
        gen = torch.Generator().manual_seed(hash((job.seed, step, 0, 0)) % 2**63)
        prefix = sample_prefix_lengths(pixels.shape[0], lo, hi, gen)  # (B',)
        result = trainer.train_step(pixels, prefix, gen)
        done = step + 1
        if done % tc.val_every == 0 or done == tc.steps:
            batches = (
                {"patches": x.to(device), "valid": torch.ones(len(x), dtype=torch.bool)}
                for x in val.split(tc.micro_batch_size)
            )
            metrics.update(trainer.validate(batches))
        if done % quarter == 0 or done == tc.steps:
            metrics["train/loss"] = result.loss
            val_txt = f", val/loss {metrics['val/loss']:.4f}" if "val/loss" in metrics else ""
            say(f"step {done}/{tc.steps}: train/loss {result.loss:.4f}{val_txt}")
    return trainer.model.trunk, metrics


def probe(
    trunk: torch.nn.Module, job: JobConfig, data: LocalData, device: torch.device
) -> dict[str, float]:
    """The job's probes on a frozen trunk: features of the labelled train rows (``views``
    augmented crops each) and of every scored image, in the trunk's own sequence order, cached
    as the platform caches them, then :func:`probe_cached`. Returns the probe metrics."""
    from aim_platform.eval.cache import FeatureCache
    from aim_platform.eval.features import block_outputs, sequence_order
    from aim_platform.eval.probe import probe_cached, probe_inputs, report_metrics

    cfg = job.probe
    assert cfg is not None
    trunk = trunk.to(device).eval()
    n_blocks = len(trunk.blocks)
    inputs = probe_inputs(cfg, n_blocks)
    blocks = sorted({b for chosen in inputs.values() for b in chosen})
    order = sequence_order(job.model)  # (K,) or None: raster
    aug = DataConfig(sources=[DataSource(url="local")]).crop_args()  # the probe's default crops
    m = job.model
    rows = labelled_rows(data.train, cfg.labels_per_class, cfg.seed)
    with tempfile.TemporaryDirectory(prefix="aim-local-probe-") as folder:
        cache = FeatureCache(folder)
        splits: list[tuple[str, ImageSet, list[int], int | None]] = [
            ("train", data.train, rows, view) for view in range(cfg.views)
        ]
        splits.append(("val", data.val, list(range(len(data.val))), None))
        for split, images, idx, view in splits:
            for start in range(0, len(idx), FEATURE_BATCH):
                chunk = idx[start : start + FEATURE_BATCH]
                patches, valid = decode_batch(
                    [images.ids[i] for i in chunk],
                    [images.images[i] for i in chunk],
                    img_size=m.img_size,
                    patch_size=m.patch_size,
                    train=view is not None,
                    seed=cfg.seed,
                    epoch=view or 0,
                    **(aug if view is not None else {}),
                )
                pixels = torch.from_numpy(patches[valid]).to(device)  # (B, K, P) uint8
                labels = np.asarray([images.labels[i] for i in chunk])[valid]  # (B,)
                with torch.no_grad():
                    feats = block_outputs(trunk, pixels, blocks, cfg.attention, order)
                cache.add(split, feats.half().cpu().numpy(), labels, blocks, inputs)
        num_heads = trunk.blocks[0].attn.num_heads
        report = probe_cached(cache, cfg, n_blocks, len(data.classes), num_heads)
    return report_metrics(report)


@dataclass(frozen=True, eq=False)  # hashed by identity: one entry per task
class Task:
    """One unit of work: a pre-training and the probes of every trial that shares it (variants
    whose jobs differ only in their probe, e.g. Table 3d's probe attention), or the random-trunk
    floor of one variant (probes only)."""

    kind: str  # "trial" or "floor"
    study: str
    variants: tuple[str, ...]
    seed: int
    seeds: int
    jobs: tuple[dict[str, Any], ...]  # each variant's JobConfig as JSON

    @property
    def name(self) -> str:
        label = " + ".join(trial_name(v, self.seed, self.seeds) for v in self.variants)
        return f"{self.study}: {'random trunk ' if self.kind == 'floor' else ''}{label}"


_DATA: dict[str, LocalData] = {}  # per worker process: the data set, read once


def run_task(
    task: Task, data_root: str, device: str, deadline: float, threads: int = 2
) -> dict[str, Any]:
    """Run one task in a worker process; returns ``{"metrics": {variant: metrics}, "error",
    "wall_s"}``."""
    t0 = time.time()
    if t0 > deadline:
        return {"metrics": {}, "error": "not started: deadline", "wall_s": 0.0}
    torch.set_num_threads(threads)
    dev = torch.device(device)
    if dev.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # float32 weights, TF32 matmuls
        torch.backends.cudnn.allow_tf32 = True

    def say(text: str) -> None:
        print(f"{task.name}: {text} ({time.time() - t0:.0f} s)", flush=True)

    try:
        if data_root not in _DATA:
            _DATA[data_root] = read_image_folders(data_root)
        data = _DATA[data_root]
        jobs = [JobConfig.model_validate(j) for j in task.jobs]
        out: dict[str, dict[str, float]] = {}
        if task.kind == "floor":
            from aim_platform.models.aim import build_trunk

            torch.manual_seed(jobs[0].seed)  # the trunk the trial starts from
            out[task.variants[0]] = probe(build_trunk(jobs[0].model), jobs[0], data, dev)
        else:
            trunk, metrics = pretrain(jobs[0], data, dev, deadline, say)
            for variant, job in zip(task.variants, jobs, strict=True):
                say(f"probing the trunk for {variant}" if len(jobs) > 1 else "probing the trunk")
                out[variant] = {**metrics, **probe(trunk, job, data, dev)}
    except DeadlinePassed as exc:
        return {"metrics": {}, "error": f"deadline: {exc}", "wall_s": time.time() - t0}
    except Exception as exc:  # noqa: BLE001 - one failed trial is reported, never fatal
        return {"metrics": {}, "error": f"{type(exc).__name__}: {exc}", "wall_s": time.time() - t0}
    return {"metrics": out, "error": None, "wall_s": time.time() - t0}


def plan_tasks(
    specs: list[StudySpec],
    scale: Scale,
    seeds: int,
    extra: list[str],
    only_seeds: list[int] | None = None,
) -> tuple[list[Task], dict[str, dict[tuple[str, int], str]]]:
    """Every pre-training (shared by the trials whose jobs differ only in the probe) and every
    distinct floor, seed by seed (so that a deadline leaves whole seeds), and per study which
    floor each (variant, seed) reads; ``only_seeds``: those seed indices of ``seeds`` only."""
    tasks: list[Task] = []
    floor_of: dict[str, dict[tuple[str, int], str]] = {s.name: {} for s in specs}
    floors: set[str] = set()
    for seed in seed_indices(seeds, only_seeds):
        for spec in specs:
            groups: dict[str, list[tuple[str, JobConfig]]] = {}
            for variant in spec.variants:
                job = trial_job(spec, variant, scale, extra, seed, seeds)
                groups.setdefault(pretraining_key(job), []).append((variant, job))
            for group in groups.values():
                variants = tuple(v for v, _ in group)
                jobs = tuple(j.model_dump(mode="json") for _, j in group)
                tasks.append(Task("trial", spec.name, variants, seed, seeds, jobs))
                for variant, job in group:
                    if job.probe is None:
                        continue
                    key = floor_key(job)
                    floor_of[spec.name][(variant, seed)] = key
                    if key not in floors:
                        floors.add(key)
                        as_json = job.model_dump(mode="json")
                        tasks.append(Task("floor", spec.name, (variant,), seed, seeds, (as_json,)))
    return tasks, floor_of


def run_local_studies(
    specs: list[StudySpec],
    scale: Scale,
    data_root: str,
    *,
    seeds: int = 1,
    only_seeds: list[int] | None = None,
    extra: list[str] | None = None,
    parallel: int = 2,
    device: str = "cpu",
    deadline_s: float | None = None,
    out: Path | None = None,
    say: Callable[[str], None] = print,
) -> list[StudyResult]:
    """Run every trial and floor of ``specs`` in ``parallel`` processes on ``device``; return
    one :class:`StudyResult` per spec (its tables and verdicts). With ``out``, the outcomes are
    written to ``out/results.json`` as they come, the tables to ``out/<study>.md``/``.csv``
    and the per-seed results to ``out/<study>-trials.csv`` (:mod:`.study_results`).
    """
    # One process a trial: the whole global batch in one step (a preset's worker count, e.g.
    # the tiny scale's 2, would otherwise be checked against batch sizes it no longer splits).
    extra = [*(extra or []), "train.num_workers=1"]
    tasks, floor_of = plan_tasks(specs, scale, seeds, extra, only_seeds)
    read_image_folders(data_root)  # a missing or malformed folder: one clear error, here
    deadline = time.time() + (deadline_s if deadline_s is not None else 1e9)
    trials = sum(len(t.variants) for t in tasks if t.kind == "trial")
    pretrainings = sum(t.kind == "trial" for t in tasks)
    shared = (
        f" ({pretrainings} pre-trainings: trials that differ only in the probe share one)"
        if pretrainings < trials
        else ""
    )
    floors = sum(t.kind == "floor" for t in tasks)
    process = "process" if parallel == 1 else "processes"
    say(f"{trials} trials{shared}, {floors} random-trunk floors; {parallel} {process} on {device}")
    threads = max(1, (os.cpu_count() or 1) // parallel) if device == "cpu" else 2
    done: dict[Task, dict[str, Any]] = {}
    floor_metrics: dict[str, dict[str, float]] = {}
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
    ctx = multiprocessing.get_context("spawn")  # CUDA cannot be forked
    with ProcessPoolExecutor(max_workers=parallel, mp_context=ctx) as pool:
        futures: dict[Future, Task] = {
            pool.submit(run_task, t, data_root, device, deadline, threads): t for t in tasks
        }
        for fut in as_completed(futures):
            task = futures[fut]
            result = fut.result()
            done[task] = result
            if task.kind == "floor" and not result["error"]:
                key = floor_of[task.study][(task.variants[0], task.seed)]
                floor_metrics[key] = result["metrics"][task.variants[0]]
            for line in _outcome_lines(task, result):
                say(line)
            if out is not None:
                _write_results(out / "results.json", done)
    results = []
    for spec in specs:
        outcomes = [
            TrialOutcome(
                v, None, r["metrics"].get(v, {}), r["error"], t.seed, job["train"]["steps"]
            )
            for t, r in done.items()
            if t.kind == "trial" and t.study == spec.name
            for v, job in zip(t.variants, t.jobs, strict=True)
        ]
        floor: dict[str, dict[int, dict[str, float]]] = {}
        for (variant, seed), key in floor_of[spec.name].items():
            if key in floor_metrics:
                floor.setdefault(variant, {})[seed] = floor_metrics[key]
        first = trial_job(spec, next(iter(spec.variants)), scale, extra, 0, 1)
        recipe = probe_recipe(first.probe) if first.probe else ""
        result = StudyResult(spec, scale, None, "", outcomes, floor, recipe)
        results.append(result)
        if out is not None:
            (out / f"{spec.name}.md").write_text(result.markdown())
            (out / f"{spec.name}.csv").write_text(result.csv())
            (out / f"{spec.name}-trials.csv").write_text(trials_csv(result))  # per seed
    return results


def _outcome_lines(task: Task, result: dict[str, Any]) -> list[str]:
    """One console line per variant of a finished task."""
    wall = f"{result['wall_s']:.0f} s"
    prefix = f"{task.study}: {'random trunk ' if task.kind == 'floor' else ''}"
    lines = []
    for v in task.variants:
        name = prefix + trial_name(v, task.seed, task.seeds)
        if result["error"]:
            lines.append(f"{name}: failed ({result['error']}; {wall})")
            continue
        m = result["metrics"][v]
        parts = [f"val/loss {m['val/loss']:.4f}"] if "val/loss" in m else []
        parts += [
            f"{k} {100 * m[f'probe/{k}/top1']:.1f}%"
            for k in ("linear", "attentive")
            if f"probe/{k}/top1" in m
        ]
        lines.append(f"{name}: done ({', '.join(parts)}; {wall})")
    return lines


def _write_results(path: Path, done: dict[Task, dict[str, Any]]) -> None:
    rows = [
        {
            "kind": t.kind,
            "study": t.study,
            "variant": v,
            "seed": t.seed,
            "metrics": r["metrics"].get(v, {}),
            "error": r["error"],
            "wall_s": r["wall_s"],
            "shared_with": [w for w in t.variants if w != v],
        }
        for t, r in done.items()
        for v in t.variants
    ]
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(rows, indent=1))
    tmp.replace(path)
