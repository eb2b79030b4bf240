"""The real-data check of the evaluation issue, with the platform's own jobs.

1. ingest scikit-learn's digits at 32 px with half of them held out for validation;
2. pre-train aim-tiny (jobs/configs/digits_probe_check.yaml), probing 5 checkpoints;
3. probe a randomly initialized trunk of the same shape with the same probe budget/seeds;
4. print per-block accuracies, the best-block gain, and Spearman(val loss, accuracy).

Usage: .venv/bin/python jobs/digits_probe_check.py [--set a.b=c ...]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from aim_platform.cluster import connect
from aim_platform.config import JobConfig, load_config
from aim_platform.eval.correlation import run_points
from aim_platform.jobs.ingest import ingest
from aim_platform.jobs.pretrain import pretrain
from aim_platform.jobs.pretrain_outputs import summary
from aim_platform.jobs.probe import log_probe, run_probe
from aim_platform.models.aim import build_trunk
from aim_platform.models.trunk_file import write_trunk
from aim_platform.tracking import Tracker

CONFIG = Path(__file__).parent / "configs" / "digits_probe_check.yaml"


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    args = parser.parse_args(argv)
    job = load_config(CONFIG, args.overrides, JobConfig)
    assert job.probe is not None
    connect(None)
    dataset = job.probe.dataset or job.data.sources[0].url
    ingest("builtin:digits", dataset, image_size=32, val_fraction=0.5, shard_size_mb=1)

    result = pretrain(job)
    print("\n".join(summary(result)))

    torch.manual_seed(job.seed)
    random_dir = f"{result.storage}/random-trunk"
    write_trunk(build_trunk(job.model).state_dict(), job, random_dir)
    random = run_probe(random_dir, job.probe, dataset=dataset)
    tracker = Tracker(result.tracking_uri)
    log_probe(
        tracker,
        random,
        job.probe,
        experiment=job.tracking.experiment,
        run_name="random-trunk-probe",
        trunk_path=random_dir,
        dataset=dataset,
        parent_run_id=result.run_id,
    )

    blocks = sorted(random.per_block["attentive"])
    print(
        f"\nlabels: {job.probe.labels_per_class} per class "
        f"({random.train_images} images x {job.probe.views} views), "
        f"validation images: {random.val_images}, seeds: pretrain {job.seed}, "
        f"probe {job.probe.seed}"
    )
    header = "| trunk | " + " | ".join(f"block {b}" for b in blocks) + " | best |"
    print(header + "\n|" + " --- |" * (len(blocks) + 2))
    rnd = [random.per_block["attentive"][b].top1 for b in blocks]
    print("| random init | " + " | ".join(f"{x:.3f}" for x in rnd) + f" | {max(rnd):.3f} |")
    best_trained = 0.0
    for step in [*job.probe.at_steps, result.steps]:
        accs = []
        for b in blocks:
            hist = dict(tracker.metric_history(result.run_id, f"probe/attentive/block_{b}/top1"))
            accs.append(hist.get(step, float("nan")))
        best_trained = max(best_trained, max(accs))
        print(f"| step {step} | " + " | ".join(f"{x:.3f}" for x in accs) + f" | {max(accs):.3f} |")
    corr = run_points(tracker, result.run_id, "probe/attentive/best_block_top1")
    print(
        f"\nbest pre-trained block {best_trained:.3f} vs best random block {max(rnd):.3f}: "
        f"{100 * (best_trained - max(rnd)):+.1f} points"
    )
    print(
        f"Spearman(val loss, best-block accuracy) over {len(corr.losses)} checkpoints: "
        f"{corr.spearman:.2f}; Pearson {corr.pearson:.2f}"
    )
    print(corr.table())
    print(f"MLflow: {result.tracking_uri} run {result.run_id}")
    return 0 if best_trained >= max(rnd) + 0.03 else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
