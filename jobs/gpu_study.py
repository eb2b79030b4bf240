"""Study tables on one GPU with no Ray cluster: every trial of the given study specs in local
processes sharing the device (:mod:`aim_platform.jobs.local_study`), for a lent GPU machine
that has PyTorch but no Ray or MLflow. Same jobs, model, crops, probes, table and verdicts as
``aimctl study``; images read from an image-folder tree or its ``.tar.gz`` archives.

    python jobs/gpu_study.py jobs/studies/attention.yaml jobs/studies/capacity.yaml \\
        --data cifar10/ --scale cifar10 --seeds 3 --parallel 8 --set train.steps=3000 \\
        --deadline-s 480 --out gpu_study/          # cifar10/{train,test}.tar.gz or folders
    python jobs/gpu_study.py jobs/studies/head.yaml --variants none,mlp --scale tiny \\
        --data tests/assets/cifar10-mini

Prints one line per finished trial and floor, then each study's table with its verdicts (also
written to ``--out``: ``results.json``, ``<study>.md``, ``<study>.csv`` and the per-seed
``<study>-trials.csv`` that ``docs/results/`` keeps and ``tests/test_results.py`` recomputes).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "platform"))  # runnable from a bare checkout, no install

from aim_platform.config import SCALES  # noqa: E402
from aim_platform.errors import PlatformError  # noqa: E402
from aim_platform.jobs.local_study import run_local_studies  # noqa: E402
from aim_platform.jobs.study_spec import load_study, select_variants  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("specs", nargs="+", type=Path, help="study spec YAML files")
    parser.add_argument("--data", required=True, help="folder with train/ and test/ (or .tar.gz)")
    parser.add_argument("--scale", default="cifar10", choices=SCALES)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument(
        "--only-seeds", default="", help="0,2: run only these seed indices of --seeds"
    )
    parser.add_argument("--variants", default=None, help="a,b: run only these variants")
    parser.add_argument("--parallel", type=int, default=2, help="trial processes at once")
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda if present)")
    parser.add_argument("--set", dest="extra", action="append", default=[], help="override")
    parser.add_argument("--deadline-s", type=float, default=None, help="stop after this long")
    parser.add_argument("--out", type=Path, default=None, help="results and tables folder")
    args = parser.parse_args(argv)

    try:
        only_seeds = [int(x) for x in args.only_seeds.split(",") if x.strip()] or None
    except ValueError:
        parser.error(f"--only-seeds: {args.only_seeds!r} is not a comma-separated list of integers")
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    specs = [load_study(p) for p in args.specs]
    if args.variants:
        specs = [select_variants(s, args.variants.split(",")) for s in specs]
    extra = [f"data.sources.0.url={Path(args.data).resolve()}", *args.extra]
    start = time.time()
    results = run_local_studies(
        specs,
        args.scale,
        args.data,
        seeds=args.seeds,
        only_seeds=only_seeds,
        extra=extra,
        parallel=args.parallel,
        device=device,
        deadline_s=args.deadline_s,
        out=args.out,
        say=lambda text: print(f"[{time.time() - start:5.0f} s] {text}", flush=True),
    )
    for result in results:
        print("\n" + result.markdown(), flush=True)
    print(f"(total {time.time() - start:.0f} s on {device})")
    finished = sum(not t.error for r in results for t in r.trials)
    return 0 if finished else 1


if __name__ == "__main__":
    try:
        sys.exit(main())
    except PlatformError as exc:  # bad data, spec or override: one line, not a traceback
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
