"""`medfs verify`: is every record present, pinned and readable, and is nothing left pinned?

For every file version the manifest refers to, in this order:

- missing:   its root block is not on this node. Checked offline (`block/stat --offline`), so a
             missing object is reported, never fetched. Not repairable here: pin it while
             connected to a node that has it, or restore the data.
- unpinned:  present but not pinned, so the next garbage collection deletes it. `--repair` pins.
- wrap:      the owner's wrapped content key is absent or does not open. Not repairable (the key
             exists nowhere else); the file is unreadable for the owner.
- corrupt:   (`deep` only) a segment fails authentication, or the object ends too early or too
             late; the segment is named. Not repairable.

Then the node's recursive pins that nothing refers to: neither a manifest entry, nor an audit
anchor (this state's, or the lost machine's after a restore), nor a recorded manifest snapshot.
Only pins whose first bytes are a medfs object or snapshot magic are considered at all; the
rest (share manifests, anchors, anyone else's data on a shared node) are counted, not judged.
Of the medfs ones, an **orphan-pin** is one this state directory is known to have made:

- its CID is in this state's audit log (a "version" or "restored" entry) or among the
  snapshots `backups.json` lists (pinned or since replaced), or
- the node is this state's own (the embedded node, or `exclusive=True`).

Other medfs objects are listed as *foreign*: on a node shared by several state directories
(`--api`) they may be another one's live records, and unpinning them would destroy data.
`--repair` unpins orphans, except, while the state is mounted, an unrecorded one: it may be an
upload the daemon is about to commit.

Ordering matters because the mount may be running: the audit records are read first, then the
pins, then the references (a version is logged only after its commit, so a recorded CID that no
reference holds was superseded before the references were read). Every problem is re-checked
against the current manifest entry before it is reported or repaired.

No pyfuse3, no trio: plain blocking code for the CLI.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Final

from medfs import audit, backup, format, layout, recipients, state
from medfs.errors import AuditError, FormatError, IPFSError, MedfsError, NotForIdentityError
from medfs.ipfs import IPFS
from medfs.manifest import Inode, Kind, Manifest

MISSING: Final = "missing"
UNPINNED: Final = "unpinned"
WRAP: Final = "wrap"
CORRUPT: Final = "corrupt"
ORPHAN: Final = "orphan-pin"
KINDS: Final = (MISSING, UNPINNED, WRAP, CORRUPT, ORPHAN)

# What a pin must start with to be considered a medfs object at all.
OBJECT_MAGICS: Final = (format.MAGIC, backup.MAGIC)
# Audit events whose CID is an object this state directory added and may unpin once unused.
_MADE_HERE: Final = frozenset({"version", "restored"})
# --deep reads objects in pieces of this size: memory stays bounded whatever the file size.
READ_CHUNK: Final = 1 << 20

Progress = Callable[[int], None]


@dataclass
class Problem:
    kind: str
    cid: str
    path: str | None  # the file's path in the manifest; None for an orphan pin
    detail: str
    segment: int | None = None  # corrupt: the first segment that fails
    repaired: bool = False

    def as_json(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "cid": self.cid,
            "path": self.path,
            "detail": self.detail,
            "segment": self.segment,
            "repaired": self.repaired,
        }


@dataclass
class Report:
    deep: bool
    files: int = 0
    problems: list[Problem] = field(default_factory=list)
    actions: list[str] = field(default_factory=list)  # what --repair did, one line each
    foreign: list[str] = field(default_factory=list)  # medfs pins not known to be this state's
    other_pins: int = 0  # pins that are not medfs objects: not ours to judge
    notes: list[str] = field(default_factory=list)

    @property
    def remaining(self) -> list[Problem]:
        return [p for p in self.problems if not p.repaired]

    @property
    def ok(self) -> bool:
        return not self.remaining

    def as_json(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "deep": self.deep,
            "files": self.files,
            "problems": [p.as_json() for p in self.problems],
            "actions": self.actions,
            "foreign_pins": self.foreign,
            "other_pins": self.other_pins,
            "notes": self.notes,
        }


def check(
    session: state.Session,
    state_layout: state.Layout,
    ipfs: IPFS,
    *,
    deep: bool,
    repair: bool,
    exclusive: bool = False,
    progress: Progress | None = None,
) -> Report:
    """Check the state's records on `ipfs`; with `repair`, pin and unpin what can be fixed."""
    report = Report(deep=deep)
    manifest = session.manifest
    made_here, anchored = _records(state_layout, session, report)
    pins = ipfs.pins()
    for path, inode in manifest.walk():
        if inode.kind is not Kind.FILE or inode.cid is None:
            continue
        report.files += 1
        _check_entry(
            session, ipfs, os.fsdecode(path), inode, pins, report, deep=deep, repair=repair
        )
        if progress is not None:
            progress(report.files)
    referenced = (
        manifest.cids()
        | manifest.pin_groups()
        | anchored
        | _anchor_cids(state_layout)
        | {b.cid for b in backup.load_backups(state_layout)}
    )
    made_here |= {b.cid for b in backup.load_backups(state_layout, history=True)}
    mounted = state.holder(state_layout) is not None
    for cid in sorted(pins - referenced):
        try:
            head = ipfs.cat(cid, 0, len(format.MAGIC))
        except IPFSError:
            report.other_pins += 1  # a directory, or not readable as a file: not one of ours
            continue
        if head not in OBJECT_MAGICS:
            report.other_pins += 1
            continue
        if cid not in made_here and not exclusive:
            report.foreign.append(cid)
            continue
        what = "a manifest snapshot" if head == backup.MAGIC else "an encrypted object"
        problem = Problem(ORPHAN, cid, None, f"{what} that no entry refers to is still pinned")
        report.problems.append(problem)
        if not repair:
            continue
        if mounted and cid not in made_here:
            problem.detail += (
                "; left pinned while mounted: it may be an upload about to be committed"
                " (run again after 'medfs umount')"
            )
            continue
        if cid in manifest.cids():  # committed meanwhile
            report.problems.remove(problem)
            continue
        _try(report, problem, functools.partial(ipfs.unpin, cid), f"unpinned orphan {cid}")
    return report


