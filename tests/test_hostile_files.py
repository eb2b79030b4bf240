"""Hostile files never run code: every loader of a file from a user or a bucket is fed a crafted
file whose loading would create a marker file (a pickle's ``__reduce__``, a YAML tag, a
Parquet column of pickles, a PostScript "image"); the marker is never created and the error is
one line naming the file."""

from __future__ import annotations

import io
import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from aim_platform.cli import app
from aim_platform.errors import PlatformError, UnsafeFile
from aim_platform.selfcheck import reference_path


class Payload:
    """Pickles as ``open(marker, "w")``: loading it creates the marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self) -> tuple[object, tuple[str, str]]:
        return (open, (self.marker, "w"))


def _one_line(text: str) -> str:
    lines = [ln for ln in text.splitlines() if ln.strip()]
    assert len(lines) == 1, text
    return lines[0]


def _refused(exc: pytest.ExceptionInfo[BaseException], path: Path | str) -> str:
    """The error is a platform error (one line at the command line) naming ``path``."""
    assert isinstance(exc.value, PlatformError), exc.value
    line = _one_line(str(exc.value))
    assert str(path) in line, line
    return line


def _reference() -> dict:
    return torch.load(reference_path(), weights_only=True)


# -- torch files: official checkpoints, converted trunks, the selfcheck reference --------------


def test_convert_ml_aim_refuses_a_pickle_that_runs_code(tmp_path: Path) -> None:
    marker, crafted, out = tmp_path / "marker", tmp_path / "crafted.pt", tmp_path / "out.pt"
    ref = _reference()
    torch.save({"state_dict": ref["state_dict"], "ml_aim_config": Payload(marker)}, crafted)
    result = CliRunner().invoke(app, ["convert-ml-aim", str(crafted), str(out)])
    assert result.exit_code == 2
    line = _one_line(result.output)
    assert line.startswith(f"error: {crafted}: refused:") and "io.open" in line, line
    assert not marker.exists() and not out.exists()


@pytest.mark.parametrize(
    ("config", "says"),
    [
        ("img_size=56", "must be a mapping"),
        ({"img_size": "56", "patch_size": 14}, "ml_aim_config lacks"),
        ({"img_size": "x", "patch_size": 14, "embed_dim": 64, "num_blocks": 4, "num_heads": 4},
         "ml_aim_config.img_size must be a positive integer"),
        ({"img_size": 56, "patch_size": 14, "embed_dim": 64, "num_blocks": 4, "num_heads": 4,
          "act_layer": "gelu"}, "unknown keys ['act_layer']"),
        ({"img_size": 56, "patch_size": 14, "embed_dim": 32, "num_blocks": 4, "num_heads": 4},
         "the weights do not fit"),
        ({"img_size": 56, "patch_size": 14, "embed_dim": 64, "num_blocks": 4, "num_heads": 4,
          "probe_layers": "last"}, "probe_layers must be"),
    ],
)  # fmt: skip
def test_convert_ml_aim_malformed_config_is_one_line(
    tmp_path: Path, config: object, says: str
) -> None:
    src = tmp_path / "official.pt"
    torch.save({"state_dict": _reference()["state_dict"], "ml_aim_config": config}, src)
    result = CliRunner().invoke(app, ["convert-ml-aim", str(src), str(tmp_path / "out.pt")])
    assert result.exit_code == 2, result.output
    line = _one_line(result.output)
    assert line.startswith(f"error: {src}:") and says in line, line


def test_a_converted_trunk_that_runs_code_is_refused(tmp_path: Path) -> None:
    from aim_platform.eval.features import load_trunk

    marker, crafted = tmp_path / "marker", tmp_path / "trunk.pt"
    torch.save({"format": "aim-platform/classifier-v1", "x": Payload(marker)}, crafted)
    with pytest.raises(UnsafeFile) as exc:
        load_trunk(str(crafted))
    assert "refused" in _refused(exc, crafted)
    not_torch = tmp_path / "notes.pt"
    not_torch.write_text("hello")
    with pytest.raises(UnsafeFile) as exc:
        load_trunk(str(not_torch))
    assert "not a torch checkpoint" in _refused(exc, not_torch)
    assert not marker.exists()


def test_selfcheck_reads_its_reference_weights_only(tmp_path: Path) -> None:
    from aim_platform.selfcheck import ml_aim_parity

    marker, crafted = tmp_path / "marker", tmp_path / "ref.pt"
    torch.save({**_reference(), "logits": Payload(marker)}, crafted)
    with pytest.raises(UnsafeFile) as exc:
        ml_aim_parity(str(crafted))
    _refused(exc, crafted)
    assert not marker.exists()
    assert ml_aim_parity().ok  # the shipped reference is plain weights


# -- checkpoints: DCP metadata, the train state ----------------------------------------------


def _app() -> object:
    from aim_platform.train.checkpoint import AppState

    model = torch.nn.Linear(4, 3)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(2, 4)).sum().backward()
    opt.step()
    return AppState(model, opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0))


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
def test_dcp_metadata_that_runs_code_is_refused(tmp_path: Path) -> None:
    from aim_platform.train import checkpoint as ckpt

    folder, marker = tmp_path / "checkpoint_00000010", tmp_path / "marker"
    saved = _app()
    ckpt.save(folder, saved, ckpt.TrainState(step=10, epoch=1), "name: x\n", rank=0)
    restored = _app()
    assert ckpt.load(folder, restored) == ckpt.TrainState(step=10, epoch=1)  # the real thing
    assert torch.equal(restored.model.weight, saved.model.weight)

    (folder / ".metadata").write_bytes(pickle.dumps(Payload(marker)))
    with pytest.raises(UnsafeFile) as exc:
        ckpt.load(folder, _app())
    assert "names io.open" in _refused(exc, folder / ".metadata")
    (folder / ".metadata").write_bytes(b"not a pickle")
    with pytest.raises(UnsafeFile) as exc:
        ckpt.load(folder, _app())
    _refused(exc, folder / ".metadata")
    assert not marker.exists()


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
def test_dcp_metadata_with_enums_pickled_by_name_loads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Some Pythons (3.11.2, Debian's) pickle an enum member as ``getattr(cls, name)``: a
    checkpoint saved there loads anywhere; ``getattr`` on anything but a member of DCP's
    metadata enums is refused."""
    from torch.distributed.checkpoint.metadata import _MEM_FORMAT_ENCODING

    from aim_platform.train import checkpoint as ckpt

    monkeypatch.setattr(
        _MEM_FORMAT_ENCODING,
        "__reduce_ex__",
        lambda self, proto: (getattr, (type(self), self.name)),
    )
    folder = tmp_path / "checkpoint_00000010"
    saved = _app()
    ckpt.save(folder, saved, ckpt.TrainState(step=10, epoch=1), "name: x\n", rank=0)
    assert b"getattr" in (folder / ".metadata").read_bytes()
    monkeypatch.undo()
    restored = _app()
    assert ckpt.load(folder, restored) == ckpt.TrainState(step=10, epoch=1)
    assert torch.equal(restored.model.weight, saved.model.weight)

    class Crafted:
        def __reduce__(self) -> tuple:  # getattr(Metadata, "__init__"): no enum member
            from torch.distributed.checkpoint.metadata import Metadata

            return getattr, (Metadata, "__init__")

    (folder / ".metadata").write_bytes(pickle.dumps(Crafted()))
    with pytest.raises(UnsafeFile) as exc:
        ckpt.load(folder, _app())
    assert "getattr(Metadata, '__init__')" in _refused(exc, folder / ".metadata")


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
def test_dcp_byte_item_that_runs_code_is_refused(tmp_path: Path) -> None:
    """A shard's non-tensor item (here the optimizer's ``lr``) replaced by a crafted pickle:
    torch's own planner would unpickle it with ``weights_only=False`` and run it."""
    from aim_platform.train import checkpoint as ckpt

    folder, marker = tmp_path / "checkpoint_00000010", tmp_path / "marker"
    crafted = _app()
    crafted.optimizer.param_groups[0]["lr"] = Payload(marker)  # type: ignore[attr-defined]
    ckpt.save(folder, crafted, ckpt.TrainState(step=10, epoch=1), "name: x\n", rank=0)
    with pytest.raises(UnsafeFile) as exc:
        ckpt.load(folder, _app())
    line = _refused(exc, folder / "__0_0.distcp")
    assert "optim.param_groups" in line and "names io.open" in line
    assert not marker.exists()


