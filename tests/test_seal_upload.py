"""SealAndUpload's hand-offs between its sealer and uploader threads: the pure logic, with a
node that records what it was sent. Real nodes, killed mid-copy, are in test_reliability."""

from __future__ import annotations

import errno
import fcntl
import os
import threading
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

import pytest

from medfs import format
from medfs.content import DIRECT_CHUNK, SPOOL_BATCH, ContentError, SealAndUpload, Spool
from medfs.errors import IPFSError

SEG = format.SEGMENT_SIZE


class RecordingNode:
    """Takes an upload's stream; fails after `fail_after` chunks if asked to."""

    def __init__(self, fail_after: int | None = None) -> None:
        self.fail_after = fail_after
        self.received = bytearray()
        self.completed = False

    def add(self, data: Iterable[bytes], *, pin: bool = True) -> str:
        for n, chunk in enumerate(data):
            if n == self.fail_after:
                raise IPFSError("the node went away")
            self.received += chunk
        self.completed = True
        return "bafkreirecorded"


def pieces(total: int, size: int = 1 << 20) -> Iterator[bytes]:
    for offset in range(0, total, size):
        yield os.urandom(min(size, total - offset))


def test_the_upload_and_the_spool_get_the_same_ciphertext(tmp_path: Path) -> None:
    plaintext = b"".join(pieces(5 * SPOOL_BATCH * SEG + 12345))
    node = RecordingNode()
    writes = [plaintext[i : i + 300_000] for i in range(0, len(plaintext), 300_000)]
    sealed = SealAndUpload(node, tmp_path, writes).finish_sync()  # type: ignore[arg-type]
    assert sealed.cid == "bafkreirecorded" and sealed.error is None
    assert sealed.size == len(plaintext)
    spooled = sealed.spool.read_bytes()
    assert bytes(node.received) == spooled
    assert format.decrypt_bytes(sealed.key, spooled) == plaintext


def test_a_failed_upload_leaves_the_whole_object_in_the_spool(tmp_path: Path) -> None:
    plaintext = b"".join(pieces(3 * SPOOL_BATCH * SEG))
    node = RecordingNode(fail_after=5)
    sealed = SealAndUpload(node, tmp_path, [plaintext]).finish_sync()  # type: ignore[arg-type]
    assert sealed.cid is None and sealed.error == "the node went away"
    assert format.decrypt_bytes(sealed.key, sealed.spool.read_bytes()) == plaintext


def test_an_encryption_failure_never_completes_an_upload(tmp_path: Path) -> None:
    def broken() -> Iterator[bytes]:
        yield from pieces(2 * SPOOL_BATCH * SEG)
        raise OSError(5, "the draft could not be read")

    node = RecordingNode()
    job = SealAndUpload(node, tmp_path, broken())  # type: ignore[arg-type]
    with pytest.raises(ContentError, match="cannot encrypt the new version"):
        job.finish_sync()
    # A truncated object, had it been added, would have been pinned and then forgotten.
    assert not node.completed
    assert list(tmp_path.iterdir()) == []


def test_abort_stops_the_sealer_and_removes_the_spool_once_it_is_done(tmp_path: Path) -> None:
    gate = threading.Event()

    def slow() -> Iterator[bytes]:
        for chunk in pieces(64 * SEG):
            gate.wait()
            yield chunk

    node = RecordingNode()
    job = SealAndUpload(node, tmp_path, slow())  # type: ignore[arg-type]
    job.abort()
    gate.set()
    deadline = time.monotonic() + 10
    while list(tmp_path.iterdir()) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert list(tmp_path.iterdir()) == []
    assert not node.completed


def test_spool_write_survives_short_writes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real = os.writev

    def short(fd: int, buffers: list[bytes]) -> int:
        # At most 1,000 bytes a call: batches end mid-piece and mid-batch.
        first = bytes(buffers[0])[:1000]
        return real(fd, [first])

    monkeypatch.setattr(os, "writev", short)
    spool = Spool(tmp_path)
    parts = [os.urandom(n) for n in (10, 2500, 1, 999, 4096)]
    spool.write(list(parts))
    spool.finish()
    spool.close()
    assert spool.path.read_bytes() == b"".join(parts)


def odd_pieces() -> list[bytes]:
    # Across several direct chunks, chunk edges falling inside pieces, one piece over a chunk.
    sizes = [SEG + 16, 37, DIRECT_CHUNK + 5, 1, *[SEG + 16] * 40, 4096, 3 * SEG]
    return [os.urandom(n) for n in sizes]


def direct_spool(tmp_path: Path) -> Spool:
    spool = Spool(tmp_path)
    if not spool.direct:
        spool.discard()
        pytest.skip(f"the filesystem of {tmp_path} refuses O_DIRECT")
    return spool


def test_a_direct_spool_writes_every_byte_in_order(tmp_path: Path) -> None:
    spool = direct_spool(tmp_path)
    parts = odd_pieces()
    spool.write(parts[:3])
    spool.write(parts[3:])
    assert fcntl.fcntl(spool._fd, fcntl.F_GETFL) & os.O_DIRECT
    spool.finish()
    spool.close()
    assert spool.path.read_bytes() == b"".join(parts)


@pytest.mark.parametrize("failure", ["EINVAL", "short"])
def test_a_direct_spool_falls_back_to_buffered_writes_mid_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, failure: str
) -> None:
    spool = direct_spool(tmp_path)
    real, calls = os.write, []

    def refusing(fd: int, data: memoryview) -> int:
        if fd != spool._fd:
            return real(fd, data)
        calls.append(len(data))
        if len(calls) == 2:  # the second chunk: the file already has one written directly
            if failure == "EINVAL":
                raise OSError(errno.EINVAL, "Invalid argument")
            return real(fd, data[:4096])  # aligned, but short
        return real(fd, data)

    monkeypatch.setattr(os, "write", refusing)
    parts = odd_pieces()
    spool.write(parts)
    assert not spool.direct and len(calls) == 2
    assert not fcntl.fcntl(spool._fd, fcntl.F_GETFL) & os.O_DIRECT
    spool.finish()
    spool.close()
    assert spool.path.read_bytes() == b"".join(parts)


def test_a_spool_is_buffered_where_the_filesystem_refuses_o_direct(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = fcntl.fcntl

    def no_direct(fd: int, cmd: int, arg: int = 0) -> int:
        if cmd == fcntl.F_SETFL and arg & os.O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real(fd, cmd, arg)

    monkeypatch.setattr(fcntl, "fcntl", no_direct)
    spool = Spool(tmp_path)
    assert not spool.direct
    parts = odd_pieces()
    spool.write(parts)
    spool.finish()
    spool.close()
    assert spool.path.read_bytes() == b"".join(parts)
