"""Secret redaction and path safety (``aim_platform.security``)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from aim_platform.config import flatten
from aim_platform.security import (
    REDACTED,
    UnsafePathError,
    check_relative,
    is_secret_key,
    redact,
    redact_text,
)

SECRET = "wJalrXUtnFEMI-K7MDENG-bPxRfiCYEXAMPLEKEY"
TOKEN = "FQoGZXIvYXdzEJr-session-token-EXAMPLE"


def _config() -> dict:
    return {
        "name": "run-1",
        "model": {"size": "aim-tiny", "num_tokens": 64},
        "data": {
            "url": "s3://bucket/shards",
            "storage_options": {
                "key": "AKIAIOSFODNN7EXAMPLE",
                "secret": SECRET,
                "token": TOKEN,
                "client_kwargs": {"endpoint_url": "http://127.0.0.1:9000", "region_name": "eu"},
            },
            "mixture": [{"url": "s3://b/x", "storage_options": {"aws_secret_access_key": SECRET}}],
        },
        "tracking": {
            "uri": f"postgresql://mlflow:{SECRET}@db:5432/mlflow",
            "MLFLOW_TRACKING_PASSWORD": SECRET,
            "credentials": {"anything": SECRET},
            "password": None,
        },
    }


def test_redact_nested_config_and_storage_options() -> None:
    cfg = _config()
    before = json.dumps(cfg)
    out = redact(cfg)
    dumped = json.dumps(out) + yaml.safe_dump(out)
    assert SECRET not in dumped and TOKEN not in dumped and "AKIAIOSFODNN7EXAMPLE" not in dumped
    assert json.dumps(cfg) == before, "redact must not modify its input"
    opts = out["data"]["storage_options"]
    assert opts["key"] == opts["secret"] == opts["token"] == REDACTED
    # Non-secrets survive untouched, so the params stay useful.
    assert opts["client_kwargs"] == {"endpoint_url": "http://127.0.0.1:9000", "region_name": "eu"}
    assert out["model"] == {"size": "aim-tiny", "num_tokens": 64}
    assert out["data"]["url"] == "s3://bucket/shards"
    assert out["data"]["mixture"][0]["url"] == "s3://b/x"
    assert out["data"]["mixture"][0]["storage_options"]["aws_secret_access_key"] == REDACTED
    assert out["tracking"]["uri"] == f"postgresql://mlflow:{REDACTED}@db:5432/mlflow"
    assert out["tracking"]["credentials"] == REDACTED
    assert out["tracking"]["password"] is None  # unset stays visible as unset


def test_redact_flattened_params_and_pydantic_models() -> None:
    params = flatten(redact(_config()))  # what a job logs as MLflow params
    assert params["data.storage_options.secret"] == REDACTED
    assert params["data.storage_options.client_kwargs.endpoint_url"] == "http://127.0.0.1:9000"
    assert params["tracking.credentials"] == REDACTED  # a secret section, whole
    assert params["model.num_tokens"] == 64
    assert SECRET not in json.dumps(params)

    from pydantic import BaseModel

    class Storage(BaseModel):
        endpoint_url: str
        secret_access_key: str

    out = redact({"storage": Storage(endpoint_url="http://x", secret_access_key=SECRET)})
    assert out == {"storage": {"endpoint_url": "http://x", "secret_access_key": REDACTED}}


@pytest.mark.parametrize(
    "key",
    [
        "AWS_SECRET_ACCESS_KEY",
        "AWS_SESSION_TOKEN",
        "AWS_ACCESS_KEY_ID",
        "aws.secretAccessKey",
        "RAY_AUTH_TOKEN",
        "MLFLOW_TRACKING_PASSWORD",
        "storage_options.key",
        "api_key",
        "apikey",
        "client_secret",
        "gcp.credentials.json",
        "db.passwd",
        "privateKey",
    ],
)
def test_secret_keys(key: str) -> None:
    assert is_secret_key(key)


@pytest.mark.parametrize(
    "key", ["model.num_tokens", "tokenizer", "data.url", "monkey", "keyframes", "name", "seed"]
)
def test_not_secret_keys(key: str) -> None:
    assert not is_secret_key(key)


def test_redact_text_for_logs() -> None:
    line = (
        f"env AWS_SECRET_ACCESS_KEY={SECRET} AWS_DEFAULT_REGION=eu-west-1 "
        f"uri=postgresql://u:{SECRET}@h/db header Authorization: Bearer {TOKEN} "
        f"key id AKIAIOSFODNN7EXAMPLE password: 'hunter22'"
    )
    out = redact_text(line)
    for leaked in (SECRET, TOKEN, "AKIAIOSFODNN7EXAMPLE", "hunter22"):
        assert leaked not in out
    assert "AWS_DEFAULT_REGION=eu-west-1" in out and "postgresql://u:" in out
    assert redact_text(f"retrying with {SECRET}", [SECRET]) == f"retrying with {REDACTED}"


@pytest.mark.parametrize(
    ("relative", "message"),
    [
        ("../outside", "escapes its root"),
        ("a/../../outside", "escapes its root"),
        ("..", "escapes its root"),
        ("/etc/passwd", "is absolute"),
        ("~/x", "is absolute"),
        ("C:/x", "is absolute"),
        ("s3://other-bucket/x", "is a URL"),
        ("file:///etc", "is a URL"),
        ("", "empty path"),
        ("a\\..\\b", "backslash"),
        ("a\x00b", "NUL"),
    ],
)
def test_relative_paths_from_configs_and_manifests_cannot_escape(
    relative: str, message: str
) -> None:
    with pytest.raises(UnsafePathError, match=message) as err:
        check_relative(relative, field="manifest shard")
    assert str(err.value).startswith("manifest shard: ")


def test_relative_paths_are_normalized() -> None:
    assert check_relative("exp1/ckpt/../final") == "exp1/final"
    assert check_relative("a/./b") == "a/b"
    assert check_relative("jobs/configs/x.yaml", field="config") == "jobs/configs/x.yaml"


def test_a_manifest_cannot_point_the_pipeline_outside_its_dataset(tmp_path: Path) -> None:
    from aim_platform.config import DataSource
    from aim_platform.data.pipeline import source_shards

    (tmp_path / "secret.parquet").write_bytes(b"not yours")
    root = tmp_path / "dataset"
    root.mkdir()
    manifest = {"shards": {"train": [{"path": "../secret.parquet", "rows": 1}], "val": []}}
    (root / "_manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(UnsafePathError, match="manifest shard: .* escapes its root"):
        source_shards(DataSource(url=str(root)), "train")
