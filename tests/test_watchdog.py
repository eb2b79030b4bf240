"""The step watchdog (issue 29 point 3) without Ray: it fires only while armed, reports the
step, its last beat and where the rank was; a rank in a step (waiting on its peers) fires
later, and the progress board names the rank that hung reading, not one that waited for it."""

from __future__ import annotations

import time

from aim_platform.train.progress import ProgressBoard
from aim_platform.train.watchdog import EXIT_HUNG, IN_STEP, READING, StepWatchdog


def _watch(
    board: ProgressBoard,
    rank: int,
    ended: list[tuple[int, int]],
    timeout_s: float = 0.5,
    grace_s: float = 0.3,
    defer_s: float | None = None,
) -> StepWatchdog:
    return StepWatchdog(
        timeout_s,
        lambda what: board.hung({**what, "rank": rank, "node": "n"}),
        grace_s=grace_s,
        defer_s=defer_s,
        end=lambda code: ended.append((rank, code)),
    )


def test_the_rank_that_hung_is_named_not_the_one_that_waited_for_it() -> None:
    board, ended = ProgressBoard(10), []
    hung, waiting = _watch(board, 1, ended), _watch(board, 0, ended)
    hung.beat(6)  # rank 1 finished step 6, then its next read never returned
    time.sleep(0.1)
    waiting.beat(6, holding_batch=True)  # rank 0's batch came; it blocks in the collectives
    time.sleep(1.5)
    assert ended == [(1, EXIT_HUNG), (0, EXIT_HUNG)]  # the waiting rank fires later
    assert board.get().hung["rank"] == 1 and board.get().hung["step"] == 6
    assert board.get().hung["where"] == READING


def test_a_rank_in_a_step_defers_to_a_reading_rank_whose_beat_is_later() -> None:
    """A fresh-clone run named rank 0 (blocked in a collective) while rank 1 slept reading:
    which beat is older is a race; where each rank was is not."""
    board, ended = ProgressBoard(10), []
    # rank 0 in a step, waiting on rank 1; its watchdog would fire first on timing alone
    waiting = _watch(board, 0, ended, defer_s=0.0)
    waiting.beat(6, holding_batch=True)
    time.sleep(0.1)
    hung = _watch(board, 1, ended)
    hung.beat(6)  # rank 1's read never returns; its beat is the later one
    time.sleep(1.5)
    assert sorted(ended) == [(0, EXIT_HUNG), (1, EXIT_HUNG)]
    assert board.get().hung["rank"] == 1 and board.get().hung["where"] == READING
    board.hung({"rank": 0, "node": "n", "step": 6, "last_beat": 0.0, "where": IN_STEP})
    assert board.get().hung["rank"] == 1  # an older beat in a step does not replace it


def test_a_rank_in_a_step_waits_longer_before_it_fires() -> None:
    board, ended = ProgressBoard(10), []
    dog = _watch(board, 0, ended, timeout_s=0.4, grace_s=0.1, defer_s=0.4)
    dog.beat(3, holding_batch=True)
    time.sleep(0.6)  # past the timeout, not past timeout + defer
    assert ended == [] and board.get().hung is None
    time.sleep(0.9)
    assert ended == [(0, EXIT_HUNG)] and board.get().hung["where"] == IN_STEP


def test_a_paused_or_beating_watchdog_never_fires() -> None:
    board, ended = ProgressBoard(10), []
    dog = _watch(board, 0, ended)
    time.sleep(0.8)  # not armed yet: start-up has no rhythm
    dog.beat(1)
    for step in range(2, 6):
        time.sleep(0.2)
        dog.beat(step)
    dog.pause()  # a long checkpoint
    time.sleep(0.8)
    dog.close()
    assert ended == [] and board.get().hung is None