def test_latest_and_run_id_records_are_json_only(tmp_path: Path) -> None:
    from aim_platform.config import JobConfig
    from aim_platform.jobs.pretrain import latest_train_state, run_paths

    marker = tmp_path / "marker"
    job = JobConfig.model_validate({"name": "x", "train": {"storage_path": str(tmp_path)}})
    latest = Path(run_paths(job).latest)
    latest.parent.mkdir(parents=True)
    latest.write_bytes(pickle.dumps(Payload(marker)))
    with pytest.raises(UnsafeFile) as exc:
        latest_train_state(job)
    _refused(exc, latest)
    latest.write_text(json.dumps({"checkpoint": "c", "step": "ten"}))
    with pytest.raises(UnsafeFile):
        latest_train_state(job)
    assert not marker.exists()


# -- trunks and codebooks: safetensors + YAML ------------------------------------------------


def test_trunk_folder_files_that_are_not_what_they_say_are_refused(tmp_path: Path) -> None:
    from aim_platform.config import JobConfig
    from aim_platform.models.aim import build_trunk
    from aim_platform.models.trunk_file import read_trunk, write_trunk

    marker, folder = tmp_path / "marker", tmp_path / "final"
    job = JobConfig.model_validate({"name": "x", "model": {"size": "aim-tiny"}})
    write_trunk(build_trunk(job.model).state_dict(), job, str(folder))
    assert read_trunk(str(folder))[1].model == job.model  # the real thing

    good_config = (folder / "config.yaml").read_text()
    (folder / "config.yaml").write_text(f"!!python/object/apply:builtins.open ['{marker}', 'w']\n")
    with pytest.raises(UnsafeFile) as exc:
        read_trunk(str(folder))
    assert "never loaded" in _refused(exc, folder / "config.yaml")
    (folder / "config.yaml").write_text(good_config)
    (folder / "trunk.safetensors").write_bytes(pickle.dumps(Payload(marker)))
    with pytest.raises(UnsafeFile) as exc:
        read_trunk(str(folder))
    assert "not a safetensors file" in _refused(exc, folder / "trunk.safetensors")
    assert not marker.exists()


