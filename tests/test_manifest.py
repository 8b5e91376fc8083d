"""The sidecar manifest (medfs/manifest.py): tree, versions, wraps, sealed names, durability."""

from __future__ import annotations

import errno
import os
import sqlite3
import stat
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from medfs import manifest as mf
from medfs.errors import FormatError, MedfsError
from medfs.manifest import ROOT_INODE, Inode, Kind, Manifest, NameCipher, VersionConflict

KEY = bytes(range(32))
OTHER_KEY = bytes(range(1, 33))
OWNER = "medfs1" + "a" * 32
FRIEND = "medfs1" + "b" * 32
WRAPPED = b"mlkem768-x25519 " + OWNER.encode() + b" c3Rhbnph"
T0 = 1_700_000_000_000_000_000
UID, GID = 1000, 1001

names_st = st.binary(min_size=1, max_size=mf.NAME_MAX).filter(
    lambda n: b"/" not in n and b"\x00" not in n and n not in (b".", b"..")
)


def new_manifest(path: Path, key: bytes = KEY) -> Manifest:
    return Manifest.initialize(
        path, owner=OWNER, wrapped_key=WRAPPED, names=NameCipher(key), uid=UID, gid=GID, now_ns=T0
    )


def reopen(path: Path, key: bytes = KEY) -> Manifest:
    manifest = Manifest.open(path)
    manifest.unlock(NameCipher(key))
    return manifest


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "manifest.db"


@pytest.fixture
def m(db_path: Path) -> Iterator[Manifest]:
    with new_manifest(db_path) as manifest:
        yield manifest


def mkfile(m: Manifest, parent: int, name: bytes, now: int = T0 + 1) -> Inode:
    return m.create(parent, name, Kind.FILE, 0o644, UID, GID, now)


def mkdir(m: Manifest, parent: int, name: bytes, now: int = T0 + 1) -> Inode:
    return m.create(parent, name, Kind.DIR, 0o755, UID, GID, now)


def commit(m: Manifest, ino: int, cid: str = "c", **over: object) -> str | None:
    args: dict[str, object] = {
        "cid": cid,
        "salt": b"s" * 32,
        "size": 10,
        "format": 1,
        "mtime_ns": T0 + 5,
        "version_ns": T0 + 6,
        "wraps": {OWNER: b"stanza-" + cid.encode()},
    }
    args.update(over)
    return m.commit_version(ino, **args)


def errno_of(info: pytest.ExceptionInfo[BaseException]) -> int | None:
    assert isinstance(info.value, OSError)
    return info.value.errno


# -- NameCipher ------------------------------------------------------------------------------


@given(parent=st.integers(1, 2**63 - 1), name=names_st)
def test_name_round_trip_is_deterministic_and_padded(parent, name):
    cipher = NameCipher(KEY)
    sealed = cipher.seal_name(parent, name)
    assert sealed == cipher.seal_name(parent, name)
    assert cipher.open_name(parent, sealed) == name
    # 16-byte SIV tag plus plaintext padded to NAME_PAD: the length shows only a rough size.
    assert (len(sealed) - 16) % mf.NAME_PAD == 0
    assert len(sealed) - 16 > len(name)
    assert name not in sealed or len(name) < 4


def test_sealing_depends_on_parent_label_and_key():
    cipher = NameCipher(KEY)
    sealed = cipher.seal_name(2, b"results.pdf")
    assert sealed != cipher.seal_name(3, b"results.pdf")
    assert sealed != cipher.seal_target(2, b"results.pdf")
    assert sealed != NameCipher(OTHER_KEY).seal_name(2, b"results.pdf")
    assert cipher.open_target(2, cipher.seal_target(2, b"../x")) == b"../x"
    for bad in (
        lambda: cipher.open_name(3, sealed),  # moved to another directory
        lambda: cipher.open_target(2, sealed),  # a name passed off as a target
        lambda: NameCipher(OTHER_KEY).open_name(2, sealed),
        lambda: cipher.open_name(2, sealed[:-1] + bytes([sealed[-1] ^ 1])),
        lambda: cipher.open_name(2, b""),
        lambda: cipher.open_name(2, b"short"),
    ):
        with pytest.raises(FormatError, match="does not authenticate"):
            bad()


def test_name_cipher_rejects_bad_keys_and_hides_its_key():
    for size in (0, 16, 31, 33, 64):
        with pytest.raises(ValueError):
            NameCipher(bytes(size))
    assert KEY.hex() not in repr(NameCipher(KEY))
    assert len(mf.new_manifest_key()) == mf.MANIFEST_KEY_SIZE


# -- creating and opening --------------------------------------------------------------------


def test_initialize_makes_a_private_unlocked_manifest_with_a_root(db_path):
    old = os.umask(0)  # the mode must not depend on the caller's umask
    try:
        m = new_manifest(db_path)
    finally:
        os.umask(old)
    with m:
        root = m.get(ROOT_INODE)
        assert root == Inode(
            ROOT_INODE, Kind.DIR, 0o700, UID, GID, 0, T0, T0, T0, None, None, None, None,
            root.entry_id,
        )  # fmt: skip
        assert len(root.entry_id) == 16
        assert root.st_mode == stat.S_IFDIR | 0o700
        assert m.parent_of(ROOT_INODE) is None
        assert m.path_of(ROOT_INODE) == b"/"
        assert m.children(ROOT_INODE) == []
        assert (m.owner, m.wrapped_key) == (OWNER, WRAPPED)
        assert m.get_meta("schema_version") == b"2"
        mkfile(m, ROOT_INODE, b"a")  # the WAL files exist while open
        for suffix in ("", "-wal", "-shm"):
            assert stat.S_IMODE(os.stat(f"{db_path}{suffix}").st_mode) == 0o600, suffix
    assert stat.S_IMODE(db_path.stat().st_mode) == 0o600


def test_root_inode_is_pyfuse3s():
    pyfuse3 = pytest.importorskip("pyfuse3")
    assert pyfuse3.ROOT_INODE == ROOT_INODE


def test_initialize_never_overwrites(tmp_path, db_path):
    db_path.write_bytes(b"precious")
    with pytest.raises(FileExistsError):
        new_manifest(db_path)
    assert db_path.read_bytes() == b"precious"
    link = tmp_path / "link.db"
    link.symlink_to(tmp_path / "elsewhere.db")
    with pytest.raises(FileExistsError):
        new_manifest(link)
    assert not (tmp_path / "elsewhere.db").exists()


def test_failed_initialize_leaves_nothing(db_path, monkeypatch):
    monkeypatch.setattr(mf, "_SCHEMA", (*mf._SCHEMA, "CREATE TABLE broken ("))
    with pytest.raises(sqlite3.OperationalError):
        new_manifest(db_path)
    assert list(db_path.parent.iterdir()) == []


def test_meta_round_trip_and_reserved_keys(m, db_path):
    assert m.get_meta("manifest_id") is None
    m.set_meta("manifest_id", b"\x00\x01")
    m.set_meta("manifest_id", b"\x02")
    assert m.get_meta("manifest_id") == b"\x02"
    for key in ("schema_version", "key_check", "owner", "wrapped_key"):
        with pytest.raises(ValueError):
            m.set_meta(key, b"x")
    m.close()
    with Manifest.open(db_path) as again:
        assert again.get_meta("manifest_id") == b"\x02"
        assert (again.owner, again.wrapped_key) == (OWNER, WRAPPED)


