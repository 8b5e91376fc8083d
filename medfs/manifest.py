"""The sidecar manifest: the filesystem tree, mapped to IPFS CIDs and wrapped content keys.

One SQLite file in the state directory (WAL, synchronous=FULL, mode 0600) holds every inode
(kind, permission bits, owner, size, times, and for files the CID, header salt and format of the
current version), every directory entry, and the wrapped content keys of every file version. This
module is the only owner of that schema. Each public mutating method is exactly one `BEGIN
IMMEDIATE` transaction, so a crash leaves either the old entry or the new one, never a mix.

Names and symlink targets never touch the disk in the clear: they are sealed with AES-SIV under a
key derived from the 32-byte manifest key (`NameCipher`). AES-SIV is deterministic, so the
`UNIQUE (parent, name)` index works on ciphertext; the parent inode is associated data, so equal
names in different directories look unrelated and a row moved to another directory fails to open.
Plaintext is padded to a multiple of `NAME_PAD` bytes so a sealed name shows only a rough length.
For the same reason, no message raised here ever contains a name or path: only inode numbers.

Everything is local and quick (no network): the filesystem calls it from the trio thread.
Failures the filesystem maps to an errno are `OSError`s carrying that errno (`FileNotFoundError`,
`FileExistsError`, `NotADirectoryError`, `IsADirectoryError`, ENOTEMPTY, EINVAL, ENAMETOOLONG).
"""

from __future__ import annotations

import contextlib
import errno
import hmac
import itertools
import os
import sqlite3
import stat
import urllib.parse
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, fields
from enum import StrEnum
from pathlib import Path
from types import TracebackType
from typing import Any, NamedTuple, TypeVar

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESSIV
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from medfs import durable
from medfs.errors import FormatError, MedfsError

SCHEMA_VERSION = 2
# PRAGMA application_id "MEDF": lets `file(1)` and `open` tell a manifest from any other database.
APPLICATION_ID = 0x4D454446
ENTRY_ID_SIZE = 16
ROOT_INODE = 1  # pyfuse3.ROOT_INODE (pyfuse3 itself stays fenced in the filesystem layer)
MANIFEST_KEY_SIZE = 32
NAMES_INFO = b"medfs v1 manifest names"
KEY_CHECK_INFO = b"medfs v1 manifest key check"
NAME_LABEL = b"medfs name"
TARGET_LABEL = b"medfs target"
NAME_PAD = 32
NAME_MAX = 255  # bytes, as on Linux
TARGET_MAX = 4095  # PATH_MAX less its terminating NUL
MAX_INO = 2**63 - 1

_RESERVED_META = frozenset({"schema_version", "key_check", "owner", "wrapped_key"})
_PAGE = 256

# Versions committed in a group are kept on the node by one pin of a directory holding them all
# (`IPFS.add_group`). A row says which group keeps which current version; a group's pin may go
# once it keeps none (schema 2; a schema-1 manifest gains the table when it is opened).
_PIN_GROUPS = (
    "CREATE TABLE pin_groups (member TEXT PRIMARY KEY, grp TEXT NOT NULL) STRICT, WITHOUT ROWID",
    "CREATE INDEX pin_groups_by_grp ON pin_groups (grp)",
)

_SCHEMA = (
    "CREATE TABLE meta (key TEXT PRIMARY KEY, value BLOB NOT NULL) STRICT",
    # AUTOINCREMENT: an inode number is never reused, so a kernel that still remembers a deleted
    # inode can never reach a newer file through it.
    """CREATE TABLE inodes (
        ino INTEGER PRIMARY KEY AUTOINCREMENT,
        kind TEXT NOT NULL CHECK (kind IN ('file', 'dir', 'symlink')),
        mode INTEGER NOT NULL CHECK (mode BETWEEN 0 AND 4095),
        uid INTEGER NOT NULL,
        gid INTEGER NOT NULL,
        size INTEGER NOT NULL DEFAULT 0 CHECK (size >= 0),
        atime_ns INTEGER NOT NULL,
        mtime_ns INTEGER NOT NULL,
        ctime_ns INTEGER NOT NULL,
        cid TEXT,
        salt BLOB,
        version_ns INTEGER,
        format INTEGER,
        target BLOB,
        -- What wrapped keys are bound to (with the object's salt): random, so that it can travel
        -- in a share manifest and mean the same entry on the recipient's side.
        entry_id BLOB NOT NULL UNIQUE CHECK (length(entry_id) = 16),
        CHECK ((kind = 'symlink') = (target IS NOT NULL)),
        CHECK (kind = 'file' OR cid IS NULL),
        CHECK ((cid IS NULL) = (salt IS NULL)),
        CHECK ((cid IS NULL) = (version_ns IS NULL)),
        CHECK ((cid IS NULL) = (format IS NULL))
    ) STRICT""",
    # AUTOINCREMENT: the id is the readdir offset, so it must never go backwards or be reused.
    """CREATE TABLE dirents (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        parent INTEGER NOT NULL REFERENCES inodes (ino),
        name BLOB NOT NULL,
        ino INTEGER NOT NULL UNIQUE REFERENCES inodes (ino) CHECK (ino != 1 AND ino != parent),
        UNIQUE (parent, name)
    ) STRICT""",
    # Pages of readdir are "children of P with id > N, by id": this index answers them directly.
    "CREATE INDEX dirents_by_parent ON dirents (parent, id)",
    """CREATE TABLE wraps (
        ino INTEGER NOT NULL REFERENCES inodes (ino),
        fingerprint TEXT NOT NULL,
        stanza BLOB NOT NULL,
        PRIMARY KEY (ino, fingerprint)
    ) STRICT, WITHOUT ROWID""",
    # A grant on a directory covers everything below it, now and later.
    """CREATE TABLE grants (
        ino INTEGER NOT NULL REFERENCES inodes (ino),
        fingerprint TEXT NOT NULL,
        public BLOB NOT NULL,
        created_ns INTEGER NOT NULL,
        PRIMARY KEY (ino, fingerprint)
    ) STRICT, WITHOUT ROWID""",
    # The last share-manifest sequence number issued to each recipient: it only grows.
    "CREATE TABLE share_sequence (fingerprint TEXT PRIMARY KEY, last INTEGER NOT NULL) STRICT",
    *_PIN_GROUPS,
)


def new_entry_id() -> bytes:
    return os.urandom(ENTRY_ID_SIZE)


def new_manifest_key() -> bytes:
    """A fresh random manifest key (one per manifest; the caller wraps it for the owner)."""
    return os.urandom(MANIFEST_KEY_SIZE)


def _oserror(code: int, message: str) -> OSError:
    # OSError(errno, ...) builds the matching subclass (FileNotFoundError for ENOENT, ...).
    return OSError(code, message)


