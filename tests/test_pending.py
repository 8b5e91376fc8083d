"""PendingStore: the records that let the next mount upload and commit what was closed while
the node was away, or before a crash. Real mounts that crash and recover are in
test_reliability; this is the store's own contract."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from medfs import format
from medfs.content import PendingRecord, PendingStore, Staging, seal_small

KEY = bytes(range(32))
T0 = 1_700_000_000_000_000_000


@pytest.fixture
def store(tmp_path: Path) -> PendingStore:
    return PendingStore(tmp_path / "staging", KEY)


def saved(store: PendingStore, ino: int, *, synced: bool = False) -> PendingRecord:
    sealed = seal_small(Staging(store.directory, 1 << 30), os.urandom(1000 + ino))
    return store.save(ino, sealed, T0 + ino, synced=synced)


def test_a_saved_record_loads_back_as_it_was(store: PendingStore) -> None:
    records = [saved(store, 7), saved(store, 8, synced=True)]
    loaded = sorted(store.load(), key=lambda r: r.ino)
    assert loaded == records
    assert [r.size for r in loaded] == [1007, 1008]
    assert sorted(store.directory.iterdir()) == sorted(r.spool for r in records)  # one file each


def test_the_object_uploaded_is_the_sealed_one_without_its_record(store: PendingStore) -> None:
    plaintext = os.urandom(200_000)  # several segments, read back in several chunks
    sealed = seal_small(Staging(store.directory, 1 << 30), plaintext)
    ciphertext = sealed.spool.read_bytes()
    record = store.save(9, sealed, T0)
    assert record.spool.stat().st_size > len(ciphertext)
    assert b"".join(record.chunks(size=50_000)) == ciphertext
    assert format.decrypt_bytes(record.key, b"".join(record.chunks())) == plaintext


def test_a_record_keeps_its_key_and_inode_sealed(store: PendingStore) -> None:
    record = saved(store, 123456)
    raw = record.spool.read_bytes()
    assert record.key not in raw and record.key.hex().encode() not in raw
    # Five bytes or more: a three-byte word turns up in a kilobyte of ciphertext once a 10^4.
    assert b"123456" not in raw and b'"ino"' not in raw


def test_records_that_cannot_be_used_are_left_in_place(store: PendingStore) -> None:
    altered = saved(store, 1)
    raw = bytearray(altered.spool.read_bytes())
    raw[-13] ^= 1  # the record's last byte, before its length and marker
    altered.spool.write_bytes(bytes(raw))
    cut = saved(store, 2)
    cut.spool.write_bytes(cut.spool.read_bytes()[1:])  # its object lost a byte
    too_long = store.directory / f"{os.urandom(12).hex()}.obj"  # states a record past its start
    too_long.write_bytes(os.urandom(100) + (1 << 20).to_bytes(4, "big") + PendingStore.MAGIC)
    foreign = PendingStore(store.directory, bytes(32)).load()  # another mount's key
    good = saved(store, 3)
    assert store.load() == [good]
    assert foreign == []
    assert store.sweep() == (0, 0)  # kept for a person to look at
    assert altered.spool.exists() and cut.spool.exists() and too_long.exists()


def test_sweep_removes_what_a_crash_left_and_nothing_a_record_keeps(store: PendingStore) -> None:
    kept = saved(store, 1)
    staging = Staging(store.directory, 1 << 30)
    orphan = seal_small(staging, b"closed, but the daemon died before its record")
    empty = store.directory / f"{os.urandom(12).hex()}.obj"  # died right after creating it
    empty.touch()
    torn = store.directory / f"{os.urandom(12).hex()}.tmp"  # the earlier layout's torn record
    torn.write_bytes(b"half a rec")
    assert store.load() == [kept]
    assert store.sweep() == (2, 1)  # the orphan and the torn record; the empty one
    assert not orphan.spool.exists() and not empty.exists() and not torn.exists()
    assert store.load() == [kept]
    assert store.sweep() == (0, 0)


def _empty_objects(directory: Path) -> set[Path]:
    return {p for p in directory.glob("*.obj") if p.stat().st_size == 0}


def test_files_made_ahead_serve_one_version_each_and_never_outlive_the_mount(
    store: PendingStore,
) -> None:
    # The worker makes more once fewer than a quarter wait: 29 closes after the first leave
    # 35 of 64, and it makes none, so every count below is exact whatever the timing.
    staging = Staging(store.directory, 1 << 30, ahead=64)
    texts = [os.urandom(100 + n) for n in range(30)]

    def ready(count: int) -> bool:  # the worker made all it may, and waits: nothing moves now
        deadline = time.monotonic() + 20
        while len(_empty_objects(store.directory)) < count and time.monotonic() < deadline:
            time.sleep(0.01)
        return len(_empty_objects(store.directory)) == count

    first = seal_small(staging, texts[0])  # the first close starts the worker, and waits not
    assert ready(64)
    sealed = [first] + [seal_small(staging, text) for text in texts[1:]]
    assert len({s.spool for s in sealed}) == len(texts)
    for s, text in zip(sealed, texts, strict=True):
        assert format.decrypt_bytes(s.key, s.spool.read_bytes()) == text
    records = [store.save(n, s, T0 + n) for n, s in enumerate(sealed)]
    # A crash leaves the unused ones empty, without a record: a mount's start deletes them.
    assert ready(64 - 29)
    assert store.sweep() == (0, 64 - 29)
    assert set(store.directory.iterdir()) == {r.spool for r in records}
    assert sorted(store.load(), key=lambda r: r.ino) == records
    # A clean end (umount) deletes them itself, and only them.
    for record in records:
        store.remove(record)
    again = Staging(store.directory, 1 << 30, ahead=8)
    kept = store.save(99, seal_small(again, b"kept"), T0)
    again.close()
    assert list(store.directory.iterdir()) == [kept.spool]
    assert seal_small(again, b"after close").spool.read_bytes()  # made at the close again


def test_records_of_the_earlier_layout_are_adopted(store: PendingStore) -> None:
    """Before one file per version, `X.pending` beside `X.obj` held the same sealed record."""
    plaintext = os.urandom(3000)
    sealed = seal_small(Staging(store.directory, 1 << 30), plaintext)
    body = json.dumps({
        "ino": 42, "spool": sealed.spool.name, "key": sealed.key.hex(),
        "salt": sealed.salt.hex(), "size": sealed.size, "mtime_ns": T0,
    }).encode()  # fmt: skip
    nonce = os.urandom(12)
    old = sealed.spool.with_suffix(".pending")
    old.write_bytes(nonce + store._aead.encrypt(nonce, body, store.AAD))
    lost = store.directory / f"{os.urandom(12).hex()}.pending"  # its object is gone
    lost.write_bytes(b"a record whose object is gone")
    (record,) = store.load()
    assert (record.ino, record.spool, record.key, record.mtime_ns) == (42, sealed.spool,
                                                                       sealed.key, T0)  # fmt: skip
    assert not old.exists() and lost.exists()
    assert format.decrypt_bytes(record.key, b"".join(record.chunks())) == plaintext
    assert store.load() == [record]  # adopted once


def test_remove_deletes_the_file_and_may_run_twice(store: PendingStore) -> None:
    record = saved(store, 5)
    store.remove(record)
    assert not record.spool.exists()
    store.remove(record)
    assert store.load() == []
