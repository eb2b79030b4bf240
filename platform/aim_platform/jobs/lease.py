"""One writer per run: a lease on ``<storage>/<name>/lease.json``.

A run (``aimctl pretrain``) or a study (``aimctl study``) writes ``latest.json``, checkpoints,
``mlflow_run_id.json`` and its MLflow run under its name in a storage root; two live runs with
one name would write over each other. So a run holds its name by a small record on the same
storage (local folder or ``s3://``, through :mod:`aim_platform.storage`)::

    {"holder": "<ray session>/<ray job id>", "ray_job": "02000000", "host": "node-1",
     "pid": 4242, "token": "<uuid>", "heartbeat": 1767000000.0, "ttl": 120.0}

- acquired before any step, renewed from a daemon thread every ``ttl / 4`` seconds and removed
  at the end (finished, failed or preempted);
- a second run finds a live record and is refused with one line naming the holder
  (:class:`LeaseHeld`: host, pid, Ray job, age of its last heartbeat);
- a record whose heartbeat is older than its TTL (the holder's ``train.lease_ttl_s``) is
  taken over and the caller is told so; so is one whose holder process is gone from this very
  host (a killed driver on the same machine need not be waited for);
- the same holder (the same Ray job of the same Ray session: a Tune trial restarted, a fit
  restarted inside one job) takes its own lease again without waiting (re-entrant).

What it guarantees (:func:`acquire`): object stores have no compare-and-swap that fsspec
exposes everywhere, so a starter writes its record with a fresh token, waits ``settle_s``
(2 s on object storage, 0.5 s on a folder) and reads it back; it holds the lease only if its own token is still there. Two
starters racing for one name cannot both win as long as each one's read-check-write takes less
than ``settle_s`` (on S3, whose reads are strongly consistent since 2020, and on local and
NFS folders, where the record is replaced by an atomic rename). Should both still win (a store
stalled for longer than that), each renewal reads the record first: the one whose token was
overwritten sees it within ``ttl / 4`` seconds, stops renewing and is told (``on_lost``).
Heartbeat ages compare wall clocks of different hosts: keep them in sync (NTP) to well within
the TTL.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

from fsspec.implementations.local import LocalFileSystem

from aim_platform.errors import PlatformError, UnsafeFile
from aim_platform.storage import filesystem, is_remote

LEASE_FILE = "lease.json"
SETTLE_S = 2.0  # seconds between writing a record and reading it back, object storage
SETTLE_LOCAL_S = 0.5  # the same on a local or mounted folder
log = logging.getLogger(__name__)


class LeaseHeld(PlatformError):
    """Another live run holds the name: the message names it (host, pid, Ray job, age)."""


@dataclass(frozen=True)
class Holder:
    """Who holds a lease.

    Attributes:
        id: What makes two holders the same: ``<ray session>/<ray job id>`` inside Ray (Ray
            numbers jobs from 01000000 in every new cluster, so the session is part of it),
            else a fresh uuid.
        ray_job: The Ray job id, or None outside Ray.
        host: The host name.
        pid: The process id.
    """

    id: str
    ray_job: str | None
    host: str
    pid: int

    @classmethod
    def current(cls) -> Holder:
        """This process: its Ray job when Ray is initialized, else a uuid."""
        host, pid = socket.gethostname(), os.getpid()
        try:
            import ray

            if ray.is_initialized():
                ctx = ray.get_runtime_context()
                job = ctx.get_job_id()
                return cls(f"{ctx.get_session_name()}/{job}", job, host, pid)
        except ImportError:
            pass
        return cls(f"uuid/{uuid.uuid4().hex}", None, host, pid)


@dataclass(frozen=True)
class Record:
    """The content of ``lease.json`` (see the module docstring)."""

    holder: str
    ray_job: str | None
    host: str
    pid: int
    token: str
    heartbeat: float
    ttl: float

    @classmethod
    def parse(cls, data: Any, path: str) -> Record:
        """A record from decoded JSON; anything else is refused naming the file."""
        try:
            return cls(
                holder=str(data["holder"]),
                ray_job=None if data.get("ray_job") is None else str(data["ray_job"]),
                host=str(data["host"]),
                pid=int(data["pid"]),
                token=str(data["token"]),
                heartbeat=float(data["heartbeat"]),
                ttl=float(data["ttl"]),
            )
        except (KeyError, TypeError, ValueError, AttributeError):
            raise UnsafeFile(
                f"{path}: not a lease record; remove it if no run of this name is running"
            ) from None

    def describe(self, now: float) -> str:
        """``Ray job 02000000 on host h, pid 4242, last heartbeat 3 s ago`` (never "(pid ...":
        that reads as a raw Ray log line)."""
        job = f"Ray job {self.ray_job}" if self.ray_job else "a process"
        age = max(0.0, now - self.heartbeat)
        return f"{job} on host {self.host}, pid {self.pid}, last heartbeat {age:.0f} s ago"


def _process_gone(record: Record) -> bool:
    """True when the holder ran on this host and its process no longer exists (or is a
    zombie). Pid reuse can only make a dead holder look alive: the safe side."""
    if record.host != socket.gethostname():
        return False
    try:
        os.kill(record.pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    try:
        with open(f"/proc/{record.pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except (OSError, IndexError):
        return False


class Lease:
    """A held lease: renewed from a daemon thread until :meth:`release`."""

    def __init__(
        self,
        fs: Any,
        path: str,
        record: Record,
        on_lost: Callable[[str], None] | None = None,
    ) -> None:
        self.fs, self.path, self.record = fs, path, record
        self.on_lost = on_lost
        self.lost = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name="aim-lease", daemon=True)

    def start(self) -> Lease:
        self._thread.start()
        return self

    def _beat(self) -> None:
        while not self._stop.wait(self.record.ttl / 4):
            try:
                self.renew()
            except Exception as exc:  # an outage: try again next beat (the TTL is the margin)
                log.warning("could not renew the lease %s: %s", self.path, exc)
            if self.lost.is_set():
                return

    def renew(self) -> bool:
        """Write a new heartbeat if the record is still this lease's; False (and ``lost``
        set, ``on_lost`` told) if another run has taken it."""
        current = _read(self.fs, self.path)
        if current is None or current.token != self.record.token:
            self.lost.set()
            if self.on_lost is not None:
                who = current.describe(time.time()) if current else "nobody (it was removed)"
                self.on_lost(f"lost the lease {self.path} to {who}")
            return False
        self.record = Record(**{**asdict(self.record), "heartbeat": time.time()})
        _write(self.fs, self.path, self.record)
        return True

    def release(self) -> None:
        """Stop renewing and remove the record if it is still this lease's."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=30)
        with contextlib.suppress(Exception):  # a store down at the end: the TTL frees it
            current = _read(self.fs, self.path)
            if current is not None and current.token == self.record.token:
                self.fs.rm(self.path)

    def __enter__(self) -> Lease:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def _read(fs: Any, path: str) -> Record | None:
    """The record now (a GET every time: never a cached listing), or None if there is none."""
    try:
        data = fs.cat_file(path)
    except FileNotFoundError:
        return None
    try:
        decoded = json.loads(data)
    except ValueError as exc:
        raise UnsafeFile(f"{path}: not a lease record (not JSON: {exc})") from None
    return Record.parse(decoded, path)