class NameCipher:
    """Seals names and symlink targets for the manifest with AES-SIV (deterministic, AEAD)."""

    def __init__(self, manifest_key: bytes) -> None:
        if len(manifest_key) != MANIFEST_KEY_SIZE:
            raise ValueError(f"a manifest key is {MANIFEST_KEY_SIZE} bytes")
        siv_key = HKDF(hashes.SHA256(), 64, salt=None, info=NAMES_INFO).derive(manifest_key)
        self._siv = AESSIV(siv_key)
        # A separate derivation, so storing it reveals nothing about the name key.
        self.key_check = HKDF(hashes.SHA256(), 32, salt=None, info=KEY_CHECK_INFO).derive(
            manifest_key
        )

    def __repr__(self) -> str:
        return "NameCipher(...)"

    def seal_name(self, parent: int, name: bytes) -> bytes:
        return self._seal(NAME_LABEL, parent, name)

    def open_name(self, parent: int, sealed: bytes) -> bytes:
        return self._open(NAME_LABEL, parent, sealed)

    def seal_target(self, ino: int, target: bytes) -> bytes:
        return self._seal(TARGET_LABEL, ino, target)

    def open_target(self, ino: int, sealed: bytes) -> bytes:
        return self._open(TARGET_LABEL, ino, sealed)

    def _seal(self, label: bytes, owner: int, data: bytes) -> bytes:
        # ISO/IEC 7816-4 padding (0x80, then zeros): unambiguous, and deterministic as SIV needs.
        padded = data + b"\x80" + bytes(-(len(data) + 1) % NAME_PAD)
        return self._siv.encrypt(padded, [label, owner.to_bytes(8, "big")])

    def _open(self, label: bytes, owner: int, sealed: bytes) -> bytes:
        try:
            padded = self._siv.decrypt(sealed, [label, owner.to_bytes(8, "big")])
        except (InvalidTag, ValueError, OverflowError):
            raise FormatError("manifest entry does not authenticate") from None
        unpadded = padded.rstrip(b"\x00")
        if len(padded) % NAME_PAD or not unpadded.endswith(b"\x80"):
            raise FormatError("manifest entry has invalid padding")
        return unpadded[:-1]


class Kind(StrEnum):
    FILE = "file"
    DIR = "dir"
    SYMLINK = "symlink"


_S_IFMT = {Kind.FILE: stat.S_IFREG, Kind.DIR: stat.S_IFDIR, Kind.SYMLINK: stat.S_IFLNK}


@dataclass(frozen=True)
class Inode:
    """One inode row. `mode` holds permission bits only; `st_mode` adds the file type."""

    ino: int
    kind: Kind
    mode: int
    uid: int
    gid: int
    size: int
    atime_ns: int
    mtime_ns: int
    ctime_ns: int
    cid: str | None
    salt: bytes | None
    version_ns: int | None
    format: int | None
    entry_id: bytes

    @property
    def st_mode(self) -> int:
        return _S_IFMT[self.kind] | self.mode


# Inode's fields are the columns, in order: one list for the dataclass and every query.
_INODE = ", ".join(f"i.{field.name}" for field in fields(Inode))
# Built from fixed column names, never from input (hence the noqa for S608).
_GET = f"SELECT {_INODE} FROM inodes i WHERE i.ino = ?"  # noqa: S608
_CHILDREN = (
    f"SELECT d.id, d.name, {_INODE} FROM dirents d JOIN inodes i ON i.ino = d.ino"  # noqa: S608
    " WHERE d.parent = ? AND d.id > ? ORDER BY d.id LIMIT ?"
)
_LOOKUP = (
    f"SELECT {_INODE} FROM dirents d JOIN inodes i ON i.ino = d.ino"  # noqa: S608
    " WHERE d.parent = ? AND d.name = ?"
)
_INSERT_WRAP = "INSERT OR REPLACE INTO wraps (ino, fingerprint, stanza) VALUES (?, ?, ?)"
# The version check and the insert in one statement: a share wraps thousands of files.
_INSERT_WRAP_IF_CURRENT = (
    "INSERT OR REPLACE INTO wraps (ino, fingerprint, stanza)"
    " SELECT ?, ?, ? WHERE EXISTS (SELECT 1 FROM inodes WHERE ino = ? AND cid = ?)"
)
# Inodes asked for by number, this many per statement (well under SQLite's variable limit).
_IN_BATCH = 500
_WRAPPED_FOR = (
    f"SELECT {_INODE}, w.stanza FROM inodes i"  # noqa: S608
    " LEFT JOIN wraps w ON w.ino = i.ino AND w.fingerprint = ? WHERE i.ino IN ({marks})"
)
_ORPHANS = (
    f"SELECT {_INODE} FROM inodes i LEFT JOIN dirents d ON d.ino = i.ino"  # noqa: S608
    " WHERE d.id IS NULL AND i.ino != 1 ORDER BY i.ino"
)


ANY_CID = object()


class NewVersion(NamedTuple):
    """An uploaded object to make a file's current version (see `Manifest.commit_version`)."""

    ino: int
    cid: str
    salt: bytes
    size: int
    format: int
    mtime_ns: int
    version_ns: int
    wraps: Mapping[str, bytes]


_T = TypeVar("_T")


class VersionConflict(Exception):
    """A compare-and-swap commit found another version in place."""


class RecipientsChanged(Exception):
    """A version was wrapped for other people than may read its file now: a grant, a
    revocation or a move landed between reading the recipients and the commit. Nothing was
    committed; wrap it again for `recipients_of` and retry."""

    def __init__(self, inos: Sequence[int]) -> None:
        super().__init__(f"the recipients of inode {', '.join(map(str, inos))} changed")
        self.inos = tuple(inos)


# A share lands between one wrap and its commit rarely; every time, this many times in a row,
# means the wraps can never match: a grant whose fingerprint is not its public file's.
RECIPIENT_TRIES = 5


def recipients_never_match(err: RecipientsChanged) -> FormatError:
    """What a committer raises after RECIPIENT_TRIES commits refused with `err`."""
    inodes = ", ".join(map(str, err.inos))
    return FormatError(
        f"the wraps of inode {inodes} never match its grants: a grant in the manifest is damaged",
        hint="medfs writes no such grant (its fingerprint is not its public file's): restore "
        "the manifest from a snapshot (`medfs restore`)",
    )


def until_recipients_match(attempt: Callable[[], _T]) -> _T:
    """`attempt()` (read the recipients, wrap, commit) again while its commit finds other
    recipients, RECIPIENT_TRIES times at most; for committers that wrap on their own thread."""
    for tries in itertools.count(1):
        try:
            return attempt()
        except RecipientsChanged as err:  # a share or a revoke landed between read and commit
            if tries == RECIPIENT_TRIES:
                raise recipients_never_match(err) from None
    raise AssertionError("unreachable")  # pragma: no cover


class Stats(NamedTuple):
    files: int
    dirs: int
    bytes: int


