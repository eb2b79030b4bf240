"""``aimctl bench pretrain``: end to end through the real launcher, is data or model the
bottleneck?

Runs a short pre-training of a job config (default: the demo) without MLflow into a
temporary folder and reads what rank 0 reported at the last log step: images/s and MFU
(warm-up steps excluded) and the share of wall time the loop spent waiting for batches.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

from aim_platform.config import JobConfig, load_config

DEMO = Path(__file__).resolve().parents[3] / "jobs" / "configs" / "demo.yaml"
WAIT_BOUND = 0.10  # above this share of wall time waiting for data, the pipeline limits


@dataclass
class PretrainBench:
    """What one end-to-end run measured."""

    steps: int
    images_per_s: float
    mfu: float | None
    data_wait_fraction: float

    @property
    def bottleneck(self) -> str:
        return "data pipeline" if self.data_wait_fraction > WAIT_BOUND else "model"

    def lines(self) -> list[str]:
        mfu = f"{100 * self.mfu:.1f}%" if self.mfu is not None else "n/a"
        return [
            f"steps {self.steps}, {self.images_per_s:.1f} images/s, MFU {mfu}",
            f"waiting for data: {100 * self.data_wait_fraction:.1f}% of the last log window",
            f"bottleneck: {self.bottleneck} (data-bound above {100 * WAIT_BOUND:.0f}% waiting)",
        ]


def run(config: Path = DEMO, steps: int = 30, overrides: list[str] | None = None) -> PretrainBench:
    """Pre-train ``steps`` steps of ``config`` (plus overrides) and measure it."""
    from aim_platform.jobs.pretrain import pretrain

    with tempfile.TemporaryDirectory() as tmp:
        job = load_config(
            config,
            [
                *(overrides or []),
                f"train.steps={steps}",
                f"train.log_every={steps}",
                f"train.val_every={steps}",
                f"train.checkpoint_every={steps}",
                f"train.storage_path={tmp}",
                "name=bench-pretrain",
            ],
            JobConfig,
        )
        result = pretrain(job, track=False)
    m = result.metrics
    return PretrainBench(
        result.steps,
        float(m.get("perf/images_per_s", 0.0)),
        m.get("perf/mfu"),
        float(m.get("perf/data_wait_fraction", 0.0)),
    )