def _records(
    state_layout: state.Layout, session: state.Session, report: Report
) -> tuple[set[str], set[str]]:
    """(CIDs this state's audit log says it added, CIDs of anchors it logged)."""
    made, anchored = set(), set()
    try:
        for entry in audit.read_entries(
            audit.log_path(state_layout.root), audit.audit_key(session.manifest_key)
        ):
            if entry.cid is None:
                continue
            if entry.event in _MADE_HERE:
                made.add(entry.cid)
            elif entry.event == "anchor":
                anchored.add(entry.cid)
    except AuditError as err:
        report.notes.append(
            f"the audit log could not be read ({err.message}); only objects on this state's"
            " own node are treated as this state's"
        )
    return made, anchored


def _anchor_cids(state_layout: state.Layout) -> set[str]:
    cids = {a.cid for a in audit.load_anchors(audit.anchors_path(state_layout.root)) if a.cid}
    restored = audit.load_anchors(backup.restored_anchors_path(state_layout))
    return cids | {a.cid for a in restored if a.cid}


def _try(report: Report, problem: Problem, action: Callable[[], None], done: str) -> None:
    try:
        action()
    except MedfsError as err:
        problem.detail += f"; repair failed: {err.message}"
        return
    problem.repaired = True
    report.actions.append(done)


def _current(manifest: Manifest, inode: Inode) -> bool:
    """Whether `inode` still has the version seen (a running mount may have replaced it)."""
    now = manifest.get(inode.ino)
    return now is not None and now.cid == inode.cid


def _check_entry(
    session: state.Session,
    ipfs: IPFS,
    path: str,
    inode: Inode,
    pins: set[str],
    report: Report,
    *,
    deep: bool,
    repair: bool,
) -> None:
    manifest = session.manifest
    cid = inode.cid
    assert cid is not None and inode.salt is not None
    found: list[Problem] = []
    group = manifest.pin_group_of(cid)
    pinned = cid in pins or (group is not None and group in pins)
    present = ipfs.has_local(cid)
    if not present:
        detail = "not on this node; not repairable here (pin it from a node that holds it)"
        found.append(Problem(MISSING, cid, path, detail))
    elif not pinned:
        detail = "on this node but not pinned: the next garbage collection deletes it"
        found.append(Problem(UNPINNED, cid, path, detail))
    key = None
    stanza = manifest.wraps(inode.ino).get(session.owner.fingerprint)
    if stanza is None:
        found.append(Problem(WRAP, cid, path, "no content key is wrapped for the owner"))
    else:
        try:
            key = session.owner.unwrap(
                recipients.Stanza.from_bytes(stanza),
                recipients.entry_context(inode.entry_id, inode.salt),
            )
        except (FormatError, NotForIdentityError) as err:
            found.append(Problem(WRAP, cid, path, f"the owner's wrap does not open: {err.message}"))
    if deep and key is not None and present:
        if pinned:
            bad = _authenticate(ipfs, cid, key, inode.size)
            if bad is not None:
                segment, detail = bad
                found.append(Problem(CORRUPT, cid, path, detail, segment=segment))
        else:
            report.notes.append(f"{path}: not read in depth, since it is not pinned")
    if not found or not _current(manifest, inode):
        return  # all well, or replaced by a running mount meanwhile: no longer this entry's
    report.problems.extend(found)
    if repair:
        for problem in found:
            if problem.kind == UNPINNED:
                _try(report, problem, functools.partial(_pin_alone, manifest, ipfs, cid),
                     f"pinned {cid} ({path})")  # fmt: skip


def _pin_alone(manifest: Manifest, ipfs: IPFS, cid: str) -> None:
    ipfs.pin(cid)
    manifest.pinned_alone(cid)  # no longer its group's to keep (that pin is gone anyway)


def _chunks(ipfs: IPFS, cid: str) -> Iterator[bytes]:
    offset = 0
    while True:
        data = ipfs.cat(cid, offset, READ_CHUNK)
        if data:
            yield data
        if len(data) < READ_CHUNK:
            return
        offset += len(data)


def _authenticate(ipfs: IPFS, cid: str, key: bytes, size: int) -> tuple[int, str] | None:
    """(first bad segment, why) if the object does not decrypt to `size` bytes, else None."""
    segments = 0
    plaintext = 0
    try:
        for piece in format.decrypt(key, _chunks(ipfs, cid)):
            segments += 1
            plaintext += len(piece)
    except FormatError as err:
        # decrypt yields one item per authenticated segment: the count is the failing index.
        return segments, err.message
    except IPFSError as err:
        return segments, f"cannot read it back: {err.message}"
    if plaintext != size:
        last = layout.segment_count(plaintext) - 1
        return last, f"it holds {plaintext} bytes, but the manifest says {size}"
    return None
