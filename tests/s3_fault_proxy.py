"""A fault-injecting HTTP proxy for an S3 endpoint: fails a set fraction of requests the way
S3 and S3-compatible stores do.

Faults (each failed request gets one, drawn from ``kinds`` by a seeded generator):

- ``slowdown``: ``503 SlowDown`` with S3's XML error body, before the store sees the request
  (the request's body, if any, is read first, as S3 does);
- ``reset``: the connection is reset (RST) before the store sees the request;
- ``cut``: the store handles the request, then the connection is reset half way through
  the response (a GET loses its body; a PUT was done but its answer is lost);
- ``timeout``: no answer at all; the connection is held for ``hang_s`` seconds, then closed
  (a client without a read timeout shorter than that hangs).

Transparency: at a 0% fault rate the proxy must change nothing a client or the store can see,
or its failures would be blamed on the platform. It therefore never parses bodies: each
connection carries one request; its head is read (to count and fault it), forwarded with
``Connection: close``, and from then on bytes flow both ways unchanged (HEAD answers keep
their ``Content-Length``, chunked and ``aws-chunked`` uploads stream through, ``100
Continue`` passes) until the store closes; the final response head gets ``Connection: close``
too, so the client opens a fresh connection for its next request.

Use in a test::

    with FaultProxy(upstream="http://127.0.0.1:9000", rate=0.0) as proxy:
        os.environ["AWS_ENDPOINT_URL"] = proxy.url
        ...
        proxy.configure(rate=0.2, methods={"GET"})   # faults on reads from now on
        proxy.stats()                                # {"requests": ..., "faults": {...}}

or as a process (what ``BENCHMARKS.md``'s fault table runs)::

    python tests/s3_fault_proxy.py --upstream http://127.0.0.1:9000 --port 9100 --rate 0.1
"""

from __future__ import annotations

import argparse
import random
import re
import socket
import struct
import threading
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from urllib.parse import urlparse

KINDS = ("slowdown", "reset", "cut", "timeout")
HEAD_LIMIT = 64 * 1024  # bytes of a request or response head
SLOWDOWN_BODY = (
    b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>SlowDown</Code>'
    b"<Message>Please reduce your request rate.</Message>"
    b"<RequestId>FAULTPROXY</RequestId></Error>"
)


@dataclass
class FaultRules:
    """Which requests fail and how.

    Attributes:
        rate: Fraction of matching requests that fail (0: none, 1: all).
        kinds: Faults to draw from.
        methods: Only requests with these methods can fail (None: any).
        path: Only requests whose path matches this regular expression can fail (None: any).
        hang_s: How long a ``timeout`` holds the connection before closing it.
        limit: At most this many faults from now on (None: no limit): a store that
            misbehaves for a while, then recovers.
        seed: Seed of the fault draws.
    """

    rate: float = 0.0
    kinds: tuple[str, ...] = KINDS
    methods: frozenset[str] | None = None
    path: str | None = None
    hang_s: float = 30.0
    limit: int | None = None
    seed: int = 0


@dataclass
class _Stats:
    requests: int = 0
    faults: Counter = field(default_factory=Counter)
    by_method: Counter = field(default_factory=Counter)
    faulted_paths: list[str] = field(default_factory=list)
    given_up: int = 0  # held connections (timeout faults) the client closed before hang_s


def _read_head(sock: socket.socket, buf: bytearray) -> bytes | None:
    """Read one HTTP head (up to the blank line) from ``sock``; leftover bytes stay in
    ``buf``. None when the peer closed before a whole head arrived."""
    while b"\r\n\r\n" not in buf:
        if len(buf) > HEAD_LIMIT:
            return None
        chunk = sock.recv(65536)
        if not chunk:
            return None
        buf += chunk
    end = buf.index(b"\r\n\r\n") + 4
    head = bytes(buf[:end])
    del buf[:end]
    return head


