"""The read-ahead heuristic of a file handle: sequential readers get windows, random ones never."""

from __future__ import annotations

import random

from medfs.content import MAX_READAHEAD
from medfs.fs import Handle

KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30


def test_a_random_read_near_the_last_one_fetches_nothing_ahead() -> None:
    handle = Handle(ino=2, writable=False)
    # From issue #8's benchmark: read 969 began 429 KiB before read 968 ended.
    for off in (127_247_376 - 4 * KiB, 126_817_975):
        assert handle.plan_read(off, 4 * KiB) == 0
        handle.after_read(off, 4 * KiB)


def test_random_4k_reads_never_read_ahead() -> None:
    rng = random.Random(8)
    handle = Handle(ino=2, writable=False)
    for _ in range(20_000):
        off = rng.randrange(0, GiB - 4 * KiB)
        assert handle.plan_read(off, 4 * KiB) == 0
        handle.after_read(off, 4 * KiB)


def test_sequential_reads_grow_the_window_even_out_of_order() -> None:
    handle = Handle(ino=2, writable=False)
    windows = []
    off = 0
    for _ in range(12):
        windows.append(handle.plan_read(off, 256 * KiB))
        handle.after_read(off, 256 * KiB)
        off += 256 * KiB
    assert windows[0] == 0 and windows[1] == 8
    assert windows[-1] == MAX_READAHEAD
    # The kernel keeps two requests in flight: the later one may be planned first.
    assert handle.plan_read(off + 256 * KiB, 256 * KiB) == MAX_READAHEAD
    assert handle.plan_read(off, 256 * KiB) == MAX_READAHEAD


def test_a_seek_ends_the_streak() -> None:
    handle = Handle(ino=2, writable=False)
    for off in range(0, MiB, 128 * KiB):
        handle.plan_read(off, 128 * KiB)
        handle.after_read(off, 128 * KiB)
    assert handle.ahead > 0
    assert handle.plan_read(500 * MiB, 128 * KiB) == 0