def test_open_a_locked_manifest_then_unlock(m, db_path):
    mkfile(m, ROOT_INODE, b"a")
    m.close()
    with Manifest.open(db_path) as locked:
        # What needs no names works while locked ...
        assert locked.get(2) is not None
        assert locked.has_children(ROOT_INODE)
        assert locked.parent_of(2) == ROOT_INODE
        assert locked.statistics() == (1, 1, 0)
        # ... what handles names refuses, rather than silently finding nothing.
        for call in (
            lambda: locked.lookup(ROOT_INODE, b"a"),
            lambda: locked.children(ROOT_INODE),
            lambda: locked.path_of(2),
            lambda: mkfile(locked, ROOT_INODE, b"b"),
        ):
            with pytest.raises(RuntimeError, match="unlock"):
                call()
        with pytest.raises(FormatError, match="manifest key"):
            locked.unlock(NameCipher(OTHER_KEY))
        locked.unlock(NameCipher(KEY))
        assert locked.lookup(ROOT_INODE, b"a") is not None


def test_open_refuses_what_is_not_a_manifest(tmp_path, db_path):
    with pytest.raises(FileNotFoundError):
        Manifest.open(db_path)
    assert not db_path.exists()  # opening must never create an empty database

    junk = tmp_path / "junk.db"
    junk.write_bytes(os.urandom(4096))
    junk.chmod(0o600)
    with pytest.raises(FormatError, match="not a medfs manifest"):
        Manifest.open(junk)

    other = tmp_path / "other.db"
    with sqlite3.connect(other) as db:
        db.execute("CREATE TABLE meta (key TEXT, value BLOB)")
    db.close()
    other.chmod(0o600)
    with pytest.raises(FormatError, match="not a medfs manifest"):
        Manifest.open(other)


def test_open_checks_the_schema_version(m, db_path):
    m.close()
    with sqlite3.connect(db_path) as db:
        db.execute("UPDATE meta SET value = X'33' WHERE key = 'schema_version'")
    db.close()
    with pytest.raises(FormatError, match="schema version 3") as info:
        Manifest.open(db_path)
    assert info.value.hint is not None and "upgrade" in info.value.hint
    with sqlite3.connect(db_path) as db:
        db.execute("DELETE FROM meta WHERE key = 'schema_version'")
    db.close()
    with pytest.raises(FormatError, match="schema version"):
        Manifest.open(db_path)


def test_open_refuses_a_manifest_others_can_read(m, db_path):
    m.close()
    db_path.chmod(0o640)
    with pytest.raises(MedfsError, match="group or others") as info:
        Manifest.open(db_path)
    assert not isinstance(info.value, FormatError)
    assert info.value.hint == f"make it private with: chmod 600 {db_path}"


def test_closed_manifest_refuses_use(m):
    m.close()
    m.close()  # idempotent
    with pytest.raises(RuntimeError, match="closed"):
        m.get(ROOT_INODE)


# -- entries ---------------------------------------------------------------------------------


def test_create_lookup_children_round_trip(m):
    d = mkdir(m, ROOT_INODE, b"scans", now=T0 + 10)
    f = mkfile(m, d.ino, b"mri.dcm", now=T0 + 20)
    s = m.create(d.ino, b"latest", Kind.SYMLINK, 0o777, UID, GID, T0 + 30, target=b"mri.dcm")
    assert f == Inode(
        f.ino, Kind.FILE, 0o644, UID, GID, 0, *(T0 + 20,) * 3, None, None, None, None, f.entry_id
    )
    assert (s.kind, s.size, s.st_mode) == (Kind.SYMLINK, 7, stat.S_IFLNK | 0o777)
    # What create returns is what was stored, to the field (d has changed since: its mtime).
    assert (f, s) == (m.get(f.ino), m.get(s.ino))
    assert m.readlink(s.ino) == b"mri.dcm"
    assert m.lookup(ROOT_INODE, b"scans") == m.get(d.ino)
    assert m.lookup(d.ino, b"mri.dcm") == f
    assert m.lookup(ROOT_INODE, b"mri.dcm") is None  # the same name elsewhere is another entry
    assert [(name, node.ino) for _, name, node in m.children(d.ino)] == [
        (b"mri.dcm", f.ino),
        (b"latest", s.ino),
    ]
    assert m.has_children(d.ino) and not m.has_children(f.ino)
    assert m.parent_of(f.ino) == d.ino
    # Creating an entry changes its directory's mtime and ctime.
    after = m.get(d.ino)
    assert after is not None and (after.mtime_ns, after.ctime_ns) == (T0 + 30, T0 + 30)
    x = m.create(ROOT_INODE, b"x", "file", 0o600, 0, 0, T0)
    assert x.kind is Kind.FILE and x == m.get(x.ino)
    sub = mkdir(m, d.ino, b"2026", now=T0 + 40)
    assert sub == m.get(sub.ino)


def test_inode_numbers_are_never_reused(m):
    a = mkfile(m, ROOT_INODE, b"a")
    m.unlink(ROOT_INODE, b"a", now_ns=T0 + 2)
    m.delete_inode(a.ino)
    assert mkfile(m, ROOT_INODE, b"a").ino > a.ino


def test_create_refuses_bad_requests(m):
    f = mkfile(m, ROOT_INODE, b"Secret-Name-M1")
    d = mkdir(m, ROOT_INODE, b"gone")
    m.unlink(ROOT_INODE, b"gone", now_ns=T0 + 2)
    cases = [
        (ROOT_INODE, b"Secret-Name-M1", errno.EEXIST),
        (999, b"x", errno.ENOENT),
        (f.ino, b"x", errno.ENOTDIR),
        (d.ino, b"x", errno.ENOENT),  # nothing may appear in a removed directory
        (ROOT_INODE, b"a" * 256, errno.ENAMETOOLONG),
    ]
    cases += [(ROOT_INODE, bad, errno.EINVAL) for bad in (b"", b".", b"..", b"a/b", b"a\x00b")]
    for parent, name, code in cases:
        with pytest.raises(OSError) as info:
            mkfile(m, parent, name)
        assert errno_of(info) == code, (parent, name)
        assert "Secret-Name" not in str(info.value)  # names never appear in messages
    assert mkfile(m, ROOT_INODE, b"a" * 255).ino
    with pytest.raises(ValueError):
        m.create(ROOT_INODE, b"m", Kind.FILE, 0o10000, UID, GID, T0)
    with pytest.raises(ValueError):
        m.create(ROOT_INODE, b"m", Kind.SYMLINK, 0o777, UID, GID, T0)
    with pytest.raises(ValueError):
        m.create(ROOT_INODE, b"m", Kind.FILE, 0o644, UID, GID, T0, target=b"x")
    with pytest.raises(ValueError):
        m.create(ROOT_INODE, b"m", "fifo", 0o644, UID, GID, T0)
    for target, code in ((b"", errno.EINVAL), (b"a\x00", errno.EINVAL), (b"a" * 4096, 36)):
        with pytest.raises(OSError) as info:
            m.create(ROOT_INODE, b"l", Kind.SYMLINK, 0o777, UID, GID, T0, target=target)
        assert errno_of(info) == code
    assert m.lookup(ROOT_INODE, b"m") is None and m.lookup(ROOT_INODE, b"l") is None


