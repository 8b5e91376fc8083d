"""CPU-bound work split across forked copies of this process.

For the command line's key wrapping: cryptography's HPKE holds the GIL, so threads would run
the wraps of a large share one after another. A forked copy needs nothing sent to it (the
function and its keys are already in its memory) and sends back only its results, through a
pipe; nothing touches the disk. A child that fails in any way has its part redone here, so the
caller sees the genuine exception, raised where it would have been without the split.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Callable, Sequence
from typing import TypeVar

T = TypeVar("T")

# Below this many items per process a fork (a few milliseconds) is not worth it.
MIN_PER_PROCESS = 128


def _workers() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def map_split(
    fn: Callable[[T], bytes], items: Sequence[T], *, workers: int | None = None
) -> list[bytes]:
    """`[fn(x) for x in items]`, with contiguous parts of `items` done in forked children.

    `fn` must be pure: what it changes in a child's memory is lost, and it must not use
    anything a fork does not carry over (threads, open database connections)."""
    n = min(workers or _workers(), len(items) // MIN_PER_PROCESS)
    if n < 2:
        return [fn(x) for x in items]
    size = -(-len(items) // n)
    parts = [items[i : i + size] for i in range(0, len(items), size)]
    sys.stdout.flush()  # a child exits without flushing; still, leave it nothing to repeat
    sys.stderr.flush()
    children: list[tuple[int, int]] = []  # (pid, read end) of those not collected yet
    try:
        for part in parts[1:]:
            children.append(_spawn(fn, part))
        results = [fn(x) for x in parts[0]]
        for part in parts[1:]:
            pid, fd = children.pop(0)
            results.extend(_collect(pid, fd, part, fn))
        return results
    finally:
        for pid, fd in children:  # only after an exception here: do not leave zombies
            os.close(fd)
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, 0)


def _spawn(fn: Callable[[T], bytes], part: Sequence[T]) -> tuple[int, int]:
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: compute, send, and leave without running any cleanup of the parent's
        code = 1
        try:
            os.close(read_end)
            # All computed first: the pipe holds 64 KiB, and the parent reads only once its own
            # part is done.
            payload = b"".join(len(r).to_bytes(4, "big") + r for r in map(fn, part))
            with os.fdopen(write_end, "wb") as out:
                out.write(payload)
            code = 0
        finally:
            os._exit(code)
    os.close(write_end)
    return pid, read_end


def _collect(pid: int, fd: int, part: Sequence[T], fn: Callable[[T], bytes]) -> list[bytes]:
    chunks = []
    try:
        while chunk := os.read(fd, 1 << 20):
            chunks.append(chunk)
    finally:
        os.close(fd)
        _, status = os.waitpid(pid, 0)
    if os.waitstatus_to_exitcode(status) == 0:
        results = _unframe(b"".join(chunks))
        if results is not None and len(results) == len(part):
            return results
    return [fn(x) for x in part]  # the child failed: the genuine error, if any, comes from here


def _unframe(data: bytes) -> list[bytes] | None:
    """The results a child sent (each a 4-byte length, then its bytes); None if cut short."""
    results, pos = [], 0
    while pos < len(data):
        n = int.from_bytes(data[pos : pos + 4], "big")
        if pos + 4 + n > len(data):
            return None
        results.append(data[pos + 4 : pos + 4 + n])
        pos += 4 + n
    return results
