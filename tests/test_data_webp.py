"""WebP: ingested and decoded when PIL is built with libwebp; doctor lists the codecs."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from data_helpers import jpeg, rgb_array
from PIL import Image, features

from aim_platform.data.transforms import decode_batch
from aim_platform.doctor import codecs, pil_report
from aim_platform.jobs.ingest import ingest

HAS_WEBP = features.check("webp")


def test_doctor_lists_codecs() -> None:
    found = codecs()
    assert {"jpeg", "png", "webp", "avif"} <= set(found)
    assert found["jpeg"] and found["png"] and found["webp"] == HAS_WEBP
    report = pil_report()
    assert f"webp {'yes' if HAS_WEBP else 'NO'}" in report["codecs"]
    assert ("webp" in report) != HAS_WEBP  # the hint shows only when WebP is missing


@pytest.mark.skipif(
    not HAS_WEBP,
    reason="the imported PIL has no WebP: install libwebp-dev, run infra/pillow_simd.sh",
)
def test_webp_is_ingested_and_decoded(ray_session, tmp_path: Path) -> None:
    src = tmp_path / "imgs"
    src.mkdir()
    buf = io.BytesIO()
    Image.fromarray(rgb_array(40, 48, 5)).save(buf, format="WEBP", quality=90)
    (src / "a.webp").write_bytes(buf.getvalue())
    (src / "b.jpg").write_bytes(jpeg(40, 48, seed=6))
    m = ingest(str(src), str(tmp_path / "out"), val_fraction=0.0)
    assert not m["rejected"] and m["counts"]["train"] == 2
    table = pq.read_table(tmp_path / "out" / "train")
    row = table["id"].to_pylist().index("a.webp")
    data = table["image"][row].as_py()
    assert data == buf.getvalue() and (
        table["width"][row].as_py(),
        table["height"][row].as_py(),
    ) == (48, 40)
    patches, valid = decode_batch(["a.webp"], [data], img_size=32, patch_size=8, train=False)
    assert valid.all() and patches.shape == (1, 16, 192) and np.asarray(patches).std() > 0