def test_a_codebook_that_is_a_pickle_is_refused(tmp_path: Path) -> None:
    from aim_platform.models.tokenizer import Tokenizer

    marker, crafted = tmp_path / "marker", tmp_path / "codebook.safetensors"
    crafted.write_bytes(pickle.dumps(Payload(marker)))
    with pytest.raises(UnsafeFile) as exc:
        Tokenizer.load(str(crafted))
    _refused(exc, crafted)
    assert not marker.exists()


# -- configs, study specs, overrides, submitted files: YAML ----------------------------------


def test_yaml_tags_that_build_objects_are_one_line_errors(tmp_path: Path) -> None:
    from aim_platform.submit import _validate

    marker = tmp_path / "marker"
    tag = f"!!python/object/apply:builtins.open ['{marker}', 'w']"
    config = tmp_path / "job.yaml"
    config.write_text(f"name: {tag}\n")
    runner = CliRunner()
    result = runner.invoke(app, ["plan", str(config), "--gpus", "1"])
    assert result.exit_code == 2
    line = _one_line(result.output)
    assert str(config) in line and "line 1, column 7" in line and "never loaded" in line
    result = runner.invoke(
        app, ["plan", "jobs/configs/demo.yaml", "--gpus", "1", "--set", f"name={tag}"]
    )
    assert result.exit_code == 2 and "never loaded" in _one_line(result.output)
    spec = tmp_path / "study.yaml"
    spec.write_text(f"name: s\nvariants: {tag}\n")
    result = runner.invoke(app, ["study", str(spec)])
    assert result.exit_code == 2 and str(spec) in _one_line(result.output)
    with pytest.raises(PlatformError) as exc:
        _validate(spec, [], "tiny")
    _refused(exc, spec)
    assert not marker.exists()


# -- data: Parquet shards, images, feature cache shards --------------------------------------


def _pickled_column_shard(path: Path, marker: Path, column: str) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq
    import ray.data  # noqa: F401 - registers Ray's extension types, as in every Ray worker
    from ray.data._internal.object_extensions.arrow import ArrowPythonObjectArray

    cols = {"id": pa.array(["a"]), "image": pa.array([b"x"]), "label": pa.array([1], pa.int32())}
    cols[column] = ArrowPythonObjectArray.from_objects([Payload(marker)])
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(cols), path)


