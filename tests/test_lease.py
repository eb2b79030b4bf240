"""One writer per run: the lease on ``<storage>/<name>/lease.json`` (aim_platform.jobs.lease).

Unit tests call the lease functions with short TTLs (no Ray). The journey, two ``aimctl
pretrain`` of one name on one storage, each with its own Ray (two clusters sharing a bucket,
the case a lease exists for), is part of tests/test_exact_resume_journeys.py: the second is
refused naming the first, which goes on through its faults and finishes.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from aim_platform.errors import UnsafeFile
from aim_platform.jobs import lease
from aim_platform.jobs.lease import Holder, LeaseHeld


def _holder(n: int, host: str = "node-a", pid: int = 4242) -> Holder:
    return Holder(f"session/0{n}000000", f"0{n}000000", host, pid)


def _record(root: Path) -> dict:
    return json.loads((root / "lease.json").read_text())


def test_a_live_lease_refuses_a_second_holder_naming_the_first(tmp_path: Path) -> None:
    root = tmp_path / "runs" / "demo"
    first = lease.acquire(str(root), ttl=60, holder=_holder(1), settle_s=0)
    with pytest.raises(LeaseHeld) as refused:
        lease.acquire(str(root), ttl=60, holder=_holder(2, "node-b", 7), settle_s=0)
    text = str(refused.value)
    assert "\n" not in text
    assert "run demo is held by Ray job 01000000 on host node-a, pid 4242," in text
    assert "last heartbeat 0 s ago" in text and str(root / "lease.json") in text
    assert _record(root)["holder"] == "session/01000000"  # the refused one wrote nothing
    first.release()
    assert not (root / "lease.json").exists()
    lease.acquire(str(root), ttl=60, holder=_holder(2), settle_s=0).release()  # free again


def test_same_ray_job_takes_its_own_lease_again(tmp_path: Path) -> None:
    """A Tune trial restarted, or a fit restarted inside one job: no wait, no message."""
    said: list[str] = []
    lease.acquire(str(tmp_path), ttl=60, holder=_holder(1), settle_s=0, heartbeat=False)
    again = lease.acquire(str(tmp_path), ttl=60, holder=_holder(1, pid=99), say=said.append)
    assert said == [] and _record(tmp_path)["pid"] == 99
    again.release()


def test_a_silent_holder_is_taken_over_after_its_ttl(tmp_path: Path) -> None:
    said: list[str] = []
    # A holder on another host that stops heart-beating (its node lost): heartbeat=False.
    lease.acquire(str(tmp_path), ttl=0.5, holder=_holder(1, "node-a"), settle_s=0, heartbeat=False)
    with pytest.raises(LeaseHeld):  # within its TTL it still counts as live
        lease.acquire(str(tmp_path), ttl=0.5, holder=_holder(2, "node-b"), settle_s=0)
    time.sleep(0.8)
    taken = lease.acquire(
        str(tmp_path), ttl=0.5, holder=_holder(2, "node-b"), settle_s=0, say=said.append
    )
    assert len(said) == 1, said
    assert said[0].startswith("taking over the lease of ")
    assert "from Ray job 01000000 on host node-a, pid 4242," in said[0]
    assert "no heartbeat for over its TTL of 0.5 s" in said[0]
    assert _record(tmp_path)["holder"] == "session/02000000"
    taken.release()


def test_a_holder_that_missed_two_renewals_is_waited_for_then_taken_over(tmp_path: Path) -> None:
    """A RayJob retry after a head loss comes back before the dead run's TTL has passed: it
    waits for the TTL (saying so) instead of being refused and using up a retry."""
    said: list[str] = []
    lease.acquire(str(tmp_path), ttl=2.0, holder=_holder(1, "node-a"), settle_s=0, heartbeat=False)
    time.sleep(1.2)  # silent for over half its TTL: a live holder renews every quarter
    start = time.monotonic()
    taken = lease.acquire(
        str(tmp_path), ttl=2.0, holder=_holder(2, "node-b"), settle_s=0, say=said.append
    )
    assert time.monotonic() - start >= 0.7  # it waited for the TTL
    assert said[0].startswith("the lease of ") and "waiting up to" in said[0]
    assert "no heartbeat for over its TTL of 2 s" in said[1]
    assert _record(tmp_path)["holder"] == "session/02000000"
    taken.release()


def test_heartbeats_keep_a_lease_live_past_its_ttl(tmp_path: Path) -> None:
    held = lease.acquire(str(tmp_path), ttl=0.4, holder=_holder(1, "node-a"), settle_s=0)
    first_beat = _record(tmp_path)["heartbeat"]
    time.sleep(1.2)  # three TTLs: renewed every 0.1 s
    assert _record(tmp_path)["heartbeat"] > first_beat
    with pytest.raises(LeaseHeld, match="held by Ray job 01000000"):
        lease.acquire(str(tmp_path), ttl=0.4, holder=_holder(2, "node-b"), settle_s=0)
    held.release()


def test_a_dead_process_on_this_host_is_taken_over_at_once(tmp_path: Path) -> None:
    """A driver killed on this machine (SIGKILL: no release) does not make the next run wait."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    host = socket.gethostname()
    lease.acquire(
        str(tmp_path), ttl=600, holder=_holder(1, host, proc.pid), settle_s=0, heartbeat=False
    )
    said: list[str] = []
    taken = lease.acquire(
        str(tmp_path), ttl=600, holder=_holder(2, host), settle_s=0, say=said.append
    )
    taken.release()
    assert len(said) == 1 and "its process is gone from this host" in said[0], said
    # A live process on this host is not taken over.
    lease.acquire(
        str(tmp_path), ttl=600, holder=_holder(3, host, os.getpid()), settle_s=0, heartbeat=False
    )
    with pytest.raises(LeaseHeld, match=f"pid {os.getpid()}"):
        lease.acquire(str(tmp_path), ttl=600, holder=_holder(4, host), settle_s=0)