def test_lookup_and_children_check_the_parent(m):
    f = mkfile(m, ROOT_INODE, b"f")
    for call in (lambda p: m.lookup(p, b"x"), lambda p: m.children(p)):
        with pytest.raises(FileNotFoundError):
            call(999)
        with pytest.raises(NotADirectoryError):
            call(f.ino)


def test_set_attrs_changes_only_what_is_given(m):
    f = mkfile(m, ROOT_INODE, b"f")
    assert m.set_attrs(f.ino) == f
    g = m.set_attrs(f.ino, mode=0o600, uid=5, gid=6, size=99, atime_ns=1, mtime_ns=2, ctime_ns=3)
    assert (g.mode, g.uid, g.gid, g.size, g.atime_ns, g.mtime_ns, g.ctime_ns) == (
        0o600,
        5,
        6,
        99,
        1,
        2,
        3,
    )
    assert m.set_attrs(f.ino, size=0) == Inode(**{**g.__dict__, "size": 0})
    with pytest.raises(FileNotFoundError):
        m.set_attrs(999, mode=0o600)
    with pytest.raises(ValueError):
        m.set_attrs(f.ino, mode=0o100644)
    with pytest.raises(ValueError):
        m.set_attrs(f.ino, size=-1)


def test_readlink_errors(m):
    f = mkfile(m, ROOT_INODE, b"f")
    with pytest.raises(FileNotFoundError):
        m.readlink(999)
    with pytest.raises(OSError) as info:
        m.readlink(f.ino)
    assert errno_of(info) == errno.EINVAL


def test_unlink_keeps_the_inode_until_deleted(m):
    f = mkfile(m, ROOT_INODE, b"f")
    commit(m, f.ino, "cid-f")
    gone = m.unlink(ROOT_INODE, b"f", now_ns=T0 + 50)
    assert gone.ino == f.ino and gone.ctime_ns == T0 + 50 and gone.cid == "cid-f"
    root = m.get(ROOT_INODE)
    assert root is not None and root.mtime_ns == T0 + 50
    assert m.lookup(ROOT_INODE, b"f") is None
    assert m.get(f.ino) == gone  # an open file stays readable
    assert m.wraps(f.ino) == {OWNER: b"stanza-cid-f"}
    assert m.parent_of(f.ino) is None and m.path_of(f.ino) is None
    assert m.orphans() == [gone]
    assert m.cids() == {"cid-f"}
    assert m.delete_inode(f.ino) == gone
    assert m.get(f.ino) is None and m.orphans() == [] and m.cids() == set()
    with pytest.raises(FileNotFoundError):
        m.wraps(f.ino)
    with pytest.raises(FileNotFoundError):
        m.delete_inode(f.ino)
    with pytest.raises(FileNotFoundError):
        m.unlink(ROOT_INODE, b"f", now_ns=T0)


def test_unlink_and_delete_refuse_to_break_the_tree(m):
    d = mkdir(m, ROOT_INODE, b"d")
    mkfile(m, d.ino, b"f")
    with pytest.raises(OSError) as info:
        m.unlink(ROOT_INODE, b"d", now_ns=T0)
    assert errno_of(info) == errno.ENOTEMPTY
    with pytest.raises(ValueError, match="still linked"):
        m.delete_inode(d.ino)
    with pytest.raises(ValueError, match="root"):
        m.delete_inode(ROOT_INODE)
    m.unlink(d.ino, b"f", now_ns=T0)
    m.unlink(ROOT_INODE, b"d", now_ns=T0)
    assert m.delete_inode(d.ino).kind is Kind.DIR


def test_orphans_survive_a_crash(m, db_path):
    f = mkfile(m, ROOT_INODE, b"open-while-unlinked")
    commit(m, f.ino, "cid-o")
    m.unlink(ROOT_INODE, b"open-while-unlinked", now_ns=T0 + 9)
    m.close()  # the process dies before the last close of the file
    with reopen(db_path) as again:
        assert [(o.ino, o.cid) for o in again.orphans()] == [(f.ino, "cid-o")]


# -- rename ----------------------------------------------------------------------------------


def test_rename_within_and_across_directories(m):
    a = mkdir(m, ROOT_INODE, b"a")
    b = mkdir(m, ROOT_INODE, b"b")
    f = mkfile(m, a.ino, b"f")
    (first_id, _, _) = m.children(a.ino)[0]
    assert m.rename(a.ino, b"f", a.ino, b"g", now_ns=T0 + 10) is None
    assert m.lookup(a.ino, b"f") is None
    assert m.children(a.ino)[0][:2] == (first_id, b"g")  # the entry keeps its readdir offset
    assert m.rename(a.ino, b"g", b.ino, b"h", now_ns=T0 + 20) is None
    assert m.lookup(a.ino, b"g") is None
    moved = m.lookup(b.ino, b"h")
    assert moved is not None and moved.ino == f.ino and moved.ctime_ns == T0 + 20
    assert m.path_of(f.ino) == b"/b/h"
    for directory in (a.ino, b.ino):
        node = m.get(directory)
        assert node is not None and (node.mtime_ns, node.ctime_ns) == (T0 + 20, T0 + 20)
    # Onto itself: nothing happens.
    assert m.rename(b.ino, b"h", b.ino, b"h", now_ns=T0 + 30) is None
    assert m.get(b.ino).mtime_ns == T0 + 20


def test_rename_over_an_existing_file_returns_it(m):
    old = mkfile(m, ROOT_INODE, b"old")
    new = mkfile(m, ROOT_INODE, b"new")
    commit(m, old.ino, "cid-old")
    commit(m, new.ino, "cid-new")
    replaced = m.rename(ROOT_INODE, b"new", ROOT_INODE, b"old", now_ns=T0 + 40)
    assert replaced is not None and replaced.ino == old.ino and replaced.cid == "cid-old"
    assert replaced.ctime_ns == T0 + 40
    found = m.lookup(ROOT_INODE, b"old")
    assert found is not None and found.ino == new.ino
    assert m.lookup(ROOT_INODE, b"new") is None
    assert m.orphans() == [replaced]  # the caller decides when to delete it and unpin
    assert m.cids() == {"cid-old", "cid-new"}


