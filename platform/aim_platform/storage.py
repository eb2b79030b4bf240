"""Filesystems from URLs: fsspec for ingest and small files, pyarrow for Ray Data reads.

Below every layer (as :mod:`aim_platform.config` and :mod:`aim_platform.errors` are): data,
models (the trunk and codebook files), training and evaluation all read and write URLs here.

A URL is a local path (``/data/x``, ``./x``, ``file:///x``) or any fsspec URL
(``s3://bucket/prefix``, ...). For S3 the endpoint comes from ``storage_options``
(``endpoint_url`` or ``client_kwargs.endpoint_url``), else from ``$AWS_ENDPOINT_URL``;
credentials come from the usual AWS environment variables or ``storage_options``. Nothing
here writes options or credentials anywhere (manifests record only the URL).
"""

from __future__ import annotations

import json
import os
from typing import TYPE_CHECKING, Any
from urllib.parse import urlparse

import fsspec

from aim_platform.errors import DataError, UnsafeFile

if TYPE_CHECKING:  # pyarrow is imported where its filesystems are made, not by every reader
    import pyarrow.fs as pafs


def is_remote(url: str) -> bool:
    """True for URLs with a non-local protocol (``s3://``, ``gs://``, ...)."""
    proto = urlparse(url).scheme
    return proto not in ("", "file", "local") and len(proto) > 1  # "C:" is a drive


def endpoint_url(storage_options: dict[str, Any] | None = None) -> str | None:
    """The S3 endpoint to use: from the options, else ``$AWS_ENDPOINT_URL``, else None (AWS)."""
    opts = storage_options or {}
    url = opts.get("endpoint_url") or (opts.get("client_kwargs") or {}).get("endpoint_url")
    return url or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")


def _s3_options(storage_options: dict[str, Any] | None) -> dict[str, Any]:
    opts = dict(storage_options or {})
    endpoint = endpoint_url(opts)
    opts.pop("endpoint_url", None)
    if endpoint:
        client_kwargs = dict(opts.get("client_kwargs") or {})
        client_kwargs["endpoint_url"] = endpoint
        opts["client_kwargs"] = client_kwargs
    return opts


def filesystem(
    url: str, storage_options: dict[str, Any] | None = None
) -> tuple[fsspec.AbstractFileSystem, str]:
    """An fsspec filesystem for ``url`` and the path inside it.

    Args:
        url: A local path or fsspec URL.
        storage_options: Extra fsspec options (e.g. ``{"endpoint_url": ...}`` for S3).

    Returns:
        (filesystem, path) with the protocol stripped from ``path``; local paths are absolute.
    """
    if not is_remote(url):
        path = url.removeprefix("file://")
        return fsspec.filesystem("file"), os.path.abspath(path)
    proto = urlparse(url).scheme
    opts = _s3_options(storage_options) if proto in ("s3", "s3a") else dict(storage_options or {})
    fs, path = fsspec.core.url_to_fs(url, **opts)
    return fs, path.rstrip("/")


def pyarrow_filesystem(
    url: str, storage_options: dict[str, Any] | None = None
) -> tuple[pafs.FileSystem, str]:
    """A pyarrow filesystem for ``url`` (what ``ray.data.read_parquet`` takes) and the path.

    S3 gets pyarrow's native client with the endpoint override and the driver's credentials
    (options, else ``AWS_*`` variables; otherwise pyarrow's default chain on each host);
    other remote protocols are wrapped fsspec filesystems; local paths ``LocalFileSystem``.
    """
    import pyarrow.fs as pafs

    if not is_remote(url):
        return pafs.LocalFileSystem(), filesystem(url)[1]
    parsed = urlparse(url)
    path = (parsed.netloc + parsed.path).rstrip("/")
    if parsed.scheme in ("s3", "s3a"):
        opts = storage_options or {}
        kwargs: dict[str, Any] = {
            "region": opts.get("region")
            or os.environ.get("AWS_REGION")
            or os.environ.get("AWS_DEFAULT_REGION")
            or "us-east-1"
        }
        endpoint = endpoint_url(opts)
        if endpoint:
            ep = urlparse(endpoint)
            if ep.scheme:
                kwargs["scheme"] = ep.scheme
                kwargs["endpoint_override"] = ep.netloc + ep.path.rstrip("/")
            else:
                kwargs["endpoint_override"] = endpoint
        key = opts.get("key") or os.environ.get("AWS_ACCESS_KEY_ID")
        secret = opts.get("secret") or os.environ.get("AWS_SECRET_ACCESS_KEY")
        token = opts.get("token") or os.environ.get("AWS_SESSION_TOKEN")
        if opts.get("anon"):
            kwargs["anonymous"] = True
        elif key and secret:
            # Resolved here so Ray tasks on hosts without these variables can read; the
            # filesystem object carries them in memory only (never to a file or manifest).
            kwargs.update(access_key=key, secret_key=secret)
            if token:
                kwargs["session_token"] = token
        return pafs.S3FileSystem(**kwargs), path
    fs, inner = filesystem(url, storage_options)
    return pafs.PyFileSystem(pafs.FSSpecHandler(fs)), inner


def join(base: str, *parts: str) -> str:
    """Join path parts with ``/`` (fsspec paths use forward slashes everywhere)."""
    out = base.rstrip("/")
    for p in parts:
        out = f"{out}/{p.strip('/')}"
    return out


def parse_storage_options(text: str | None) -> dict[str, Any]:
    """Parse a ``--storage-options`` JSON object (empty or None gives ``{}``)."""
    if not text:
        return {}
    try:
        opts = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(f"storage_options: not valid JSON: {exc}") from None
    if not isinstance(opts, dict):
        raise DataError("storage_options: must be a JSON object")
    return opts


def public_url(url: str) -> str:
    """``url`` without user info or query (``s3://k:s@b/p?x`` -> ``s3://b/p``), for records."""
    parsed = urlparse(url)
    if not is_remote(url):
        return url
    netloc = parsed.netloc.rsplit("@", 1)[-1]
    return f"{parsed.scheme}://{netloc}{parsed.path}"


def read_json(fs: Any, path: str, what: str) -> Any:
    """A small JSON file (a marker, a state record) from ``fs``: JSON can only ever be data.

    Args:
        fs: The fsspec filesystem ``path`` is on.
        path: The file.
        what: What it should be, for the message (``the latest checkpoint record``).

    Raises:
        UnsafeFile: not JSON (a torn write, another kind of file): one line naming it.
    """
    with fs.open(path, "rb") as f:
        data = f.read()
    try:
        return json.loads(data)
    except ValueError as exc:  # JSONDecodeError and undecodable bytes alike
        raise UnsafeFile(f"{path}: not {what} (not JSON: {exc})") from None