def _inode(row: Sequence[Any]) -> Inode:
    return Inode(row[0], Kind(row[1]), *row[2:])


def _check_ino(ino: int) -> None:
    if not 1 <= ino <= MAX_INO:
        raise ValueError(f"invalid inode number {ino}")


def _check_name(name: bytes) -> None:
    if len(name) > NAME_MAX:
        raise _oserror(errno.ENAMETOOLONG, f"names are at most {NAME_MAX} bytes")
    if not name or name in (b".", b"..") or b"/" in name or b"\x00" in name:
        raise _oserror(errno.EINVAL, "invalid file name")


def _check_wrap(fingerprint: object, stanza: object) -> None:
    if not isinstance(fingerprint, str) or not fingerprint:
        raise TypeError("a wrap's fingerprint must be a non-empty str")
    if not isinstance(stanza, bytes) or not stanza:
        raise TypeError("a wrap's stanza must be non-empty bytes")


def _check_target(target: bytes) -> None:
    if len(target) > TARGET_MAX:
        raise _oserror(errno.ENAMETOOLONG, f"symlink targets are at most {TARGET_MAX} bytes")
    if not target or b"\x00" in target:
        raise _oserror(errno.EINVAL, "invalid symlink target")


def _check_version(v: NewVersion) -> None:
    if not v.cid or not v.salt or v.size < 0:
        raise ValueError("a version needs a CID, a salt and a non-negative size")
    if not v.wraps:
        raise ValueError("a version no one can unwrap would be lost: wraps must not be empty")


def _check_mode(mode: int) -> None:
    if not 0 <= mode <= 0o7777:
        raise ValueError(f"mode {mode:#o} has bits beyond the permission bits")


def _connect(path: Path) -> sqlite3.Connection:
    # mode=rw: never let sqlite3 create a fresh empty database where a manifest was expected.
    uri = "file:" + urllib.parse.quote(str(path.absolute())) + "?mode=rw"
    # isolation_level=None: no implicit transactions; `_write` issues BEGIN IMMEDIATE itself.
    db = sqlite3.connect(uri, uri=True, isolation_level=None)
    try:
        db.execute("PRAGMA journal_mode = WAL")
        # FULL: a committed version (and so the CID that holds its data) survives power loss.
        db.execute("PRAGMA synchronous = FULL")
        db.execute("PRAGMA foreign_keys = ON")
    except BaseException:
        db.close()
        raise
    return db


def _connect_checked(path: Path) -> sqlite3.Connection:
    """Connect to an existing file and make sure it is a medfs manifest."""
    try:
        db = _connect(path)
    except sqlite3.OperationalError as err:
        raise MedfsError(f"cannot open manifest {path}: {err}") from None
    except sqlite3.DatabaseError:
        raise FormatError(f"{path} is not a medfs manifest (not an SQLite database)") from None
    try:
        (app_id,) = db.execute("PRAGMA application_id").fetchone()
    except sqlite3.DatabaseError:
        db.close()
        raise FormatError(f"{path} is not a medfs manifest (not an SQLite database)") from None
    if app_id != APPLICATION_ID:
        db.close()
        raise FormatError(f"{path} is not a medfs manifest")
    return db


def _migrate_from_1(db: sqlite3.Connection) -> None:
    """Schema 1 lacks only the pin groups; adding them changes nothing already recorded."""
    db.execute("BEGIN IMMEDIATE")
    try:
        for statement in _PIN_GROUPS:
            db.execute(statement)
        version = str(SCHEMA_VERSION).encode()
        db.execute("UPDATE meta SET value = ? WHERE key = 'schema_version'", (version,))
        db.execute("COMMIT")
    except BaseException:
        db.rollback()
        raise


