"""The audit log: an append-only, hash-chained, signed record of what happened to the records.

Two files in the state directory:

    <state>/audit.log           one entry per line; mode 0600; only ever appended to
    <state>/audit-anchors.json  the anchors taken so far (signed count and head; also on IPFS)

An entry is one line of canonical JSON (keys sorted, no spaces, ASCII only), then LF:

    {"actor":FPR,"cid":CID|null,"event":EVENT,"prev":HEX,"sealed":B64,"seq":N,"sig":B64,
     "time_ns":T,"v":1}

- `seq` counts from 0. `prev` is the SHA-256 (hex) of the previous line's bytes without its LF,
  64 zeros for entry 0: the lines form a hash chain.
- `sig` is the actor's Ed25519 signature, purpose "audit-entry", over the line without "sig".
- `sealed` holds every detail that names something (paths, command names, recipients, reasons):
  salt (16 bytes) || AES-256-GCM(entry key, zero nonce, details, aad = the public fields), where
  the details are canonical JSON padded with spaces to a multiple of 64 bytes (so the length
  says little about a name), entry key = HKDF-SHA256(audit key, salt, ENTRY_INFO) (a fresh key
  per entry, so the zero nonce never repeats), audit key = `audit_key(manifest key)`, and the
  public fields are the line without "sealed" and "sig".

So the chain and the signatures verify with the public identity alone: an auditor can prove the
log intact without being able to read a single path; `read_entries` needs the key.

Writers: the mount daemon and CLI commands (share, revoke, anchor) may write at the same time.
Each write holds an exclusive flock on the file just long enough to read the newest entry, sign
its own entries onto the chain after it, write and fsync; readers (`verify`) take a shared lock.

Durability: `append` writes the line and fsyncs before it returns, so an acknowledged operation
has its entry on disk. `append_batched` (reads) does no I/O at all: it queues the event; it is
signed onto the chain when written. A flusher thread writes the queue with one write and one
fsync once it is BATCH_SIZE entries long or its oldest entry is `batch_delay` old, and any
durable append, `flush` or `close` takes the queue along first, so the file order is always the
seq order. A crash loses at most the last `batch_delay` of reads, never a write, share or
revoke, and never breaks the chain: the file only ever holds a prefix of the chain plus, at
worst, one torn line.

Recovery: on open the writer drops a torn tail (bytes after the last LF, or zero-filled lines a
crash can leave behind) - such bytes were never acknowledged, since appends fsync whole lines -
and records a "recovered" entry with the number and hash of the bytes dropped. A damaged last
line that a crash cannot explain makes it refuse (AuditError), so no new entry buries evidence.

Anchors: `anchor` signs {count, head} (purpose "audit-anchor"), adds that document to IPFS, logs
an "anchor" entry with its CID and records it in the anchors file. `verify` checks that the log
still extends every anchor it is given. Without an anchor, cutting entries off the end of a log
is undetectable by construction (what remains is a valid chain); entries after the last anchor,
at least that anchor's own entry, stay unprotected against truncation. Someone who can rewrite
both the log and the anchors file can roll both back together; an anchor CID kept elsewhere
(`medfs audit verify --anchor CID`) still catches that. Someone holding the private key can
rewrite history from any point after the last anchor they cannot replace.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import io
import json
import logging
import os
import re
import stat
import threading
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, BinaryIO, Protocol

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from medfs import durable, recipients
from medfs.errors import AuditError, FormatError
from medfs.identity import Identity, PublicIdentity

log = logging.getLogger(__name__)

LOG_NAME = "audit.log"
ANCHORS_NAME = "audit-anchors.json"
VERSION = 1
KEY_SIZE = 32
KEY_INFO = b"medfs v1 audit log"
ENTRY_INFO = b"medfs v1 audit entry"
ENTRY_PURPOSE = "audit-entry"
ANCHOR_PURPOSE = "audit-anchor"
ANCHOR_TYPE = "medfs-audit-anchor"
GENESIS = "0" * 64
SALT_SIZE = 16
PAD_TO = 64
MAX_LINE = 1 << 20
# Reads are batched: at most this many entries, or this many seconds, between fsyncs.
BATCH_SIZE = 256
BATCH_DELAY = 1.0

# The events the filesystem records. Others matching EVENT_RE are accepted (newer writers).
EVENTS = frozenset(
    {
        "mount",
        "unmount",
        "create",
        "version",
        "open",
        "delete",
        "rename",
        "share",
        "share-refused",
        "revoke",
        "manifest-accepted",
        "manifest-refused",
        "anchor",
        "recovered",
        "restored",
        "export-package",
        "import-package",
    }
)
EVENT_RE = re.compile(r"[a-z][a-z0-9-]{0,31}")
_CID_RE = re.compile(r"[A-Za-z0-9]{1,128}")
_HEX_RE = re.compile(r"[0-9a-f]{64}")
_ENTRY_KEYS = frozenset({"v", "seq", "time_ns", "actor", "event", "cid", "prev", "sealed", "sig"})
_ANCHOR_KEYS = frozenset({"type", "v", "count", "head", "time_ns", "actor", "sig"})
_SIG_SIZE = 64
_CHUNK = 1 << 16


def audit_key(manifest_key: bytes) -> bytes:
    """The key that seals the log's details, derived from the state's manifest key."""
    if len(manifest_key) != KEY_SIZE:
        raise ValueError(f"the manifest key must be {KEY_SIZE} bytes")
    return HKDF(hashes.SHA256(), KEY_SIZE, salt=None, info=KEY_INFO).derive(manifest_key)


def log_path(state_root: Path) -> Path:
    return state_root / LOG_NAME


def anchors_path(state_root: Path) -> Path:
    return state_root / ANCHORS_NAME


# --- canonical JSON -----------------------------------------------------------------------------


def canonical(obj: Mapping[str, Any]) -> bytes:
    """The one byte spelling of a JSON object that medfs signs and hashes."""
    text = json.dumps(
        obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False
    )
    return text.encode("ascii")


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result = dict(pairs)
    if len(result) != len(pairs):
        raise ValueError("duplicate key")
    return result


def _no_constants(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _parse_canonical(data: bytes, what: str) -> dict[str, Any]:
    try:
        obj = json.loads(
            data.decode("ascii"), object_pairs_hook=_no_duplicates, parse_constant=_no_constants
        )
    except (UnicodeDecodeError, ValueError):
        raise FormatError(f"{what} is not a JSON object") from None
    if not isinstance(obj, dict):
        raise FormatError(f"{what} is not a JSON object")
    if canonical(obj) != data:
        raise FormatError(f"{what} is not in canonical form (re-encoded or edited by hand)")
    return obj


def _count(obj: Mapping[str, Any], key: str, what: str) -> int:
    value = obj[key]
    if type(value) is not int or value < 0:
        raise FormatError(f"{what}: {key} must be a non-negative integer")
    return value


def _text(obj: Mapping[str, Any], key: str, pattern: re.Pattern[str], what: str) -> str:
    value = obj[key]
    if not isinstance(value, str) or not pattern.fullmatch(value):
        raise FormatError(f"{what}: malformed {key}")
    return value


def _fingerprint(obj: Mapping[str, Any], what: str) -> str:
    value = obj["actor"]
    if not isinstance(value, str) or not recipients.is_fingerprint(value):
        raise FormatError(f"{what}: malformed actor fingerprint")
    return value


def _b64(obj: Mapping[str, Any], key: str, what: str) -> bytes:
    value = obj[key]
    if not isinstance(value, str):
        raise FormatError(f"{what}: {key} must be base64 text")
    try:
        return recipients.b64decode(value)
    except FormatError:
        raise FormatError(f"{what}: {key} is not canonical base64") from None


def _jsonable(value: object) -> Any:
    """Details as JSON values; bytes (file names) become str the way os.fsdecode spells them."""
    if isinstance(value, bytes):
        return os.fsdecode(value)
    if isinstance(value, os.PathLike):
        return os.fsdecode(value.__fspath__())
    if isinstance(value, list | tuple | set | frozenset):
        items = [_jsonable(item) for item in value]
        return sorted(items) if isinstance(value, set | frozenset) else items
    if isinstance(value, Mapping):
        return {str(key): _jsonable(item) for key, item in value.items()}
    if value is None or isinstance(value, str | int | float):
        return value
    raise TypeError(f"an audit detail cannot hold {type(value).__name__}")


# --- entries ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Entry:
    """One entry with its details opened."""

    seq: int
    time_ns: int
    actor: str
    event: str
    cid: str | None
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def paths(self) -> list[str]:
        """Every path the entry names: path, new_path (renames), paths (shares)."""
        found = [self.details.get("path"), self.details.get("new_path")]
        found += list(self.details.get("paths") or ())
        return [p for p in found if isinstance(p, str)]

    def concerns(self, prefix: str) -> bool:
        """Whether the entry names `prefix` or anything below it (whole path components)."""
        prefix = "/" + prefix.strip("/")
        if prefix == "/":
            return bool(self.paths)
        return any(p == prefix or p.startswith(prefix + "/") for p in self.paths)

    def as_json(self) -> dict[str, Any]:
        return {
            "seq": self.seq,
            "time_ns": self.time_ns,
            "actor": self.actor,
            "event": self.event,
            "cid": self.cid,
            "details": self.details,
        }


def _public_fields(obj: Mapping[str, Any]) -> dict[str, Any]:
    return {key: obj[key] for key in _ENTRY_KEYS - {"sealed", "sig"}}


def _parse_entry(line: bytes) -> dict[str, Any]:
    """A line's fields, checked for form (not for signature or chain)."""
    if len(line) > MAX_LINE:
        raise FormatError(f"the entry is longer than {MAX_LINE} bytes")
    obj = _parse_canonical(line, "the entry")
    if set(obj) != _ENTRY_KEYS:
        raise FormatError("the entry has missing or unexpected fields")
    if obj["v"] != VERSION or type(obj["v"]) is not int:
        raise FormatError(f"unsupported entry version {obj['v']!r}")
    what = "the entry"
    _count(obj, "seq", what)
    _count(obj, "time_ns", what)
    _fingerprint(obj, what)
    _text(obj, "event", EVENT_RE, what)
    if obj["cid"] is not None:
        _text(obj, "cid", _CID_RE, what)
    _text(obj, "prev", _HEX_RE, what)
    if len(_b64(obj, "sealed", what)) < SALT_SIZE + 16:
        raise FormatError("the entry's sealed details are too short")
    if len(_b64(obj, "sig", what)) != _SIG_SIZE:
        raise FormatError("the entry's signature has the wrong length")
    return obj


