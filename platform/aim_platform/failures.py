"""A failure in one line: the innermost exception under Ray's layers, the worker rank and Ray
task it came from, and where it was raised (the tracebacks themselves go to the log)."""

from __future__ import annotations

import re
import traceback
from pathlib import Path

# In the text of a Ray error: a task's process title (`ray::MapBatches(read_and_decode)() (pid=`)
# and a traceback frame (`File "/x/y.py", line 12, in f`).
_RAY_TASK = re.compile(r"ray::(\S+?)\(\) \(pid=")
_FRAME = re.compile(r'File "([^"]+)", line (\d+), in (\S+)')
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def _chain(exc: BaseException) -> tuple[list[BaseException], int | None]:
    """The exceptions from ``exc`` down to the one at the bottom of Ray's wrapping, and the
    worker rank it came from.

    Follows Ray Train's ``WorkerGroupError.worker_failures`` (the lowest failed rank) and
    ``controller_failure``, a ``RayTaskError``'s ``cause``, then ``__cause__`` and
    ``__context__``; Ray is not imported (the attributes are read by name).
    """
    chain, rank = [exc], None
    while True:
        failures = getattr(exc, "worker_failures", None)
        if isinstance(failures, dict) and failures:
            rank = min(failures)
            wrapped = [failures[rank]]
        else:
            context = None if exc.__suppress_context__ else exc.__context__
            wrapped = [
                getattr(exc, "controller_failure", None),
                getattr(exc, "cause", None),
                exc.__cause__,
                context,
            ]
        nxt = next((w for w in wrapped if isinstance(w, BaseException)), None)
        if nxt is None or any(nxt is seen for seen in chain):
            return chain, rank
        chain.append(nxt)
        exc = nxt


def _short(path: str) -> str:
    """A frame's file without the installation prefix (``.../site-packages/``), else its
    folder and name."""
    for marker in ("/site-packages/", "/dist-packages/", "/platform/"):
        if marker in path:
            return path.rsplit(marker, 1)[1]
    return "/".join(Path(path).parts[-2:])


def root_cause(exc: BaseException) -> str:
    """One line for a failure that Ray wrapped in layers of its own: the innermost exception
    (with its notes), the worker rank and Ray task it came from, and where it was raised.

    E.g. ``ArrowInvalid: Parquet file size is 0 bytes; reading shard /d/train-00003.parquet
    (worker rank 0, Ray task MapBatches(read_and_decode), raised at pyarrow/_parquet.pyx:1523,
    from aim_platform/data/tasks.py:135 in read_and_decode)``. The tracebacks themselves
    belong in the log.
    """
    chain, rank = _chain(exc)
    inner = chain[-1]
    lines = str(inner).strip().splitlines()
    message = f"{type(inner).__name__}: {lines[0]}" if lines else type(inner).__name__
    notes = [n for n in getattr(inner, "__notes__", []) if isinstance(n, str)]
    # Ray carries remote tracebacks as text: the innermost exception's own block is the one
    # that ends with its message, after a `Traceback` header or a `ray::Task() (pid=` title.
    text = _ANSI.sub("", "\n".join(str(e) for e in chain[:-1]))  # Ray colours task titles
    end = text.rfind(message.split(": ", 1)[-1]) if lines else -1
    end = len(text) if end < 0 else end
    tasks = list(_RAY_TASK.finditer(text, 0, end))
    start = max(text.rfind("Traceback (most recent call last)", 0, end), 0)
    start = max(start, tasks[-1].start() if tasks else 0)
    frames = [tuple(f) for f in _FRAME.findall(text, start, end)]
    if not frames:  # raised in this process: its own traceback
        frames = [
            (f.filename, str(f.lineno), f.name) for f in traceback.extract_tb(inner.__traceback__)
        ][-1:]
    where = [f"worker rank {rank}"] if rank is not None else []
    if tasks:
        where.append(f"Ray task {tasks[-1].group(1)}")
    if frames:
        file, line, _ = frames[-1]
        where.append(f"raised at {_short(file)}:{line}")
        ours = [f for f in frames if "aim_platform" in f[0]]
        if ours and ours[-1] != frames[-1]:
            file, line, name = ours[-1]
            where.append(f"from {_short(file)}:{line} in {name}")
    return "; ".join([message, *notes]) + (f" ({', '.join(where)})" if where else "")
