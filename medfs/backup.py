"""Manifest snapshots: an encrypted, signed copy of the manifest on IPFS, and restoring from one.

Losing the laptop must not lose the records. The objects are on IPFS already; what only the
laptop holds is the manifest (which CID is which file, and the wrapped keys). So the mount daemon
adds a snapshot of it to IPFS at every umount and every few minutes while mounted, and
`medfs restore --from-cid CID --key NAME.key` rebuilds a working state directory from it.

    envelope    = "MEDFSBAK" || 0x01 || I2OSP(len(stanza), 2) || stanza || object
    object      = format v1 object of `plaintext` under a fresh random key; `stanza` wraps that
                  key to the owner, bound to entry_context(b"medfs manifest snapshot", salt)
    plaintext   = I2OSP(len(header), 4) || header || signature (64) || manifest database bytes
    header      = canonical JSON: format, owner (public identity), created_ns, files, entries,
                  manifest_size, manifest_sha256, anchors (the audit anchors recorded so far)
    signature   = Ed25519 by the owner, purpose "manifest-snapshot", over the header

The header binds the database through its SHA-256, so the signature covers every byte, and a
restore refuses a snapshot not signed by the key it is given (SignatureError), one encrypted to
another identity (NotForIdentityError), and anything altered (FormatError). This is the share
manifest's envelope (medfs/envelope.py, docs/FORMAT.md §7) with its own magic, context label and
signature purpose, so neither can ever pass for the other.

The manifest database already keeps names sealed (AES-SIV under the manifest key), and the
snapshot adds a second layer: IPFS sees neither names nor CIDs nor sizes of single files.

Local records, in the state directory:

    <state>/backups.json           [{cid, time_ns, entries, files, digest, pinned}], oldest
                                   first: the newest KEEP stay pinned, older ones are unpinned
                                   and kept as history (up to MAX_HISTORY), so `medfs verify`
                                   knows every snapshot this state made for its own
    <state>/restored-anchors.json  after a restore: the audit anchors of the lost machine's log
                                   (kept apart from audit-anchors.json, which the fresh log here
                                   could never extend)

`copy_manifest` must run on the thread that owns the manifest connection; everything else here
is plain blocking code that may run in a worker thread.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import json
import logging
import os
import re
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from medfs import audit, durable, envelope, identity, recipients, state
from medfs.audit import AuditLog
from medfs.errors import (
    FormatError,
    KeyFileError,
    MedfsError,
    SignatureError,
    UsageError,
)
from medfs.identity import Identity, PublicIdentity
from medfs.ipfs import IPFS
from medfs.manifest import Manifest

log = logging.getLogger(__name__)

MAGIC: Final = b"MEDFSBAK"
VERSION: Final = envelope.VERSION
FORMAT_NAME: Final = "medfs-snapshot-v1"
SIGNATURE_PURPOSE: Final = "manifest-snapshot"
# The "entry id" of the envelope's wrap: 23 bytes, unlike file entry ids (16), the share
# manifest's label (20) and the manifest key's (18), so no other wrap can open as this one.
ENVELOPE_CONTEXT_ID: Final = b"medfs manifest snapshot"
SIGNATURE_SIZE: Final = 64
KEEP: Final = 3
MAX_HISTORY: Final = 1000  # unpinned snapshots still listed in backups.json
MAX_SNAPSHOT_SIZE: Final = 2 << 30  # the whole envelope; it is held in memory
BACKUPS_NAME: Final = "backups.json"
RESTORED_ANCHORS_NAME: Final = "restored-anchors.json"
INTERVAL_ENV: Final = "MEDFS_BACKUP_MINUTES"
DEFAULT_INTERVAL_MINUTES: Final = 10.0

_HEADER_LENGTH_SIZE = 4
_MAX_HEADER_SIZE = 16 << 20
_HEADER_KEYS = frozenset(
    {
        "format",
        "owner",
        "created_ns",
        "files",
        "entries",
        "manifest_size",
        "manifest_sha256",
        "anchors",
    }
)
_HEX_RE = re.compile(r"[0-9a-f]{64}")
_CID_RE = re.compile(r"[A-Za-z0-9]{1,128}")


# -- the snapshot ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class ManifestCopy:
    """The manifest's database bytes at one moment, and how many entries it holds."""

    data: bytes
    files: int
    entries: int

    @property
    def digest(self) -> str:
        return hashlib.sha256(self.data).hexdigest()


