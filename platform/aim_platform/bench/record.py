"""What exact data resume costs (``aimctl bench record``): the record of trained rows
(:mod:`aim_platform.data.consumed`) against the work it rides on, measured side by side.

- read task: hashing each row's occurrence key (``row_keys``) against decoding the same chunk
  (crop, flip, patchify) of real JPEGs, interleaved rounds;
- training rank: ``ConsumedLog.add`` of a micro-batch against one training step of the model;
- checkpoint: ``data_state.json`` of an epoch in progress against the checkpoint's shards.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np


def _best(fn: Callable[[], object], rounds: int) -> float:
    times = []
    for _ in range(rounds):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def run(
    *, rows: int = 256, rounds: int = 5, size: str = "aim-tiny", echo: Callable[[str], None]
) -> dict[str, float]:
    """Print and return the three ratios (record cost / the work beside it)."""
    import torch

    from aim_platform.bench.data import make_jpegs
    from aim_platform.config import JobConfig
    from aim_platform.data.consumed import ConsumedLog, DataState, row_keys
    from aim_platform.data.transforms import decode_batch, id_hash
    from aim_platform.models.aim import sample_prefix_lengths
    from aim_platform.selfcheck import digits_patches
    from aim_platform.train.checkpoint import TrainState
    from aim_platform.train.trainer import Trainer

    jpegs = make_jpegs(rows, seed=0)
    ids = [f"photos/{i:06d}" for i in range(rows)]
    repeats = np.zeros(rows, np.int64)
    decode = _best(
        lambda: decode_batch(
            ids, jpegs, img_size=224, patch_size=14, train=True, seed=0, epoch=0, repeats=repeats
        ),
        rounds,
    )
    keys = _best(lambda: row_keys((id_hash(f"s/{i}") for i in ids), repeats), rounds)
    echo(
        f"read task, {rows} rows at 224 px: decode {decode * 1e3:.1f} ms, keys "
        f"{keys * 1e3:.2f} ms: keys / decode = {keys / decode:.4f}"
    )

    job = JobConfig.model_validate({"name": "bench", "model": {"size": size}})
    trainer = Trainer.setup(job, torch.device("cpu"), "fp32")
    batch = 32
    pixels = digits_patches(job.model.img_size, job.model.patch_size)[:batch]  # (B, K, P)
    gen = torch.Generator().manual_seed(0)

    def step() -> None:
        prefix = sample_prefix_lengths(batch, *job.model.prefix_range, gen)
        trainer.backward(pixels, prefix, gen)
        trainer.step()

    step()  # warm-up
    cols = {
        "epoch": torch.zeros(batch, dtype=torch.int32),
        "item": torch.full((batch,), 7, dtype=torch.int64),
        "epoch_items": torch.full((batch,), 100, dtype=torch.int32),
        "item_rows": torch.full((batch,), 2300, dtype=torch.int32),
        "key": torch.arange(batch, dtype=torch.int64) << 7,
    }
    log = ConsumedLog()
    t_step = _best(step, rounds)
    t_add = _best(lambda: log.add(cols), rounds * 20)
    echo(
        f"training rank, {size} batch {batch}: step {t_step * 1e3:.1f} ms, record "
        f"{t_add * 1e6:.0f} us: record / step = {t_add / t_step:.5f}"
    )

    # an epoch in progress: 2 ranks x 4 shards of 2,300 rows half trained, 96 shards done
    state = DataState()
    rng = np.random.default_rng(0)
    for item in range(100):
        n = 2300 if item < 96 else 1150
        keys_done = (rng.integers(0, 2**55, n) << 7).tolist()
        state.merge([{"rows": {f"0:{item}": keys_done}, "sizes": {f"0:{item}": [2300, 100]}}])
    with tempfile.TemporaryDirectory() as tmp:
        trainer.save(Path(tmp), TrainState(step=1), "x: 1\n", 0)
        ckpt = sum(p.stat().st_size for p in Path(tmp).rglob("*") if p.is_file())
    record = len(state.to_json().encode())
    echo(
        f"checkpoint of {size}: {ckpt / 2**20:.2f} MiB, data_state.json {record / 2**10:.0f} KiB "
        f"(4 shards in progress): record / checkpoint = {record / ckpt:.4f}"
    )
    return {"keys/decode": keys / decode, "record/step": t_add / t_step, "size": record / ckpt}