def _with_close(head: bytes) -> bytes:
    """``head`` with any ``Connection``/``Keep-Alive`` header replaced by ``Connection: close``."""
    lines = head[:-4].split(b"\r\n")
    kept = [lines[0]] + [
        line
        for line in lines[1:]
        if line.split(b":", 1)[0].strip().lower() not in (b"connection", b"keep-alive")
    ]
    return b"\r\n".join([*kept, b"Connection: close"]) + b"\r\n\r\n"


def _header(head: bytes, name: bytes) -> bytes | None:
    for line in head.split(b"\r\n")[1:]:
        key, _, value = line.partition(b":")
        if key.strip().lower() == name:
            return value.strip()
    return None


def _reset(sock: socket.socket) -> None:
    """Close with RST (SO_LINGER 0): what a peer or middlebox dropping a connection sends.

    ``close()`` alone does nothing while another thread is blocked in ``recv()`` on the
    socket (the kernel keeps it open until that call returns): the client would wait on
    a connection nobody serves. ``shutdown(SHUT_RD)`` wakes that thread first.
    """
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.shutdown(socket.SHUT_RD)
    except OSError:
        pass
    sock.close()


def _drain_body(sock: socket.socket, head: bytes, buf: bytearray) -> None:
    """Read the request's body (Content-Length or chunked) so an error answer is clean."""
    if (_header(head, b"expect") or b"").lower() == b"100-continue":
        return  # the client waits for our answer before it sends the body
    length = _header(head, b"content-length")
    if length is not None:
        want = int(length)
        while len(buf) < want:
            chunk = sock.recv(65536)
            if not chunk:
                return
            buf += chunk
        del buf[:want]
        return
    if (_header(head, b"transfer-encoding") or b"").lower() == b"chunked":
        while True:  # size line, data, CRLF ... then trailers up to a blank line
            while b"\r\n" not in buf:
                chunk = sock.recv(65536)
                if not chunk:
                    return
                buf += chunk
            line, _, rest = bytes(buf).partition(b"\r\n")
            size = int(line.split(b";")[0], 16)
            need = size + 2 if size else 0
            while len(rest) < need:
                chunk = sock.recv(65536)
                if not chunk:
                    return
                rest += chunk
            buf[:] = rest[need:]
            if size == 0:
                while b"\r\n\r\n" not in b"\r\n" + bytes(buf):
                    chunk = sock.recv(65536)
                    if not chunk:
                        return
                    buf += chunk
                return


def _pump(src: socket.socket, dst: socket.socket, initial: bytes = b"") -> None:
    """Copy bytes from ``src`` to ``dst`` until ``src`` closes; then half-close ``dst``."""
    try:
        if initial:
            dst.sendall(initial)
        while True:
            chunk = src.recv(65536)
            if not chunk:
                break
            dst.sendall(chunk)
    except OSError:
        pass
    try:
        dst.shutdown(socket.SHUT_WR)
    except OSError:
        pass