def _entry_aead(key: bytes, salt: bytes) -> AESGCM:
    return AESGCM(HKDF(hashes.SHA256(), KEY_SIZE, salt=salt, info=ENTRY_INFO).derive(key))


def _seal(key: bytes, details: Mapping[str, Any], aad: bytes) -> bytes:
    plain = canonical(details)
    plain += b" " * (-len(plain) % PAD_TO)
    salt = os.urandom(SALT_SIZE)
    return salt + _entry_aead(key, salt).encrypt(bytes(12), plain, aad)


def _unseal(key: bytes, sealed: bytes, aad: bytes) -> dict[str, Any]:
    salt, body = sealed[:SALT_SIZE], sealed[SALT_SIZE:]
    try:
        plain = _entry_aead(key, salt).decrypt(bytes(12), body, aad)
    except InvalidTag:
        raise FormatError(
            "its details do not open with this key (another log, or altered)"
        ) from None
    return _parse_canonical(plain.rstrip(b" "), "its details")


def _open_entry(key: bytes, obj: Mapping[str, Any]) -> Entry:
    aad = canonical(_public_fields(obj))
    return Entry(
        seq=obj["seq"],
        time_ns=obj["time_ns"],
        actor=obj["actor"],
        event=obj["event"],
        cid=obj["cid"],
        details=_unseal(key, _b64(obj, "sealed", "the entry"), aad),
    )


