"""PendingStore: the records that let the next mount upload and commit what was closed while
the node was away, or before a crash. Real mounts that crash and recover are in
test_reliability; this is the store's own contract."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from medfs.content import PendingRecord, PendingStore, seal_small

KEY = bytes(range(32))
T0 = 1_700_000_000_000_000_000


@pytest.fixture
def store(tmp_path: Path) -> PendingStore:
    return PendingStore(tmp_path / "staging", KEY)


def saved(store: PendingStore, ino: int, *, synced: bool = False) -> PendingRecord:
    sealed = seal_small(store.directory, os.urandom(1000 + ino))
    return store.save(ino, sealed, T0 + ino, synced=synced)


def test_a_saved_record_loads_back_as_it_was(store: PendingStore) -> None:
    records = [saved(store, 7), saved(store, 8, synced=True)]
    loaded = sorted(store.load(), key=lambda r: r.ino)
    assert loaded == records
    assert [r.size for r in loaded] == [1007, 1008]
    assert all(r.spool.is_file() and r.meta.is_file() for r in loaded)


def test_a_record_keeps_its_key_and_inode_sealed(store: PendingStore) -> None:
    record = saved(store, 123456)
    raw = record.meta.read_bytes()
    assert record.key not in raw and record.key.hex().encode() not in raw
    assert b"123456" not in raw and b"ino" not in raw


def test_records_that_cannot_be_used_are_left_in_place(store: PendingStore) -> None:
    lost = saved(store, 1)
    lost.spool.unlink()  # its object is gone
    altered = saved(store, 2)
    raw = bytearray(altered.meta.read_bytes())
    raw[-1] ^= 1
    altered.meta.write_bytes(bytes(raw))
    foreign = PendingStore(store.directory, bytes(32)).load()  # another mount's key
    good = saved(store, 3)
    assert store.load() == [good]
    assert foreign == []
    assert lost.meta.exists() and altered.meta.exists()  # kept for a person to look at


def test_sweep_removes_what_a_crash_left_and_nothing_a_record_keeps(store: PendingStore) -> None:
    kept = saved(store, 1)
    orphan = seal_small(store.directory, b"closed, but the daemon died before its record")
    torn = store.directory / f"{os.urandom(12).hex()}.tmp"  # a record never renamed into place
    torn.write_bytes(b"half a rec")
    assert store.sweep([kept.spool]) == 2
    assert not orphan.spool.exists() and not torn.exists()
    assert store.load() == [kept]
    assert store.sweep([kept.spool]) == 0


def test_remove_deletes_both_files_and_may_run_twice(store: PendingStore) -> None:
    record = saved(store, 5)
    store.remove(record)
    assert not record.spool.exists() and not record.meta.exists()
    store.remove(record)
    assert store.load() == []