def test_a_parquet_shard_with_a_pickled_image_column_is_refused(tmp_path: Path) -> None:
    import pyarrow.fs as pafs

    from aim_platform.data.tasks import read_and_decode

    marker, shard = tmp_path / "marker", tmp_path / "train" / "part-00000.parquet"
    _pickled_column_shard(shard, marker, "image")
    batch = {"epoch": np.array([0]), "source": np.array([0]), "path": np.array([str(shard)])}
    with pytest.raises(UnsafeFile) as exc:
        list(
            read_and_decode(
                batch,
                sources=[("x", 1.0, pafs.LocalFileSystem())],
                train=False,
                model={"img_size": 32, "patch_size": 4},
                seed=0,
                chunk_rows=8,
                aug={"max_pixels": 10**8},
            )
        )
    assert "'image'" in _refused(exc, shard)
    assert not marker.exists()


def test_a_probe_dataset_with_a_pickled_label_column_is_refused(tmp_path: Path) -> None:
    from aim_platform.jobs.probe import select_labelled

    marker, root = tmp_path / "marker", tmp_path / "labelled"
    _pickled_column_shard(root / "train" / "part-00000.parquet", marker, "label")
    manifest = {"settings": {"order": "hash"}, "label_names": ["a"]}
    manifest["shards"] = {"train": [{"path": "train/part-00000.parquet", "rows": 1}], "val": []}
    (root / "_manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(UnsafeFile) as exc:
        select_labelled(str(root), 1, seed=0)
    assert "'label'" in _refused(exc, "part-00000.parquet")
    assert not marker.exists()


@pytest.mark.parametrize("by_file", [False, True])
def test_a_parquet_source_with_a_pickled_column_is_refused_at_ingest(
    tmp_path: Path, by_file: bool
) -> None:
    """A Hugging Face-style Parquet folder handed to ``aimctl ingest``: a column of pickles
    (here the label, which the listing reads) is refused before a value is read."""
    from aim_platform.data.sources import list_source

    marker, src = tmp_path / "marker", tmp_path / "hf" / "train-00000.parquet"
    _pickled_column_shard(src, marker, "label")
    with pytest.raises(UnsafeFile) as exc:
        list_source(str(src.parent), by_file=by_file)
    assert "'label'" in _refused(exc, "train-00000.parquet")
    assert not marker.exists()


def test_a_manifest_or_study_record_that_is_not_json_is_one_line(tmp_path: Path) -> None:
    from aim_platform.data.shards import MANIFEST, read_manifest

    root = tmp_path / "root"
    root.mkdir()
    (root / MANIFEST).write_bytes(pickle.dumps(Payload(tmp_path / "marker")))
    with pytest.raises(UnsafeFile) as exc:
        read_manifest(str(root))
    assert "ingest manifest" in _refused(exc, MANIFEST)
    assert not (tmp_path / "marker").exists()


EPS = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 8 8\n%%EndComments\nshowpage\n%%EOF\n"


def test_postscript_never_reaches_ghostscript(tmp_path: Path, monkeypatch) -> None:
    """Pillow decodes EPS by running Ghostscript on it; a machine with Ghostscript is faked
    by a `gs` that leaves the marker."""
    from PIL import EpsImagePlugin

    from aim_platform.data.transforms import ImageRejected, inspect_image, val_image

    marker, gs = tmp_path / "marker", tmp_path / "gs"
    gs.write_text(f"#!/bin/sh\ntouch {marker}\nexit 1\n")
    gs.chmod(0o755)
    monkeypatch.setattr(EpsImagePlugin, "gs_binary", str(gs))
    for decode in (inspect_image, lambda data: val_image(data, 32)):
        with pytest.raises(ImageRejected, match="not an image"):
            decode(EPS)
    with pytest.raises(ImageRejected, match="not an image"):
        inspect_image(pickle.dumps(Payload(marker)))  # a pickle where an image should be
    assert not marker.exists()


def test_a_feature_cache_shard_of_pickles_is_refused(tmp_path: Path) -> None:
    from aim_platform.eval.cache import FeatureCache

    marker = tmp_path / "marker"
    cache = FeatureCache(str(tmp_path / "cache"))
    features = np.zeros((2, 1, 4, 8), np.float16)  # (B, L, K, D)
    cache.add("val", features, np.array([0, 1]), [3], {"last": [3]})
    labels = next(Path(cache.root).glob("val/labels/*.npy"))
    buf = io.BytesIO()
    np.save(buf, np.array([Payload(marker)], dtype=object), allow_pickle=True)
    labels.write_bytes(buf.getvalue())
    with pytest.raises(UnsafeFile) as exc:
        list(cache.iterate("val", "last"))
    _refused(exc, labels)
    assert not marker.exists()