def _digest(line: bytes) -> str:
    return hashlib.sha256(line).hexdigest()


def read_entries(
    path: str | os.PathLike[str],
    key: bytes,
    *,
    prefix: str | None = None,
    since_ns: int | None = None,
) -> Iterator[Entry]:
    """The log's entries with their details opened under the audit `key`, oldest first.

    Filters: `prefix` keeps entries naming that path or one below it; `since_ns` keeps entries
    at or after that time. Reads only: check integrity with `verify`. A torn last line is
    skipped; an entry that does not parse or open raises AuditError naming it.
    """
    try:
        fh = open(path, "rb")  # noqa: SIM115 (closed by the with below)
    except FileNotFoundError:
        return
    except OSError as err:
        raise AuditError(f"cannot read the audit log {path}: {err.strerror}") from None
    with fh:
        for number, raw in enumerate(iter(lambda: fh.readline(MAX_LINE + 2), b"")):
            if not raw.endswith(b"\n"):
                return
            try:
                entry = _open_entry(key, _parse_entry(raw[:-1]))
            except FormatError as err:
                raise AuditError(
                    f"audit log entry {number}: {err.message}",
                    hint="check the log with 'medfs audit verify'",
                ) from None
            if since_ns is not None and entry.time_ns < since_ns:
                continue
            if prefix is not None and not entry.concerns(prefix):
                continue
            yield entry