def _write(fs: Any, path: str, record: Record) -> None:
    """Replace the record in one piece: an S3 PUT is atomic; a local file is renamed."""
    data = json.dumps(asdict(record)).encode()
    if isinstance(fs, LocalFileSystem):
        folder = os.path.dirname(path)
        os.makedirs(folder, exist_ok=True)
        tmp = f"{path}.{record.token}.tmp"
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
        return
    fs.pipe_file(path, data)


def acquire(
    root: str,
    *,
    ttl: float,
    storage_options: dict[str, Any] | None = None,
    holder: Holder | None = None,
    say: Callable[[str], None] | None = None,
    settle_s: float | None = None,
    heartbeat: bool = True,
) -> Lease:
    """Hold ``<root>/lease.json`` for the run (or study) whose folder is ``root``.

    Args:
        root: The run's folder, ``<storage>/<name>`` (a local path or a URL).
        ttl: Seconds without a heartbeat after which another run may take the lease over
            (``train.lease_ttl_s``); the lease is renewed every ``ttl / 4`` seconds.
        storage_options: fsspec options of the storage (an S3 endpoint).
        holder: Who holds it; default :meth:`Holder.current`.
        say: Told, in a sentence, when a stale lease is taken over (and if it is lost later).
        settle_s: How long a starter waits before reading its record back (see the module
            docstring for the guarantee it buys); default :data:`SETTLE_S` on object storage,
            :data:`SETTLE_LOCAL_S` on a local or mounted folder (a rename, no network).
        heartbeat: False holds the lease without renewing it (tests of a holder that dies).

    Returns:
        The held :class:`Lease`; call :meth:`Lease.release` at the end.

    Raises:
        LeaseHeld: a live run of another holder has the name (or won a race for it).
        UnsafeFile: ``lease.json`` is not a lease record.
    """
    holder = holder or Holder.current()
    fs, path = filesystem(f"{root.rstrip('/')}/{LEASE_FILE}", storage_options)
    url = path if not is_remote(root) else f"{root.rstrip('/')}/{LEASE_FILE}"
    name = root.rstrip("/").rsplit("/", 1)[-1]
    current = _read(fs, path)
    now = time.time()
    if current is not None and current.holder != holder.id and not _process_gone(current):
        current = _wait_if_silent(fs, path, current, name, say)
        now = time.time()
    if current is not None and current.holder != holder.id:
        stale = now - current.heartbeat > current.ttl
        if not stale and not _process_gone(current):
            raise LeaseHeld(_held_message(name, current, now, url))
        if say is not None:
            why = (
                f"no heartbeat for over its TTL of {current.ttl:g} s"
                if stale
                else "its process is gone from this host"
            )
            say(f"taking over the lease of {name} from {current.describe(now)}: {why}")
    mine = Record(
        holder=holder.id,
        ray_job=holder.ray_job,
        host=holder.host,
        pid=holder.pid,
        token=uuid.uuid4().hex,
        heartbeat=now,
        ttl=float(ttl),
    )
    _write(fs, path, mine)
    if settle_s is None:
        settle_s = SETTLE_S if is_remote(root) else SETTLE_LOCAL_S
    time.sleep(settle_s)
    back = _read(fs, path)
    if back is None or back.token != mine.token:
        if back is None:
            raise LeaseHeld(f"run {name}: its lease {url} vanished while starting; try again")
        raise LeaseHeld(_held_message(name, back, time.time(), url))
    lease = Lease(fs, path, mine, on_lost=say)
    return lease.start() if heartbeat else lease


