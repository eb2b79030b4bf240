"""s3fs's filesystem with every request bounded by ``read_timeout`` (see :mod:`aim_platform.storage`).

botocore puts ``Expect: 100-continue`` on every upload with a file-like body (s3fs's
``pipe_file``, ``put_object``, ``upload_part``), and aiohttp, under aiobotocore, starts a
request's read timeout only once the body is sent: an upload waits for the store's ``100
Continue`` without any limit. A connection that goes silent at that moment (a store that
hangs, a load balancer that drops it without a reset) then holds the upload until the peer
closes it, forever if it never does, whatever ``read_timeout`` says. Measured through
``tests/s3_fault_proxy.py`` with ``read_timeout`` 3 s: a GET held by the proxy gave up after
3.8 s, a PUT waited the proxy's whole 30 s; an ingest at 20% faults hung for good on one PUT.
Without the header both give up after ``read_timeout`` and botocore retries them.

Kept in its own module so that the class pickles by name (Ray tasks receive filesystems)
and importing :mod:`aim_platform.storage` does not import s3fs.
"""

from __future__ import annotations

from typing import Any

import s3fs


def _no_expect(params: dict[str, Any], **kwargs: Any) -> None:
    """botocore ``before-call`` handler, after its own that adds the header: take it off."""
    params["headers"].pop("Expect", None)


class S3FileSystem(s3fs.S3FileSystem):
    """``s3fs.S3FileSystem`` whose uploads are sent without ``Expect: 100-continue``."""

    async def set_session(self, refresh: bool = False, kwargs: dict[str, Any] | None = None) -> Any:
        client = await super().set_session(refresh=refresh, kwargs=kwargs or {})
        # s3fs calls this before every request; botocore ignores a handler whose unique_id
        # the client already holds, so only a new client gets it
        client.meta.events.register_last(
            "before-call.s3", _no_expect, unique_id="aim-platform-no-expect"
        )
        return client
