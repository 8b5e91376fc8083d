"""File contents between the filesystem and IPFS: reading versions, staging drafts, uploading.

A committed *version* of a file is one encrypted object on IPFS. Reading it fetches only the
segments a read needs (one range request, plus read-ahead on sequential access) and keeps
them, still encrypted, in a bounded LRU cache; each read opens what it returns.

A *draft* is what a file becomes while it is written. A file written from its start, in order
(cp, rsync, tar, dd), streams: each write is encrypted and sent into a running IPFS add, so a
closed file is already uploaded and there is no second pass over the data. Until it passes
`SMALL_FILE` it is only held in memory: most records are small, and a small file is sealed in
one piece when it is closed and left in the staging area for a group upload with others (one
request and one pin for many files, where each upload of its own costs a request and a pin that
dwarf the work on its bytes). Any other pattern
(random writes, in-place edits, truncation, reading back while writing) turns the draft into an
overlay of 64 KiB blocks over a base version; changed blocks live in the staging area, encrypted
under a key that exists only in this process's memory, and commit re-encrypts the whole file
under a fresh content key.

Nothing here knows FUSE. Blocking work (HTTP to Kubo, encrypting or decrypting more than a few
segments, staging I/O) runs in worker threads; the async methods are safe on the trio thread.
Two exceptions, both bounded and cheaper than the hand-off to a worker they would need: a read
served from the cache decrypts the segments it returns (at most one request's worth), and
sealing a file of one segment at close writes at most 64 KiB to the page cache.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import mmap
import os
import queue
import tempfile
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, TypeVar

import trio
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from medfs import durable, format, layout
from medfs.copies import LocalCopies
from medfs.errors import FormatError, IPFSError, MedfsError
from medfs.ipfs import IPFS

log = logging.getLogger(__name__)

SEG = layout.SEGMENT_SIZE
T = TypeVar("T")
# Sequential reads fetch ahead in growing windows up to this many segments (8 MiB): fewer,
# larger range requests; each costs a round trip to the node whatever its size.
MAX_READAHEAD = 128
# Background read-ahead: requests of this many segments (8 MiB), up to this many in flight at
# once. Overlapping two keeps the node busy while the other window is decrypted and read;
# each request costs the node a connection and a walk from the root, so fewer, larger ones
# leave it more of the two cores (8 MiB against 4 MiB windows: 1 GiB cold cat 199 -> 234 MiB/s
# mean, Kubo 4.1-4.4 -> 3.4-3.7 CPU-s, the same as for `ipfs cat` of the same bytes).
PREFETCH_WINDOW = 128
PREFETCH_PARALLEL = 2
CLAIMS_KEPT = 64
# How many write chunks may wait for the sealer before a writer blocks (8 MiB of 128 KiB writes).
UPLOAD_QUEUE = 64
# The sealer hands the uploader and the spool batches of this many segments (1 MiB), and at
# most this many batches wait for the uploader before the sealer does.
SPOOL_BATCH = 16
UPLOAD_BATCHES = 8
# A spool written with direct I/O goes to the disk in chunks of this size (a multiple of any
# device's logical block), from an aligned buffer; only its last chunk is written buffered.
DIRECT_CHUNK = 1 << 20
# How many segments an overlay commit reads from its base in one range request.
COMMIT_BATCH = 64
# A file written in order is held in memory up to this size, then streamed into an upload.
SMALL_FILE = 1 << 20


@dataclass(frozen=True)
class Version:
    """One encrypted object. `key` is the unwrapped content key: memory only.

    `local` is set while the object is only in the staging area (its upload failed and waits
    for the node): reads then come from that file, and `cid` is just a cache label.
    """

    cid: str
    key: bytes
    salt: bytes
    size: int
    local: Path | None = None

    def segments(self) -> format.Segments:
        return format.Segments(
            self.key, format.Header(self.salt), layout.ciphertext_size(self.size)
        )


@dataclass(frozen=True)
class Sealed:
    """A new version, encrypted in full: uploaded (`cid`), or waiting in `spool` if the
    upload failed (`error` says why), or not tried yet (neither: a small file, for a group)."""

    key: bytes
    salt: bytes
    size: int
    spool: Path
    cid: str | None
    error: str | None


class ContentError(Exception):
    """A content operation failed; `errno` is what the filesystem should answer."""

    def __init__(self, message: str, err: int = errno.EIO) -> None:
        super().__init__(message)
        self.errno = err


class StagedCopyGone(ContentError):
    """A read went to a version's copy in the staging area, and the copy was gone: the
    version was uploaded (or replaced) between choosing it and opening its file. The file's
    current version has what the read wants; the caller asks again."""


def _read_staged(path: Path, offset: int, length: int) -> bytes:
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        raise StagedCopyGone(f"{path.name} is no longer in the staging area") from None
    try:  # once open, an upload that unlinks the file no longer matters
        return os.pread(fd, length, offset)
    finally:
        os.close(fd)


@contextlib.contextmanager
def _as_content_error(what: str) -> Iterator[None]:
    try:
        yield
    except (IPFSError, FormatError) as err:
        raise ContentError(f"{what}: {err.message}") from err


@dataclass(frozen=True)
class Fetched:
    """One segment's ciphertext as it came from the staging area, a local copy or the node.
    Not trusted: it is authenticated every time it is opened."""

    data: memoryview
    opener: format.Segments  # shared by the segments of one range read: one key derivation
    from_copy: bool


class _CopyDamaged(Exception):
    """A segment from a local copy failed authentication: the copy is deleted, and the node
    has the object intact, so the read is asked again."""


class SegmentCache:
    """Fetched segments of committed versions, least recently used first out, counted by
    their ciphertext's size. Each segment is a view into the buffer of the range read that
    brought it, and that buffer lives until its last segment leaves. Whoever uses a segment
    opens (authenticates and decrypts) it on its own thread."""

    def __init__(self, limit_bytes: int) -> None:
        self.limit = limit_bytes
        self._items: OrderedDict[tuple[str, int], Fetched] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()  # shared by the trio thread and workers

    def get(self, cid: str, index: int) -> Fetched | None:
        with self._lock:
            item = self._items.get((cid, index))
            if item is not None:
                self._items.move_to_end((cid, index))
            return item

    def run(self, cid: str, first: int, last: int) -> list[Fetched]:
        """The cached segments first, first + 1, ... up to last, stopping at the first one
        missing: every segment of a read in one lock (it is taken for each request)."""
        out = []
        with self._lock:
            for index in range(first, last + 1):
                item = self._items.get((cid, index))
                if item is None:
                    break
                self._items.move_to_end((cid, index))
                out.append(item)
        return out

    def put(self, cid: str, index: int, item: Fetched) -> None:
        with self._lock:
            old = self._items.pop((cid, index), None)
            if old is not None:
                self._bytes -= old.data.nbytes
            self._items[(cid, index)] = item
            self._bytes += item.data.nbytes
            while self._bytes > self.limit and self._items:
                _, dropped = self._items.popitem(last=False)
                self._bytes -= dropped.data.nbytes

    def discard(self, cid: str, index: int, item: Fetched) -> None:
        """Forget `item` (it failed to open), unless a newer fetch has replaced it."""
        with self._lock:
            if self._items.get((cid, index)) is item:
                del self._items[(cid, index)]
                self._bytes -= item.data.nbytes


class Reader:
    """Reads of committed versions through the segment cache, from the version's local copy
    if there is one, else from the node.

    Fetching (disk or HTTP, whole windows of segments) runs in worker threads and leaves
    ciphertext in the cache. A read that finds its segments there opens them on the trio
    thread, straight into the buffer it replies with: at most what one request returns (the
    kernel asks 256 KiB at a time), cheaper than the hand-off to a worker. Opening them in the
    read-ahead threads instead cost a GIL hand-off per 64 KiB segment, and a cold 1 GiB `cat`
    from a local copy ran at 578-615 MiB/s against 778-878 (docs/PERFORMANCE.md)."""

    def __init__(self, ipfs: IPFS, cache: SegmentCache, copies: LocalCopies | None = None) -> None:
        self.ipfs = ipfs
        self.cache = cache
        self.copies = copies
        # Segments being fetched in the background, so a read waits instead of fetching twice.
        self._inflight: dict[tuple[str, int], trio.Event] = {}
        self._prefetching = 0  # background fetches running (touched on the trio thread only)
        # The last segment a background fetch took on, per object (most recent last).
        self._claimed: dict[str, int] = {}
        # Range reads (from a copy or the node) and the segments they took: for benchmarks and
        # `user.medfs.stats`, which also has how many of them a copy served.
        self.fetches = 0
        self.segments_fetched = 0
        self.copy_reads = 0  # range reads a local copy served
        self._counting = threading.Lock()  # workers count too: no increment may be lost

    def fetched(self, v: Version, first: int, last: int, ahead: int = 0) -> list[Fetched]:
        """Segments first..last as fetched (blocking). Misses are fetched in one range request,
        extended by `ahead` segments that are cached for the reads to come."""
        items = self.cache.run(v.cid, first, last)
        if len(items) == last - first + 1:
            return items
        start = first + len(items)
        stop = min(layout.segment_count(v.size) - 1, max(last, last + ahead))
        with self._counting:
            self.fetches += 1
            self.segments_fetched += stop - start + 1
        got = self._fetch(v, start, stop)
        for index, item in got.items():
            self.cache.put(v.cid, index, item)
        return items + [got[index] for index in range(start, last + 1)]

    def _fetch(self, v: Version, first: int, last: int) -> dict[int, Fetched]:
        """Segments first..last in one range read, cut into one view per segment (no copy)."""
        where = layout.span(v.size, first * SEG, (last - first + 1) * SEG)
        if where is None:
            return {}
        base, length = where.ciphertext_offset, where.ciphertext_length
        data: bytes | bytearray | None = None
        from_copy = False
        if v.local is not None:
            data = _read_staged(v.local, base, length)
        elif self.copies is not None:
            data = self.copies.read(v.cid, base, length)
            from_copy = data is not None
        if data is None:
            with _as_content_error(f"cannot read {v.cid}"):
                data = self.ipfs.cat_buffer(v.cid, base, length)
        if len(data) != length:
            raise ContentError(
                f"cannot read {v.cid}: the encrypted object does not match its stated size "
                f"(asked for {length} bytes at {base}, got {len(data)})"
            )
        if from_copy:
            with self._counting:
                self.copy_reads += 1
        view, opener = memoryview(data), v.segments()
        stride = SEG + layout.TAG_SIZE
        return {
            index: Fetched(view[at : at + stride], opener, from_copy)
            for index, at in zip(
                range(where.first, where.last + 1), range(0, length, stride), strict=True
            )
        }

    def _open(self, v: Version, index: int, item: Fetched, out: memoryview | None = None) -> bytes:
        """Authenticate and decrypt one fetched segment (into `out` if given, then b"")."""
        try:
            if out is None:
                return item.opener.open(index, item.data)
            item.opener.open_into(index, item.data, out)
            return b""
        except FormatError as err:
            self.cache.discard(v.cid, index, item)
            if item.from_copy and self.copies is not None:
                # Torn by a crash or changed on disk: the node has the object intact.
                self.copies.drop(v.cid, failed=True)
                raise _CopyDamaged from err
            raise ContentError(f"cannot read {v.cid}: {err.message}") from err

    def _fetch_and_open(
        self, v: Version, first: int, last: int, ahead: int, opened: Callable[[list[Fetched]], T]
    ) -> T:
        """`opened(items)` of segments first..last as `fetched` gives them (blocking)."""
        while True:
            try:
                return opened(self.fetched(v, first, last, ahead))
            except _CopyDamaged:
                # That segment left the cache and the copy is gone: fetched again, from the
                # node. Each round drops one segment, so this ends.
                continue

    def segments(self, v: Version, first: int, last: int, ahead: int = 0) -> list[bytes]:
        """Plaintext segments first..last (blocking), fetched as `fetched` does."""
        return self._fetch_and_open(
            v, first, last, ahead,
            lambda items: [self._open(v, i, item) for i, item in enumerate(items, first)],
        )  # fmt: skip

    def _read_sync(self, v: Version, offset: int, end: int, ahead: int) -> memoryview:
        """`read` of a miss, in a worker: fetched, then opened as a hit is."""
        first, last = offset // SEG, (end - 1) // SEG
        return self._fetch_and_open(
            v, first, last, ahead, lambda items: self._plaintext(v, offset, end, items)
        )

    def _plaintext(self, v: Version, offset: int, end: int, items: list[Fetched]) -> memoryview:
        """Bytes [offset, end) opened from `items`, the segments that hold them, into one
        buffer; the reply is a view of it, so nothing is copied after decryption."""
        first = offset // SEG
        buffer = bytearray(min((first + len(items)) * SEG, v.size) - first * SEG)
        view = memoryview(buffer)
        for i, item in enumerate(items):
            self._open(v, first + i, item, view[i * SEG : (i + 1) * SEG])
        return view[offset - first * SEG : end - first * SEG]

    async def read(
        self, v: Version, offset: int, length: int, ahead: int = 0
    ) -> bytes | memoryview:
        end = min(offset + length, v.size)
        if end <= offset:
            return b""
        first, last = offset // SEG, (end - 1) // SEG
        for _attempt in range(2):
            cached = self.cache.run(v.cid, first, last)
            if len(cached) == last - first + 1:  # sequential reads after read-ahead: no hop
                try:
                    return self._plaintext(v, offset, end, cached)
                except _CopyDamaged:
                    break  # asked again below, from the node
            event = self._inflight.get((v.cid, first + len(cached)))  # the first one missing
            if event is None:
                break
            await event.wait()  # a prefetch, or another read, is bringing it
        # Claimed like a prefetch: the kernel sends a sequential reader's read-ahead as several
        # requests at once, and each would otherwise fetch the same segments.
        mine = trio.Event()
        stop = min(layout.segment_count(v.size) - 1, last + ahead)
        claimed = [
            index
            for index in range(first, stop + 1)
            if (v.cid, index) not in self._inflight and self.cache.get(v.cid, index) is None
        ]
        for index in claimed:
            self._inflight[(v.cid, index)] = mine
        try:
            return await trio.to_thread.run_sync(self._read_sync, v, offset, end, ahead)
        finally:
            self._release(v.cid, claimed, mine)

    def _release(self, cid: str, indices: Iterable[int], event: trio.Event) -> None:
        """End a claim: its segments are no longer on their way, and whoever waits wakes."""
        for index in indices:
            if self._inflight.get((cid, index)) is event:
                del self._inflight[(cid, index)]
        event.set()

    def claim_ahead(self, v: Version, first: int, last: int) -> Ahead | None:
        """The window among first..last worth fetching in the background, skipping what is
        cached or already on its way: at most PREFETCH_WINDOW segments, while fewer than
        PREFETCH_PARALLEL fetches run. None when there is nothing to do, which is most calls:
        deciding here, on the caller's thread, spares it starting a task for nothing. A
        claimed window must be passed to `fetch_ahead`, which releases it. Errors are left
        for the reads to meet."""
        count = layout.segment_count(v.size)
        last = min(last, count - 1)
        if self._prefetching >= PREFETCH_PARALLEL:
            return None
        # Every read of a sequential reader asks again; start past what earlier calls took on
        # rather than look up each of the (up to 256) segments in between every time. A mark
        # far beyond this window is from another pass (the reader went back): not trusted.
        claimed = self._claimed.get(v.cid, -1)
        start = first if claimed > 2 * last - first else max(first, claimed + 1)
        while start <= last and (
            self.cache.get(v.cid, start) is not None or (v.cid, start) in self._inflight
        ):
            start += 1
        if start > last:
            return None
        if last < count - 1 and last - start + 1 < min(PREFETCH_WINDOW, (last - first) // 2):
            # Only a sliver fits before the end of the reader's window: wait, and fetch a
            # whole window later (every round trip to the node costs about the same). Known
            # before looking at the sliver's segments: a sequential reader comes here at
            # nearly every request, and looking cost it ~65 lookups each time. A gap before a
            # cached segment in the sliver waits too; a read that gets there first fetches it.
            return None
        stop = start
        while (
            stop + 1 <= last
            and stop + 1 - start < PREFETCH_WINDOW
            and self.cache.get(v.cid, stop + 1) is None
            and (v.cid, stop + 1) not in self._inflight
        ):
            stop += 1
        event = trio.Event()
        for index in range(start, stop + 1):
            self._inflight[(v.cid, index)] = event
        self._claimed.pop(v.cid, None)
        self._claimed[v.cid] = stop
        while len(self._claimed) > CLAIMS_KEPT:
            del self._claimed[next(iter(self._claimed))]
        self._prefetching += 1
        return Ahead(v, start, stop, event)

    async def fetch_ahead(self, ahead: Ahead) -> None:
        v, start, stop = ahead.version, ahead.start, ahead.stop
        try:
            await trio.to_thread.run_sync(self.fetched, v, start, stop)
        except (ContentError, OSError):
            pass  # must not end the filesystem's nursery: a read of it meets the error
        finally:
            self._prefetching -= 1
            self._release(v.cid, range(start, stop + 1), ahead.event)


@dataclass(frozen=True)
class Ahead:
    """A window of segments claimed for a background fetch (`Reader.claim_ahead`)."""

    version: Version
    start: int
    stop: int
    event: trio.Event


class Staging:
    """Scratch space for drafts, encrypted under a key that lives only in this process.

    Files are unlinked as soon as they are created, so a crash leaves nothing behind but
    ciphertext whose key died with the process. The total is bounded: past `limit_bytes` a
    write fails with ENOSPC.
    """

    RECORD = 4 + 12 + SEG + 16  # length | nonce | ciphertext+tag

    def __init__(self, directory: Path, limit_bytes: int, *, ahead: int = 0) -> None:
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.directory = directory
        self.limit = limit_bytes
        self.ahead = ahead  # empty objects made ahead for small closes (0: one at each)
        self._aead = AESGCM(AESGCM.generate_key(bit_length=256))
        self._used = 0
        self._lock = threading.Lock()
        self._fresh: _FreshFiles | None = None  # started at the first small close

    def reserve(self, records: int) -> None:
        with self._lock:
            if self._used + records * self.RECORD > self.limit:
                raise ContentError("the staging area is full", errno.ENOSPC)
            self._used += records * self.RECORD

    def release(self, records: int) -> None:
        with self._lock:
            self._used -= records * self.RECORD

    def new_file(self) -> StagedFile:
        return StagedFile(self)

    def fresh_object(self) -> Path:
        """An empty file of its own for a small version's object (`*.obj`, mode 0600).

        With `ahead`, made ahead by a worker thread: a new file costs this machine's ext4
        35-815 us of CPU (docs/PERFORMANCE.md), and each small close needs one, on the thread
        that serves FUSE. A crash leaves the unused ones empty, without a pending record's
        marker, and a mount's start deletes those (`PendingStore.sweep`, FORMAT.md §8): the
        worker starts only after that sweep, at the first small close, which makes its own.
        """
        if not self.ahead:
            return _new_object(self.directory)
        with self._lock:  # closes of small and larger files come from two threads
            fresh = self._fresh
            if fresh is None:
                self._fresh = _FreshFiles(self.directory, self.ahead)
        # Taking from a worker that has just started would leave `ahead` or one fewer ready,
        # as the threads happen to run: its first fill is whole when no close takes part.
        return _new_object(self.directory) if fresh is None else fresh.take()

    def renew(self) -> None:
        """At a mount's start, once the staging area holds nothing: make its directory anew,
        where new files are cheap to make (`durable.renew_empty_directory`). Only a hint to
        the filesystem: whatever stops it leaves the directory as it was."""
        try:
            durable.renew_empty_directory(self.directory)
        except OSError as err:
            log.debug("the staging directory stays where it is: %s", err)

    def close(self) -> None:
        """Delete the files made ahead and never used (a mount's start would, otherwise)."""
        if self._fresh is not None:
            self._fresh.close()


def _new_object(directory: Path) -> Path:
    path = directory / f"{os.urandom(12).hex()}.obj"
    os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600))
    return path


