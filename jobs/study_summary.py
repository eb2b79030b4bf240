"""Summarize finished studies from their folders and MLflow: each study's table (mean ± std
over seeds, the paper's numbers, the random-trunk floor and the verdict per pair) and, across its trials, the
correlation of the final validation loss with linear and attentive probe top-1.

Usage: .venv/bin/python jobs/study_summary.py runs/studies [--tracking-uri URI]
(the tracking URI defaults to ``mlflow.db`` beside the studies folder, as ``aimctl study``).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from aim_platform.eval.correlation import pearson, spearman
from aim_platform.tracking import resolve_tracking_uri


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("studies", type=Path, help="the --storage folder of aimctl study")
    parser.add_argument("--tracking-uri", default=None)
    args = parser.parse_args(argv)
    uri = resolve_tracking_uri(args.tracking_uri, str(args.studies.resolve().parent))
    from mlflow.tracking import MlflowClient  # a reading script: the client's search

    client = MlflowClient(tracking_uri=uri)
    for folder in sorted(p for p in args.studies.iterdir() if (p / "table.md").is_file()):
        print(folder.joinpath("table.md").read_text())
        marker = folder / "parent_run.json"  # this folder's study run (names repeat)
        if not marker.is_file():
            continue
        parent = client.get_run(json.loads(marker.read_text())["run_id"])
        trials = client.search_runs(
            [parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'"
        )
        points = [
            (m["val/loss"], m["probe/linear/top1"], m["probe/attentive/top1"])
            for m in (t.data.metrics for t in trials)
            if {"val/loss", "probe/linear/top1", "probe/attentive/top1"} <= m.keys()
        ]
        if len(points) < 3:
            continue
        loss = [p[0] for p in points]
        for i, kind in ((1, "linear"), (2, "attentive")):
            acc = [p[i] for p in points]
            print(
                f"val loss vs {kind} top-1 over {len(points)} trials: "
                f"Pearson {pearson(loss, acc):+.2f}, Spearman {spearman(loss, acc):+.2f}"
            )
        print()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
