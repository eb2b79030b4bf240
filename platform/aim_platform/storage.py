"""Filesystems from URLs: fsspec for ingest and small files, pyarrow for Ray Data reads.

Below every layer (as :mod:`aim_platform.config` and :mod:`aim_platform.errors` are): data,
models (the trunk and codebook files), training and evaluation all read and write URLs here.

A URL is a local path (``/data/x``, ``./x``, ``file:///x``) or any fsspec URL
(``s3://bucket/prefix``, ...). For S3 the endpoint comes from ``storage_options``
(``endpoint_url`` or ``client_kwargs.endpoint_url``), else from ``$AWS_ENDPOINT_URL``;
credentials come from the usual AWS environment variables or ``storage_options``. Nothing
here writes options or credentials anywhere (manifests record only the URL).

Object stores throttle (503 SlowDown), reset connections and time out. Both S3 clients get
one retry policy from three platform keys of ``storage_options`` (:class:`S3Retry`):
``max_attempts`` (default 10: AWS's standard retry mode with exponential back-off, for
botocore under s3fs and for pyarrow's AWS SDK), ``connect_timeout`` and ``read_timeout``
(seconds; default: each client's own, 5/15 s for s3fs, 1/3 s for pyarrow). The SDKs' own
default of 3 attempts loses about one request in 100 when a store fails one in five. s3fs
uploads go without ``Expect: 100-continue`` so that ``read_timeout`` bounds them too
(:mod:`aim_platform.storage_s3fs`).
"""

from __future__ import annotations

import functools
import json
import os
from dataclasses import dataclass
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


@dataclass(frozen=True)
class S3Retry:
    """Retries and timeouts of every S3 request (see the module docstring).

    Attributes:
        max_attempts: Tries of one request, the first included (AWS standard retry mode).
        connect_timeout: Seconds to open a connection (None: the client's default).
        read_timeout: Seconds without a byte from the store before a request is abandoned
            and retried (None: the client's default).
    """

    max_attempts: int = 10
    connect_timeout: float | None = None
    read_timeout: float | None = None

    @classmethod
    def of(cls, storage_options: dict[str, Any] | None) -> S3Retry:
        """The policy that ``storage_options`` asks for (defaults for keys not given)."""
        opts = storage_options or {}
        attempts = int(opts.get("max_attempts", cls.max_attempts))
        if attempts < 1:
            raise DataError(f"storage_options.max_attempts: {attempts} must be at least 1")
        return cls(attempts, _seconds(opts, "connect_timeout"), _seconds(opts, "read_timeout"))


def _seconds(opts: dict[str, Any], key: str) -> float | None:
    value = opts.get(key)
    if value is None:
        return None
    if float(value) <= 0:
        raise DataError(f"storage_options.{key}: {value} must be positive")
    return float(value)


RETRY_KEYS = ("max_attempts", "connect_timeout", "read_timeout")


def _s3_options(storage_options: dict[str, Any] | None) -> dict[str, Any]:
    """s3fs options: the endpoint into ``client_kwargs``, the retry policy into botocore's
    ``config_kwargs`` (what the caller put there explicitly wins)."""
    retry = S3Retry.of(storage_options)
    opts = {k: v for k, v in (storage_options or {}).items() if k not in RETRY_KEYS}
    endpoint = endpoint_url(opts)
    opts.pop("endpoint_url", None)
    if endpoint:
        client_kwargs = dict(opts.get("client_kwargs") or {})
        client_kwargs["endpoint_url"] = endpoint
        opts["client_kwargs"] = client_kwargs
    config: dict[str, Any] = {
        "retries": {"total_max_attempts": retry.max_attempts, "mode": "standard"}
    }
    if retry.connect_timeout is not None:
        config["connect_timeout"] = retry.connect_timeout
    if retry.read_timeout is not None:
        config["read_timeout"] = retry.read_timeout
    opts["config_kwargs"] = {**config, **(opts.get("config_kwargs") or {})}
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
    if proto in ("s3", "s3a"):
        from aim_platform.storage_s3fs import S3FileSystem

        fs = S3FileSystem(**_s3_options(storage_options))
        return fs, fs._strip_protocol(url).rstrip("/")
    # the retry keys are ours; other fsspec protocols have their own
    opts = {k: v for k, v in (storage_options or {}).items() if k not in RETRY_KEYS}
    fs, path = fsspec.core.url_to_fs(url, **opts)
    return fs, path.rstrip("/")


@functools.cache
def _s3_filesystem_class() -> type[pafs.S3FileSystem]:
    """pyarrow's S3 client with AWS's standard retries, kept when it is pickled.

    pyarrow's own ``__reduce__`` drops ``retry_strategy``, so the copy that a Ray task or a
    Ray Train worker receives would be back at 3 attempts. Made on first use so that
    importing this module does not import pyarrow.
    """
    import pyarrow.fs as pafs

    class S3FileSystem(pafs.S3FileSystem):
        def __init__(self, *, max_attempts: int, **kwargs: Any) -> None:
            retry = pafs.AwsStandardS3RetryStrategy(max_attempts=max_attempts)
            super().__init__(retry_strategy=retry, **kwargs)
            self.max_attempts = max_attempts

        def __reduce__(self) -> tuple[Any, ...]:
            _, (kwargs,) = super().__reduce__()
            return s3_filesystem, (self.max_attempts, kwargs)

    return S3FileSystem


def s3_filesystem(max_attempts: int, kwargs: dict[str, Any]) -> pafs.S3FileSystem:
    """pyarrow's S3 client making ``max_attempts`` tries per request (also its unpickler)."""
    return _s3_filesystem_class()(max_attempts=max_attempts, **kwargs)


def pyarrow_filesystem(
    url: str, storage_options: dict[str, Any] | None = None
) -> tuple[pafs.FileSystem, str]:
    """A pyarrow filesystem for ``url`` (what ``ray.data.read_parquet`` takes) and the path.

    S3 gets pyarrow's native client with the endpoint override, the retry policy
    (:class:`S3Retry`) and the driver's credentials (options, else ``AWS_*`` variables;
    otherwise pyarrow's default chain on each host);
    other remote protocols are wrapped fsspec filesystems; local paths ``LocalFileSystem``.
    """
    import pyarrow.fs as pafs

    if not is_remote(url):
        return pafs.LocalFileSystem(), filesystem(url)[1]
    parsed = urlparse(url)
    path = (parsed.netloc + parsed.path).rstrip("/")
    if parsed.scheme in ("s3", "s3a"):
        opts = storage_options or {}
        retry = S3Retry.of(opts)
        kwargs: dict[str, Any] = {
            "region": opts.get("region")
            or os.environ.get("AWS_REGION")
            or os.environ.get("AWS_DEFAULT_REGION")
            or "us-east-1",
            "connect_timeout": retry.connect_timeout,
            "request_timeout": retry.read_timeout,  # a low-speed limit under curl: same idea
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
        return s3_filesystem(retry.max_attempts, kwargs), path
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
