"""The random-trunk floor of a study table: each trial's trunk as it starts, never trained,
probed exactly as the trial's, so that what pre-training adds is the distance to it."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from aim_platform import tracking
from aim_platform.config import JobConfig
from aim_platform.errors import UnsafeFile
from aim_platform.jobs.study_table import trial_name
from aim_platform.storage import filesystem, read_json


def floor_key(job: JobConfig) -> str:
    """What a random trunk's probe depends on: the trunk's shapes, its sequence order (for a
    causal probe), the init seed, the probe settings and data. Variants equal in these share
    one floor (the head study's three variants: one random trunk a seed)."""
    m, probe = job.model, job.probe
    assert probe is not None
    trunk = {
        k: getattr(m, k)
        for k in ("img_size", "patch_size", "embed_dim", "num_blocks", "num_heads", "mlp_ratio")
    }
    if probe.attention == "causal":
        trunk["order"] = [m.pattern, m.pattern_seed]
    data = job.probe.dataset or job.data.sources[0].url
    return json.dumps([trunk, job.seed, probe.model_dump(mode="json"), data], sort_keys=True)


def random_trunk_floor(
    trials: list[tuple[str, int, JobConfig]],
    seeds: int,
    store: str,
    storage_options: dict[str, Any] | None,
    tracker: tracking.Tracker,
    parent: str,
    experiment: str,
    on_trial: Callable[[str, str, dict[str, Any]], None] | None = None,
) -> dict[str, dict[int, dict[str, float]]]:
    """Probe metrics of a randomly initialized trunk per variant and seed index (``trials``:
    each trial's variant, seed index and job, as the study runs it): the trunk
    each trial starts from, never trained, probed exactly as the trial's. Each distinct
    floor (:func:`floor_key`) is probed once, logged as a probe run under the study run and
    kept in ``store`` (the study's ``floor.json``, local or on object storage with
    ``storage_options``: a resumed study does not redo it); a floor that fails is left out,
    with a tag on the study run. ``on_trial`` sees each as a row ``random trunk <trial>``."""
    import tempfile

    import torch

    from aim_platform.eval.probe import report_metrics
    from aim_platform.jobs.probe import log_probe, run_probe
    from aim_platform.models.aim import build_trunk
    from aim_platform.models.trunk_file import write_trunk

    fs, path = filesystem(store, storage_options)
    done: dict[str, dict[str, float]] = {}
    if fs.exists(path):
        done = read_json(fs, path, "a study's random-trunk floor record")
        if not isinstance(done, dict):
            raise UnsafeFile(f"{path}: not a study's random-trunk floor record (not a mapping)")
    out: dict[str, dict[int, dict[str, float]]] = {}
    for variant, seed, job in trials:
        if job.probe is None:
            continue
        key = floor_key(job)
        if key not in done:
            dataset = job.probe.dataset or job.data.sources[0].url
            name = trial_name(variant, seed, seeds)
            show = on_trial or (lambda *args: None)
            show(f"random trunk {name}", "running", {})
            try:
                with tempfile.TemporaryDirectory(prefix="aim-random-trunk-") as folder:
                    torch.manual_seed(job.seed)
                    write_trunk(build_trunk(job.model).state_dict(), job, folder)
                    report = run_probe(folder, job.probe, dataset=dataset)
            except Exception as exc:  # noqa: BLE001 - a floor is reported, never fatal
                show(f"random trunk {name}", "failed", {})
                tracker.set_tags(parent, {f"floor_failed.{name}": str(exc)[:500]})
                continue
            done[key] = report_metrics(report)
            fs.pipe_file(path, json.dumps(done).encode())
            show(f"random trunk {name}", "done", done[key])
            log_probe(
                tracker,
                report,
                job.probe,
                experiment=experiment,
                run_name=f"random-trunk-{name}",
                trunk_path="random init",
                dataset=dataset,
                parent_run_id=parent,
            )
        out.setdefault(variant, {})[seed] = done[key]
    return out
