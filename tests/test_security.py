"""Secret redaction and path safety (``aim_platform.security``)."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import pytest
import yaml

from aim_platform.config import flatten
from aim_platform.security import (
    REDACTED,
    UnsafePathError,
    check_relative,
    install_log_redaction,
    is_secret_key,
    redact,
    redact_params,
    redact_text,
    safe_join,
    secret_values,
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
    params = redact_params(flatten(_config()))
    assert params["data.storage_options.secret"] == REDACTED
    assert params["data.storage_options.client_kwargs.endpoint_url"] == "http://127.0.0.1:9000"
    assert params["tracking.credentials.anything"] == REDACTED  # a secret section, flattened
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
    # Known secret values from a config are scrubbed wherever they appear.
    found = secret_values(_config())
    assert SECRET in found and TOKEN in found and "aim-tiny" not in found
    assert redact_text(f"retrying with {SECRET}", found) == f"retrying with {REDACTED}"


def test_log_filter_scrubs_records() -> None:
    logger = logging.getLogger("aim-test-redaction")
    handler = logging.StreamHandler()
    logger.addHandler(handler)
    try:
        filt = install_log_redaction(logger, secret_values(_config()))
        record = logger.makeRecord(
            logger.name, logging.INFO, __file__, 1, "opts %s", ({"s": SECRET},), None
        )
        assert filt.filter(record)
        assert SECRET not in record.getMessage() and REDACTED in record.getMessage()
        assert filt in handler.filters
    finally:
        logger.removeHandler(handler)


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
def test_safe_join_rejects_escapes(relative: str, message: str, tmp_path: Path) -> None:
    for root in (str(tmp_path), "s3://bucket/runs/exp"):
        with pytest.raises(UnsafePathError, match=message) as err:
            safe_join(root, relative, field="checkpoint.path")
        assert str(err.value).startswith("checkpoint.path: ")


def test_safe_join_accepts_relative_paths(tmp_path: Path) -> None:
    assert safe_join("s3://bucket/runs/", "exp1/ckpt/../final") == "s3://bucket/runs/exp1/final"
    assert safe_join(tmp_path, "a/./b") == str(tmp_path / "a" / "b")
    assert safe_join(f"file://{tmp_path}", "a") == f"file://{tmp_path / 'a'}"
    assert safe_join(tmp_path, ".") == str(tmp_path)
    assert check_relative("jobs/configs/x.yaml", field="config") == "jobs/configs/x.yaml"


def test_safe_join_rejects_symlink_out_of_local_root(tmp_path: Path) -> None:
    root, outside = tmp_path / "root", tmp_path / "outside"
    root.mkdir()
    outside.mkdir()
    os.symlink(outside, root / "link")
    with pytest.raises(UnsafePathError, match="outside the root"):
        safe_join(root, "link/data.bin")
    os.symlink(root / "real", root / "inner")  # a link that stays inside is fine
    assert safe_join(root, "inner/x") == str(root / "inner" / "x")