@dataclass(frozen=True)
class Snapshot:
    """An opened, verified snapshot."""

    owner: PublicIdentity
    created_ns: int
    files: int
    entries: int
    manifest: bytes
    anchors: tuple[dict[str, Any], ...]  # records as in audit-anchors.json


def copy_manifest(manifest: Manifest) -> ManifestCopy:
    """A consistent in-memory copy of the manifest. Call it on the manifest's own thread."""
    stats = manifest.statistics()
    # The root directory is not an entry anyone made.
    return ManifestCopy(manifest.serialize(), stats.files, stats.files + stats.dirs - 1)


def _fail(message: str) -> FormatError:
    return FormatError(f"invalid manifest snapshot: {message}")


def _header(
    copy: ManifestCopy, owner: PublicIdentity, anchors: list[dict[str, Any]], created_ns: int
) -> bytes:
    return audit.canonical(
        {
            "format": FORMAT_NAME,
            "owner": recipients.b64encode(owner.to_bytes()),
            "created_ns": created_ns,
            "files": copy.files,
            "entries": copy.entries,
            "manifest_size": len(copy.data),
            "manifest_sha256": copy.digest,
            "anchors": anchors,
        }
    )


def seal(
    copy: ManifestCopy,
    signer: Identity,
    *,
    anchors: list[dict[str, Any]] | None = None,
    created_ns: int | None = None,
    recipient: PublicIdentity | None = None,
) -> bytes:
    """Sign a manifest copy with `signer` and encrypt it to `recipient` (default: the signer).

    `recipient` exists so tests can build a snapshot encrypted to one identity and signed by
    another; medfs itself always seals to the owner who signs.
    """
    to = signer.public if recipient is None else recipient
    header = _header(
        copy, signer.public, anchors or [], time.time_ns() if created_ns is None else created_ns
    )
    signature = signer.sign(SIGNATURE_PURPOSE, header)
    plaintext = len(header).to_bytes(_HEADER_LENGTH_SIZE, "big") + header + signature + copy.data
    data = envelope.seal(MAGIC, ENVELOPE_CONTEXT_ID, plaintext, to)
    if len(data) > MAX_SNAPSHOT_SIZE:
        raise MedfsError(
            f"the manifest snapshot would be {len(data)} bytes, over {MAX_SNAPSHOT_SIZE}"
        )
    return data


def snapshot(session: state.Session, layout: state.Layout) -> bytes:
    """A sealed snapshot of the session's manifest and the state's anchors, now."""
    return seal(copy_manifest(session.manifest), session.owner, anchors=_anchor_records(layout))


def _anchor_records(layout: state.Layout) -> list[dict[str, Any]]:
    return [anchor.record() for anchor in audit.load_anchors(audit.anchors_path(layout.root))]


def _check_anchor(record: object, index: int) -> dict[str, Any]:
    if not isinstance(record, dict):
        raise _fail(f"anchor {index} is not an object")
    fields = dict(record)
    cid = fields.pop("cid", None)
    if not isinstance(cid, str) or not _CID_RE.fullmatch(cid):
        raise _fail(f"anchor {index} has a malformed CID")
    try:
        audit.Anchor.from_fields(fields, cid)
    except FormatError as err:
        raise _fail(f"anchor {index}: {err.message}") from None
    return dict(record)


def _count(obj: Mapping[str, Any], key: str) -> int:
    value = obj[key]
    if type(value) is not int or value < 0:
        raise _fail(f"{key} must be a non-negative integer")
    return value