# --- anchors ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Anchor:
    """A signed statement "this log had `count` entries, the last one hashing to `head`"."""

    count: int
    head: str
    time_ns: int
    actor: str
    sig: bytes
    cid: str | None = None

    def unsigned(self) -> dict[str, Any]:
        return {
            "type": ANCHOR_TYPE,
            "v": VERSION,
            "count": self.count,
            "head": self.head,
            "time_ns": self.time_ns,
            "actor": self.actor,
        }

    def document(self) -> bytes:
        """What goes to IPFS: canonical JSON, signature included. Counts and hashes only."""
        return canonical({**self.unsigned(), "sig": recipients.b64encode(self.sig)})

    def record(self) -> dict[str, Any]:
        """Its entry in the anchors file."""
        return {**self.unsigned(), "sig": recipients.b64encode(self.sig), "cid": self.cid}

    @classmethod
    def sign(cls, identity: Identity, count: int, head: str, time_ns: int) -> Anchor:
        unsigned = cls(count, head, time_ns, identity.fingerprint, b"")
        sig = identity.sign(ANCHOR_PURPOSE, canonical(unsigned.unsigned()))
        return cls(count, head, time_ns, identity.fingerprint, sig)

    @classmethod
    def from_fields(cls, obj: Mapping[str, Any], cid: str | None = None) -> Anchor:
        what = "the anchor"
        if set(obj) != _ANCHOR_KEYS or obj["type"] != ANCHOR_TYPE:
            raise FormatError("not a medfs audit anchor")
        if obj["v"] != VERSION or type(obj["v"]) is not int:
            raise FormatError(f"unsupported anchor version {obj['v']!r}")
        sig = _b64(obj, "sig", what)
        if len(sig) != _SIG_SIZE:
            raise FormatError("the anchor's signature has the wrong length")
        return cls(
            count=_count(obj, "count", what),
            head=_text(obj, "head", _HEX_RE, what),
            time_ns=_count(obj, "time_ns", what),
            actor=_fingerprint(obj, what),
            sig=sig,
            cid=cid,
        )

    @classmethod
    def from_document(cls, data: bytes, cid: str | None = None) -> Anchor:
        return cls.from_fields(_parse_canonical(data, "the anchor"), cid)

    def check(self, public_keys: Mapping[str, PublicIdentity]) -> None:
        """FormatError unless a trusted identity signed it."""
        signer = public_keys.get(self.actor)
        if signer is None:
            raise FormatError(f"signed by {self.actor}, which is not a trusted identity")
        if self.count == 0 and self.head != GENESIS:
            raise FormatError("an anchor of an empty log must name the genesis hash")
        signer.verify(ANCHOR_PURPOSE, canonical(self.unsigned()), self.sig)

    @property
    def name(self) -> str:
        return self.cid or f"of {self.count} entries"


def load_anchors(path: str | os.PathLike[str]) -> list[Anchor]:
    """The anchors recorded in an anchors file (none if it does not exist)."""
    try:
        data = json.loads(Path(path).read_bytes())
    except FileNotFoundError:
        return []
    except (OSError, ValueError) as err:
        raise AuditError(f"cannot read the anchors file {path}: {err}") from None
    if not isinstance(data, list):
        raise AuditError(f"the anchors file {path} is not a list of anchors")
    anchors = []
    for number, item in enumerate(data):
        try:
            if not isinstance(item, dict) or "cid" not in item:
                raise FormatError("not an anchor record")
            cid = item.pop("cid")
            if not isinstance(cid, str) or not _CID_RE.fullmatch(cid):
                raise FormatError("malformed cid")
            anchors.append(Anchor.from_fields(item, cid))
        except FormatError as err:
            raise AuditError(f"anchor {number} in {path}: {err.message}") from None
    return anchors


