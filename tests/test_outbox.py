"""The outbox that keeps MLflow off the training path: order, outages, a full buffer, refused
writes and the end of a job, against a fake service (no MLflow, no timing assertions)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from aim_platform.outbox import Outbox, OutboxStatus


class FakeService:
    """Takes writes while ``up``; raises ConnectionError while down; ValueError for "bad"."""

    def __init__(self) -> None:
        self.up = threading.Event()
        self.up.set()
        self.written: list[object] = []
        self.tries = 0
        self.hold = threading.Event()  # set: a write hangs until released
        self.release = threading.Event()

    def apply(self, write: object) -> None:
        self.tries += 1
        if self.hold.is_set():
            self.release.wait()
        if not self.up.is_set():
            raise ConnectionError("Connection refused\nretries exhausted")
        if write == "bad":
            raise ValueError("INVALID_PARAMETER_VALUE: metric value is not a number")
        self.written.append(write)


def _transient(exc: BaseException) -> bool:
    return isinstance(exc, ConnectionError)


def _outbox(service: FakeService, capacity: int = 100) -> Outbox[object]:
    return Outbox(
        service.apply, transient=_transient, capacity=capacity, min_wait=0.01, max_wait=0.05
    )


def _until(check: Callable[[], bool], what: str) -> None:
    """Wait for progress, generously: the machine is shared and slow."""
    deadline = time.monotonic() + 120
    while not check():
        assert time.monotonic() < deadline, what
        time.sleep(0.01)


def test_writes_go_through_in_order_across_an_outage() -> None:
    service = FakeService()
    box = _outbox(service)
    box.put(0)
    assert box.flush(60) and service.written == [0]
    service.up.clear()
    before = time.time()
    for i in range(1, 6):
        assert box.put(i)
    _until(lambda: box.status().down, "the outbox never noticed the outage")
    down = box.status()
    assert down.down_since is not None and down.down_since >= before
    assert down.buffered == 5 and down.outages == 1 and "Connection refused" in down.last_error
    assert "\n" not in down.last_error
    tries = service.tries
    _until(lambda: service.tries > tries + 2, "no retry while down")  # the same write again
    service.up.set()
    assert box.flush(60)
    assert service.written == [0, 1, 2, 3, 4, 5]
    after = box.status()
    assert not after.down and after.outages == 1 and after.down_seconds > 0
    assert after.written == 6 and after.unwritten == 0
    box.close(1)


def test_a_full_buffer_drops_and_counts_but_never_an_essential_write() -> None:
    service = FakeService()
    service.up.clear()
    box = _outbox(service, capacity=3)
    assert [box.put(i) for i in range(5)] == [True, True, True, False, False]
    assert box.put("end", essential=True)
    status = box.status()
    assert status.dropped == 2 and status.buffered == 4 and status.unwritten == 6
    service.up.set()
    assert box.flush(60)
    assert service.written == [0, 1, 2, "end"]
    assert box.status().dropped == 2 and box.status().unwritten == 2
    box.close(1)


def test_a_refused_write_is_counted_and_does_not_hold_up_the_rest() -> None:
    service = FakeService()
    box = _outbox(service)
    for write in (1, "bad", 2):
        box.put(write)
    assert box.flush(60)
    status = box.status()
    assert service.written == [1, 2] and status.failed == 1 and not status.down
    assert status.last_error.startswith("ValueError: INVALID_PARAMETER_VALUE")
    box.close(1)


def test_put_returns_while_a_write_hangs() -> None:
    service = FakeService()
    service.hold.set()
    box = _outbox(service)
    box.put("first")  # the drain thread takes it and hangs in the "request"
    _until(lambda: service.tries == 1, "the drain thread never started the write")
    done = threading.Event()

    def producer() -> None:
        for i in range(50):
            box.put(i)
        done.set()

    threading.Thread(target=producer, daemon=True).start()
    assert done.wait(60), "put blocked behind a hanging write"
    assert box.status().buffered == 51
    service.hold.clear()
    service.release.set()
    assert box.flush(60) and service.written == ["first", *range(50)]
    box.close(1)


def _down_with(n: int) -> tuple[FakeService, Outbox[object]]:
    """An outbox whose service is down, holding the writes 0..n-1 (the outage noticed)."""
    service = FakeService()
    service.up.clear()
    box = _outbox(service)
    for i in range(n):
        box.put(i)
    _until(lambda: box.status().down, "the outbox never noticed the outage")
    return service, box


def test_close_with_the_service_down_hands_back_what_is_left_in_order() -> None:
    service, box = _down_with(4)
    status, left = box.close(0.05)
    assert left == [0, 1, 2, 3] and isinstance(status, OutboxStatus)
    assert status.buffered == 4 and status.down
    assert not box.put(9)  # closed: counted as dropped, never tried
    service.up.set()
    tries = service.tries
    box._thread.join(60)
    assert not box._thread.is_alive() and service.written == []
    assert service.tries <= tries + 1  # at most the try that was under way


def test_status_copies_the_waiting_writes_only_when_asked_and_few() -> None:
    _, box = _down_with(3)
    assert box.status().waiting == ()  # not asked: the counters only
    assert box.status(copy=3).waiting == (0, 1, 2)  # in order, the one being tried first
    assert box.status(copy=2).waiting == ()  # more than asked for: none (buffered counts them)
    assert box.status(copy=2).buffered == 3
    box.close(0.05)