def open_snapshot(data: bytes, owner: Identity) -> Snapshot:
    """Decrypt and verify a snapshot that `owner` must have made for themselves.

    NotForIdentityError: encrypted to another identity. SignatureError: not signed by `owner`.
    FormatError: corrupt, truncated, altered or not a snapshot.
    """
    plaintext = envelope.open(
        data,
        MAGIC,
        ENVELOPE_CONTEXT_ID,
        owner,
        what="manifest snapshot",
        max_size=MAX_SNAPSHOT_SIZE,
        not_for_hint="restore with the key file of the identity that owned the state directory",
    )
    if len(plaintext) < _HEADER_LENGTH_SIZE + SIGNATURE_SIZE:
        raise _fail("too short")
    header_size = int.from_bytes(plaintext[:_HEADER_LENGTH_SIZE], "big")
    if header_size > _MAX_HEADER_SIZE:
        raise _fail("the header is too large")
    body_start = _HEADER_LENGTH_SIZE + header_size
    if len(plaintext) < body_start + SIGNATURE_SIZE:
        raise _fail("truncated header")
    header = plaintext[_HEADER_LENGTH_SIZE:body_start]
    signature = plaintext[body_start : body_start + SIGNATURE_SIZE]
    database = plaintext[body_start + SIGNATURE_SIZE :]
    # The signature is checked against the key the caller trusts, before the header is believed.
    try:
        owner.public.verify(SIGNATURE_PURPOSE, header, signature)
    except FormatError:
        raise SignatureError(
            f"the manifest snapshot is not signed by {owner.fingerprint}",
            hint="it was made (or altered) by someone else; never restore from it",
        ) from None
    try:
        obj = json.loads(header.decode("ascii"))
    except (UnicodeDecodeError, ValueError):
        raise _fail("the header is not JSON") from None
    if not isinstance(obj, dict) or set(obj) != _HEADER_KEYS:
        raise _fail("the header has missing or unexpected fields")
    if audit.canonical(obj) != header:
        raise _fail("the header is not canonical")
    if obj["format"] != FORMAT_NAME:
        raise _fail(f"unsupported format {str(obj['format'])[:40]!r}")
    try:
        named = PublicIdentity.from_bytes(recipients.b64decode(str(obj["owner"])))
    except KeyFileError as err:
        raise _fail(f"the owner's public identity: {err.message}") from None
    if named != owner.public:
        raise SignatureError(f"the snapshot names owner {named.fingerprint}, not the signer")
    if _count(obj, "manifest_size") != len(database):
        raise _fail("the manifest's size does not match the header")
    if not isinstance(obj["manifest_sha256"], str) or not _HEX_RE.fullmatch(obj["manifest_sha256"]):
        raise _fail("malformed manifest digest")
    if hashlib.sha256(database).hexdigest() != obj["manifest_sha256"]:
        raise _fail("the manifest does not match its signed digest")
    if not isinstance(obj["anchors"], list):
        raise _fail("anchors must be a list")
    anchors = tuple(_check_anchor(item, i) for i, item in enumerate(obj["anchors"]))
    return Snapshot(
        owner=named,
        created_ns=_count(obj, "created_ns"),
        files=_count(obj, "files"),
        entries=_count(obj, "entries"),
        manifest=database,
        anchors=anchors,
    )


# -- the local record of snapshots -------------------------------------------------------------


@dataclass(frozen=True)
class Backup:
    cid: str
    time_ns: int
    entries: int
    files: int
    digest: str  # SHA-256 of the database copy: an unchanged manifest is not uploaded again
    pinned: bool = True  # False once newer snapshots replaced it (history only)

    def as_json(self) -> dict[str, Any]:
        return {
            "cid": self.cid,
            "time_ns": self.time_ns,
            "entries": self.entries,
            "files": self.files,
            "digest": self.digest,
            "pinned": self.pinned,
        }


def backups_path(layout: state.Layout) -> Path:
    return layout.root / BACKUPS_NAME


def restored_anchors_path(layout: state.Layout) -> Path:
    return layout.root / RESTORED_ANCHORS_NAME


