"""The step watchdog (issue 29 point 3) without Ray: it fires only while armed, reports the
step and its last beat, and the progress board keeps the rank whose beat is oldest."""

from __future__ import annotations

import time

from aim_platform.train.progress import ProgressBoard
from aim_platform.train.watchdog import EXIT_HUNG, StepWatchdog


def _watch(board: ProgressBoard, rank: int, ended: list[tuple[int, int]]) -> StepWatchdog:
    return StepWatchdog(
        0.5,
        lambda what: board.hung({**what, "rank": rank, "node": "n"}),
        grace_s=0.3,
        end=lambda code: ended.append((rank, code)),
    )


def test_the_rank_that_hung_is_named_not_the_one_that_waited_for_it() -> None:
    board, ended = ProgressBoard(10), []
    hung, waiting = _watch(board, 1, ended), _watch(board, 0, ended)
    hung.beat(6)  # rank 1 finished step 6, then its next read never returned
    time.sleep(0.1)
    waiting.beat(6)  # rank 0's batch came, then it blocked in the step's collectives
    time.sleep(1.5)
    assert sorted(ended) == [(0, EXIT_HUNG), (1, EXIT_HUNG)]
    assert board.get().hung["rank"] == 1 and board.get().hung["step"] == 6


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