def test_rename_of_directories(m):
    a = mkdir(m, ROOT_INODE, b"a")
    sub = mkdir(m, a.ino, b"sub")
    f = mkfile(m, sub.ino, b"f")
    empty = mkdir(m, ROOT_INODE, b"empty")
    full = mkdir(m, ROOT_INODE, b"full")
    mkfile(m, full.ino, b"x")
    plain = mkfile(m, ROOT_INODE, b"plain")

    def refused(op, code):
        with pytest.raises(OSError) as info:
            op()
        assert errno_of(info) == code

    refused(lambda: m.rename(ROOT_INODE, b"a", ROOT_INODE, b"full", now_ns=T0), errno.ENOTEMPTY)
    refused(lambda: m.rename(ROOT_INODE, b"a", ROOT_INODE, b"plain", now_ns=T0), errno.ENOTDIR)
    refused(lambda: m.rename(ROOT_INODE, b"plain", ROOT_INODE, b"a", now_ns=T0), errno.EISDIR)
    refused(lambda: m.rename(ROOT_INODE, b"a", sub.ino, b"loop", now_ns=T0), errno.EINVAL)
    refused(lambda: m.rename(ROOT_INODE, b"a", a.ino, b"loop", now_ns=T0), errno.EINVAL)
    refused(lambda: m.rename(ROOT_INODE, b"nope", ROOT_INODE, b"z", now_ns=T0), errno.ENOENT)
    refused(lambda: m.rename(ROOT_INODE, b"a", plain.ino, b"z", now_ns=T0), errno.ENOTDIR)
    assert m.path_of(f.ino) == b"/a/sub/f"  # nothing moved

    replaced = m.rename(ROOT_INODE, b"a", ROOT_INODE, b"empty", now_ns=T0 + 1)
    assert replaced is not None and replaced.ino == empty.ino
    assert m.path_of(f.ino) == b"/empty/sub/f"  # descendants follow, names re-sealed only once
    assert m.resolve("/empty/sub/f") == m.get(f.ino)
    m.rename(ROOT_INODE, b"empty", full.ino, b"inner", now_ns=T0 + 2)
    assert m.path_of(f.ino) == b"/full/inner/sub/f"


# -- readdir stability -----------------------------------------------------------------------


@settings(max_examples=40, deadline=None)
@given(
    initial=st.integers(0, 20),
    page=st.integers(1, 6),
    steps=st.lists(
        st.tuples(st.integers(0, 3), st.lists(st.integers(0, 40), max_size=4)), max_size=8
    ),
)
def test_readdir_pages_neither_skip_nor_repeat_survivors(initial, page, steps):
    with tempfile.TemporaryDirectory() as tmp, new_manifest(Path(tmp) / "m.db") as m:
        d = mkdir(m, ROOT_INODE, b"d")
        counter = 0

        def add() -> None:
            nonlocal counter
            mkfile(m, d.ino, b"n%d" % counter)
            counter += 1

        for _ in range(initial):
            add()
        survivors = {name for _, name, _ in m.children(d.ino)}
        seen: list[bytes] = []
        after = 0
        for adds, removals in [*steps, *[(0, [])] * 30]:
            batch = m.children(d.ino, after, page)
            if not batch:
                break
            seen += [name for _, name, _ in batch]
            after = batch[-1][0]
            # Between pages: entries come and go (some of them renamed in place).
            for _ in range(adds):
                add()
            current = [name for _, name, _ in m.children(d.ino)]
            for index in removals:
                if current and index % 3 == 0:
                    victim = current.pop(index % len(current))
                    m.rename(d.ino, victim, d.ino, victim + b"~", now_ns=T0)
                    survivors.discard(victim)
                elif current:
                    victim = current.pop(index % len(current))
                    m.unlink(d.ino, victim, now_ns=T0)
                    survivors.discard(victim)
        else:
            pytest.fail("readdir did not finish")
        assert len(seen) == len(set(seen)), "an entry was returned twice"
        assert survivors <= set(seen), "a surviving entry was skipped"


# -- versions and wraps ----------------------------------------------------------------------


def test_commit_version_replaces_the_version_and_all_wraps(m):
    f = mkfile(m, ROOT_INODE, b"f", now=T0 + 1)
    m.add_grant(f.ino, FRIEND, b"friend's public file", now_ns=T0)
    assert commit(m, f.ino, "cid-1", wraps={OWNER: b"w1", FRIEND: b"w2"}) is None
    v1 = m.get(f.ino)
    assert v1 is not None
    assert (v1.cid, v1.salt, v1.size, v1.format) == ("cid-1", b"s" * 32, 10, 1)
    assert (v1.mtime_ns, v1.version_ns, v1.ctime_ns) == (T0 + 5, T0 + 6, T0 + 5)
    assert m.wraps(f.ino) == {OWNER: b"w1", FRIEND: b"w2"}
    m.remove_grant(f.ino, FRIEND)
    previous = commit(
        m, f.ino, "cid-2", salt=b"t" * 32, size=0, format=2, mtime_ns=T0 + 7, version_ns=T0 + 8
    )
    assert previous == "cid-1"
    v2 = m.get(f.ino)
    assert v2 is not None
    assert (v2.cid, v2.salt, v2.size, v2.format) == ("cid-2", b"t" * 32, 0, 2)
    assert (v2.mtime_ns, v2.version_ns) == (T0 + 7, T0 + 8)
    assert m.wraps(f.ino) == {OWNER: b"stanza-cid-2"}  # the friend's old wrap is gone
    assert commit(m, f.ino, "cid-2") is None  # the same CID is never handed back for unpinning
    assert m.cids() == {"cid-2"}


def test_commit_version_refuses_bad_versions(m):
    d = mkdir(m, ROOT_INODE, b"d")
    s = m.create(ROOT_INODE, b"s", Kind.SYMLINK, 0o777, UID, GID, T0, target=b"d")
    f = mkfile(m, ROOT_INODE, b"f")
    m.add_grant(d.ino, FRIEND, b"friend's public file", now_ns=T0)  # wraps {OWNER} miss them
    with pytest.raises(IsADirectoryError):
        commit(m, d.ino, "c")
    with pytest.raises(OSError) as info:
        commit(m, s.ino, "c")
    assert errno_of(info) == errno.EINVAL
    with pytest.raises(FileNotFoundError):
        commit(m, 999, "c")
    for bad in ({"wraps": {}}, {"cid": ""}, {"salt": b""}, {"size": -1}):
        with pytest.raises(ValueError):
            commit(m, f.ino, **bad)
    assert m.get(f.ino) == f


class FailingWraps(Mapping[str, bytes]):
    """A wraps mapping that fails after yielding its first item: a crash mid-commit."""

    def __init__(self) -> None:
        self.data = {OWNER: b"new-owner-wrap", FRIEND: b"new-friend-wrap"}

    def __getitem__(self, key: str) -> bytes:
        return self.data[key]

    def __len__(self) -> int:
        return 2

    def __iter__(self) -> Iterator[str]:
        yield OWNER
        raise OSError(errno.EIO, "simulated failure in the middle of the commit")