def load_backups(layout: state.Layout, *, history: bool = False) -> list[Backup]:
    """The snapshots kept pinned, oldest first (none if no record); with `history`, also the
    ones this state made and has unpinned since."""
    path = backups_path(layout)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return []
    except (OSError, ValueError) as err:
        raise MedfsError(f"cannot read {path}: {err}") from None
    try:
        return [
            Backup(
                cid=str(item["cid"]),
                time_ns=int(item["time_ns"]),
                entries=int(item.get("entries", 0)),
                files=int(item.get("files", 0)),
                digest=str(item.get("digest", "")),
                pinned=bool(item.get("pinned", True)),
            )
            for item in data
            if history or item.get("pinned", True)
        ]
    except (TypeError, KeyError, ValueError):
        raise MedfsError(f"{path} is not a list of backups") from None


@contextlib.contextmanager
def _records_locked(layout: state.Layout) -> Iterator[None]:
    """The daemon's periodic task and a `medfs backup` run may both update the record."""
    with open(layout.root / (BACKUPS_NAME + ".lock"), "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _write_json(path: Path, value: object) -> None:
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(json.dumps(value, indent=2) + "\n")
        fh.flush()
        os.fsync(fh.fileno())
    tmp.replace(path)


def _record(layout: state.Layout, backup: Backup) -> list[Backup]:
    """Append `backup` to the record, keep the newest KEEP pinned; return the ones to unpin."""
    with _records_locked(layout):
        records = [*load_backups(layout, history=True), backup]
        pinned = [b for b in records if b.pinned]
        dropped = pinned[:-KEEP]
        gone = {b.cid for b in dropped}
        records = [dataclasses.replace(b, pinned=False) if b.cid in gone else b for b in records]
        history = [b for b in records if not b.pinned]
        forgotten = {b.cid for b in history[: max(0, len(history) - MAX_HISTORY)]}
        records = [b for b in records if b.cid not in forgotten]
        # Marked unpinned before the unpin: if that fails, `medfs verify --repair` unpins it.
        _write_json(backups_path(layout), [b.as_json() for b in records])
    return dropped


def publish(
    copy: ManifestCopy,
    owner: Identity,
    layout: state.Layout,
    ipfs: IPFS,
    *,
    force: bool = True,
) -> Backup | None:
    """Seal `copy`, add it to IPFS (pinned), record it, unpin snapshots beyond the newest KEEP.

    Without `force`, nothing is uploaded when the newest recorded snapshot holds the same
    database bytes (returns None). Safe in a worker thread.
    """
    previous = load_backups(layout)
    if not force and previous and previous[-1].digest == copy.digest:
        return None
    data = seal(copy, owner, anchors=_anchor_records(layout))
    cid = ipfs.add(data)
    backup = Backup(cid, time.time_ns(), copy.entries, copy.files, copy.digest)
    dropped = _record(layout, backup)
    for old in dropped:
        if old.cid == cid:
            continue
        try:
            ipfs.unpin(old.cid)
        except MedfsError as err:
            # Already unpinned, or the node is away: `medfs verify --repair` finds it later.
            log.info("unpin old snapshot %s: %s", old.cid, err.message)
    return backup


def upload(
    session: state.Session,
    layout: state.Layout,
    ipfs: IPFS,
    *,
    force: bool = True,
) -> Backup | None:
    """Snapshot the session's manifest now and publish it (see `publish`)."""
    return publish(copy_manifest(session.manifest), session.owner, layout, ipfs, force=force)


def interval_seconds(environ: Mapping[str, str] | None = None) -> float | None:
    """Seconds between snapshots while mounted ($MEDFS_BACKUP_MINUTES); None when 0 (off)."""
    raw = (os.environ if environ is None else environ).get(INTERVAL_ENV, "")
    if not raw.strip():
        return DEFAULT_INTERVAL_MINUTES * 60
    try:
        minutes = float(raw)
    except ValueError:
        minutes = -1.0
    if not minutes >= 0 or minutes == float("inf"):
        raise UsageError(
            f"{INTERVAL_ENV}={raw!r} is not a number of minutes",
            hint="set it to a number such as 10, or 0 to back up only at umount",
        )
    return None if minutes == 0 else minutes * 60


# -- restoring ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Restored:
    layout: state.Layout
    owner: str
    created_ns: int
    files: int
    entries: int
    anchors: int
    fetched: int  # objects pinned on this node (with fetch=True)
    missing: list[str]  # CIDs that could not be pinned


def fetch(cid: str, ipfs: IPFS) -> bytes:
    """A snapshot's bytes from IPFS, refusing anything too large before reading it."""
    size = ipfs.stat(cid).size
    if size > MAX_SNAPSHOT_SIZE:
        raise _fail(f"{cid} is {size} bytes, over {MAX_SNAPSHOT_SIZE}")
    return ipfs.cat(cid)


def check_new_state(new_state: state.Layout) -> None:
    """Refuse a directory that already holds a state (or a manifest)."""
    for path in (new_state.config, new_state.manifest):
        if path.exists() or path.is_symlink():
            raise UsageError(
                f"{new_state.root} is already initialised ({path.name} exists)",
                hint="restore into a new, empty --state directory",
            )


def restore(
    cid: str,
    key_path: Path,
    passphrase: str,
    new_state: state.Layout,
    ipfs: IPFS,
    *,
    fetch_objects: bool = False,
) -> Restored:
    """Rebuild a state directory from the snapshot at `cid`, owned by the key at `key_path`.

    Writes manifest.db, restored-anchors.json, backups.json (the snapshot itself, pinned here)
    and then config.json (last: a half-made state is not "initialised"), and starts a fresh
    audit log with a "restored" entry naming the snapshot. With `fetch_objects`, every object
    the manifest refers to is pinned on this node (fetched from the peers it can reach).
    """
    check_new_state(new_state)
    owner = identity.read_key_file(key_path, passphrase)
    snap = open_snapshot(fetch(cid, ipfs), owner)
    ipfs.pin(cid)  # this node keeps the snapshot it came from, until newer ones replace it
    new_state.root.mkdir(parents=True, exist_ok=True, mode=0o700)
    written: list[Path] = []
    try:
        durable.write_new(new_state.manifest, snap.manifest)
        written.append(new_state.manifest)
        _write_json(restored_anchors_path(new_state), list(snap.anchors))
        written.append(restored_anchors_path(new_state))
        config = {
            "version": state.CONFIG_VERSION,
            "key": str(key_path.absolute()),
            "public": snap.owner.to_text(),
        }
        tmp = new_state.config.with_suffix(".tmp")
        tmp.write_text(json.dumps(config, indent=2) + "\n")
        tmp.replace(new_state.config)
        written.append(new_state.config)
        # The same checks as any later mount: the owner, and that the manifest key opens.
        session = state.unlock(new_state, passphrase)
    except BaseException:
        for path in reversed(written):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
        raise
    try:
        digest = hashlib.sha256(snap.manifest).hexdigest()
        _record(new_state, Backup(cid, snap.created_ns, snap.entries, snap.files, digest))
        fetched, missing = 0, []
        if fetch_objects:
            # Pinned one by one here: the groups that kept them belong to the old node.
            session.manifest.forget_pin_groups()
            for object_cid in sorted(session.manifest.cids()):
                try:
                    ipfs.pin(object_cid)
                    fetched += 1
                except MedfsError:
                    missing.append(object_cid)
        with AuditLog(
            audit.log_path(new_state.root), session.owner, audit.audit_key(session.manifest_key)
        ) as journal:
            journal.append(
                "restored",
                cid=cid,
                snapshot_ns=snap.created_ns,
                entries=snap.entries,
                previous_anchors=len(snap.anchors),
            )
    finally:
        session.manifest.close()
    return Restored(
        layout=new_state,
        owner=owner.fingerprint,
        created_ns=snap.created_ns,
        files=snap.files,
        entries=snap.entries,
        anchors=len(snap.anchors),
        fetched=fetched,
        missing=missing,
    )