class Adder(Protocol):
    """What `anchor` needs of the IPFS adapter: add bytes (pinned), return the CID."""

    def add(self, data: bytes) -> str: ...


# --- verification -------------------------------------------------------------------------------


@dataclass(frozen=True)
class VerifyResult:
    """`ok` only if the whole log is intact; else `first_bad` names the first bad entry (its seq,
    which is also its 0-based line number) or is None when an anchor itself is bad."""

    ok: bool
    count: int  # entries that verified, in order from the start
    first_bad: int | None
    reason: str
    anchors: int = 0  # anchors the log was checked against


def _misplaced(rest: BinaryIO, expected: int, found: Mapping[str, Any]) -> str:
    """Why a line holds the wrong entry: look for the expected one further on."""
    if found["seq"] < expected:  # entries 0..expected-1 were all seen already, in order
        return "an entry was duplicated or inserted here"
    for raw in iter(lambda: rest.readline(MAX_LINE + 2), b""):
        with contextlib.suppress(FormatError):
            if _parse_entry(raw.rstrip(b"\n"))["seq"] == expected:
                return f"entries are out of order (entry {expected} comes later)"
    missing = f"{expected}" if found["seq"] == expected + 1 else f"{expected}..{found['seq'] - 1}"
    return f"entry {missing} is missing (deleted)"


def verify(
    path: str | os.PathLike[str],
    public_keys: Mapping[str, PublicIdentity],
    anchors: Iterable[Anchor] = (),
) -> VerifyResult:
    """Check form, order, chain and signatures of every entry, and that the log extends every
    anchor. Needs no secret. Streams the file; stops at the first bad entry."""
    anchors = list(anchors)
    for anchor in anchors:
        try:
            anchor.check(public_keys)
        except FormatError as err:
            return VerifyResult(False, 0, None, f"anchor {anchor.name}: {err.message}")
    at: dict[int, list[Anchor]] = {}
    for anchor in anchors:
        at.setdefault(anchor.count, []).append(anchor)

    def bad(seq: int, reason: str) -> VerifyResult:
        return VerifyResult(False, seq, seq, reason, len(anchors))

    seq, prev = 0, GENESIS
    try:
        fh: BinaryIO = open(path, "rb")  # noqa: SIM115 (closed by the with below)
        # Writers hold an exclusive lock only while writing: a shared one gives a whole view.
        fcntl.flock(fh, fcntl.LOCK_SH)
    except FileNotFoundError:
        fh = io.BytesIO()  # no log yet: an empty one
    except OSError as err:
        raise AuditError(f"cannot read the audit log {path}: {err.strerror}") from None
    with fh:
        for raw in iter(lambda: fh.readline(MAX_LINE + 2), b""):
            if not raw.endswith(b"\n"):
                if len(raw) > MAX_LINE:
                    return bad(seq, f"the line is longer than {MAX_LINE} bytes")
                return bad(
                    seq,
                    "the last line is incomplete (a write cut short by a crash, or cut by"
                    " hand); the next mount drops it and records a 'recovered' entry",
                )
            line = raw[:-1]
            try:
                obj = _parse_entry(line)
            except FormatError as err:
                return bad(seq, f"{err.message} (edited?)")
            if obj["seq"] != seq:
                return bad(seq, f"the line holds entry {obj['seq']}: {_misplaced(fh, seq, obj)}")
            if obj["prev"] != prev:
                return bad(
                    seq,
                    "it does not chain to the entry before it (entries reordered, inserted"
                    " or replaced)",
                )
            signer = public_keys.get(obj["actor"])
            if signer is None:
                return bad(
                    seq,
                    f"signed by {obj['actor']}, which is not a trusted identity"
                    " (re-signed with another key?)",
                )
            unsigned = {key: value for key, value in obj.items() if key != "sig"}
            try:
                signer.verify(ENTRY_PURPOSE, canonical(unsigned), _b64(obj, "sig", "the entry"))
            except FormatError:
                return bad(
                    seq,
                    f"the signature by {obj['actor']} does not verify (the entry was altered,"
                    " or re-signed with another key)",
                )
            prev = _digest(line)
            seq += 1
            for anchor in at.get(seq, ()):
                if anchor.head != prev:
                    return bad(
                        seq - 1,
                        f"it is not the entry anchor {anchor.name} recorded (the log was"
                        " rewritten at or before this entry)",
                    )
    longest = max(anchors, key=lambda a: a.count, default=None)
    if longest is not None and longest.count > seq:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(longest.time_ns / 1e9))
        return bad(
            seq,
            f"missing: the log ends after {seq} entries, but anchor {longest.name} of {when}"
            f" recorded {longest.count}; entries were cut off the end",
        )
    return VerifyResult(True, seq, None, "intact", len(anchors))