@pytest.mark.parametrize(
    ("wraps", "error"),
    [
        pytest.param(FailingWraps(), OSError, id="failure-mid-insert"),
        pytest.param({OWNER: b"new", FRIEND: "not bytes"}, TypeError, id="wrong-type"),
        pytest.param({OWNER: b"new", 7: b"x"}, mf.RecipientsChanged, id="wrong-key-type"),
    ],
)
def test_commit_version_is_atomic(m, db_path, wraps, error):
    f = mkfile(m, ROOT_INODE, b"f")
    m.add_grant(f.ino, FRIEND, b"friend's public file", now_ns=T0)
    commit(m, f.ino, "cid-old", wraps={OWNER: b"old-wrap", FRIEND: b"old-friend"})
    before = m.get(f.ino)
    with pytest.raises(error):
        commit(m, f.ino, "cid-new", size=77, mtime_ns=T0 + 99, wraps=wraps)
    assert m.get(f.ino) == before
    assert m.wraps(f.ino) == {OWNER: b"old-wrap", FRIEND: b"old-friend"}
    mkfile(m, ROOT_INODE, b"still-usable")  # the failed transaction is not left open
    m.close()
    with reopen(db_path) as again:
        assert again.get(f.ino) == before
        assert again.wraps(f.ino) == {OWNER: b"old-wrap", FRIEND: b"old-friend"}


def test_commit_version_is_atomic_when_the_database_fails(m, monkeypatch):
    f = mkfile(m, ROOT_INODE, b"f")
    commit(m, f.ino, "cid-old")
    m.add_grant(f.ino, FRIEND, b"friend's public file", now_ns=T0)
    before = m.get(f.ino)
    calls = 0
    real = Manifest._insert_wrap

    def flaky(self, ino, fingerprint, stanza):
        nonlocal calls
        calls += 1
        if calls == 2:
            raise sqlite3.OperationalError("disk I/O error")
        real(self, ino, fingerprint, stanza)

    monkeypatch.setattr(Manifest, "_insert_wrap", flaky)
    with pytest.raises(sqlite3.OperationalError):
        commit(m, f.ino, "cid-new", wraps={OWNER: b"a", FRIEND: b"b"})
    assert m.get(f.ino) == before
    assert m.wraps(f.ino) == {OWNER: b"stanza-cid-old"}


def test_add_and_remove_wraps(m):
    f = mkfile(m, ROOT_INODE, b"f")
    with pytest.raises(ValueError, match="no committed version"):
        m.add_wrap(f.ino, FRIEND, b"w")
    commit(m, f.ino, "c")
    with pytest.raises(ValueError, match="no grant"):
        m.add_wrap(f.ino, FRIEND, b"w0")
    m.add_grant(f.ino, FRIEND, b"friend's public file", now_ns=T0)
    m.add_wrap(f.ino, FRIEND, b"w1")
    m.add_wrap(f.ino, FRIEND, b"w2")
    assert m.wraps(f.ino) == {OWNER: b"stanza-c", FRIEND: b"w2"}
    with pytest.raises(KeyError):
        m.remove_wrap(f.ino, "medfs1" + "c" * 32)
    m.remove_wrap(f.ino, FRIEND)
    with pytest.raises(ValueError, match="last wrap"):
        m.remove_wrap(f.ino, OWNER)
    assert m.wraps(f.ino) == {OWNER: b"stanza-c"}
    with pytest.raises(FileNotFoundError):
        m.add_wrap(999, FRIEND, b"w")


# -- paths, walking, totals ------------------------------------------------------------------


def build_tree(m: Manifest) -> dict[bytes, Inode]:
    records = mkdir(m, ROOT_INODE, b"records")
    y2024 = mkdir(m, records.ino, b"2024")
    lab = mkfile(m, y2024.ino, b"lab.pdf")
    commit(m, lab.ino, "cid-lab", size=100)
    note = mkfile(m, records.ino, b"note.txt")
    commit(m, note.ino, "cid-note", size=23)
    link = m.create(ROOT_INODE, b"latest", Kind.SYMLINK, 0o777, UID, GID, T0, target=b"records")
    empty = mkdir(m, ROOT_INODE, b"empty")
    return {
        b"/records": records,
        b"/records/2024": y2024,
        b"/records/2024/lab.pdf": lab,
        b"/records/note.txt": note,
        b"/latest": link,
        b"/empty": empty,
    }


def test_resolve_and_path_of(m):
    tree = build_tree(m)
    for path, node in tree.items():
        assert m.path_of(node.ino) == path
        assert m.resolve(path) == m.get(node.ino)
        assert m.resolve(path.lstrip(b"/").decode()) == m.get(node.ino)
    assert m.resolve("/") == m.resolve("") == m.get(ROOT_INODE)
    assert m.resolve("records/./2024//lab.pdf") == m.get(tree[b"/records/2024/lab.pdf"].ino)
    assert m.resolve("/records/2024/../note.txt") == m.get(tree[b"/records/note.txt"].ino)
    assert m.resolve("/..") == m.get(ROOT_INODE)
    assert m.resolve("/records/missing") is None
    assert m.resolve("/records/note.txt/x") is None  # a file has no entries
    assert m.resolve("/latest/note.txt") is None  # symlinks are not followed
    assert m.path_of(999) is None


def test_walk_is_depth_first_in_entry_order(m, monkeypatch):
    monkeypatch.setattr(mf, "_PAGE", 2)  # several pages per directory
    tree = build_tree(m)
    assert [(path, node.ino) for path, node in m.walk()] == [
        (b"/", ROOT_INODE),
        (b"/records", tree[b"/records"].ino),
        (b"/records/2024", tree[b"/records/2024"].ino),
        (b"/records/2024/lab.pdf", tree[b"/records/2024/lab.pdf"].ino),
        (b"/records/note.txt", tree[b"/records/note.txt"].ino),
        (b"/latest", tree[b"/latest"].ino),
        (b"/empty", tree[b"/empty"].ino),
    ]
    assert [path for path, _ in m.walk(tree[b"/records"].ino)] == [
        b"/records",
        b"/records/2024",
        b"/records/2024/lab.pdf",
        b"/records/note.txt",
    ]
    assert [path for path, _ in m.walk(tree[b"/latest"].ino)] == [b"/latest"]
    with pytest.raises(FileNotFoundError):
        list(m.walk(999))


def test_walk_copes_with_deep_trees(m):
    parent = ROOT_INODE
    for _ in range(1200):  # deeper than Python's recursion limit
        parent = mkdir(m, parent, b"d").ino
    paths = [path for path, _ in m.walk()]
    assert len(paths) == 1201 and paths[-1] == b"/d" * 1200
    assert m.path_of(parent) == b"/d" * 1200


def test_cids_and_statistics(m):
    build_tree(m)
    assert m.cids() == {"cid-lab", "cid-note"}
    assert m.statistics() == (2, 4, 123)
    assert m.statistics().bytes == 123


def test_reopening_keeps_everything(m, db_path):
    build_tree(m)
    m.set_meta("manifest_id", b"id")
    note = m.resolve("/records/note.txt").ino
    m.add_grant(note, FRIEND, b"friend's public file", now_ns=T0)
    m.add_wrap(note, FRIEND, b"shared")
    before = list(m.walk())
    wraps = {node.ino: m.wraps(node.ino) for _, node in before if node.kind is Kind.FILE}
    readlinks = m.readlink(m.resolve("/latest").ino)
    m.close()
    with reopen(db_path) as again:
        assert list(again.walk()) == before
        assert {ino: again.wraps(ino) for ino in wraps} == wraps
        assert again.readlink(again.resolve("/latest").ino) == readlinks
        assert again.get_meta("manifest_id") == b"id"
        assert again.statistics() == (2, 4, 123)