class _FreshFiles:
    """Up to `count` empty files made ahead in one directory by a worker, taken one at a time."""

    def __init__(self, directory: Path, count: int) -> None:
        self.directory = directory
        self.high = count
        self.low = count // 4  # fewer left than this: make more, up to `high`
        self._ready: list[Path] = []
        self._lock = threading.Lock()
        self._wanted = threading.Event()
        self._closed = False
        self._wanted.set()
        self._thread = threading.Thread(target=self._fill, name="medfs-fresh", daemon=True)
        self._thread.start()

    def take(self) -> Path:
        with self._lock:
            path = self._ready.pop() if self._ready else None
            if len(self._ready) < self.low:
                self._wanted.set()
        # None ready (the first close, or a burst that outran the worker): made here, as always.
        return path if path is not None else _new_object(self.directory)

    def _fill(self) -> None:
        while not self._closed:
            self._wanted.wait()
            self._wanted.clear()
            # As many as were missing when asked: takes meanwhile wait for the next call,
            # so what is left after a burst of closes does not hang on the threads' timing.
            with self._lock:  # close() wakes it too, to make none and stop
                missing = 0 if self._closed else self.high - len(self._ready)
            for _ in range(missing):
                try:
                    path = _new_object(self.directory)
                except OSError as err:  # a full disk, say: from now on each close makes its own
                    log.warning("staging files are no longer made ahead: %s", err)
                    return
                with self._lock:
                    wanted = not self._closed  # closed while it was made
                    if wanted:
                        self._ready.append(path)
                if not wanted:
                    path.unlink()
                    return

    def close(self) -> None:
        with self._lock:
            self._closed = True
            ready, self._ready = self._ready, []
        self._wanted.set()
        self._thread.join()
        _unlink_all(ready)


