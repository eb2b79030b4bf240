"""Artifact-store errors: a 4xx is permanent for that artifact (counted, named once, never
retried, never holding up the writes queued after it); a 5xx is transient (the queue waits and
tries again). Against a real MLflow server whose artifact uploads go through a proxy on
127.0.0.1 that answers them with 500 for a while, and with 413 for one artifact always.

No assertion is about time: waits are for progress, with generous limits.
"""

from __future__ import annotations

import http.client
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from fault_rows import FaultRow, current_test, record

from aim_platform import tracking
from aim_platform.jobs.pretrain_outputs import PretrainResult, summary

ARTIFACTS = "/mlflow-artifacts/artifacts/"
TOO_BIG = "too-big.txt"
_HOP = {"connection", "keep-alive", "transfer-encoding", "content-length", "server", "date"}


class ArtifactStoreProxy(ThreadingHTTPServer):
    """Forwards every request to ``upstream``, except artifact uploads (PUT): 500 while
    ``failing`` is set, 413 for :data:`TOO_BIG` always. Counts uploads per file name."""

    daemon_threads = True

    def __init__(self, upstream: str) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.upstream = upstream.removeprefix("http://")
        self.failing = threading.Event()
        self.puts: Counter[str] = Counter()  # tries per file name
        self.answered: Counter[tuple[str, int]] = Counter()  # (file name, status) -> count
        self.lock = threading.Lock()

    @property
    def uri(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class _Handler(BaseHTTPRequestHandler):
    server: ArtifactStoreProxy

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - quiet
        pass

    def _forward(self) -> None:
        assert "chunked" not in self.headers.get("Transfer-Encoding", "")
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        if self.command == "PUT" and ARTIFACTS in self.path:
            name = self.path.rsplit("/", 1)[-1]
            status = 413 if name == TOO_BIG else 500 if self.server.failing.is_set() else 0
            with self.server.lock:
                self.server.puts[name] += 1
                self.server.answered[(name, status or 200)] += 1
            if status:
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
        conn = http.client.HTTPConnection(self.server.upstream, timeout=60)
        headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP}
        conn.request(self.command, self.path, body=body, headers=headers)
        answer = conn.getresponse()
        data = answer.read()
        conn.close()
        self.send_response(answer.status)
        for key, value in answer.getheaders():
            if key.lower() not in _HOP:
                self.send_header(key, value)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _forward


@pytest.fixture
def proxy(mlflow_server: str) -> Iterator[ArtifactStoreProxy]:
    server = ArtifactStoreProxy(mlflow_server)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def _until(check: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + 300
    while not check():
        assert time.monotonic() < deadline, what
        time.sleep(0.1)


@pytest.mark.timeout(900)
def test_a_refused_artifact_is_counted_once_and_holds_up_nothing(
    proxy: ArtifactStoreProxy, mlflow_server: str
) -> None:
    tracker = tracking.Tracker(proxy.uri, background=True, flush_timeout=120)
    run = tracker.start_run("artifact-store-errors", "pretrain")
    proxy.failing.set()  # the store fails (5xx) for a while: transient, as today
    tracker.log_metrics(run, {"train/loss": 1.0}, step=1)
    tracker.log_text(run, "first\n", "first.txt")
    tracker.log_text(run, "x" * 10_000, TOO_BIG)  # refused (413) whatever happens
    tracker.log_metrics(run, {"train/loss": 0.5}, step=2)
    tracker.log_text(run, "last\n", "plots/last.txt")
    # the 500s are retried, the same write first: the queue holds everything after it
    _until(
        lambda: tracker.status().down and proxy.answered[("first.txt", 500)] > 3,
        "first.txt tried again by the queue after MLflow's own tries (3) got 500s",
    )
    state = tracker.status()
    assert state.down and state.buffered == 4 and proxy.puts[TOO_BIG] == 0

    proxy.failing.clear()  # the store answers again
    report = tracking.end_run(tracker, run, step=2, status="FINISHED")

    reader = tracking.Tracker(mlflow_server)  # straight to the server, not through the proxy
    assert reader.run_status(run) == "FINISHED"
    assert reader.metric_history(run, "train/loss") == [(1, 1.0), (2, 0.5)]  # not held up
    from mlflow.tracking import MlflowClient

    client = MlflowClient(mlflow_server)
    landed = {f.path for f in client.list_artifacts(run)} | {
        f.path for f in client.list_artifacts(run, "plots")
    }
    assert landed == {"first.txt", "plots", "plots/last.txt"}
    assert proxy.puts[TOO_BIG] == 1  # never retried
    assert report.unwritten == 0 and report.dropped == 0 and report.outages == 1
    assert report.refused == (f"{TOO_BIG} (HTTP 413 Request Entity Too Large)",)
    assert report.metrics()[tracking.REFUSED_ARTIFACTS_METRIC] == 1

    # the pre-training summary counts and names it, once
    result = PretrainResult(
        name="pretrain", storage="/runs", run_id=run, tracking_uri=mlflow_server, steps=2
    )
    result.tracking = report
    lines = summary(result)
    named = [line for line in lines if TOO_BIG in line]
    assert named == [
        "MLflow: 1 artifact(s) refused by the artifact store, not retried: "
        f"{TOO_BIG} (HTTP 413 Request Entity Too Large)"
    ], lines
    assert not any("writes refused by the server" in line for line in lines), lines
    record(
        FaultRow(
            fault="artifact store answers 500 for a while, 413 for one file",
            console=[line for line in lines if "refused by the artifact store" in line],
            steps_redone="0 (writes are queued; the 413 file is tried once)",
            data_lost=f"{TOO_BIG} only, named once; every other write landed; run FINISHED",
            test=current_test(),
        )
    )


def test_4xx_is_permanent_and_5xx_408_429_and_no_answer_are_transient() -> None:
    import requests
    from mlflow.exceptions import MlflowException, RestException

    def http_error(status: int) -> requests.HTTPError:
        response = requests.Response()
        response.status_code, response.reason = status, "Reason"
        return requests.HTTPError(f"{status} Error", response=response)

    for status in (400, 403, 404, 413):
        assert not tracking.is_unreachable(http_error(status)), status
    for status in (408, 429, 500, 502, 503, 504):
        assert tracking.is_unreachable(http_error(status)), status
    assert tracking.is_unreachable(requests.ConnectionError("Connection refused"))
    assert tracking.is_unreachable(MlflowException("API request failed: too many 500 errors"))
    assert not tracking.is_unreachable(
        RestException({"error_code": "INVALID_PARAMETER_VALUE", "message": "bad"})
    )
    assert tracking.refusal(http_error(413)) == "HTTP 413 Reason"
