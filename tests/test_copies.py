"""LocalCopies: the store's own contract. Reads through a real mount are in test_copies_mount."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from medfs import copies as copies_module
from medfs.copies import LocalCopies

CID_A = "bafkreiaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa"
CID_B = "bafkreibbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb"
CID_C = "bafkreicccccccccccccccccccccccccccccccccccccccccccccccccccc"


def spool(tmp_path: Path, data: bytes) -> Path:
    path = tmp_path / f"{os.urandom(6).hex()}.obj"
    path.write_bytes(data)
    return path


def test_a_kept_spool_is_cut_to_its_object_and_read_back(tmp_path: Path) -> None:
    store = LocalCopies(tmp_path / "copies", 1 << 20)
    obj = os.urandom(5000)
    path = spool(tmp_path, obj + b"a sealed staging record")
    assert store.keep(path, CID_A, len(obj))
    assert not path.exists()
    assert (tmp_path / "copies" / CID_A).read_bytes() == obj  # the record did not come along
    assert store.read(CID_A, 100, 900) == obj[100:1000]
    assert store.total == 5000 and CID_A in store


def test_what_cannot_be_a_copy_is_refused_and_left_to_the_caller(tmp_path: Path) -> None:
    store = LocalCopies(tmp_path / "copies", 4096)
    short = spool(tmp_path, b"x" * 100)
    assert not store.keep(short, CID_A, 200)  # not the whole object
    assert short.read_bytes() == b"x" * 100  # untouched: the caller deletes it
    big = spool(tmp_path, b"y" * 5000)
    assert not store.keep(big, CID_A, 5000)  # over the limit on its own
    for name in ("../escape", "spool:abc", "a/b", "short"):
        assert not store.keep(short, name, 100)
    assert short.exists() and big.exists()
    assert list((tmp_path / "copies").iterdir()) == []


def test_no_copy_is_kept_when_the_disk_is_nearly_full(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = LocalCopies(tmp_path / "copies", 1 << 20)
    monkeypatch.setattr(copies_module, "RESERVE", 1.0)  # every disk is "nearly full"
    path = spool(tmp_path, b"z" * 100)
    assert not store.keep(path, CID_A, 100)
    assert path.exists()


def test_a_short_or_missing_copy_reads_as_none_and_is_dropped(tmp_path: Path) -> None:
    store = LocalCopies(tmp_path / "copies", 1 << 20)
    assert store.keep(spool(tmp_path, b"a" * 1000), CID_A, 1000)
    assert store.keep(spool(tmp_path, b"b" * 1000), CID_B, 1000)
    os.truncate(tmp_path / "copies" / CID_A, 500)  # torn by a crash
    assert store.read(CID_A, 0, 1000) is None
    assert CID_A not in store and not (tmp_path / "copies" / CID_A).exists()
    assert store.failed == 1
    (tmp_path / "copies" / CID_B).unlink()  # removed behind its back
    assert store.read(CID_B, 0, 10) is None
    assert store.read(CID_C, 0, 10) is None  # never kept
    assert store.total == 0


def test_trim_drops_the_least_recently_read_first(tmp_path: Path) -> None:
    store = LocalCopies(tmp_path / "copies", 2500)
    for cid in (CID_A, CID_B):
        assert store.keep(spool(tmp_path, b"q" * 1000), cid, 1000)
    assert store.read(CID_A, 0, 1) == b"q"  # A is now the more recent
    assert store.keep(spool(tmp_path, b"r" * 1000), CID_C, 1000)
    assert store.over_limit
    store.trim()
    assert not store.over_limit
    assert CID_B not in store and CID_A in store and CID_C in store
    assert sorted(p.name for p in (tmp_path / "copies").iterdir()) == [CID_A, CID_C]


def test_a_new_store_indexes_what_is_there_oldest_first_and_removes_junk(tmp_path: Path) -> None:
    directory = tmp_path / "copies"
    directory.mkdir()
    for age, cid in ((300, CID_A), (100, CID_B), (200, CID_C)):
        (directory / cid).write_bytes(b"c" * 1000)
        os.utime(directory / cid, (1_700_000_000 - age, 1_700_000_000 - age))
    (directory / "tmp-not-a-cid.part").write_bytes(b"junk")
    store = LocalCopies(directory, 2000)  # room for two: the oldest (A) goes
    assert sorted(p.name for p in directory.iterdir()) == [CID_B, CID_C]
    assert store.total == 2000
    store.retain({CID_C, CID_A})  # B is no longer in the manifest
    assert [p.name for p in directory.iterdir()] == [CID_C]


def test_a_limit_of_zero_keeps_and_reads_nothing(tmp_path: Path) -> None:
    directory = tmp_path / "copies"
    assert LocalCopies(directory, 1 << 20).keep(spool(tmp_path, b"d" * 100), CID_A, 100)
    store = LocalCopies(directory, 0)
    assert list(directory.iterdir()) == []  # what was kept goes
    path = spool(tmp_path, b"e" * 100)
    assert not store.keep(path, CID_B, 100) and path.exists()
    assert store.read(CID_A, 0, 10) is None
    with pytest.raises(ValueError):
        LocalCopies(directory, -1)