def test_a_holder_whose_lease_was_taken_stops_and_is_told(tmp_path: Path) -> None:
    told: list[str] = []
    held = lease.acquire(str(tmp_path), ttl=60, holder=_holder(1), settle_s=0, heartbeat=False)
    held.on_lost = told.append
    time.sleep(0.05)
    other = lease.acquire(str(tmp_path), ttl=60, holder=_holder(1, pid=5), settle_s=0)
    assert held.renew() is False and held.lost.is_set()
    assert told and "lost the lease" in told[0]
    held.release()  # not its record any more: left alone
    assert _record(tmp_path)["pid"] == 5
    other.release()


def _race(root: Path, starters: int) -> tuple[list[lease.Lease], list[str]]:
    """``starters`` threads released at once to acquire ``root``: who won, who was refused."""
    barrier = threading.Barrier(starters)
    won: list[lease.Lease] = []
    refused: list[str] = []

    def start(n: int) -> None:
        barrier.wait()
        try:
            won.append(lease.acquire(str(root), ttl=60, holder=_holder(n), settle_s=0.2))
        except LeaseHeld as exc:
            refused.append(str(exc))

    threads = [threading.Thread(target=start, args=(n,)) for n in range(1, starters + 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return won, refused


def test_racing_starters_never_both_win(tmp_path: Path) -> None:
    """Three starters released at once, twenty rounds: exactly one holds the lease each time."""
    for round_ in range(20):
        root = tmp_path / f"r{round_}"
        won, refused = _race(root, 3)
        assert len(won) == 1 and len(refused) == 2, (won, refused)
        assert _record(root)["token"] == won[0].record.token
        won[0].release()


def test_a_lease_on_object_storage(s3_endpoint: dict[str, str]) -> None:
    root = f"s3://{s3_endpoint['bucket']}/lease-test/demo"
    opts = {"endpoint_url": s3_endpoint["endpoint_url"]}
    held = lease.acquire(root, ttl=60, storage_options=opts, holder=_holder(1), settle_s=0.1)
    with pytest.raises(LeaseHeld, match=f"held by Ray job 01000000 .*{root}/lease.json"):
        lease.acquire(root, ttl=60, storage_options=opts, holder=_holder(2), settle_s=0.1)
    held.release()
    lease.acquire(root, ttl=60, storage_options=opts, holder=_holder(2), settle_s=0.1).release()


def test_a_record_that_is_not_a_lease_is_refused_by_name(tmp_path: Path) -> None:
    (tmp_path / "lease.json").write_text('{"holder": 1}')
    with pytest.raises(UnsafeFile, match="lease.json: not a lease record"):
        lease.acquire(str(tmp_path), ttl=60, settle_s=0)