class FaultProxy:
    """A threaded proxy on 127.0.0.1 in front of ``upstream`` that fails requests by rules.

    Args:
        upstream: The store's URL (``http://HOST:PORT``).
        port: Port to listen on (0: any free one; see :attr:`url`).
        **rules: :class:`FaultRules` fields.
    """

    def __init__(self, upstream: str, port: int = 0, **rules: object) -> None:
        parsed = urlparse(upstream)
        self.upstream = (parsed.hostname or "127.0.0.1", parsed.port or 80)
        self.rules = FaultRules()
        self._rng = random.Random(0)
        self._lock = threading.Lock()
        self._stats = _Stats()
        self._active: dict[int, tuple[float, str]] = {}  # connection id -> (start, what)
        self.configure(**rules)
        self._server = socket.create_server(("127.0.0.1", port), backlog=256)
        self.port = self._server.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._accept, name="fault-proxy", daemon=True)

    def __enter__(self) -> FaultProxy:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._closed.set()
        try:  # close() alone does not wake a thread blocked in accept(): shutdown() does
            self._server.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        try:
            self._server.close()
        except OSError:
            pass
        self._thread.join(timeout=5)

    def configure(
        self,
        *,
        rate: float | None = None,
        kinds: Iterable[str] | None = None,
        methods: Iterable[str] | None = (),
        path: str | None = "",
        hang_s: float | None = None,
        limit: int | None = -1,
        seed: int | None = None,
    ) -> None:
        """Change the rules from now on (unset arguments keep their value; ``methods=None``,
        ``path=None`` or ``limit=None`` clear that filter)."""
        with self._lock:
            r = self.rules
            if rate is not None:
                if not 0 <= rate <= 1:
                    raise ValueError(f"rate: {rate} must lie in [0, 1]")
                r.rate = rate
            if kinds is not None:
                kinds = tuple(kinds)
                unknown = set(kinds) - set(KINDS)
                if unknown or not kinds:
                    raise ValueError(f"kinds: {kinds} must be some of {KINDS}")
                r.kinds = kinds
            if methods != ():
                r.methods = None if methods is None else frozenset(m.upper() for m in methods)
            if path != "":
                r.path = path
            if hang_s is not None:
                r.hang_s = hang_s
            if limit != -1:
                r.limit = limit
            if seed is not None:
                r.seed = seed
                self._rng = random.Random(seed)

    def stats(self) -> dict[str, object]:
        """Requests seen, faults injected by kind, requests by method, faulted paths, and how
        many held connections the client gave up on before the proxy closed them."""
        with self._lock:
            s = self._stats
            return {
                "requests": s.requests,
                "faults": dict(s.faults),
                "faulted": sum(s.faults.values()),
                "by_method": dict(s.by_method),
                "faulted_paths": list(s.faulted_paths),
                "given_up": s.given_up,
            }

    def in_flight(self) -> list[str]:
        """The requests the proxy is handling now, oldest first (``'12.3 s GET /b/k (cut)'``):
        what to look at when a client seems to hang."""
        now = time.monotonic()
        with self._lock:
            held = sorted(self._active.values())
        return [f"{now - t0:.1f} s {what}" for t0, what in held]

    def _draw(self, method: str, path: str) -> str | None:
        """Count the request and decide its fault (None: none)."""
        with self._lock:
            r = self.rules
            self._stats.requests += 1
            self._stats.by_method[method] += 1
            if r.methods is not None and method not in r.methods:
                return None
            if r.path is not None and not re.search(r.path, path):
                return None
            if r.limit is not None and r.limit <= 0:
                return None
            if r.rate <= 0 or self._rng.random() >= r.rate:
                return None
            if r.limit is not None:
                r.limit -= 1
            kind = self._rng.choice(r.kinds)
            self._stats.faults[kind] += 1
            self._stats.faulted_paths.append(f"{kind} {method} {path}")
            return kind

    def _accept(self) -> None:
        while not self._closed.is_set():
            try:
                client, _ = self._server.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        buf = bytearray()
        try:
            head = _read_head(client, buf)
            if head is None:
                client.close()
                return
            method, path = (head.split(b"\r\n", 1)[0].decode("latin-1").split(" ") + ["", ""])[:2]
            kind = self._draw(method, path)
            expect = b" expect-100" if _header(head, b"expect") else b""
            with self._lock:
                self._active[id(client)] = (
                    time.monotonic(),
                    f"{method} {path} ({kind or 'no fault'}{expect.decode()})",
                )
            if kind == "reset":
                _reset(client)
                return
            if kind == "timeout":
                self._hang(client)
                return
            if kind == "slowdown":
                _drain_body(client, head, buf)
                client.sendall(
                    b"HTTP/1.1 503 Slow Down\r\nContent-Type: application/xml\r\n"
                    + f"Content-Length: {len(SLOWDOWN_BODY)}\r\n".encode()
                    + b"x-amz-request-id: FAULTPROXY\r\nConnection: close\r\n\r\n"
                    + (SLOWDOWN_BODY if method != "HEAD" else b"")
                )
                client.close()
                return
            self._forward(client, head, buf, cut=kind == "cut")
        except OSError:
            client.close()
        finally:
            with self._lock:
                self._active.pop(id(client), None)

    def _hang(self, client: socket.socket) -> None:
        """Answer nothing for ``hang_s`` seconds (or until the client gives up), then close."""
        deadline = time.monotonic() + self.rules.hang_s
        client.settimeout(0.5)
        while time.monotonic() < deadline and not self._closed.is_set():
            try:
                if not client.recv(65536):  # the client timed out and closed: what a
                    with self._lock:  # timeout should cause
                        self._stats.given_up += 1
                    break
            except TimeoutError:
                continue
            except OSError:  # reset by the client: it gave up too
                with self._lock:
                    self._stats.given_up += 1
                break
        client.close()

    def _forward(self, client: socket.socket, head: bytes, buf: bytearray, *, cut: bool) -> None:
        """One request to the store and its answer back; ``cut``: reset half way through."""
        upstream = socket.create_connection(self.upstream)
        try:
            upstream.sendall(_with_close(head))
            up = threading.Thread(target=_pump, args=(client, upstream, bytes(buf)), daemon=True)
            up.start()
            rbuf = bytearray()
            while True:  # 1xx heads (100 Continue) pass as they are
                rhead = _read_head(upstream, rbuf)
                if rhead is None:
                    _reset(client)
                    return
                status = rhead.split(b" ", 2)[1] if rhead.count(b" ") >= 1 else b""
                if not status.startswith(b"1"):
                    break
                client.sendall(rhead)
            if cut:
                self._cut(client, upstream, rhead, rbuf, head.startswith(b"HEAD "))
                return
            _pump(upstream, client, _with_close(rhead) + bytes(rbuf))
            up.join(timeout=5)
        finally:
            upstream.close()
            client.close()

    @staticmethod
    def _cut(
        client: socket.socket,
        upstream: socket.socket,
        rhead: bytes,
        rbuf: bytearray,
        head_request: bool,
    ) -> None:
        """Forward the response head and half its body, then reset; an answer without a
        body to cut (a PUT's, a HEAD's) is not sent at all: the store did the work, the
        client never hears of it."""
        length = int(_header(rhead, b"content-length") or 0)
        half = length // 2
        if half == 0 or head_request:
            _reset(client)
            return
        while len(rbuf) < half:
            chunk = upstream.recv(65536)
            if not chunk:
                break
            rbuf += chunk
        client.sendall(_with_close(rhead) + bytes(rbuf[:half]))
        _reset(client)


