"""Study specs without Ray: read a spec (over its defaults), restrict it to some variants, and
build the job of one trial. :mod:`.study` runs them with Ray Tune; :mod:`.local_study` runs them
in local processes on one device."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from aim_platform.config import ConfigError, JobConfig, Scale, StudySpec
from aim_platform.jobs.study_table import seed_overrides

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
    # the text's directions between two kept variants (a trial re-validates the spec)
    directions = {
        row: [t for t in texts if all(side.strip() in keep for side in t.split(">"))]
        for row, texts in spec.directions.items()
    }
    return spec.model_copy(
        update={
            "variants": variants,
            "paper": paper,
            "variant_scales": variant_scales,
            "directions": directions,
        }
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


def pretraining_key(job: JobConfig) -> str:
    """What a pre-training depends on: the whole job but its probe and run name. Trials whose
    jobs have the same key (Table 3d's probe attention) can share one pre-training: the same
    seed gives the same trunk."""
    fields = job.model_dump(mode="json")
    return json.dumps(
        {k: v for k, v in fields.items() if k not in ("probe", "name")}, sort_keys=True
    )


def pretraining_groups(
    spec: StudySpec, scale: Scale, extra: list[str], seeds: int = 1
) -> list[list[str]]:
    """The spec's variants grouped by the pre-training they need (:func:`pretraining_key`), in
    the spec's order; each group's first variant names its pre-training. Seeds shift every
    variant's seeds alike, so seed 0 decides for all."""
    groups: dict[str, list[str]] = {}
    for variant in spec.variants:
        job = trial_job(spec, variant, scale, extra, 0, seeds)
        groups.setdefault(pretraining_key(job), []).append(variant)
    return list(groups.values())