# --- the writer ---------------------------------------------------------------------------------


class AuditLog:
    """A writer of one log. Thread-safe, and several processes may write at once (the mount
    daemon, and a `medfs share` run while it is mounted): each write takes an exclusive flock
    on the file, catches up with whatever others appended, and only then signs its entries
    onto the chain, so the chain never forks."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        identity: Identity,
        key: bytes,
        *,
        anchors: str | os.PathLike[str] | None = None,
        batch_size: int = BATCH_SIZE,
        batch_delay: float = BATCH_DELAY,
    ) -> None:
        if len(key) != KEY_SIZE:
            raise ValueError(f"the audit key must be {KEY_SIZE} bytes")
        if batch_size < 1 or batch_delay < 0:
            raise ValueError("batch size must be positive and the delay not negative")
        self.path = Path(path)
        self.anchors_path = Path(anchors) if anchors else self.path.with_name(ANCHORS_NAME)
        self.identity = identity
        self._key = key
        self._batch_size = batch_size
        self._batch_delay = batch_delay
        self._lock = threading.Lock()  # held while writing: a write may wait for an fsync
        # The queue has a lock of its own, so that queueing never waits for a write's fsync
        # (the mount daemon queues from the thread that serves FUSE). Whoever writes takes
        # `_lock` first, then the queue: so entries reach the file in the order they were made.
        self._queue_lock = threading.Lock()
        self._cond = threading.Condition(self._queue_lock)
        # Queued read events, not yet signed: their place in the chain is fixed at write time.
        self._pending: list[_Event] = []
        self._pending_since = 0.0
        self._seq = 0  # the next entry's seq in the file
        self._prev = GENESIS  # the hash of the file's newest entry
        self._end = 0  # the file's size after our last look: a change means another writer
        self._failed: str | None = None
        self._closed = False
        self._fd = self._open()
        try:
            with self._lock:
                self._commit([], sync=True)  # recovers a torn tail, if any
        except BaseException:
            os.close(self._fd)
            raise
        self._flusher = threading.Thread(
            target=self._flush_loop, name="medfs-audit-flush", daemon=True
        )
        self._flusher.start()

    def __enter__(self) -> AuditLog:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    @property
    def count(self) -> int:
        """Entries in the file at our last write, plus our queued ones."""
        with self._lock, self._queue_lock:
            return self._seq + len(self._pending)

    # -- opening and recovery ------------------------------------------------------------------

    def _open(self) -> int:
        flags = os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
        try:
            fd = os.open(self.path, flags, 0o600)
        except OSError as err:
            raise AuditError(f"cannot open the audit log {self.path}: {err.strerror}") from None
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise AuditError(f"the audit log {self.path} is not a regular file")
            os.fchmod(fd, 0o600)
            if os.fstat(fd).st_size == 0:
                # The new file's name must survive a crash too.
                durable.fsync_path(self.path.parent, directory=True)
        except BaseException:
            os.close(fd)
            raise
        return fd

    @contextlib.contextmanager
    def _file_lock(self) -> Iterator[None]:
        """Exclusive use of the file's tail, across processes, for one write."""
        fcntl.flock(self._fd, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(self._fd, fcntl.LOCK_UN)

    def _rfind_newline(self, before: int) -> int:
        """Offset of the last LF before `before`, or -1; reads backwards in chunks."""
        pos = before
        while pos > 0:
            start = max(0, pos - _CHUNK)
            i = os.pread(self._fd, pos - start, start).rfind(b"\n")
            if i >= 0:
                return start + i
            pos = start
        return -1

    def _catch_up(self) -> _Event | None:
        """Learn the file's newest entry (file lock held). A torn tail, left by a writer that
        died mid-line, is cut off and returned as a "recovered" event to record."""
        size = os.fstat(self._fd).st_size
        if size == self._end:
            return None
        end = self._rfind_newline(size) + 1  # bytes after the last LF were torn mid-write
        last = b""
        while end > 0:
            start = self._rfind_newline(end - 1) + 1
            last = os.pread(self._fd, end - 1 - start, start)
            if last and last.count(0) == len(last):
                end, last = start, b""  # zero-filled blocks a crash left in place of data
                continue
            break
        if end > 0:
            try:
                obj = _parse_entry(last)
            except FormatError as err:
                raise AuditError(
                    f"the last entry of the audit log {self.path} is damaged ({err.message});"
                    " a crash does not explain that, so medfs will not write after it",
                    hint="look with 'medfs audit verify'; move the log aside to start a new one",
                ) from None
            if obj["actor"] != self.identity.fingerprint:
                raise AuditError(
                    f"the audit log {self.path} is written by {obj['actor']},"
                    f" not by {self.identity.fingerprint}"
                )
            self._seq = obj["seq"] + 1
            self._prev = _digest(last)
        else:
            self._seq, self._prev = 0, GENESIS
        self._end = end
        if end == size:
            return None
        dropped = os.pread(self._fd, size - end, end)
        try:
            os.ftruncate(self._fd, end)
            os.fsync(self._fd)
        except OSError as err:
            raise AuditError(f"cannot repair the audit log {self.path}: {err.strerror}") from None
        log.warning(
            "audit log %s: dropped %d bytes of an entry torn by a crash; logged as entry %d",
            self.path,
            len(dropped),
            self._seq,
        )
        details = {"bytes_dropped": len(dropped), "sha256": _digest(dropped)}
        return _Event(time.time_ns(), "recovered", None, details)

    # -- appending -----------------------------------------------------------------------------

    def _check_usable(self) -> None:
        if self._closed:
            raise AuditError(f"the audit log {self.path} is closed")
        if self._failed:
            raise AuditError(
                f"the audit log {self.path} failed earlier ({self._failed}); nothing more can be"
                " recorded in it until it is reopened"
            )

    def _line(self, event: _Event) -> bytes:
        """Sign and seal one entry at the current end of the chain; advance seq and prev."""
        public = {
            "v": VERSION,
            "seq": self._seq,
            "time_ns": event.time_ns,
            "actor": self.identity.fingerprint,
            "event": event.name,
            "cid": event.cid,
            "prev": self._prev,
        }
        sealed = _seal(self._key, _jsonable(event.details), canonical(public))
        unsigned = {**public, "sealed": recipients.b64encode(sealed)}
        sig = self.identity.sign(ENTRY_PURPOSE, canonical(unsigned))
        line = canonical({**unsigned, "sig": recipients.b64encode(sig)})
        if len(line) > MAX_LINE:
            raise AuditError(f"an audit entry of {len(line)} bytes is too large to record")
        self._seq += 1
        self._prev = _digest(line)
        return line

    def _commit(self, events: list[_Event], *, sync: bool) -> int:
        """Write `events` at the end of the chain (self._lock held); the last one's seq."""
        try:
            with self._file_lock():
                recovered = self._catch_up()
                if recovered is not None:
                    events = [recovered, *events]
                    sync = True
                if not events:
                    return self._seq - 1
                data = b"".join(self._line(event) + b"\n" for event in events)
                view = memoryview(data)
                while view:
                    view = view[os.write(self._fd, view) :]
                self._end += len(data)
                if sync:
                    os.fsync(self._fd)
        except OSError as err:
            # The file may now end in a torn line: stop here; the next open repairs the tail.
            self._failed = err.strerror or str(err)
            raise AuditError(f"cannot write the audit log {self.path}: {err.strerror}") from None
        return self._seq - 1

    @staticmethod
    def _event(event: str, cid: str | None, details: Mapping[str, object]) -> _Event:
        if not EVENT_RE.fullmatch(event):
            raise ValueError(f"malformed audit event name {event!r}")
        if cid is not None and not _CID_RE.fullmatch(cid):
            raise ValueError(f"malformed CID {cid!r}")
        return _Event(time.time_ns(), event, cid, dict(details))

    def append(self, event: str, *, cid: str | None = None, **details: object) -> int:
        """Record an event durably (written and fsynced when this returns); its seq.

        Blocks on disk: call it from a worker thread in trio code. Queued read events are
        written first, so the file keeps the order in which events happened.
        """
        return self.append_many([(event, cid, details)])

    def append_many(self, events: Sequence[tuple[str, str | None, Mapping[str, object]]]) -> int:
        """Record several events (name, cid, details) durably with one write and one fsync;
        the last one's seq. As `append` otherwise."""
        new = [self._event(event, cid, details) for event, cid, details in events]
        with self._lock:
            self._check_usable()
            return self._commit([*self._take_queue(), *new], sync=True)

    def _take_queue(self) -> list[_Event]:
        """The queued events, now this writer's to write (`_lock` held)."""
        with self._queue_lock:
            events, self._pending = self._pending, []
        return events

    def append_batched(self, event: str, *, cid: str | None = None, **details: object) -> None:
        """Queue an event (a read) without waiting for the disk; no I/O here.

        The flusher thread writes the queue (one write, one fsync) within `batch_delay`
        seconds or at `batch_size` entries.
        """
        new = self._event(event, cid, details)
        with self._cond:
            self._check_usable()
            if not self._pending:
                self._pending_since = time.monotonic()
                self._cond.notify()
            self._pending.append(new)
            if len(self._pending) >= self._batch_size:
                self._cond.notify()

    def flush(self) -> None:
        """Write and fsync every queued entry now."""
        with self._lock:
            self._check_usable()
            self._commit(self._take_queue(), sync=True)

    def _flush_loop(self) -> None:
        while True:
            with self._cond:
                while True:
                    if self._closed or self._failed:
                        return
                    if self._pending:
                        due = self._pending_since + self._batch_delay - time.monotonic()
                        if len(self._pending) >= self._batch_size or due <= 0:
                            break
                        self._cond.wait(due)
                    else:
                        self._cond.wait()
            with self._lock:
                events = self._take_queue()
                try:
                    self._commit(events, sync=True)
                except AuditError as err:
                    log.error("%s; %d read events are lost", err.message, len(events))
                    return

    def anchor(self, ipfs: Adder) -> Anchor:
        """Sign the current head, add it to IPFS (pinned), log it and record it; the anchor.

        The anchor covers every entry before its own "anchor" entry.
        """
        with self._lock:
            self._check_usable()
            self._commit(self._take_queue(), sync=True)
            count, head = self._seq, self._prev
        signed = Anchor.sign(self.identity, count, head, time.time_ns())
        cid = ipfs.add(signed.document())
        anchor = Anchor(signed.count, signed.head, signed.time_ns, signed.actor, signed.sig, cid)
        self.append("anchor", cid=cid, count=count)
        records = [a.record() for a in load_anchors(self.anchors_path)]
        records.append(anchor.record())
        data = (json.dumps(records, indent=2, sort_keys=True) + "\n").encode("ascii")
        try:
            durable.replace(self.anchors_path, data)
        except OSError as err:
            raise AuditError(
                f"anchored at {cid}, but cannot record it in {self.anchors_path}: {err.strerror}"
            ) from None
        return anchor

    def close(self) -> None:
        """Flush what is queued, and release the file. Idempotent."""
        with self._cond:
            if self._closed:
                return
            self._closed = True
            self._cond.notify_all()
        self._flusher.join()
        try:
            with self._lock:
                events = self._take_queue()
                if events and not self._failed:
                    self._commit(events, sync=True)
        finally:
            os.close(self._fd)


@dataclass(frozen=True)
class _Event:
    time_ns: int
    name: str
    cid: str | None
    details: Mapping[str, object]
