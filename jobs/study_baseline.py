"""The floor of a study's table: the same probes on randomly initialized trunks.

Builds a study variant's job at a scale, initializes its trunk with seeds 0..N-1 (no
pre-training), and probes each with the job's probe settings (seed shifted as
``aimctl study --seeds`` does). What pre-training adds is the study's accuracy minus this.

Usage: .venv/bin/python jobs/study_baseline.py jobs/studies/head.yaml mlp --scale small --seeds 3
"""

from __future__ import annotations

import argparse
import sys
import tempfile

import torch

from aim_platform.cluster import connect
from aim_platform.jobs.probe import run_probe
from aim_platform.jobs.study import load_study
from aim_platform.jobs.study_table import mean_std, seed_overrides
from aim_platform.models.aim import build_trunk
from aim_platform.models.trunk_file import write_trunk


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("spec")
    parser.add_argument("variant")
    parser.add_argument("--scale", default="small")
    parser.add_argument("--seeds", type=int, default=3)
    args = parser.parse_args(argv)
    spec = load_study(args.spec)
    connect(None)
    scores: dict[str, list[float]] = {"linear": [], "attentive": []}
    for i in range(args.seeds):
        base = spec.job(args.variant, args.scale)
        assert base.probe is not None
        job = spec.job(args.variant, args.scale, seed_overrides(base.seed, base.probe.seed, i))
        assert job.probe is not None
        torch.manual_seed(job.seed)
        with tempfile.TemporaryDirectory() as folder:
            write_trunk(build_trunk(job.model).state_dict(), job, folder)
            dataset = job.probe.dataset or job.data.sources[0].url
            report = run_probe(folder, job.probe, dataset=dataset)
        for kind in scores:
            scores[kind].append(100 * report.main[kind].top1)
            print(f"seed {i}: {kind} {scores[kind][-1]:.1f}", flush=True)
    for kind, xs in scores.items():
        mean, std = mean_std(xs)
        print(f"random trunk, {kind}: {mean:.1f} ± {std:.1f} over {len(xs)} seeds")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