# -- confidentiality and integrity of the file itself ----------------------------------------

MARKERS = [b"Diagnosis-Marker-Q7", b"Psychiatry-Marker-Z3", b"Target-Marker-K9", b"Moved-Marker-W4"]


def database_bytes(db_path: Path) -> dict[str, bytes]:
    files = {}
    for suffix in ("", "-wal", "-shm", "-journal"):
        path = Path(f"{db_path}{suffix}")
        if path.exists():
            files[path.name] = path.read_bytes()
    return files


def test_no_plaintext_name_or_target_reaches_the_disk(m, db_path):
    d = mkdir(m, ROOT_INODE, MARKERS[1])
    f = mkfile(m, d.ino, MARKERS[0] + b".pdf")
    commit(m, f.ino, "bafy-cid")
    m.create(d.ino, b"link", Kind.SYMLINK, 0o777, UID, GID, T0, target=b"../" + MARKERS[2])
    tmp = mkfile(m, ROOT_INODE, MARKERS[3])
    m.rename(ROOT_INODE, MARKERS[3], d.ino, MARKERS[3] + b"-renamed", now_ns=T0)
    m.unlink(d.ino, MARKERS[3] + b"-renamed", now_ns=T0)
    m.delete_inode(tmp.ino)
    # An error about a name must not carry it into a log either.
    with pytest.raises(FileExistsError) as info:
        mkdir(m, ROOT_INODE, MARKERS[1])
    assert MARKERS[1].decode() not in str(info.value)

    while_open = database_bytes(db_path)
    assert f"{db_path.name}-wal" in while_open
    m.close()
    for files in (while_open, database_bytes(db_path)):
        for name, data in files.items():
            for marker in MARKERS:
                for spelling in (marker, marker.lower(), marker.decode().encode("utf-16-le")):
                    assert spelling not in data, (name, marker)
    with reopen(db_path) as again:
        assert again.resolve(b"/" + MARKERS[1] + b"/" + MARKERS[0] + b".pdf") is not None


def test_a_wrong_or_tampered_key_or_row_fails_to_open(m, db_path):
    a = mkdir(m, ROOT_INODE, b"a")
    b = mkdir(m, ROOT_INODE, b"b")
    mkfile(m, a.ino, b"secret")
    link = m.create(b.ino, b"l", Kind.SYMLINK, 0o777, UID, GID, T0, target=b"t")
    other = mkfile(m, b.ino, b"other")
    m.close()

    # A manifest opened with another key's cipher (bypassing unlock's check) fails loudly.
    wrong = Manifest.open(db_path)
    wrong._names = NameCipher(OTHER_KEY)
    with pytest.raises(FormatError, match="does not authenticate"):
        wrong.children(a.ino)
    with pytest.raises(FormatError, match="does not authenticate"):
        wrong.readlink(link.ino)
    wrong.close()

    # A sealed name moved into another directory, or a target onto another inode, fails.
    with sqlite3.connect(db_path) as db:
        db.execute("UPDATE dirents SET parent = ? WHERE parent = ?", (b.ino, a.ino))
        db.execute(
            "UPDATE inodes SET target = (SELECT target FROM inodes WHERE ino = ?) WHERE ino = ?",
            (link.ino, link.ino),
        )
    db.close()
    with reopen(db_path) as again:
        with pytest.raises(FormatError, match="does not authenticate"):
            again.children(b.ino)
        assert again.lookup(b.ino, b"secret") is None
        assert again.get(other.ino) is not None


def test_a_cycle_in_a_corrupt_tree_is_reported(m, db_path):
    a = mkdir(m, ROOT_INODE, b"a")
    b = mkdir(m, a.ino, b"b")
    m.close()
    with sqlite3.connect(db_path) as db:
        db.execute("UPDATE dirents SET parent = ? WHERE ino = ?", (b.ino, a.ino))
    db.close()
    with reopen(db_path) as again, pytest.raises(FormatError, match="cycle"):
        again.path_of(b.ino)


def test_schema_enforces_its_invariants(m, db_path):
    f = mkfile(m, ROOT_INODE, b"f")
    m.close()
    db = sqlite3.connect(db_path)
    db.execute("PRAGMA foreign_keys = ON")
    for bad in (
        "UPDATE inodes SET kind = 'fifo' WHERE ino = 2",
        "UPDATE inodes SET mode = 65535 WHERE ino = 2",
        "UPDATE inodes SET cid = 'c' WHERE ino = 2",  # a CID without salt, time and format
        "UPDATE inodes SET target = X'00' WHERE ino = 2",  # only symlinks have targets
        "INSERT INTO dirents (parent, name, ino) VALUES (1, X'00', 1)",  # the root is nobody's
        "INSERT INTO dirents (parent, name, ino) VALUES (99, X'00', 2)",
        "INSERT INTO wraps VALUES (99, 'x', X'00')",
        "UPDATE inodes SET size = 'big' WHERE ino = 2",  # STRICT tables check types
    ):
        with pytest.raises(sqlite3.IntegrityError):
            db.execute(bad)
    db.close()
    with reopen(db_path) as again:
        assert again.get(f.ino) == f


def test_entry_ids_are_random_unique_and_can_be_given(tmp_path: Path) -> None:
    with new_manifest(tmp_path / "m.db") as m:
        a = mkfile(m, ROOT_INODE, b"a")
        b = mkfile(m, ROOT_INODE, b"b")
        assert len({a.entry_id, b.entry_id, m.get(ROOT_INODE).entry_id}) == 3  # type: ignore[union-attr]
        given = bytes(range(16))
        c = m.create(ROOT_INODE, b"c", "file", 0o644, UID, GID, T0, entry_id=given)
        assert c.entry_id == given
        with pytest.raises(sqlite3.IntegrityError):  # an entry id names one entry only
            m.create(ROOT_INODE, b"d", "file", 0o644, UID, GID, T0, entry_id=given)


def test_grants_cover_everything_below_and_sequences_only_grow(tmp_path: Path) -> None:
    with new_manifest(tmp_path / "m.db") as m:
        d = m.create(ROOT_INODE, b"d", "dir", 0o755, UID, GID, T0)
        sub = m.create(d.ino, b"sub", "dir", 0o755, UID, GID, T0)
        f = mkfile(m, sub.ino, b"f")
        other = mkfile(m, ROOT_INODE, b"other")
        m.add_grant(d.ino, "bob", b"bob-public", now_ns=T0)
        m.add_grant(f.ino, "carol", b"carol-public", now_ns=T0)
        assert m.grantees(f.ino) == {"bob": b"bob-public", "carol": b"carol-public"}
        assert m.grantees(sub.ino) == {"bob": b"bob-public"}
        assert m.grantees(other.ino) == {}
        # The same identity granted at two levels: the nearest grant's public file counts.
        m.add_grant(sub.ino, "bob", b"bob-public-renewed", now_ns=T0)
        assert m.grantees(f.ino)["bob"] == b"bob-public-renewed"
        assert m.grantees(d.ino)["bob"] == b"bob-public"
        assert m.remove_grant(sub.ino, "bob")
        m.add_grant(ROOT_INODE, "dana", b"dana-public", now_ns=T0)
        assert m.grantees(other.ino) == {"dana": b"dana-public"}
        assert m.remove_grant(ROOT_INODE, "dana")
        assert m.remove_grant(d.ino, "bob") and not m.remove_grant(d.ino, "bob")
        assert m.grantees(f.ino) == {"carol": b"carol-public"}
        assert [m.next_sequence("bob") for _ in range(3)] == [1, 2, 3]
        assert m.next_sequence("carol") == 1