def _wait_if_silent(
    fs: Any, path: str, current: Record, name: str, say: Callable[[str], None] | None
) -> Record | None:
    """A holder that missed two renewals (heartbeat older than half its TTL; a live one renews
    every quarter) is most likely gone, e.g. with a lost head whose RayJob retry is this run:
    wait, saying so, until its TTL has passed or it renews. A live holder is left alone (the
    caller refuses); so is a record that changed meanwhile. Returns the record as it is then."""
    age = time.time() - current.heartbeat
    if age <= current.ttl / 2 or age > current.ttl:
        return current
    left = current.ttl - age
    if say is not None:
        say(
            f"the lease of {name} is held by {current.describe(time.time())}, silent for "
            f"{age:.0f} s: waiting up to {left:.0f} s for its TTL before taking it over"
        )
    deadline = time.monotonic() + left + 1.0
    while time.monotonic() < deadline:
        time.sleep(min(2.0, max(0.1, deadline - time.monotonic())))
        now_rec = _read(fs, path)
        if (
            now_rec is None
            or now_rec.token != current.token
            or now_rec.heartbeat > current.heartbeat
        ):
            return now_rec  # released, replaced or renewed: decide on what is there now
    return current


def _held_message(name: str, record: Record, now: float, url: str) -> str:
    return (
        f"run {name} is held by {record.describe(now)} ({url}); wait for it to end or use "
        f"another name (a holder silent for over {record.ttl:g} s is taken over)"
    )