class StagedFile:
    """The changed blocks of one draft, one fixed-size encrypted record per block."""

    def __init__(self, staging: Staging) -> None:
        self.staging = staging
        self._fh = tempfile.TemporaryFile(dir=staging.directory)  # noqa: SIM115 (lives with the draft)
        self._id = os.urandom(16)
        self.blocks: set[int] = set()

    def _aad(self, index: int) -> bytes:
        return self._id + index.to_bytes(8, "big")

    def write(self, index: int, data: bytes) -> None:
        if index not in self.blocks:
            self.staging.reserve(1)
            self.blocks.add(index)
        nonce = os.urandom(12)
        sealed = self.staging._aead.encrypt(nonce, data, self._aad(index))
        record = len(data).to_bytes(4, "big") + nonce + sealed
        os.pwrite(self._fh.fileno(), record, index * Staging.RECORD)

    def read(self, index: int) -> bytes:
        record = os.pread(self._fh.fileno(), Staging.RECORD, index * Staging.RECORD)
        n = int.from_bytes(record[:4], "big")
        return self.staging._aead.decrypt(record[4:16], record[16 : 16 + n + 16], self._aad(index))

    def drop(self, index: int) -> None:
        if index in self.blocks:
            self.blocks.discard(index)
            self.staging.release(1)

    def close(self) -> None:
        self.staging.release(len(self.blocks))
        self.blocks.clear()
        self._fh.close()


