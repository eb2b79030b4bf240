"""Which failures of MLflow mean "try again later" and which mean "refused for good".

- No answer (connection refused, timed out), a busy or failing server (408, 429, 5xx, from
  the tracking API or from the artifact store behind it) or a locked SQLite store is
  *transient*: the queue holds the write and tries it again.
- Any other 4xx is *permanent* for that write: an artifact the store refuses (413: too large,
  403: no permission) is counted, named in the summary and skipped, never retried, so the
  writes queued after it go on.

MLflow's HTTP client retries a failed request 7 times with a doubling back-off (about four
minutes) and waits 120 s for an answer. Writes are retried by the queue instead, so every
process that builds a tracker gets shorter defaults (:data:`CLIENT_DEFAULTS`; set a variable
to choose otherwise): a dead server shows within seconds, and a synchronous call fails with
one line (:class:`TrackingUnavailable`) instead of hanging.
"""

from __future__ import annotations

import os
from typing import Any

from aim_platform.errors import PlatformError
from aim_platform.outbox import one_line

CLIENT_DEFAULTS = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "20",
}
#: 4xx answers that mean "not now" rather than "not this": a timed-out or rate-limited request.
_RETRY_4XX = {408, 429}
_TRANSIENT_CODES = {"INTERNAL_ERROR", "TEMPORARILY_UNAVAILABLE", "REQUEST_LIMIT_EXCEEDED"}


class TrackingUnavailable(PlatformError, ConnectionError):
    """The tracking server does not answer (a synchronous call: a run's creation, a read)."""


def use_client_defaults() -> None:
    """Give this process :data:`CLIENT_DEFAULTS` where no variable chooses otherwise."""
    for key, value in CLIENT_DEFAULTS.items():
        os.environ.setdefault(key, value)


def http_status(exc: BaseException) -> int | None:
    """The HTTP status of a failed request, where the error carries one: MLflow's REST errors,
    ``requests``' ``HTTPError`` (an artifact upload through the server's proxy) and botocore's
    ``ClientError`` (an artifact written straight to S3)."""
    from mlflow.exceptions import RestException

    if isinstance(exc, RestException):
        return exc.get_http_status_code()
    response: Any = getattr(exc, "response", None)
    status = getattr(response, "status_code", None)
    if isinstance(status, int):
        return status
    if isinstance(response, dict):  # botocore: {"ResponseMetadata": {"HTTPStatusCode": 403}}
        status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        return status if isinstance(status, int) else None
    return None


def is_unreachable(exc: BaseException) -> bool:
    """Whether an error from MLflow means "try again later": no answer (connection refused,
    timed out), a busy or failing server (408, 429, 5xx) or a locked SQLite store; not a
    refusal of the request itself (any other 4xx: a bad value, a run that does not exist, an
    artifact the store will not take)."""
    from mlflow.exceptions import MlflowException

    if isinstance(exc, TrackingUnavailable):
        return True
    status = http_status(exc)
    if status is not None:
        return status >= 500 or status in _RETRY_4XX
    if isinstance(exc, MlflowException):
        return exc.error_code in _TRANSIENT_CODES
    return isinstance(exc, OSError)  # requests' connection errors are OSErrors


def refusal(exc: BaseException) -> str:
    """Why a request was refused, short: ``HTTP 413 Request Entity Too Large``."""
    status = http_status(exc)
    if status is None:
        return one_line(exc, 120)
    reason = getattr(getattr(exc, "response", None), "reason", None)
    return f"HTTP {status} {reason}" if isinstance(reason, str) and reason else f"HTTP {status}"
