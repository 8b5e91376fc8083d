"""File contents between the filesystem and IPFS: reading versions, staging drafts, uploading.

A committed *version* of a file is one encrypted object on IPFS. Reading it fetches only the
segments a read needs (one range request, plus read-ahead on sequential access) and keeps
decrypted segments in a bounded LRU cache.

A *draft* is what a file becomes while it is written. A file written from its start, in order
(cp, rsync, tar, dd), streams: each write is encrypted and sent into a running IPFS add, so a
closed file is already uploaded and there is no second pass over the data. Any other pattern
(random writes, in-place edits, truncation, reading back while writing) turns the draft into an
overlay of 64 KiB blocks over a base version; changed blocks live in the staging area, encrypted
under a key that exists only in this process's memory, and commit re-encrypts the whole file
under a fresh content key.

Nothing here knows FUSE. Blocking work (HTTP to Kubo, encrypting or decrypting more than a few
segments, staging I/O) runs in worker threads; the async methods are safe on the trio thread.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import queue
import tempfile
import threading
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import trio
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from medfs import format, layout
from medfs.errors import FormatError, IPFSError
from medfs.ipfs import IPFS

log = logging.getLogger(__name__)

SEG = layout.SEGMENT_SIZE
# Sequential reads fetch ahead in growing windows up to this many segments (4 MiB).
MAX_READAHEAD = 64
# How many write chunks may wait for the uploader before a writer blocks (about 16 MiB).
UPLOAD_QUEUE = 16
# How many segments an overlay commit reads from its base in one range request.
COMMIT_BATCH = 64


@dataclass(frozen=True)
class Version:
    """One committed, encrypted object. `key` is the unwrapped content key: memory only."""

    cid: str
    key: bytes
    salt: bytes
    size: int

    def reader(self, ipfs: IPFS) -> format.ObjectReader:
        return format.ObjectReader(
            self.key,
            lambda offset, length: ipfs.cat(self.cid, offset, length),
            layout.ciphertext_size(self.size),
            header=format.Header(self.salt),
        )


@dataclass(frozen=True)
class Uploaded:
    """A freshly added object: what the manifest records for a new version."""

    cid: str
    salt: bytes
    size: int


class ContentError(Exception):
    """A content operation failed; `errno` is what the filesystem should answer."""

    def __init__(self, message: str, err: int = errno.EIO) -> None:
        super().__init__(message)
        self.errno = err


@contextlib.contextmanager
def _as_content_error(what: str) -> Iterator[None]:
    try:
        yield
    except (IPFSError, FormatError) as err:
        raise ContentError(f"{what}: {err.message}") from err


class SegmentCache:
    """Decrypted segments of committed versions, least recently used first out."""

    def __init__(self, limit_bytes: int) -> None:
        self.limit = limit_bytes
        self._items: OrderedDict[tuple[str, int], bytes] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()  # shared by the trio thread and workers

    def get(self, cid: str, index: int) -> bytes | None:
        with self._lock:
            data = self._items.get((cid, index))
            if data is not None:
                self._items.move_to_end((cid, index))
            return data

    def put(self, cid: str, index: int, data: bytes) -> None:
        with self._lock:
            old = self._items.pop((cid, index), None)
            if old is not None:
                self._bytes -= len(old)
            self._items[(cid, index)] = data
            self._bytes += len(data)
            while self._bytes > self.limit and self._items:
                _, dropped = self._items.popitem(last=False)
                self._bytes -= len(dropped)


class Reader:
    """Reads of committed versions through the segment cache."""

    def __init__(self, ipfs: IPFS, cache: SegmentCache) -> None:
        self.ipfs = ipfs
        self.cache = cache

    def _cached(self, v: Version, first: int, last: int) -> list[bytes] | None:
        out = []
        for index in range(first, last + 1):
            data = self.cache.get(v.cid, index)
            if data is None:
                return None
            out.append(data)
        return out

    def segments(self, v: Version, first: int, last: int, ahead: int = 0) -> list[bytes]:
        """Plaintext segments first..last (blocking). Misses are fetched in one range request,
        extended by `ahead` segments that are cached for the reads to come."""
        hit = self._cached(v, first, last)
        if hit is not None:
            return hit
        count = layout.segment_count(v.size)
        start = first
        while self.cache.get(v.cid, start) is not None:
            start += 1
        stop = min(count - 1, max(last, last + ahead))
        with _as_content_error(f"cannot read {v.cid}"):
            data = v.reader(self.ipfs).read(start * SEG, (stop - start + 1) * SEG)
        fetched = {}
        for i, index in enumerate(range(start, stop + 1)):
            piece = data[i * SEG : (i + 1) * SEG]
            fetched[index] = piece
            self.cache.put(v.cid, index, piece)
        return [fetched[i] if i in fetched else self._must(v, i) for i in range(first, last + 1)]

    def _must(self, v: Version, index: int) -> bytes:
        data = self.cache.get(v.cid, index)
        if data is None:  # evicted between the checks above: fetch it alone
            with _as_content_error(f"cannot read {v.cid}"):
                data = v.reader(self.ipfs).read(index * SEG, SEG)
        return data

    def read_sync(self, v: Version, offset: int, length: int, ahead: int = 0) -> bytes:
        end = min(offset + length, v.size)
        if end <= offset:
            return b""
        first, last = offset // SEG, (end - 1) // SEG
        joined = b"".join(self.segments(v, first, last, ahead))
        skip = offset - first * SEG
        return joined[skip : skip + end - offset]

    async def read(self, v: Version, offset: int, length: int, ahead: int = 0) -> bytes:
        end = min(offset + length, v.size)
        if end <= offset:
            return b""
        first, last = offset // SEG, (end - 1) // SEG
        hit = self._cached(v, first, last)
        if hit is not None:  # the common case of sequential reads after read-ahead: no thread hop
            skip = offset - first * SEG
            return b"".join(hit)[skip : skip + end - offset]
        return await trio.to_thread.run_sync(self.read_sync, v, offset, length, ahead)


class Staging:
    """Scratch space for drafts, encrypted under a key that lives only in this process.

    Files are unlinked as soon as they are created, so a crash leaves nothing behind but
    ciphertext whose key died with the process. The total is bounded: past `limit_bytes` a
    write fails with ENOSPC.
    """

    RECORD = 4 + 12 + SEG + 16  # length | nonce | ciphertext+tag

    def __init__(self, directory: Path, limit_bytes: int) -> None:
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.directory = directory
        self.limit = limit_bytes
        self._aead = AESGCM(AESGCM.generate_key(bit_length=256))
        self._used = 0
        self._lock = threading.Lock()

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


class StreamUpload:
    """An IPFS add running in its own thread, fed plaintext chunks, encrypting as it goes."""

    _END = b""

    def __init__(self, ipfs: IPFS, key: bytes) -> None:
        self.key = key
        self.size = 0
        self._queue: queue.Queue[bytes | None] = queue.Queue(UPLOAD_QUEUE)
        self._ipfs = ipfs
        self._salt: bytes | None = None
        self._cid: str | None = None
        self._error: BaseException | None = None
        self._aborted = False
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, name="medfs-upload", daemon=True)
        self._thread.start()

    def _chunks(self) -> Iterator[bytes]:
        while True:
            item = self._queue.get()
            if item is None:
                if self._aborted:
                    raise ContentError("upload aborted")
                return
            yield item

    def _encrypted(self) -> Iterator[bytes]:
        stream = format.encrypt(self.key, self._chunks())
        header = next(stream)
        self._salt = format.Header.parse(header).salt
        yield header
        yield from stream

    def _run(self) -> None:
        try:
            self._cid = self._ipfs.add(self._encrypted())
        except BaseException as err:  # reported to the writer when it finishes
            self._error = err
        finally:
            self._done.set()

    def _put(self, item: bytes | None) -> None:
        while not self._done.is_set():
            try:
                self._queue.put(item, timeout=0.2)
                return
            except queue.Full:
                continue
        self._raise()

    def _raise(self) -> None:
        err = self._error
        if isinstance(err, ContentError):
            raise err
        if isinstance(err, IPFSError | FormatError):
            raise ContentError(f"upload failed: {err.message}") from err
        raise ContentError(f"upload failed: {err!r}") from err

    async def write(self, data: bytes) -> None:
        if self._done.is_set():
            self._raise()
        try:
            self._queue.put_nowait(data)
        except queue.Full:
            await trio.to_thread.run_sync(self._put, data)
        self.size += len(data)

    async def finish(self) -> Uploaded:
        await trio.to_thread.run_sync(self._finish_sync)
        assert self._cid is not None and self._salt is not None
        return Uploaded(self._cid, self._salt, self.size)

    def _finish_sync(self) -> None:
        with contextlib.suppress(ContentError):
            self._put(None)
        self._thread.join()
        if self._error is not None:
            self._raise()

    def abort(self) -> None:
        """Stop feeding; whatever was added is garbage for the caller to unpin (if any)."""
        self._aborted = True
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
        self._stream: StreamUpload | None = None
        self._staged: StagedFile | None = None
        self._garbage: list[str] = []  # temporary objects to unpin once committed

    @property
    def _streamable(self) -> bool:
        return self._staged is None and self.base_visible == 0

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
            uploaded = await stream.finish()
            self._garbage.append(uploaded.cid)
            self.base = Version(uploaded.cid, stream.key, uploaded.salt, uploaded.size)
            self.base_visible = uploaded.size
        self._staged = self.staging.new_file()

    # -- operations ---------------------------------------------------------------------------

    async def write(self, offset: int, data: bytes) -> None:
        async with self.lock:
            self.dirty = True
            if self._streamable and offset == self.size:
                if self._stream is None:
                    self._stream = StreamUpload(self.reader.ipfs, format.new_content_key())
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
            if self._streamable and size == 0 and self._stream is None:
                self.size = 0
                return
            await self._to_overlay()
            await trio.to_thread.run_sync(self._truncate_sync, size)

    async def read(self, offset: int, length: int) -> bytes:
        async with self.lock:
            if self._stream is not None:
                await self._to_overlay()
            return await trio.to_thread.run_sync(self._read_sync, offset, length)

    async def commit(self) -> tuple[Uploaded, bytes] | None:
        """Upload the draft as a new version; return it and its content key, or None when
        nothing changed. Stays usable: the new version becomes the base of further writes."""
        async with self.lock:
            if not self.dirty:
                return None
            if self._stream is not None:
                stream, self._stream = self._stream, None
                uploaded = await stream.finish()
                key = stream.key
            else:
                key = format.new_content_key()
                uploaded = await trio.to_thread.run_sync(self._upload_overlay_sync, key)
            self.base = Version(uploaded.cid, key, uploaded.salt, uploaded.size)
            self.base_visible = self.size = uploaded.size
            if self._staged is not None:
                self._staged.close()
                self._staged = None
            self.dirty = False
            return uploaded, key

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

    def _upload_overlay_sync(self, key: bytes) -> Uploaded:
        encrypted = format.encrypt(key, self._blocks_for_upload())
        header = next(encrypted)
        salt = format.Header.parse(header).salt

        def stream() -> Iterator[bytes]:
            yield header
            yield from encrypted

        with _as_content_error("cannot upload the new version"):
            cid = self.reader.ipfs.add(stream())
        return Uploaded(cid, salt, self.size)

    def take_garbage(self) -> list[str]:
        garbage, self._garbage = self._garbage, []
        return garbage

    def discard(self) -> None:
        if self._stream is not None:
            self._stream.abort()
            self._stream = None
        if self._staged is not None:
            self._staged.close()
            self._staged = None
