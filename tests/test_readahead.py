"""The read-ahead heuristic of a file handle: sequential readers get windows, random ones never;
and the background windows a reader claims: whole ones, found without a lookup per segment."""

from __future__ import annotations

import random

from medfs import layout
from medfs.content import (
    MAX_READAHEAD,
    PREFETCH_WINDOW,
    Ahead,
    Fetched,
    Reader,
    SegmentCache,
    Version,
)
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


class CountingCache(SegmentCache):
    def __init__(self) -> None:
        super().__init__(1 << 30)
        self.gets = 0

    def get(self, cid: str, index: int) -> Fetched | None:
        self.gets += 1
        return super().get(cid, index)


def _reader() -> tuple[Reader, CountingCache]:
    cache = CountingCache()
    return Reader(None, cache), cache  # type: ignore[arg-type]  # claims never ask the node


def _done(reader: Reader, window: Ahead) -> None:
    """What `fetch_ahead` does once a window is fetched, without fetching it."""
    reader._prefetching -= 1
    reader._release(window.version.cid, range(window.start, window.stop + 1), window.event)


BIG = Version("big", b"k" * 32, b"s" * 16, GiB)


def test_a_sliver_past_the_claimed_windows_waits_without_looking_at_its_segments() -> None:
    reader, cache = _reader()
    first = reader.claim_ahead(BIG, 1, 2 * MAX_READAHEAD)
    assert first is not None and (first.start, first.stop) == (1, PREFETCH_WINDOW)
    _done(reader, first)
    second = reader.claim_ahead(BIG, 5, 4 + 2 * MAX_READAHEAD)
    assert second is not None and (second.start, second.stop) == (129, 256)
    _done(reader, second)
    # A sequential reader asks at every request, 4 segments further each time: until about
    # half a window fits past what was claimed, nothing is claimed and (almost) nothing looked up.
    for at in range(9, 9 + 4 * 30, 4):
        cache.gets = 0
        assert reader.claim_ahead(BIG, at, at - 1 + 2 * MAX_READAHEAD) is None
        assert cache.gets <= 1, at
    third = reader.claim_ahead(BIG, 137, 136 + 2 * MAX_READAHEAD)
    assert third is not None and (third.start, third.stop) == (257, 384)


def test_the_last_segments_of_an_object_are_claimed_even_if_few() -> None:
    reader, _ = _reader()
    count = layout.segment_count(BIG.size)
    window = reader.claim_ahead(BIG, count - 3, count + 100)
    assert window is not None and (window.start, window.stop) == (count - 3, count - 1)