def test_commit_version_compare_and_swap(tmp_path: Path) -> None:
    with new_manifest(tmp_path / "m.db") as m:
        f = mkfile(m, ROOT_INODE, b"f")
        common = {"salt": b"s" * 32, "size": 1, "format": 1, "mtime_ns": T0, "version_ns": T0}
        m.commit_version(f.ino, cid="bafyone", wraps={OWNER: b"w"}, **common)  # type: ignore[arg-type]
        with pytest.raises(VersionConflict):
            m.commit_version(
                f.ino,
                cid="bafytwo",
                wraps={OWNER: b"w"},
                expected_cid="bafyzero",
                **common,  # type: ignore[arg-type]
            )
        assert m.get(f.ino).cid == "bafyone"  # type: ignore[union-attr]
        m.commit_version(
            f.ino, cid="bafytwo", wraps={OWNER: b"w"}, expected_cid="bafyone", **common
        )  # type: ignore[arg-type]
        assert m.get(f.ino).cid == "bafytwo"  # type: ignore[union-attr]


def test_a_version_is_committed_only_when_wrapped_for_exactly_who_may_read_it(m):
    shared = mkdir(m, ROOT_INODE, b"shared")
    inside, outside = mkfile(m, shared.ino, b"in"), mkfile(m, ROOT_INODE, b"out")
    m.add_grant(shared.ino, FRIEND, b"friend's public file", now_ns=T0)
    assert m.recipients_of(inside.ino) == {OWNER, FRIEND}
    assert m.recipients_of(outside.ino) == {OWNER}
    # Wrapped before the grant landed: the friend could never open it.
    with pytest.raises(mf.RecipientsChanged) as missing:
        commit(m, inside.ino, "c1")
    assert missing.value.inos == (inside.ino,)
    # Wrapped for someone with no grant (revoked meanwhile, or the file moved away).
    with pytest.raises(mf.RecipientsChanged):
        commit(m, outside.ino, "c2", wraps={OWNER: b"w", FRIEND: b"w"})
    assert m.get(inside.ino).cid is None and m.get(outside.ino).cid is None
    assert m.wraps(inside.ino) == {} and m.wraps(outside.ino) == {}
    commit(m, inside.ino, "c1", wraps={OWNER: b"w", FRIEND: b"w"})
    assert m.wraps(inside.ino) == {OWNER: b"w", FRIEND: b"w"}


def test_a_group_commit_names_every_version_wrapped_for_the_wrong_people(m):
    shared = mkdir(m, ROOT_INODE, b"shared")
    a, b = mkfile(m, shared.ino, b"a"), mkfile(m, shared.ino, b"b")
    c = mkfile(m, ROOT_INODE, b"c")
    m.add_grant(shared.ino, FRIEND, b"friend's public file", now_ns=T0)
    with pytest.raises(mf.RecipientsChanged) as stale:
        m.commit_group([version(a.ino, "a1"), version(c.ino, "c1"), version(b.ino, "b1")], "g1")
    assert stale.value.inos == (a.ino, b.ino)
    assert m.get(c.ino).cid is None  # nothing of the group was committed
    assert m.pin_groups() == set()


# -- pin groups: versions kept by one pin of the directory they were uploaded in ----------------


def version(ino: int, cid: str) -> mf.NewVersion:
    return mf.NewVersion(ino, cid, b"s" * 32, 10, 1, T0 + 5, T0 + 6, {OWNER: b"w-" + cid.encode()})


def test_a_group_is_unpinned_only_once_it_keeps_no_version(m):
    a, b = mkfile(m, ROOT_INODE, b"a"), mkfile(m, ROOT_INODE, b"b")
    assert commit(m, a.ino, "a0") is None  # a first version replaces nothing
    # a0 was pinned on its own: replacing it hands that pin back to the caller.
    assert m.commit_group([version(a.ino, "a1"), version(b.ino, "b1")], "g1") == ["a0"]
    assert (m.get(a.ino).cid, m.get(b.ino).cid) == ("a1", "b1")
    assert m.wraps(b.ino) == {OWNER: b"w-b1"}
    assert m.pin_group_of("a1") == m.pin_group_of("b1") == "g1"
    assert m.pin_groups() == {"g1"}
    # Replacing a1 leaves g1 pinned, since it still keeps b1; replacing b1 frees it.
    assert commit(m, a.ino, "a2") is None
    assert m.pin_groups() == {"g1"} and m.pin_group_of("a1") is None
    assert m.commit_group([version(b.ino, "b2")], "g2") == ["g1"]
    assert m.pin_groups() == {"g2"}
    # A deleted file's version: released by the caller, through the same rule.
    assert m.release("b2") == "g2"
    assert m.release("a2") == "a2"  # pinned on its own
    assert m.pin_groups() == set()


def test_a_group_commit_is_one_transaction(m):
    a = mkfile(m, ROOT_INODE, b"a")
    d = mkdir(m, ROOT_INODE, b"d")
    with pytest.raises(IsADirectoryError):
        m.commit_group([version(a.ino, "a1"), version(d.ino, "d1")], "g1")
    assert m.get(a.ino).cid is None
    assert m.pin_groups() == set()
    with pytest.raises(ValueError):
        m.commit_group([], "g1")
    with pytest.raises(ValueError, match="one version of each file"):
        m.commit_group([version(a.ino, "a1"), version(a.ino, "a2")], "g1")
    assert m.get(a.ino).cid is None


def test_restored_versions_forget_their_groups(m):
    a = mkfile(m, ROOT_INODE, b"a")
    m.commit_group([version(a.ino, "a1")], "g1")
    m.forget_pin_groups()
    assert m.pin_groups() == set()
    assert commit(m, a.ino, "a2") == "a1"  # now pinned on its own


def test_a_schema_1_manifest_gains_pin_groups_when_opened(m, db_path):
    a = mkfile(m, ROOT_INODE, b"a")
    commit(m, a.ino, "a0")
    m.close()
    with sqlite3.connect(db_path) as db:  # what medfs before pin groups wrote
        db.execute("DROP TABLE pin_groups")
        db.execute("UPDATE meta SET value = X'31' WHERE key = 'schema_version'")
    db.close()
    with reopen(db_path) as again:
        assert again.get_meta("schema_version") == b"2"
        assert again.get(a.ino).cid == "a0"
        assert again.commit_group([version(a.ino, "a1")], "g1") == ["a0"]