def seal_small(staging: Staging, plaintext: bytes) -> Sealed:
    """Encrypt a small file in one piece under a fresh key into the staging area (blocking).

    Not fsynced: the file survives the daemon being killed, and what must survive a power cut
    is synced once it is known not to be uploaded soon (`PendingStore.sync`)."""
    key = format.new_content_key()
    ciphertext = format.encrypt_bytes(key, plaintext)
    spool = staging.fresh_object()
    fd = os.open(spool, os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        durable.write_all(fd, ciphertext)
    except BaseException:
        os.close(fd)
        spool.unlink()
        raise
    os.close(fd)
    salt = format.Header.parse(ciphertext[: format.HEADER_SIZE]).salt
    return Sealed(key, salt, len(plaintext), spool, None, None)


class Spool:
    """One encrypted object written to the staging area while it is uploaded.

    The copy on disk decouples encryption from the upload: if the node fails, the object
    still completes here and waits for the node to come back. Once uploaded, it becomes the
    version's local copy or is deleted.

    Written with direct I/O where the filesystem allows it: a buffered write of a GiB costs
    this machine 1.9-2.5 s of kernel time (copying it into page cache pages that it first has
    to fault in) on two cores the node and the FUSE thread need, where direct I/O costs
    0.1-0.25 s plus 0.2-0.35 s of copying into one reused, aligned buffer. Its bytes reach
    the disk as they are written rather than later, which the kept local copy needed anyway.
    """

    def __init__(self, directory: Path) -> None:
        # Anonymous maps are page-aligned, as direct I/O needs: room for a chunk waiting to be
        # written and the next one filling. Made first: O_DIRECT is never set without it.
        self._buffer: mmap.mmap | None = mmap.mmap(-1, 2 * DIRECT_CHUNK)
        self._fill = 0
        self.path = directory / f"{os.urandom(12).hex()}.obj"
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            fcntl.fcntl(self._fd, fcntl.F_SETFL, fcntl.fcntl(self._fd, fcntl.F_GETFL) | os.O_DIRECT)
        except OSError:  # EINVAL where the filesystem has no direct I/O
            self._buffer = None

    @property
    def direct(self) -> bool:
        return self._buffer is not None

    def write(self, batch: list[bytes]) -> None:
        if self._buffer is None:
            self._writev(batch)
            return
        view = memoryview(self._buffer)
        for i, piece in enumerate(batch):
            data, at = memoryview(piece), 0
            while at < len(data):
                # The buffer holds less than a chunk here, so a chunk more always fits.
                n = min(len(data) - at, DIRECT_CHUNK)
                view[self._fill : self._fill + n] = data[at : at + n]
                self._fill += n
                at += n
                if self._fill >= DIRECT_CHUNK and not self._write_chunk(view):
                    self._writev([piece[at:], *batch[i + 1 :]])  # buffered from here on
                    return

    def _write_chunk(self, view: memoryview) -> bool:
        """Write the buffer's first chunk directly; False once writes fell back to buffered."""
        try:
            n = os.write(self._fd, view[:DIRECT_CHUNK])
        except OSError as err:
            if err.errno != errno.EINVAL:  # the file accepted O_DIRECT but not this write
                raise
            n = 0
        if n != DIRECT_CHUNK:  # a short write leaves the file offset unaligned
            self._buffered(view[n : self._fill])
            return False
        rest = self._fill - DIRECT_CHUNK
        view[:rest] = view[DIRECT_CHUNK : self._fill]
        self._fill = rest
        return True

    def _buffered(self, pending: memoryview) -> None:
        """From here on, plain buffered writes; `pending` is what the buffer still held."""
        fcntl.fcntl(self._fd, fcntl.F_SETFL, fcntl.fcntl(self._fd, fcntl.F_GETFL) & ~os.O_DIRECT)
        self._writev([bytes(pending)])
        self._drop_buffer()

    def _drop_buffer(self) -> None:
        # Not closed: views of it may still be alive up the stack; it goes with the last one.
        self._buffer = None
        self._fill = 0

    def _writev(self, batch: list[bytes]) -> None:
        # One writev per batch of segments: a GiB is ~1,000 system calls, not ~16,000.
        pieces = [piece for piece in batch if piece]  # the caller's list goes on to the uploader
        while pieces:
            n = os.writev(self._fd, pieces)
            while pieces and n >= len(pieces[0]):
                n -= len(pieces.pop(0))
            if n:
                pieces[0] = pieces[0][n:]

    def finish(self) -> None:
        """Write what the aligned buffer still holds: the object's last, unaligned bytes."""
        if self._buffer is not None:
            self._buffered(memoryview(self._buffer)[: self._fill])

    def sync(self) -> None:
        os.fsync(self._fd)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            os.close(self._fd)
        self._drop_buffer()

    def discard(self) -> None:
        self.close()
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()


def _unlink_all(paths: Iterable[Path]) -> None:
    for path in paths:
        path.unlink(missing_ok=True)


class _SealFailed(Exception):
    """Ends the upload's stream when encryption failed, so no truncated object is added."""


class SealAndUpload:
    """Encrypt plaintext under a fresh key (one thread) and upload the ciphertext as it comes
    (another thread), writing each batch of segments to a spool on the way.

    The uploader takes the batches from memory: reading the spool back cost a copy of every
    byte. An upload failure does not stop the encryption: the object still completes on disk.
    """

    def __init__(self, ipfs: IPFS, directory: Path, plaintext: Iterable[bytes]) -> None:
        self.key = format.new_content_key()
        self.spool = Spool(directory)
        self._ipfs = ipfs
        self._plaintext = plaintext
        self._salt: bytes | None = None
        self._size = 0
        self._cid: str | None = None
        self._seal_error: BaseException | None = None
        self._upload_error: str | None = None
        self._batches: queue.Queue[list[bytes] | None] = queue.Queue(UPLOAD_BATCHES)
        self._upload_over = threading.Event()
        self._aborted = False
        self._sealer = threading.Thread(target=self._seal, name="medfs-seal", daemon=True)
        self._uploader = threading.Thread(target=self._upload, name="medfs-upload", daemon=True)
        self._sealer.start()
        self._uploader.start()

    def _seal(self) -> None:
        batch: list[bytes] = []
        try:
            for piece in format.encrypt(self.key, self._counted()):
                if self._aborted:
                    return
                if self._salt is None:
                    self._salt = format.Header.parse(piece).salt
                batch.append(piece)
                if len(batch) == SPOOL_BATCH:
                    self._emit(batch)
                    batch = []
            if batch:
                self._emit(batch)
            self.spool.finish()
        except BaseException as err:  # reported when the draft commits
            self._seal_error = err
        finally:
            self._hand(None)

    def _emit(self, batch: list[bytes]) -> None:
        self._hand(batch)
        self.spool.write(batch)

    def _hand(self, batch: list[bytes] | None) -> None:
        # Once the upload has failed, nobody takes them: the spool alone goes on.
        while not self._upload_over.is_set():
            try:
                self._batches.put(batch, timeout=0.2)
                return
            except queue.Full:
                continue

    def _counted(self) -> Iterator[bytes]:
        for chunk in self._plaintext:
            self._size += len(chunk)
            yield chunk

    def _ciphertext(self) -> Iterator[bytes]:
        while (batch := self._batches.get()) is not None:
            yield from batch
        if self._seal_error is not None or self._aborted:
            raise _SealFailed

    def _upload(self) -> None:
        try:
            self._cid = self._ipfs.add(self._ciphertext())
        except _SealFailed:
            pass  # the sealer's error is the one reported
        except MedfsError as err:
            self._upload_error = err.message
        except Exception as err:  # anything else is still a failed upload, kept in staging
            self._upload_error = repr(err)
        finally:
            self._upload_over.set()

    def finish_sync(self) -> Sealed:
        """Wait for both threads (blocking). ContentError if the object could not be made."""
        self._sealer.join()
        self._uploader.join()
        if self._seal_error is not None:
            self.spool.discard()
            err = self._seal_error
            if isinstance(err, ContentError):
                raise err
            message = err.message if isinstance(err, MedfsError) else repr(err)
            raise ContentError(f"cannot encrypt the new version: {message}") from err
        assert self._salt is not None
        if self._cid is None:
            self.spool.sync()  # it must survive a crash until it is uploaded
        self.spool.close()
        return Sealed(
            self.key, self._salt, self._size, self.spool.path, self._cid, self._upload_error
        )

    def abort(self) -> None:
        """Give up (the file was deleted): stop, and remove the spool once the threads are
        done with it (closing it under the sealer could let it write into a reused fd)."""
        self._aborted = True

        def discard() -> None:
            self._sealer.join()
            self._uploader.join()
            self.spool.discard()

        threading.Thread(target=discard, name="medfs-abort", daemon=True).start()


class StreamFeed:
    """Plaintext writes of a sequential writer, handed to a SealAndUpload as they come."""

    def __init__(self, ipfs: IPFS, directory: Path) -> None:
        self._queue: queue.Queue[bytes | None] = queue.Queue(UPLOAD_QUEUE)
        self.job = SealAndUpload(ipfs, directory, self._chunks())
        self.size = 0

    def _chunks(self) -> Iterator[bytes]:
        while (item := self._queue.get()) is not None:
            yield item

    def _put(self, item: bytes | None) -> None:
        # The sealer only stops early on an encryption failure: then stop waiting for room.
        while self.job._sealer.is_alive():
            try:
                self._queue.put(item, timeout=0.2)
                return
            except queue.Full:
                continue

    async def write(self, data: bytes) -> None:
        try:
            self._queue.put_nowait(data)
        except queue.Full:
            await trio.to_thread.run_sync(self._put, data)
        self.size += len(data)

    async def finish(self) -> Sealed:
        def done() -> Sealed:
            self._put(None)
            return self.job.finish_sync()

        return await trio.to_thread.run_sync(done)

    def abort(self) -> None:
        # Aborted first: a sealer still busy with queued writes stops at its next segment.
        self.job.abort()
        with contextlib.suppress(queue.Full):
            self._queue.put_nowait(None)


class Draft:
    """The uncommitted content of one file. All methods hold the draft's lock."""

    def __init__(self, reader: Reader, staging: Staging, base: Version | None, size: int) -> None:
        self.reader = reader
        self.staging = staging
        self.base = base
        self.size = size
        # Bytes of `base` still visible: truncation hides its tail even if the file regrows.
        self.base_visible = min(size, base.size) if base else 0
        self.dirty = False
        self.mtime_ns = 0  # what the new version's mtime will be: last write or utimens
        self.lock = trio.Lock()
        self._stream: StreamFeed | None = None
        self._small = bytearray()  # all of a streamable file until it outgrows SMALL_FILE
        self._staged: StagedFile | None = None
        self._garbage: list[str] = []  # temporary objects to unpin once committed
        self._garbage_spools: list[Path] = []  # and their local copies

    @property
    def _streamable(self) -> bool:
        return self._staged is None and self.base_visible == 0

    @property
    def _in_memory(self) -> bool:
        return self._streamable and self._stream is None

    # -- blocks -------------------------------------------------------------------------------

    def _block_sync(self, index: int) -> bytes:
        """The current plaintext of block `index`, without zero padding past its data."""
        if self._staged is not None and index in self._staged.blocks:
            return self._staged.read(index)
        start = index * SEG
        if self.base is not None and start < self.base_visible:
            data = self.reader.segments(self.base, index, index)[0]
            return data[: self.base_visible - start]
        return b""

    def _write_sync(self, offset: int, data: bytes) -> None:
        assert self._staged is not None
        end = offset + len(data)
        pos = offset
        while pos < end:
            index = pos // SEG
            block_start = index * SEG
            take = min(end, block_start + SEG) - pos
            piece = data[pos - offset : pos - offset + take]
            if pos == block_start and take == SEG:
                block = piece
            else:
                old = bytearray(self._block_sync(index))
                within = pos - block_start
                if len(old) < within:
                    old += bytes(within - len(old))
                old[within : within + take] = piece
                block = bytes(old)
            self._staged.write(index, block)
            pos += take
        self.size = max(self.size, end)

    def _truncate_sync(self, size: int) -> None:
        assert self._staged is not None
        if size < self.size:
            keep = -(-size // SEG)
            for index in [i for i in self._staged.blocks if i >= keep]:
                self._staged.drop(index)
            if size % SEG:
                index = size // SEG
                block = self._block_sync(index)[: size % SEG]
                self._staged.write(index, block)
            self.base_visible = min(self.base_visible, size)
        self.size = size

    def _read_sync(self, offset: int, length: int) -> bytes:
        end = min(offset + length, self.size)
        out = bytearray()
        pos = offset
        while pos < end:
            index = pos // SEG
            block = self._block_sync(index)
            within = pos - index * SEG
            take = min(end, (index + 1) * SEG) - pos
            piece = block[within : within + take]
            out += piece + bytes(take - len(piece))  # holes read as zeros
            pos += take
        return bytes(out)

    async def _to_overlay(self) -> None:
        """Leave streaming mode: what was streamed becomes the base, further changes overlay it."""
        if self._staged is not None:
            return
        stream, self._stream = self._stream, None
        if stream is not None:
            sealed = await stream.finish()
            # A temporary object: read back from its local copy, dropped at the next commit.
            self.base = Version(f"spool:{sealed.spool.name}", sealed.key, sealed.salt,
                                sealed.size, local=sealed.spool)  # fmt: skip
            self.base_visible = sealed.size
            self._garbage_spools.append(sealed.spool)
            if sealed.cid is not None:
                self._garbage.append(sealed.cid)
        self._staged = self.staging.new_file()
        small, self._small = bytes(self._small), bytearray()
        if small:
            await trio.to_thread.run_sync(self._write_sync, 0, small)

    # -- operations ---------------------------------------------------------------------------

    async def write(self, offset: int, data: bytes) -> None:
        async with self.lock:
            self.dirty = True
            if self._streamable and offset == self.size:
                if self._stream is None and self.size + len(data) <= SMALL_FILE:
                    self._small += data
                    self.size += len(data)
                    return
                if self._stream is None:
                    self._stream = StreamFeed(self.reader.ipfs, self.staging.directory)
                    small, self._small = bytes(self._small), bytearray()
                    if small:
                        await self._stream.write(small)
                await self._stream.write(data)
                self.size += len(data)
                return
            await self._to_overlay()
            await trio.to_thread.run_sync(self._write_sync, offset, data)

    async def truncate(self, size: int) -> None:
        async with self.lock:
            if size == self.size:
                return
            self.dirty = True
            if size == 0 and self._stream is None:
                # Nothing of the old content stays: the file starts over as a new one, held
                # in memory while small and committed in a group (`cp` onto an existing file).
                self.size = self.base_visible = 0
                self._small = bytearray()
                if self._staged is not None:
                    self._staged.close()
                    self._staged = None
                return
            await self._to_overlay()
            await trio.to_thread.run_sync(self._truncate_sync, size)

    async def read(self, offset: int, length: int) -> bytes:
        async with self.lock:
            if self._in_memory:
                return bytes(self._small[offset : offset + length])
            if self._stream is not None:
                await self._to_overlay()
            return await trio.to_thread.run_sync(self._read_sync, offset, length)

    async def commit(self) -> Sealed | None:
        """Encrypt the draft as a new version under a fresh key and upload it; None when
        nothing changed. The result is uploaded (`cid`) or, if the node failed, complete in
        the staging area (`spool`). The draft stays usable, based on the new version."""
        async with self.lock:
            if not self.dirty:
                return None
            if self._stream is not None:
                stream, self._stream = self._stream, None
                sealed = await stream.finish()
            elif self._in_memory:
                small, self._small = bytes(self._small), bytearray()
                if len(small) <= SEG:  # one segment: cheaper to seal here than to hand off
                    sealed = seal_small(self.staging, small)
                else:
                    sealed = await trio.to_thread.run_sync(seal_small, self.staging, small)
            else:
                job = SealAndUpload(
                    self.reader.ipfs, self.staging.directory, self._blocks_for_upload()
                )
                sealed = await trio.to_thread.run_sync(job.finish_sync)
            kept: tuple[Path, str, int] | None = None
            if sealed.cid is not None:
                self.base = Version(sealed.cid, sealed.key, sealed.salt, sealed.size)
                # Uploaded: its spool becomes the version's local copy, or goes.
                kept = (sealed.spool, sealed.cid, layout.ciphertext_size(sealed.size))
            else:
                self.base = Version(f"spool:{sealed.spool.name}", sealed.key, sealed.salt,
                                    sealed.size, local=sealed.spool)  # fmt: skip
            self.base_visible = self.size = sealed.size
            if self._staged is not None:
                self._staged.close()
                self._staged = None
            self.dirty = False
            garbage, self._garbage_spools = self._garbage_spools, []
            if garbage or kept:
                # Big files' spools: dropping a GiB of one from the page cache takes ~0.08 s
                # here, which no request to the mount should wait behind.
                await trio.to_thread.run_sync(self._settle, kept, garbage)
            return sealed

    def _settle(self, kept: tuple[Path, str, int] | None, garbage: list[Path]) -> None:
        copies = self.reader.copies
        if kept is not None:
            spool, cid, size = kept
            if copies is not None and copies.keep(spool, cid, size):
                if copies.over_limit:
                    copies.trim()
            else:
                garbage.append(spool)
        _unlink_all(garbage)

    def rebase(self, old: Path, new: Version) -> None:
        """The pending object `old` was uploaded as `new` (same key and bytes)."""
        if self.base is not None and self.base.local == old:
            self.base = new

    def _blocks_for_upload(self) -> Iterator[bytes]:
        count = -(-self.size // SEG)
        index = 0
        while index < count:
            # Base segments come in batches: one range request per COMMIT_BATCH segments.
            batch_end = min(count, index + COMMIT_BATCH)
            base_last = (
                min(batch_end, -(-self.base_visible // SEG)) - 1 if self.base is not None else -1
            )
            base_segments: dict[int, bytes] = {}
            staged = self._staged.blocks if self._staged is not None else set()
            wanted = [i for i in range(index, base_last + 1) if i not in staged]
            if wanted and self.base is not None:
                got = self.reader.segments(self.base, wanted[0], wanted[-1])
                base_segments = dict(zip(range(wanted[0], wanted[-1] + 1), got, strict=True))
            for i in range(index, batch_end):
                if i in staged:
                    assert self._staged is not None
                    block = self._staged.read(i)
                elif i in base_segments:
                    block = base_segments[i][: max(0, self.base_visible - i * SEG)]
                else:
                    block = b""
                want = min(SEG, self.size - i * SEG)
                yield block[:want] + bytes(want - len(block[:want]))
            index = batch_end

    def take_garbage(self) -> list[str]:
        garbage, self._garbage = self._garbage, []
        return garbage

    def discard(self) -> None:
        self._small = bytearray()
        if self._stream is not None:
            self._stream.abort()
            self._stream = None
        if self._staged is not None:
            self._staged.close()
            self._staged = None
        _unlink_all(self._garbage_spools)
        self._garbage_spools = []


def pending_key(manifest_key: bytes) -> bytes:
    """The key that seals pending-upload records: derived, so it needs no storage of its own."""
    return HKDF(
        algorithm=hashes.SHA256(), length=32, salt=None, info=b"medfs v1 pending uploads"
    ).derive(manifest_key)


@dataclass(frozen=True)
class PendingRecord:
    """A committed-on-close version whose upload is still to come: the start of `spool` is its
    whole encrypted object. `saved_ns` is when it was recorded (the file's mtime)."""

    ino: int
    spool: Path
    key: bytes
    salt: bytes
    size: int
    mtime_ns: int
    saved_ns: int

    def version(self) -> Version:
        return Version(f"spool:{self.spool.name}", self.key, self.salt, self.size, self.spool)

    def chunks(self, size: int = 1 << 20) -> Iterator[bytes]:
        """The object's bytes, without the record after them (blocking)."""
        left = layout.ciphertext_size(self.size)
        with open(self.spool, "rb") as fh:
            while left:
                chunk = fh.read(min(left, size))
                if not chunk:
                    raise OSError(errno.EIO, f"{self.spool.name} is shorter than its object")
                left -= len(chunk)
                yield chunk


class PendingStore:
    """Versions waiting for the node, kept in the staging area across restarts.

    Each is one file, `*.obj`: its complete encrypted object, then a record (inode, content
    key, salt, size, mtime) sealed under a key derived from the manifest key, the record's
    length and a marker. Nothing in the staging area is readable without the owner's key.
    One file, not an object and a record beside it: a copy of many small files creates and
    deletes one file each here, and renames none. An object with no record yet (the daemon
    died before its close returned) has no marker. Layout: docs/FORMAT.md §8.
    """

    AAD = b"medfs v1 pending upload"
    MAGIC = b"medfs-p1"
    _TAIL = 4 + len(MAGIC)  # the record's length, then the marker
    _MAX_RECORD = 4096

    def __init__(self, directory: Path, key: bytes) -> None:
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.directory = directory
        self._aead = AESGCM(key)

    def save(
        self, ino: int, sealed: Sealed, mtime_ns: int, *, synced: bool = True
    ) -> PendingRecord:
        """Record `sealed` as waiting for upload, after its object. Without `synced` nothing
        is fsynced: the record survives the daemon being killed, and `sync` makes it survive
        a power cut."""
        body = json.dumps({
            "ino": ino, "key": sealed.key.hex(), "salt": sealed.salt.hex(), "size": sealed.size,
            "mtime_ns": mtime_ns,
        }).encode()  # fmt: skip
        nonce = os.urandom(12)
        saved_ns = self._append(
            sealed.spool, nonce + self._aead.encrypt(nonce, body, self.AAD), synced=synced
        )
        if synced:
            self._sync_directory()
        return PendingRecord(
            ino, sealed.spool, sealed.key, sealed.salt, sealed.size, mtime_ns, saved_ns
        )

    def _append(self, path: Path, sealed_record: bytes, *, synced: bool) -> int:
        """Write the record after the object at `path`; the file's new mtime."""
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC)
        try:
            tail = len(sealed_record).to_bytes(4, "big") + self.MAGIC
            durable.write_all(fd, sealed_record + tail)
            if synced:
                os.fsync(fd)
            return os.fstat(fd).st_mtime_ns
        finally:
            os.close(fd)

    def sync(self, records: Iterable[PendingRecord]) -> None:
        """Make records saved without `synced` survive a power cut (blocking)."""
        for record in records:
            with contextlib.suppress(FileNotFoundError):  # uploaded meanwhile
                durable.fsync_path(record.spool)
        self._sync_directory()

    def _sync_directory(self) -> None:
        durable.fsync_path(self.directory, directory=True)  # the names must survive a crash

    def load(self) -> list[PendingRecord]:
        """Every version recorded here. A file whose record cannot be used (damaged, sealed
        under another mount's key, its object cut short) is logged and left in place."""
        self._adopt_separate_records()
        found = []
        for path in sorted(self.directory.glob("*.obj")):
            try:
                record = self._read(path)
            except (OSError, ValueError, KeyError, InvalidTag) as err:
                log.error("staging file %s cannot be read (%r); it is left in place", path, err)
                continue
            if record is not None:
                found.append(record)
        return found

    def _read(self, path: Path) -> PendingRecord | None:
        """The version recorded at the end of `path`; None if it has no record."""
        with open(path, "rb") as fh:
            end = fh.seek(0, os.SEEK_END)
            sealed = self._sealed_record(fh, end)
            saved_ns = os.fstat(fh.fileno()).st_mtime_ns
        if sealed is None:
            return None
        body = json.loads(self._aead.decrypt(sealed[:12], sealed[12:], self.AAD))
        record = PendingRecord(
            int(body["ino"]), path, bytes.fromhex(body["key"]), bytes.fromhex(body["salt"]),
            int(body["size"]), int(body["mtime_ns"]), saved_ns,
        )  # fmt: skip
        if layout.ciphertext_size(record.size) != end - self._TAIL - len(sealed):
            raise ValueError("its object is not the size its record states")
        return record

    def _sealed_record(self, fh: BinaryIO, end: int) -> bytes | None:
        if not self._marked(fh, end):
            return None
        fh.seek(end - self._TAIL)
        length = int.from_bytes(fh.read(4), "big")
        if length > min(self._MAX_RECORD, end - self._TAIL):
            raise ValueError(f"its record's length ({length}) is out of range")
        fh.seek(end - self._TAIL - length)
        return fh.read(length)

    def _marked(self, fh: BinaryIO, end: int) -> bool:
        if end < self._TAIL:
            return False
        fh.seek(end - len(self.MAGIC))
        return fh.read() == self.MAGIC

    def _has_record(self, path: Path) -> bool:
        with open(path, "rb") as fh:
            return self._marked(fh, fh.seek(0, os.SEEK_END))

    def _adopt_separate_records(self) -> None:
        """Staging areas written before one file per version kept each record in `X.pending`
        beside its object `X.obj`, with the same sealed bytes: append it to its object."""
        for old in self.directory.glob("*.pending"):
            obj = old.with_suffix(".obj")
            if not obj.is_file():
                log.error("staging record %s has lost its object; it is left in place", old)
                continue
            if not self._has_record(obj):  # else a crash came between append and unlink
                self._append(obj, old.read_bytes(), synced=True)
            old.unlink()
            self._sync_directory()

    def remove(self, record: PendingRecord) -> None:
        with contextlib.suppress(FileNotFoundError):
            record.spool.unlink()

    def sweep(self) -> tuple[int, int]:
        """Delete what a crash left: objects without a record (their close never returned),
        records of the earlier layout never renamed into place (`*.tmp`), and empty files
        (made ahead for closes, `Staging.fresh_object`). For a mount's start, after `load`,
        before anything new is saved. How many were unfinished, and how many empty."""
        unfinished = empty = 0
        for path in self.directory.glob("*.obj"):
            with contextlib.suppress(FileNotFoundError):
                if not self._has_record(path):
                    was_empty = path.stat().st_size == 0
                    path.unlink()
                    empty += was_empty
                    unfinished += not was_empty
        for path in self.directory.glob("*.tmp"):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
                unfinished += 1
        return unfinished, empty