def main(argv: list[str] | None = None) -> None:
    """Run the proxy in the foreground (Ctrl-C stops it); prints its URL, then counts."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--upstream", required=True, help="the store, e.g. http://127.0.0.1:9000")
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--rate", type=float, default=0.0, help="fraction of requests that fail")
    ap.add_argument("--kinds", default=",".join(KINDS), help=f"comma list of {KINDS}")
    ap.add_argument("--methods", default=None, help="only these methods fail, e.g. GET or PUT,POST")
    ap.add_argument("--path", default=None, help="only paths matching this regex fail")
    ap.add_argument("--hang-s", type=float, default=30.0)
    ap.add_argument("--limit", type=int, default=None, help="at most this many faults")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    proxy = FaultProxy(
        a.upstream,
        a.port,
        rate=a.rate,
        kinds=a.kinds.split(","),
        methods=a.methods.split(",") if a.methods else None,
        path=a.path,
        hang_s=a.hang_s,
        limit=a.limit,
        seed=a.seed,
    )
    proxy.start()
    print(f"fault proxy {proxy.url} -> {a.upstream} (rate {a.rate})", flush=True)
    try:
        while True:
            time.sleep(30)
            s = proxy.stats()
            print(f"requests {s['requests']}, faults {s['faults']}", flush=True)
    except KeyboardInterrupt:
        s = proxy.stats()
        print(f"requests {s['requests']}, faults {s['faults']} (final)", flush=True)
        proxy.stop()


if __name__ == "__main__":
    main()