class Manifest:
    """An open manifest. Build it with `Manifest.initialize` or `Manifest.open`, not directly.

    Calls that handle names (lookup, children, create, rename, unlink, readlink, resolve,
    path_of, walk) need `unlock` first; the others work on a locked manifest. The connection
    belongs to the thread that opened it.
    """

    def __init__(self, db: sqlite3.Connection, path: Path) -> None:
        self._db: sqlite3.Connection | None = db
        self._names: NameCipher | None = None
        self._wal_fd: int | None = None  # see defer_sync
        self._owner: str | None = None  # see recipients_of
        self.path = path

    # -- lifecycle -------------------------------------------------------------------------

    @classmethod
    def initialize(
        cls,
        path: Path,
        *,
        owner: str,
        wrapped_key: bytes,
        names: NameCipher,
        uid: int,
        gid: int,
        now_ns: int,
        root_mode: int = 0o700,
    ) -> Manifest:
        """A new manifest at `path` with an empty root directory, already unlocked with `names`.

        FileExistsError if anything exists at `path` (never overwritten, symlinks not followed).
        """
        if not owner or not owner.isascii():
            raise ValueError("the owner fingerprint must be non-empty ASCII")
        _check_mode(root_mode)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        try:
            os.fchmod(fd, 0o600)  # exactly 0600 whatever the umask; -wal/-shm inherit it
        finally:
            os.close(fd)
        try:
            manifest = cls(_connect(path), path)
            try:
                db = manifest._conn
                db.execute(f"PRAGMA application_id = {APPLICATION_ID}")
                with manifest._write():
                    for statement in _SCHEMA:
                        db.execute(statement)
                    meta = {
                        "schema_version": str(SCHEMA_VERSION).encode(),
                        "owner": owner.encode("ascii"),
                        "wrapped_key": bytes(wrapped_key),
                        "key_check": names.key_check,
                    }
                    db.executemany("INSERT INTO meta VALUES (?, ?)", meta.items())
                    db.execute(
                        "INSERT INTO inodes (ino, kind, mode, uid, gid, atime_ns, mtime_ns,"
                        " ctime_ns, entry_id) VALUES (?, 'dir', ?, ?, ?, ?, ?, ?, ?)",
                        (ROOT_INODE, root_mode, uid, gid, now_ns, now_ns, now_ns, new_entry_id()),
                    )
            except BaseException:
                manifest.close()
                raise
        except BaseException:
            # Leave nothing half-made behind, so the same command can simply be run again.
            for suffix in ("", "-wal", "-shm"):
                with contextlib.suppress(FileNotFoundError):
                    Path(f"{path}{suffix}").unlink()
            raise
        # The file's own directory entry must be durable too.
        durable.fsync_path(path.absolute().parent, directory=True)
        manifest.unlock(names)
        return manifest

    @classmethod
    def open(cls, path: Path) -> Manifest:
        """Open an existing manifest (locked).

        FileNotFoundError if there is none; MedfsError if group or others can access it;
        FormatError if it is not a manifest or has a schema version this medfs does not know.
        """
        mode = path.stat().st_mode
        if mode & 0o077:
            raise MedfsError(
                f"manifest {path} is accessible by group or others (mode {stat.S_IMODE(mode):04o})",
                hint=f"make it private with: chmod 600 {path}",
            )
        db = _connect_checked(path)
        try:
            try:
                row = db.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
            except sqlite3.DatabaseError:
                raise FormatError(f"manifest {path} has no schema version") from None
            if row is None:
                raise FormatError(f"manifest {path} has no schema version")
            if row[0] == b"1":
                _migrate_from_1(db)
            elif row[0] != str(SCHEMA_VERSION).encode():
                shown = bytes(row[0]).decode("ascii", "replace")
                raise FormatError(
                    f"manifest {path} has schema version {shown[:20]}; this medfs reads only"
                    f" version {SCHEMA_VERSION}",
                    hint="a newer medfs wrote it: upgrade medfs to open it",
                )
        except BaseException:
            db.close()
            raise
        return cls(db, path)

    def close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None
        if self._wal_fd is not None:
            os.close(self._wal_fd)  # after the connection: it no longer holds any lock
            self._wal_fd = None

    def __enter__(self) -> Manifest:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def defer_sync(self) -> None:
        """From now on, commit without waiting for the disk (synchronous=NORMAL). A commit then
        survives this process being killed at once, and a power cut once `sync_to_disk` has
        run after it. For the mount daemon: an fsync per commit on the thread that serves FUSE
        would hold up every request behind it."""
        db = self._conn
        db.execute("PRAGMA synchronous = NORMAL")
        db.execute("SELECT count(*) FROM meta").fetchone()  # the -wal file exists from here on
        if self._wal_fd is None:
            # Opened once and kept until `close`: closing any descriptor of a database file
            # would drop every POSIX lock SQLite holds on it in this process, and another
            # process could then take the WAL away from under this connection.
            self._wal_fd = os.open(f"{self.path}-wal", os.O_RDONLY)

    def sync_to_disk(self) -> None:
        """Make every commit so far survive a power cut (blocking; safe from any thread). In
        WAL mode a commit is in the -wal file when it returns, and SQLite syncs the database
        file itself before a checkpoint empties the WAL. A no-op unless `defer_sync` ran
        (otherwise each commit was synced already)."""
        if self._wal_fd is not None:
            os.fsync(self._wal_fd)

    def unlock(self, names: NameCipher) -> None:
        """Enable the name-handling calls. FormatError if `names` is not this manifest's key."""
        stored = self.get_meta("key_check")
        if stored is None or not hmac.compare_digest(stored, names.key_check):
            raise FormatError("the manifest key does not open this manifest")
        self._names = names

    @property
    def _conn(self) -> sqlite3.Connection:
        if self._db is None:
            raise RuntimeError("the manifest is closed")
        return self._db

    @property
    def _cipher(self) -> NameCipher:
        if self._names is None:
            raise RuntimeError("the manifest is locked: call unlock() first")
        return self._names

    @contextlib.contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """One atomic transaction; IMMEDIATE takes the write lock up front, so no upgrade fails."""
        db = self._conn
        if db.in_transaction:
            raise RuntimeError("manifest transactions do not nest")
        db.execute("BEGIN IMMEDIATE")
        try:
            yield db
            db.execute("COMMIT")
        except BaseException:
            db.rollback()  # a no-op if SQLite has already ended the transaction (a failed COMMIT)
            raise

    # -- meta ------------------------------------------------------------------------------

    def get_meta(self, key: str) -> bytes | None:
        row = self._conn.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return None if row is None else bytes(row[0])

    def set_meta(self, key: str, value: bytes) -> None:
        """Store a caller's value. The keys this module manages itself are refused."""
        if key in _RESERVED_META:
            raise ValueError(f"meta key {key!r} is managed by the manifest itself")
        with self._write() as db:
            db.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (key, bytes(value)))

    @property
    def owner(self) -> str:
        """The owner's identity fingerprint."""
        return self._required_meta("owner").decode("ascii")

    @property
    def wrapped_key(self) -> bytes:
        """The manifest key wrapped for the owner (a recipients.Stanza in bytes)."""
        return self._required_meta("wrapped_key")

    def _required_meta(self, key: str) -> bytes:
        value = self.get_meta(key)
        if value is None:
            raise FormatError(f"manifest {self.path} has no {key}")
        return value

    # -- reading ---------------------------------------------------------------------------

    def data_version(self) -> int:
        """A number that changes when another connection (another process: a revoke) has
        committed since the last call; this connection's own commits leave it. Cheaper than
        any query, so a caller can keep what it read until it changes."""
        return int(self._conn.execute("PRAGMA data_version").fetchone()[0])

    def get(self, ino: int) -> Inode | None:
        row = self._conn.execute(_GET, (ino,)).fetchone()
        return None if row is None else _inode(row)

    def lookup(self, parent: int, name: bytes) -> Inode | None:
        """The inode `name` in directory `parent`, or None.

        FileNotFoundError / NotADirectoryError if `parent` is missing / not a directory.
        """
        _check_name(name)
        self._need_dir(parent)
        sealed = self._cipher.seal_name(parent, name)
        row = self._conn.execute(_LOOKUP, (parent, sealed)).fetchone()
        return None if row is None else _inode(row)

    def children(
        self, parent: int, after: int = 0, limit: int | None = None
    ) -> list[tuple[int, bytes, Inode]]:
        """(dirent id, name, inode) of `parent`'s entries with id > `after`, in id order.

        Ids only grow and are never reused, so the last id of a page is a stable readdir offset:
        entries added or removed between pages never make a surviving entry skip or repeat.
        """
        self._need_dir(parent)
        rows = self._conn.execute(
            _CHILDREN, (parent, after, -1 if limit is None else limit)
        ).fetchall()
        cipher = self._cipher
        return [(row[0], cipher.open_name(parent, row[1]), _inode(row[2:])) for row in rows]

    def has_children(self, parent: int) -> bool:
        row = self._conn.execute(
            "SELECT EXISTS (SELECT 1 FROM dirents WHERE parent = ?)", (parent,)
        ).fetchone()
        return bool(row[0])

    def parent_of(self, ino: int) -> int | None:
        """The directory holding `ino`; None for the root, an unlinked inode or an unknown one."""
        row = self._conn.execute("SELECT parent FROM dirents WHERE ino = ?", (ino,)).fetchone()
        return None if row is None else int(row[0])

    def readlink(self, ino: int) -> bytes:
        """A symlink's target. FileNotFoundError if missing, EINVAL if not a symlink."""
        row = self._conn.execute("SELECT kind, target FROM inodes WHERE ino = ?", (ino,)).fetchone()
        if row is None:
            raise _oserror(errno.ENOENT, f"no inode {ino}")
        if row[0] != Kind.SYMLINK:
            raise _oserror(errno.EINVAL, f"inode {ino} is not a symlink")
        return self._cipher.open_target(ino, row[1])

    def wraps(self, ino: int) -> dict[str, bytes]:
        """fingerprint -> stanza for the current version of `ino`."""
        self._need(ino)
        rows = self._conn.execute(
            "SELECT fingerprint, stanza FROM wraps WHERE ino = ? ORDER BY fingerprint", (ino,)
        )
        return {fingerprint: bytes(stanza) for fingerprint, stanza in rows}

    def wrap(self, ino: int, fingerprint: str) -> bytes | None:
        """`fingerprint`'s stanza for the current version of `ino`, or None."""
        row = self._conn.execute(
            "SELECT stanza FROM wraps WHERE ino = ? AND fingerprint = ?", (ino, fingerprint)
        ).fetchone()
        return None if row is None else bytes(row[0])

    def wrapped_for(
        self, fingerprint: str, inos: Sequence[int]
    ) -> dict[int, tuple[Inode, bytes | None]]:
        """ino -> (inode, `fingerprint`'s stanza or None) for each of `inos` still present.

        For callers that handle thousands of files (share): a query per few hundred, not one
        per file. Each inode comes from the same statement as its stanza, so the stanza is
        always the one made for that version, even while a running mount commits newer ones.
        """
        out: dict[int, tuple[Inode, bytes | None]] = {}
        for start in range(0, len(inos), _IN_BATCH):
            part = inos[start : start + _IN_BATCH]
            marks = ", ".join("?" * len(part))
            rows = self._conn.execute(_WRAPPED_FOR.format(marks=marks), (fingerprint, *part))
            for row in rows:
                stanza = row[-1]
                out[row[0]] = (_inode(row[:-1]), None if stanza is None else bytes(stanza))
        return out

    def files_wrapped_for(self, fingerprint: str) -> list[int]:
        """The inodes whose current version has a wrap for `fingerprint`."""
        rows = self._conn.execute(
            "SELECT ino FROM wraps WHERE fingerprint = ? ORDER BY ino", (fingerprint,)
        )
        return [ino for (ino,) in rows]

    def orphans(self) -> list[Inode]:
        """Inodes (not the root) without a directory entry: unlinked while open, then a crash."""
        rows = self._conn.execute(_ORPHANS)
        return [_inode(row) for row in rows]

    def uncommitted_files(self) -> list[Inode]:
        """Linked files without any version: created by a daemon that died before they were
        closed. (A closed file always has one, an empty file too.)"""
        rows = self._conn.execute(
            f"SELECT {_INODE} FROM inodes i JOIN dirents d ON d.ino = i.ino"  # noqa: S608
            " WHERE i.kind = 'file' AND i.cid IS NULL ORDER BY i.ino"
        )
        return [_inode(row) for row in rows]

    def resolve(self, path: str | bytes) -> Inode | None:
        """The inode at `path` ('/a/b' or 'a/b', from the root), or None. Symlinks are not
        followed; '.' and '..' are understood."""
        node = self.get(ROOT_INODE)
        for part in os.fsencode(path).split(b"/"):
            if node is None or node.kind is not Kind.DIR:
                return None
            if part in (b"", b"."):
                continue
            if part == b"..":
                node = self.get(self.parent_of(node.ino) or ROOT_INODE)
            else:
                node = self.lookup(node.ino, part)
        return node

    def path_of(self, ino: int) -> bytes | None:
        """The absolute path of `ino` inside the tree (b"/" for the root); None if unlinked."""
        if self.get(ino) is None:
            return None
        links = list(self._ancestry(ino))
        if (links[-1][1] if links else ino) != ROOT_INODE:
            return None  # unlinked, or below an unlinked directory
        parts = [self._cipher.open_name(parent, sealed) for _, parent, sealed in reversed(links)]
        return b"/" + b"/".join(parts)

    def walk(self, top: int = ROOT_INODE) -> Iterator[tuple[bytes, Inode]]:
        """(path, inode) for `top` and everything below it, depth-first, each level in id order.

        Iterative, one page of entries per open level: deep or wide trees cost little memory.
        """
        node, path = self.get(top), self.path_of(top)
        if node is None or path is None:
            raise _oserror(errno.ENOENT, f"no linked inode {top}")
        yield path, node
        if node.kind is not Kind.DIR:
            return
        stack = [(path, self._entries(top))]
        while stack:
            base, entries = stack[-1]
            entry = next(entries, None)
            if entry is None:
                stack.pop()
                continue
            name, child = entry
            child_path = base.rstrip(b"/") + b"/" + name
            yield child_path, child
            if child.kind is Kind.DIR:
                stack.append((child_path, self._entries(child.ino)))

    def cids(self) -> set[str]:
        """Every CID the manifest refers to (what must stay pinned)."""
        rows = self._conn.execute("SELECT cid FROM inodes WHERE cid IS NOT NULL")
        return {cid for (cid,) in rows}

    def serialize(self) -> bytes:
        """A consistent copy of the whole database file, as bytes (for manifest snapshots).

        SQLite's online backup copies every page within one read transaction, so the copy is
        one committed state even while this or another connection writes. Nothing touches the
        disk: the copy is built in memory.
        """
        copy = sqlite3.connect(":memory:")
        try:
            self._conn.backup(copy)
            return copy.serialize()
        finally:
            copy.close()

    def statistics(self) -> Stats:
        """(files, directories including the root, bytes in files), over all inodes."""
        row = self._conn.execute(
            "SELECT count(*) FILTER (WHERE kind = 'file'), count(*) FILTER (WHERE kind = 'dir'),"
            " coalesce(sum(size) FILTER (WHERE kind = 'file'), 0) FROM inodes"
        ).fetchone()
        return Stats(*row)

    # -- writing ---------------------------------------------------------------------------

    def create(
        self,
        parent: int,
        name: bytes,
        kind: Kind | str,
        mode: int,
        uid: int,
        gid: int,
        now_ns: int,
        target: bytes | None = None,
        entry_id: bytes | None = None,
    ) -> Inode:
        """A new inode linked as `name` in `parent`; the parent's mtime and ctime become now_ns.

        `entry_id` is new and random unless given (a recipient importing a share keeps the
        issuer's, since the wraps it received are bound to it).

        `target` is required for a symlink and refused otherwise. FileExistsError if the name is
        taken; FileNotFoundError if `parent` is missing or unlinked; NotADirectoryError.
        """
        kind = Kind(kind)  # ValueError for anything but "file", "dir" or "symlink"
        _check_name(name)
        _check_mode(mode)
        if (kind is Kind.SYMLINK) != (target is not None):
            raise ValueError("a symlink needs a target, and only a symlink has one")
        if target is not None:
            _check_target(target)
        cipher = self._cipher
        entry_id = new_entry_id() if entry_id is None else bytes(entry_id)
        size = 0 if target is None else len(target)
        with self._write() as db:
            self._need_dir(parent, linked=True)
            sealed = cipher.seal_name(parent, name)
            if self._find(parent, sealed) is not None:
                raise _oserror(errno.EEXIST, f"the name is taken in directory {parent}")
            ino = db.execute(
                "INSERT INTO inodes (kind, mode, uid, gid, size, atime_ns, mtime_ns, ctime_ns,"
                " target, entry_id) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    kind.value,
                    mode,
                    uid,
                    gid,
                    size,
                    now_ns,
                    now_ns,
                    now_ns,
                    # The sealed target is bound to the inode number, known only after the insert.
                    None if target is None else b"",
                    entry_id,
                ),
            ).lastrowid
            assert ino is not None
            if target is not None:
                db.execute(
                    "UPDATE inodes SET target = ? WHERE ino = ?",
                    (cipher.seal_target(ino, target), ino),
                )
            db.execute(
                "INSERT INTO dirents (parent, name, ino) VALUES (?, ?, ?)", (parent, sealed, ino)
            )
            self._touch(parent, now_ns)
        # What was just written, without reading it back: cp -r creates thousands of these.
        return Inode(ino, kind, mode, uid, gid, size, now_ns, now_ns, now_ns,
                     None, None, None, None, entry_id)  # fmt: skip

    def set_attrs(
        self,
        ino: int,
        *,
        mode: int | None = None,
        uid: int | None = None,
        gid: int | None = None,
        size: int | None = None,
        atime_ns: int | None = None,
        mtime_ns: int | None = None,
        ctime_ns: int | None = None,
    ) -> Inode:
        """Change the given attributes (no others, not even ctime). FileNotFoundError."""
        if mode is not None:
            _check_mode(mode)
        if size is not None and size < 0:
            raise ValueError("size must not be negative")
        given = {"mode": mode, "uid": uid, "gid": gid, "size": size}
        given |= {"atime_ns": atime_ns, "mtime_ns": mtime_ns, "ctime_ns": ctime_ns}
        changes = {column: value for column, value in given.items() if value is not None}
        with self._write() as db:
            self._need(ino)
            if changes:
                # Column names come from the fixed list above, never from the caller.
                assignments = ", ".join(f"{column} = ?" for column in changes)
                db.execute(
                    f"UPDATE inodes SET {assignments} WHERE ino = ?",  # noqa: S608
                    (*changes.values(), ino),
                )
        return self._need(ino)

    def unlink(self, parent: int, name: bytes, *, now_ns: int) -> Inode:
        """Remove the entry `name` from `parent` (unlink and rmdir) and return its inode.

        The inode row stays, so an open file stays readable: call `delete_inode` once the last
        reference is gone. The parent's mtime/ctime and the inode's ctime become now_ns.
        FileNotFoundError if there is no such entry; ENOTEMPTY for a directory with entries.
        Checking file versus directory (EISDIR/ENOTDIR) is the caller's part.
        """
        _check_name(name)
        cipher = self._cipher
        with self._write() as db:
            self._need_dir(parent)
            found = self._find(parent, cipher.seal_name(parent, name))
            if found is None:
                raise _oserror(errno.ENOENT, f"no such entry in directory {parent}")
            dirent, ino = found
            if self.has_children(ino):
                raise _oserror(errno.ENOTEMPTY, f"directory {ino} is not empty")
            db.execute("DELETE FROM dirents WHERE id = ?", (dirent,))
            self._touch(parent, now_ns)
            db.execute("UPDATE inodes SET ctime_ns = ? WHERE ino = ?", (now_ns, ino))
        return self._need(ino)

    def delete_inode(self, ino: int) -> Inode:
        """Remove an unlinked inode and its wraps; returns it (the caller unpins `.cid`).

        FileNotFoundError if missing; ValueError for the root or an inode that is still linked.
        """
        with self._write() as db:
            inode = self._need(ino)
            if ino == ROOT_INODE:
                raise ValueError("the root directory cannot be deleted")
            if self.parent_of(ino) is not None:
                raise ValueError(f"inode {ino} is still linked")
            db.execute("DELETE FROM wraps WHERE ino = ?", (ino,))
            db.execute("DELETE FROM inodes WHERE ino = ?", (ino,))
        return inode

    def rename(
        self, old_parent: int, old_name: bytes, new_parent: int, new_name: bytes, *, now_ns: int
    ) -> Inode | None:
        """Move an entry, in one transaction; returns the inode it replaced, if any.

        A replaced entry's dirent is removed (its inode stays, as after `unlink`); the caller
        decides when to delete it and unpin its CID. POSIX rules: a directory may only replace
        an empty directory (else ENOTDIR / ENOTEMPTY), anything else only a non-directory (else
        EISDIR), and a directory cannot move below itself (EINVAL). FileNotFoundError if the
        source or either parent is missing. Renaming an entry onto itself does nothing.
        """
        _check_name(old_name)
        _check_name(new_name)
        cipher = self._cipher
        with self._write() as db:
            self._need_dir(old_parent)
            self._need_dir(new_parent, linked=True)
            source = self._find(old_parent, cipher.seal_name(old_parent, old_name))
            if source is None:
                raise _oserror(errno.ENOENT, f"no such entry in directory {old_parent}")
            dirent, ino = source
            if old_parent == new_parent and old_name == new_name:
                return None
            moving = self._need(ino)
            if moving.kind is Kind.DIR and any(
                child == ino for child, _, _ in self._ancestry(new_parent)
            ):
                raise _oserror(errno.EINVAL, f"directory {ino} cannot move below itself")
            sealed = cipher.seal_name(new_parent, new_name)
            replaced: Inode | None = None
            existing = self._find(new_parent, sealed)
            if existing is not None:
                replaced = self._need(existing[1])
                if moving.kind is Kind.DIR and replaced.kind is not Kind.DIR:
                    raise _oserror(errno.ENOTDIR, f"inode {replaced.ino} is not a directory")
                if moving.kind is not Kind.DIR and replaced.kind is Kind.DIR:
                    raise _oserror(errno.EISDIR, f"inode {replaced.ino} is a directory")
                if self.has_children(replaced.ino):
                    raise _oserror(errno.ENOTEMPTY, f"directory {replaced.ino} is not empty")
                db.execute("DELETE FROM dirents WHERE id = ?", (existing[0],))
                db.execute("UPDATE inodes SET ctime_ns = ? WHERE ino = ?", (now_ns, replaced.ino))
                replaced = self._need(replaced.ino)
            # UPDATE, not delete and insert: the entry keeps its id, so a readdir in progress in
            # the same directory neither loses nor repeats it.
            db.execute(
                "UPDATE dirents SET parent = ?, name = ? WHERE id = ?", (new_parent, sealed, dirent)
            )
            self._touch(old_parent, now_ns)
            self._touch(new_parent, now_ns)
            db.execute("UPDATE inodes SET ctime_ns = ? WHERE ino = ?", (now_ns, ino))
        return replaced

    def commit_version(
        self,
        ino: int,
        *,
        cid: str,
        salt: bytes,
        size: int,
        format: int,
        mtime_ns: int,
        version_ns: int,
        wraps: Mapping[str, bytes],
        expected_cid: str | object | None = ANY_CID,
    ) -> str | None:
        """Make an uploaded object the file's current version, in one transaction.

        With `expected_cid`, the commit happens only if the current CID is still that one (a
        re-encryption racing a newer write must not undo it): VersionConflict otherwise.
        `wraps` must be keyed by exactly `recipients_of(ino)` at the time of the commit:
        RecipientsChanged otherwise.

        Replaces cid, salt, size, format, mtime_ns, version_ns and every wrap (ctime moves up to
        at least mtime_ns). Returns what the caller should unpin now that the previous version
        is gone (as `release` does), or None. FileNotFoundError if missing; IsADirectoryError or
        EINVAL if not a regular file; ValueError for an empty `wraps`.
        """
        version = NewVersion(ino, cid, salt, size, format, mtime_ns, version_ns, wraps)
        _check_version(version)
        with self._write():
            (inode,) = self._check_recipients([version])
            return self._release(self._commit_version(version, inode, expected_cid))

    def commit_group(self, versions: Sequence[NewVersion], group: str) -> list[str]:
        """Commit versions uploaded together under the pinned directory `group`, in one
        transaction; the group's pin keeps them from now on. Returns what to unpin.
        RecipientsChanged, naming every such file, if any is wrapped for others than
        `recipients_of` it (then nothing is committed)."""
        if not versions:
            raise ValueError("a group commit needs at least one version")
        for version in versions:
            _check_version(version)
        if len({v.ino for v in versions}) != len(versions):
            raise ValueError("a group commit takes one version of each file")
        unpin = []
        with self._write() as db:
            inodes = self._check_recipients(versions)
            for version, inode in zip(versions, inodes, strict=True):
                old = self._commit_version(version, inode, ANY_CID)
                moved = None
                if self.pin_group_of(version.cid) is not None:
                    # Committed before already (a crash came before its staging copy went):
                    # the new group keeps it from now on.
                    moved = self._release(version.cid)
                db.execute("INSERT INTO pin_groups VALUES (?, ?)", (version.cid, group))
                for gone in (self._release(old), moved):
                    if gone is not None and gone != group:
                        unpin.append(gone)
        return unpin

    def release(self, cid: str) -> str | None:
        """`cid` is no longer anyone's version: what to unpin. Its own CID, if it was pinned on
        its own; its group's, once the group keeps no other version; else None."""
        with self._write():
            return self._release(cid)

    def _release(self, cid: str | None) -> str | None:
        if cid is None:
            return None
        db = self._conn
        row = db.execute("SELECT grp FROM pin_groups WHERE member = ?", (cid,)).fetchone()
        if row is None:
            return cid
        db.execute("DELETE FROM pin_groups WHERE member = ?", (cid,))
        left = db.execute("SELECT 1 FROM pin_groups WHERE grp = ? LIMIT 1", row).fetchone()
        return None if left else str(row[0])

    def pin_group_of(self, cid: str) -> str | None:
        """The group whose pin keeps version `cid`, or None if it is pinned on its own."""
        row = self._conn.execute("SELECT grp FROM pin_groups WHERE member = ?", (cid,)).fetchone()
        return None if row is None else str(row[0])

    def pin_groups(self) -> set[str]:
        """Every group pin that still keeps a version."""
        return {grp for (grp,) in self._conn.execute("SELECT DISTINCT grp FROM pin_groups")}

    def pinned_alone(self, cid: str) -> None:
        """Version `cid` is pinned on its own from now on; its group no longer keeps it."""
        with self._write() as db:
            db.execute("DELETE FROM pin_groups WHERE member = ?", (cid,))

    def forget_pin_groups(self) -> None:
        """Every version is pinned on its own from now on (a restore on another node)."""
        with self._write() as db:
            db.execute("DELETE FROM pin_groups")

    def _check_recipients(self, versions: Sequence[NewVersion]) -> list[Inode]:
        """Refuse versions not wrapped for exactly the people who may read their file now
        (transaction open, so no grant can land between this and the commit). Committers read
        the recipients, then wrap on another thread: a `medfs share` that adds its grant
        meanwhile wraps only the versions committed before it, so a version wrapped for the
        old recipients would stay unreadable to the new one, and one wrapped before a
        revocation would stay readable to the revoked one. Returns the versions' inodes as
        they are before the commit."""
        inodes = [self._need_file(v.ino) for v in versions]  # missing, or not a file: first
        stale = [v.ino for v in versions if set(v.wraps) != self.recipients_of(v.ino)]
        if stale:
            raise RecipientsChanged(stale)
        return inodes

    def _need_file(self, ino: int) -> Inode:
        inode = self._need(ino)
        if inode.kind is not Kind.FILE:
            code = errno.EISDIR if inode.kind is Kind.DIR else errno.EINVAL
            raise _oserror(code, f"inode {ino} is not a regular file")
        return inode

    def recipients_of(self, ino: int) -> set[str]:
        """The fingerprints a new version of `ino` must be wrapped for: the owner's and every
        grantee's (`grantees`)."""
        if self._owner is None:
            self._owner = self.owner  # a manifest's owner never changes
        return {self._owner, *self.grantees(ino)}

    def _commit_version(
        self, v: NewVersion, inode: Inode, expected_cid: str | object | None
    ) -> str | None:
        """The previous CID, or None if there was none or it is the same (transaction open;
        `inode` is v's file as it is in it)."""
        db = self._conn
        if expected_cid is not ANY_CID and inode.cid != expected_cid:
            raise VersionConflict(f"inode {v.ino} has a newer version")
        db.execute(
            "UPDATE inodes SET cid = ?, salt = ?, size = ?, format = ?, mtime_ns = ?,"
            " ctime_ns = max(ctime_ns, ?), version_ns = ? WHERE ino = ?",
            (v.cid, bytes(v.salt), v.size, v.format, v.mtime_ns, v.mtime_ns, v.version_ns, v.ino),
        )
        db.execute("DELETE FROM wraps WHERE ino = ?", (v.ino,))
        for fingerprint, stanza in v.wraps.items():
            self._insert_wrap(v.ino, fingerprint, stanza)
        return None if inode.cid == v.cid else inode.cid

    def add_wrap(self, ino: int, fingerprint: str, stanza: bytes) -> None:
        """Add (or replace) one recipient's wrap of the current version, e.g. for a share.

        FileNotFoundError if missing; ValueError if the file has no committed version yet, or
        if `fingerprint` is neither the owner nor a grantee of the file (`recipients_of`).
        """
        with self._write():
            if self._need(ino).cid is None:
                raise ValueError(f"inode {ino} has no committed version to share")
            if fingerprint not in self.recipients_of(ino):
                raise ValueError(f"{fingerprint} has no grant on inode {ino}")
            self._insert_wrap(ino, fingerprint, stanza)

    def add_wraps(self, wraps: Sequence[tuple[int, str, str, bytes]]) -> int:
        """Add (or replace) many recipients' wraps `(ino, cid, fingerprint, stanza)` in one
        transaction, each only if `cid` is still the file's version (a newer one, committed
        meanwhile by a running mount, was wrapped for current grantees already) and the
        fingerprint is still one of its `recipients_of` (a revoke or a move since the wrap was
        made must not be undone). Returns how many were added."""
        for _ino, _cid, fingerprint, stanza in wraps:
            _check_wrap(fingerprint, stanza)
        with self._write() as db:
            rows = [
                (ino, fpr, stanza, ino, cid)
                for ino, cid, fpr, stanza in wraps
                if fpr in self.recipients_of(ino)
            ]
            return db.executemany(_INSERT_WRAP_IF_CURRENT, rows).rowcount

    def remove_wrap(self, ino: int, fingerprint: str) -> None:
        """Remove one recipient's wrap. KeyError if absent; ValueError for the last one."""
        with self._write() as db:
            current = self.wraps(ino)
            if fingerprint not in current:
                raise KeyError(fingerprint)
            if len(current) == 1:
                raise ValueError(f"the last wrap of inode {ino} cannot be removed")
            db.execute("DELETE FROM wraps WHERE ino = ? AND fingerprint = ?", (ino, fingerprint))

    # -- grants ----------------------------------------------------------------------------

    def add_grant(self, ino: int, fingerprint: str, public: bytes, *, now_ns: int) -> None:
        """Let `fingerprint` (whose public identity file is `public`) read `ino` and below."""
        with self._write() as db:
            self._need(ino)
            db.execute(
                "INSERT OR REPLACE INTO grants VALUES (?, ?, ?, ?)",
                (ino, fingerprint, bytes(public), now_ns),
            )

    def remove_grant(self, ino: int, fingerprint: str) -> bool:
        with self._write() as db:
            cur = db.execute(
                "DELETE FROM grants WHERE ino = ? AND fingerprint = ?", (ino, fingerprint)
            )
            return cur.rowcount > 0

    def grants(self) -> list[tuple[int, str, bytes, int]]:
        """Every grant: (inode, fingerprint, public identity, created_ns)."""
        rows = self._conn.execute("SELECT ino, fingerprint, public, created_ns FROM grants")
        return [(ino, fpr, bytes(public), created) for ino, fpr, public, created in rows]

    def grantees(self, ino: int) -> dict[str, bytes]:
        """Who may read `ino`: the grants on it and on every directory above it (the nearest
        one's public file, should two name the same identity)."""
        if self._conn.execute("SELECT 1 FROM grants LIMIT 1").fetchone() is None:
            return {}  # nothing is shared: no walk up the tree (every commit asks, twice)
        chain = [ino] + [parent for _, parent, _ in self._ancestry(ino)]
        # One query for the whole chain, not one per level: every committed version asks.
        marks = ",".join("?" * len(chain))  # placeholders only, hence the noqa
        rows = self._conn.execute(
            f"SELECT ino, fingerprint, public FROM grants WHERE ino IN ({marks})",  # noqa: S608
            chain,
        ).fetchall()
        depth = {node: i for i, node in enumerate(chain)}
        out: dict[str, bytes] = {}
        for _, fpr, public in sorted(rows, key=lambda row: depth[row[0]]):
            out.setdefault(fpr, bytes(public))
        return out

    def next_sequence(self, fingerprint: str) -> int:
        """The next share-manifest sequence number for a recipient (1, 2, ...), recorded."""
        with self._write() as db:
            row = db.execute(
                "SELECT last FROM share_sequence WHERE fingerprint = ?", (fingerprint,)
            ).fetchone()
            value = (row[0] if row else 0) + 1
            db.execute("INSERT OR REPLACE INTO share_sequence VALUES (?, ?)", (fingerprint, value))
            return value

    # -- helpers ---------------------------------------------------------------------------

    def _need(self, ino: int) -> Inode:
        _check_ino(ino)
        inode = self.get(ino)
        if inode is None:
            raise _oserror(errno.ENOENT, f"no inode {ino}")
        return inode

    def _need_dir(self, ino: int, *, linked: bool = False) -> Inode:
        inode = self._need(ino)
        if inode.kind is not Kind.DIR:
            raise _oserror(errno.ENOTDIR, f"inode {ino} is not a directory")
        # Nothing may be created in a removed directory (Linux answers ENOENT too).
        if linked and ino != ROOT_INODE and self.parent_of(ino) is None:
            raise _oserror(errno.ENOENT, f"directory {ino} has been removed")
        return inode

    def _find(self, parent: int, sealed: bytes) -> tuple[int, int] | None:
        """(dirent id, inode) of the sealed name in `parent`."""
        row = self._conn.execute(
            "SELECT id, ino FROM dirents WHERE parent = ? AND name = ?", (parent, sealed)
        ).fetchone()
        return None if row is None else (int(row[0]), int(row[1]))

    def _ancestry(self, ino: int) -> Iterator[tuple[int, int, bytes]]:
        """(inode, its parent, its sealed name) for each link from `ino` up to the top (the
        root, or an unlinked directory)."""
        seen = {ino}
        current = ino
        while row := self._conn.execute(
            "SELECT parent, name FROM dirents WHERE ino = ?", (current,)
        ).fetchone():
            parent = int(row[0])
            yield current, parent, bytes(row[1])
            if parent in seen:
                raise FormatError("the manifest tree has a cycle")
            seen.add(parent)
            current = parent

    def _entries(self, parent: int) -> Iterator[tuple[bytes, Inode]]:
        after = 0
        while page := self.children(parent, after, _PAGE):
            for _, name, inode in page:
                yield name, inode
            after = page[-1][0]

    def _touch(self, directory: int, now_ns: int) -> None:
        self._conn.execute(
            "UPDATE inodes SET mtime_ns = ?, ctime_ns = ? WHERE ino = ?",
            (now_ns, now_ns, directory),
        )

    def _insert_wrap(
        self, ino: int, fingerprint: str, stanza: bytes, *, if_cid: str | None = None
    ) -> int:
        """Insert (or replace) a wrap; with `if_cid`, only while that is the file's version.
        Returns 1 if it was written, else 0."""
        _check_wrap(fingerprint, stanza)
        if if_cid is None:
            return self._conn.execute(_INSERT_WRAP, (ino, fingerprint, stanza)).rowcount
        args = (ino, fingerprint, stanza, ino, if_cid)
        return self._conn.execute(_INSERT_WRAP_IF_CURRENT, args).rowcount