def test_deferred_commits_are_synced_on_request(m, db_path):
    m.defer_sync()
    (synchronous,) = m._conn.execute("PRAGMA synchronous").fetchone()
    assert synchronous == 1  # NORMAL: a commit waits for no fsync
    mkfile(m, ROOT_INODE, b"a")
    m.sync_to_disk()  # only fsyncs; what it promises is the file system's to keep
    with reopen(db_path) as other:
        assert other.lookup(ROOT_INODE, b"a") is not None


def test_syncing_keeps_the_locks_other_processes_rely_on(m, db_path):
    """Closing a second descriptor of a database file drops the process's POSIX locks on it;
    a connection of another process closing then thinks itself the last and takes the WAL
    (and the commits in it) away from this one."""
    reader = (
        "import sqlite3, sys; db = sqlite3.connect(sys.argv[1]);"
        " print(db.execute('SELECT count(*) FROM dirents').fetchone()[0]); db.close()"
    )

    def entries_seen_by_another_process() -> int:
        out = subprocess.run([sys.executable, "-c", reader, str(db_path)], capture_output=True)
        assert out.returncode == 0, out.stderr
        return int(out.stdout)

    m.defer_sync()
    mkfile(m, ROOT_INODE, b"a")
    m.sync_to_disk()
    assert entries_seen_by_another_process() == 1  # a CLI command while mounted
    mkfile(m, ROOT_INODE, b"b")
    m.sync_to_disk()
    assert entries_seen_by_another_process() == 2
    assert m.lookup(ROOT_INODE, b"b") is not None


def test_wraps_added_in_one_go_skip_versions_replaced_meanwhile(m):
    a, b = mkfile(m, ROOT_INODE, b"a"), mkfile(m, ROOT_INODE, b"b")
    commit(m, a.ino, "a1")
    commit(m, b.ino, "b1")
    m.add_grant(ROOT_INODE, FRIEND, b"friend's public file", now_ns=T0)
    commit(m, b.ino, "b2", wraps={OWNER: b"o", FRIEND: b"f"})  # a mount, after the share read b1
    m.add_wrap(b.ino, FRIEND, b"from-the-mount")
    added = m.add_wraps([(a.ino, "a1", FRIEND, b"for-a1"), (b.ino, "b1", FRIEND, b"for-b1")])
    assert added == 1
    assert m.wraps(a.ino)[FRIEND] == b"for-a1"
    assert m.wraps(b.ino)[FRIEND] == b"from-the-mount"  # b1's stanza would not open b2


def test_wraps_added_in_one_go_skip_recipients_revoked_meanwhile(m):
    shared, other = mkdir(m, ROOT_INODE, b"shared"), mkdir(m, ROOT_INODE, b"other")
    a, b = mkfile(m, shared.ino, b"a"), mkfile(m, shared.ino, b"b")
    m.add_grant(shared.ino, FRIEND, b"friend's public file", now_ns=T0)
    for f in (a, b):
        commit(m, f.ino, f"c{f.ino}", wraps={OWNER: b"o", FRIEND: b"f"})
    m.remove_wrap(a.ino, FRIEND)
    m.remove_wrap(b.ino, FRIEND)
    # A share wrapped both; then b moved away and a revoke came, before its wraps landed.
    m.rename(shared.ino, b"b", other.ino, b"b", now_ns=T0 + 9)
    late = [(f.ino, f"c{f.ino}", FRIEND, b"w") for f in (a, b)]
    assert m.add_wraps(late) == 1
    m.remove_grant(shared.ino, FRIEND)
    assert m.add_wraps([(a.ino, f"c{a.ino}", FRIEND, b"w2")]) == 0
    assert m.wraps(a.ino)[FRIEND] == b"w" and FRIEND not in m.wraps(b.ino)


def test_a_bad_wrap_among_many_adds_none(m):
    a = mkfile(m, ROOT_INODE, b"a")
    commit(m, a.ino, "a1")
    with pytest.raises(TypeError, match="stanza"):
        m.add_wraps([(a.ino, "a1", FRIEND, b"for-a1"), (a.ino, "a1", FRIEND, "text")])
    assert FRIEND not in m.wraps(a.ino)


def test_wrapped_for_gives_each_inode_with_its_wrap_in_batches(m):
    files = [mkfile(m, ROOT_INODE, b"f%d" % i) for i in range(1201)]  # over two batches
    for f in files[:-1]:
        commit(m, f.ino, f"c{f.ino}")
    m.add_grant(ROOT_INODE, FRIEND, b"friend's public file", now_ns=T0)
    # The last file has no version, so no wrap is added to it.
    added = m.add_wraps([(f.ino, f"c{f.ino}", FRIEND, b"friend-%d" % f.ino) for f in files[::2]])
    assert added == 600
    found = m.wrapped_for(FRIEND, [f.ino for f in files] + [99999])
    assert sorted(found) == sorted(f.ino for f in files)  # the unknown inode left out
    for i, f in enumerate(files):
        inode, stanza = found[f.ino]
        assert inode.ino == f.ino and inode.cid == (None if f is files[-1] else f"c{f.ino}")
        assert stanza == (b"friend-%d" % f.ino if i % 2 == 0 and i < 1200 else None)
    owner = m.wrapped_for(OWNER, [files[0].ino, files[-1].ino])
    assert owner[files[0].ino][1] == b"stanza-c%d" % files[0].ino
    assert owner[files[-1].ino][1] is None  # no version yet


def test_wrapped_for_reads_the_stanza_with_the_version_it_opens(m):
    f = mkfile(m, ROOT_INODE, b"f")
    commit(m, f.ino, "v1")
    commit(m, f.ino, "v2", salt=b"t" * 32)  # as a running mount would, mid-share
    inode, stanza = m.wrapped_for(OWNER, [f.ino])[f.ino]
    assert (inode.cid, inode.salt, stanza) == ("v2", b"t" * 32, b"stanza-v2")


def test_a_version_committed_again_moves_to_its_new_group(m):
    """A crash after a group's commit but before its staging copies went: the next mount
    uploads the same bytes again, in another group, and commits them once more."""
    a, b = mkfile(m, ROOT_INODE, b"a"), mkfile(m, ROOT_INODE, b"b")
    m.commit_group([version(a.ino, "a1"), version(b.ino, "b1")], "g1")
    assert m.commit_group([version(a.ino, "a1")], "g2") == []  # g1 still keeps b1
    assert m.pin_group_of("a1") == "g2"
    assert m.commit_group([version(b.ino, "b1")], "g3") == ["g1"]  # now g1 keeps nothing
    assert m.commit_group([version(b.ino, "b1")], "g3") == []  # the same group again
    assert m.pin_groups() == {"g2", "g3"}


def test_data_version_moves_only_for_commits_of_another_connection(m, db_path):
    other = reopen(db_path)
    try:
        before = m.data_version()
        mkfile(m, ROOT_INODE, b"own.txt")  # this connection's own commit
        assert m.data_version() == before
        mkfile(other, ROOT_INODE, b"theirs.txt")
        moved = m.data_version()
        assert moved != before
        assert m.data_version() == moved  # until the next commit elsewhere
    finally:
        other.close()
