"""Who can read what: granting, revoking, and receiving shares.

The issuer's side: `share` records a grant on a file or directory, wraps the current content
key of everything below it for the recipient (no re-encryption, no re-upload) and writes a
signed share manifest of everything that recipient is granted. The filesystem wraps every later
version for every grantee. `revoke` removes a grant and re-encrypts what the recipient could
read under fresh keys, so that no new version opens with the revoked key.

The recipient's side: `accept` checks a share manifest (signature, addressee, sequence) and
turns it into a local, read-only manifest that the ordinary filesystem serves.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import time
from collections.abc import Callable, Container, Iterator
from dataclasses import dataclass
from pathlib import Path

from medfs import control, forked, format, layout, recipients, sharing, state
from medfs.audit import AuditLog
from medfs.copies import LocalCopies
from medfs.errors import FormatError, MedfsError, UsageError
from medfs.identity import Identity, PublicIdentity, readers
from medfs.ipfs import IPFS
from medfs.manifest import (
    Inode,
    Kind,
    Manifest,
    NameCipher,
    VersionConflict,
    until_recipients_match,
)

# Revocation re-encrypts in pieces of this size: memory stays bounded whatever the file size.
REENCRYPT_CHUNK = 4 << 20

Progress = Callable[[int], None]


class RollbackError(MedfsError):
    """A share manifest older than one already accepted from the same issuer."""

    exit_code = 13


# -- issuer side ---------------------------------------------------------------------------------


def _resolve(manifest: Manifest, path: str) -> Inode:
    inode = manifest.resolve(path)
    if inode is None:
        raise UsageError(f"{path}: no such file or directory in medfs")
    return inode


def _owner_wrap(owner: Identity, manifest: Manifest, inode: Inode) -> bytes:
    wrapped = manifest.wrap(inode.ino, owner.fingerprint)
    if wrapped is None:
        raise _no_owner_wrap(manifest, inode)
    return wrapped


def _no_owner_wrap(manifest: Manifest, inode: Inode) -> FormatError:
    return FormatError(
        f"{_name_of(manifest, inode)}: the manifest holds no key of its version for the owner",
        hint="run `medfs verify`",
    )


def _content_key(owner: Identity, manifest: Manifest, inode: Inode) -> bytes:
    assert inode.salt is not None
    stanza = recipients.Stanza.from_bytes(_owner_wrap(owner, manifest, inode))
    return owner.unwrap(stanza, recipients.entry_context(inode.entry_id, inode.salt))


def _rewrap(owner: Identity, to: recipients.Recipient, job: tuple[bytes, bytes, bytes]) -> bytes:
    """The owner's wrapped key of one version (stanza, entry id, salt), wrapped for `to`."""
    wrapped, entry_id, salt = job
    context = recipients.entry_context(entry_id, salt)
    key = owner.unwrap(recipients.Stanza.from_bytes(wrapped), context)
    return recipients.wrap(key, to, context).to_bytes()


def _subtree(manifest: Manifest, top: Inode) -> Iterator[tuple[str, Inode]]:
    """(path relative to `top`, inode) for `top` ("") and everything below it."""
    base = manifest.path_of(top.ino) or b"/"
    for path, inode in manifest.walk(top.ino):
        yield os.fsdecode(path[len(base) :]).strip("/"), inode


def grant(
    session: state.Session,
    paths: list[str],
    to: PublicIdentity,
    *,
    now_ns: int | None = None,
    workers: int | None = None,
) -> int:
    """Grant `to` every path; wrap the current versions for them. Returns files wrapped.

    `workers=1` keeps the wrapping in this process (the mount daemon, which must not fork)."""
    manifest, owner = session.manifest, session.owner
    if to.fingerprint == owner.fingerprint:
        raise UsageError("that is the owner's own identity: it can read everything already")
    tops = [_resolve(manifest, p) for p in paths]
    now = now_ns or time.time_ns()
    public = to.to_text().encode()
    recipient = to.recipient()
    below: dict[int, None] = {}  # the files under every top, in walk order, a file once
    for top in tops:
        # The grant first: a version a running mount commits from now on is wrapped for them.
        manifest.add_grant(top.ino, to.fingerprint, public, now_ns=now)
        below.update((i.ino, None) for _rel, i in _subtree(manifest, top) if i.kind == Kind.FILE)
    versions: list[tuple[int, str, tuple[bytes, bytes, bytes]]] = []  # (ino, cid, job)
    for ino, (inode, stanza) in manifest.wrapped_for(owner.fingerprint, list(below)).items():
        if inode.cid is None or inode.salt is None:
            continue  # no version uploaded yet: the mount wraps it for every grantee at commit
        if stanza is None:
            raise _no_owner_wrap(manifest, inode)
        versions.append((ino, inode.cid, (stanza, inode.entry_id, inode.salt)))
    # Unwrapping and wrapping are nearly all of a large share's work, and hold the GIL.
    stanzas = forked.map_split(
        functools.partial(_rewrap, owner, recipient), [job for *_, job in versions], workers=workers
    )
    wraps = [
        (ino, cid, to.fingerprint, stanza)
        for (ino, cid, _job), stanza in zip(versions, stanzas, strict=True)
    ]
    manifest.add_wraps(wraps)  # one transaction (one fsync), not one per file
    return len(wraps)


def share(
    session: state.Session,
    paths: list[str],
    to: PublicIdentity,
    providers: tuple[sharing.Provider, ...],
    journal: AuditLog,
    *,
    workers: int | None = None,
) -> control.Shared:
    """Grant `to` every path, make the share manifest of everything granted to them, and
    record the share in the audit log."""
    wrapped = grant(session, paths, to, workers=workers)
    manifest = build_share(session, to.fingerprint, providers)
    sealed = sharing.seal(manifest, session.owner, to)
    journal.append("share", recipient=to.fingerprint, paths=paths, sequence=manifest.sequence)
    return control.Shared(wrapped, manifest.sequence, len(manifest.entries), sealed)


def _name_of(manifest: Manifest, inode: Inode) -> str:
    path = manifest.path_of(inode.ino)
    name = os.fsdecode(path or b"").rstrip("/").rpartition("/")[2]
    return name or "root"


def build_share(
    session: state.Session,
    fingerprint: str,
    providers: tuple[sharing.Provider, ...],
    *,
    now_ns: int | None = None,
) -> sharing.ShareManifest:
    """The share manifest of everything granted to `fingerprint`, at the next sequence."""
    manifest = session.manifest
    granted: dict[bytes, int] = {}  # path -> inode, of the granted items still linked
    for ino, fpr, _pub, _t in manifest.grants():
        where = manifest.path_of(ino) if fpr == fingerprint else None
        if where is not None:
            granted[where] = ino
    entries: dict[str, sharing.SharedEntry] = {}
    for where, ino in granted.items():
        if _inside_any(where, granted):
            continue  # in a shared directory: it is in the manifest once, at its place there
        top = manifest.get(ino)
        assert top is not None  # it has a path
        base = _name_of(manifest, top)
        if base in entries:
            raise UsageError(
                f"two shared items are both called {base!r}",
                hint="share their parent directory, or rename one",
            )
        below = list(_subtree(manifest, top))
        files = [inode.ino for _rel, inode in below if inode.kind == Kind.FILE]
        wrapped = manifest.wrapped_for(fingerprint, files)
        for rel, listed in below:
            inode, stanza = wrapped.get(listed.ino, (listed, None))  # a file: as now, with its wrap
            path = f"{base}/{rel}" if rel else base
            entry = _entry(manifest, path, inode, stanza)
            if entry is not None:
                entries[path] = entry
    if not entries:
        raise UsageError("nothing is shared with that recipient")
    return sharing.ShareManifest(
        issuer=session.owner.public,
        recipient=fingerprint,
        sequence=manifest.next_sequence(fingerprint),
        created_ns=now_ns or time.time_ns(),
        name="",
        providers=providers,
        entries=tuple(entries[p] for p in sorted(entries)),
    )


def _inside_any(path: bytes, directories: Container[bytes]) -> bool:
    """Whether a directory above `path` is one of `directories` (a walk up, not a scan)."""
    while path not in (b"/", b""):
        path = path.rpartition(b"/")[0] or b"/"
        if path in directories:
            return True
    return False


def _entry(
    manifest: Manifest, path: str, inode: Inode, stanza: bytes | None
) -> sharing.SharedEntry | None:
    """The entry of one item; a file's with the recipient's `stanza` of its current version."""
    if inode.kind == Kind.DIR:
        kind, size, target, cid, salt, stanza = "dir", 0, None, None, None, None
    elif inode.kind == Kind.SYMLINK:
        target = manifest.readlink(inode.ino)
        kind, size, cid, salt, stanza = "symlink", len(target), None, None, None
    else:
        if inode.cid is None or inode.salt is None or stanza is None:
            return None  # not uploaded yet: the next manifest will carry it
        kind, size, target, cid, salt = "file", inode.size, None, inode.cid, inode.salt
    return sharing.SharedEntry(
        path=path,
        kind=kind,
        mode=inode.mode,
        mtime_ns=inode.mtime_ns,
        size=size,
        entry_id=inode.entry_id,
        cid=cid,
        salt=salt,
        stanza=stanza,
        target=target,
    )


def providers_of(ipfs: IPFS) -> tuple[sharing.Provider, ...]:
    node = ipfs.id()
    addresses = tuple(a if "/p2p/" in a else f"{a}/p2p/{node.peer_id}" for a in node.addresses[:16])
    return (sharing.Provider(node.peer_id, addresses),)


def grants_of(session: state.Session) -> dict[str, list[tuple[str, str]]]:
    """fingerprint -> [(path, public identity text)] of every grant."""
    out: dict[str, list[tuple[str, str]]] = {}
    for ino, fpr, public, _created in session.manifest.grants():
        path = session.manifest.path_of(ino)
        if path is not None:
            out.setdefault(fpr, []).append((os.fsdecode(path), public.decode()))
    return out


@dataclass(frozen=True)
class Reencrypted:
    path: str  # in the manifest, from its root: "/shared/scan.dcm"
    old_cid: str
    new_cid: str
    size: int


def revoke(
    session: state.Session,
    paths: list[str],
    fingerprint: str,
    ipfs: IPFS,
    progress: Callable[[int], Progress | None] | None = None,
    copies: LocalCopies | None = None,
) -> tuple[list[Reencrypted], set[str]]:
    """Remove `fingerprint`'s grants on `paths`; re-encrypt every file it can still open that
    no remaining grant covers (`_opened_without_grant`).

    `progress`, given the bytes to re-encrypt, returns what to call with each piece done.
    Old versions are read from their local copies where there are some, and those copies are
    deleted once the new version is committed. Returns the re-encrypted files and the
    remaining recipients who need a fresh manifest.
    """
    manifest = session.manifest
    if fingerprint == session.owner.fingerprint:
        raise UsageError("that is the owner's own identity: it cannot be revoked")
    tops = [_resolve(manifest, p) for p in paths]
    for path, top in zip(paths, tops, strict=True):
        # (A grant already removed while files still carry wraps for the recipient is a
        # revoke that was interrupted: carrying on is what finishes it.)
        if not manifest.remove_grant(top.ino, fingerprint) and not any(
            _opened_without_grant(manifest, [top], fingerprint)
        ):
            where = [
                os.fsdecode(manifest.path_of(ino) or b"?")
                for ino, fpr, _p, _t in manifest.grants()
                if fpr == fingerprint
            ]
            raise UsageError(
                f"{path} is not granted to {fingerprint}",
                hint=f"its grants are on: {', '.join(where)}" if where else "it has no grants",
            )
    todo = list(_opened_without_grant(manifest, tops, fingerprint))
    report = progress(sum(inode.size for _, inode in todo)) if progress is not None else None
    done: list[Reencrypted] = []
    others: set[str] = set()
    for path, inode in todo:
        result = _reencrypt(session, inode, ipfs, report, copies)
        if result is not None:
            done.append(Reencrypted(path, *result))
        others.update(manifest.grantees(inode.ino))
    return done, others


def _opened_without_grant(
    manifest: Manifest, tops: list[Inode], fingerprint: str
) -> Iterator[tuple[str, Inode]]:
    """(path, file) for every file whose current version `fingerprint` can open though no
    grant lets them read it any more, with its path in the manifest: below `tops`, then
    anywhere else (a file moved out of a shared directory keeps its wraps until its next
    version, and revoking the directory must not leave it open to the revoked key)."""
    seen: set[int] = set()
    for top in tops:
        base = os.fsdecode(manifest.path_of(top.ino) or b"/").rstrip("/")
        for rel, inode in _subtree(manifest, top):
            if inode.kind == Kind.FILE and inode.ino not in seen:
                seen.add(inode.ino)
                if _opened_without_grant_now(manifest, inode, fingerprint):
                    yield f"{base}/{rel}" if rel else base, inode
    for ino in manifest.files_wrapped_for(fingerprint):
        if ino in seen:
            continue
        elsewhere, path = manifest.get(ino), manifest.path_of(ino)
        if elsewhere is None or path is None:
            continue  # gone, or unlinked and about to be
        if _opened_without_grant_now(manifest, elsewhere, fingerprint):
            yield os.fsdecode(path), elsewhere


def _opened_without_grant_now(manifest: Manifest, inode: Inode, fingerprint: str) -> bool:
    return (
        inode.cid is not None
        and fingerprint not in manifest.recipients_of(inode.ino)  # not the owner, nor granted
        and fingerprint in manifest.wraps(inode.ino)
    )


def _reencrypt(
    session: state.Session,
    inode: Inode,
    ipfs: IPFS,
    progress: Progress | None,
    copies: LocalCopies | None,
) -> tuple[str, str, int] | None:
    manifest, owner = session.manifest, session.owner
    old_cid, salt = inode.cid, inode.salt
    assert old_cid is not None and salt is not None
    old_key = _content_key(owner, manifest, inode)

    def from_node(offset: int, length: int) -> bytes:
        return ipfs.cat(old_cid, offset, length)

    def from_copy(offset: int, length: int) -> bytes:
        kept = copies.read(old_cid, offset, length) if copies is not None else None
        return kept if kept is not None else from_node(offset, length)

    def reader(fetch: Callable[[int, int], bytes]) -> format.ObjectReader:
        return format.ObjectReader(
            old_key, fetch, layout.ciphertext_size(inode.size), header=format.Header(salt)
        )

    def plaintext() -> Iterator[bytes]:
        old = reader(from_copy)
        for offset in range(0, inode.size, REENCRYPT_CHUNK):
            try:
                piece = old.read(offset, REENCRYPT_CHUNK)
            except FormatError:
                if copies is None or old_cid not in copies:
                    raise  # the node's bytes are damaged
                copies.drop(old_cid, failed=True)  # the copy's are: the node decides
                old = reader(from_node)
                piece = old.read(offset, REENCRYPT_CHUNK)
            if progress is not None:
                progress(len(piece))
            yield piece

    new_key = format.new_content_key()
    encrypted = format.encrypt(new_key, plaintext())
    header = next(encrypted)
    new_salt = format.Header.parse(header).salt

    def stream() -> Iterator[bytes]:
        yield header
        yield from encrypted

    new_cid = ipfs.add(stream())
    context = recipients.entry_context(inode.entry_id, new_salt)

    def commit() -> str | None:
        to = readers(owner.public.recipient(), manifest.grantees(inode.ino))
        return manifest.commit_version(
            inode.ino,
            cid=new_cid,
            salt=new_salt,
            size=inode.size,
            format=format.VERSION,
            mtime_ns=inode.mtime_ns,
            version_ns=time.time_ns(),
            wraps=recipients.wrap_all(new_key, to, context),
            expected_cid=old_cid,
        )

    try:
        unpin = until_recipients_match(commit)
    except VersionConflict:
        # A newer version was written meanwhile, already wrapped only for current grantees.
        with contextlib.suppress(MedfsError):
            ipfs.unpin(new_cid)
        return None
    if unpin is not None:  # the old version's own pin, or its group's once it keeps nothing
        with contextlib.suppress(MedfsError):
            ipfs.unpin(unpin)
    if copies is not None:
        copies.drop(old_cid)  # what the revoked key opens does not stay on this disk either
    return old_cid, new_cid, inode.size


# -- recipient side ----------------------------------------------------------------------------


def share_layout(root: state.Layout, issuer: str) -> state.Layout:
    """Where a share received from `issuer` is kept: its own small state directory."""
    return state.Layout(root.root / "shares" / issuer)


def _accepted_path(sub: state.Layout) -> Path:
    return sub.root / "accepted.json"


def last_accepted(sub: state.Layout) -> int:
    try:
        return int(json.loads(_accepted_path(sub).read_text())["sequence"])
    except (OSError, ValueError, KeyError, TypeError):
        return 0


def accept(
    root: state.Layout,
    data: bytes,
    recipient: Identity,
    key_file: Path,
    issuer: PublicIdentity,
) -> tuple[state.Layout, sharing.ShareManifest]:
    """Check a share manifest and make it the local view of what `issuer` shares with us."""
    share = sharing.open_manifest(data, recipient, issuer)
    sub = share_layout(root, issuer.fingerprint)
    accepted = last_accepted(sub)
    if share.sequence < accepted:
        raise RollbackError(
            f"this share manifest is number {share.sequence} from {issuer.fingerprint}, but"
            f" number {accepted} was already accepted: an older manifest is never accepted again",
            hint="ask the issuer for their latest share manifest",
        )
    if state.holder(sub):
        raise MedfsError(
            f"the share from {issuer.fingerprint} is mounted already",
            hint="unmount it first; mounting the newer manifest then replaces the view",
        )
    sub.root.mkdir(parents=True, exist_ok=True, mode=0o700)
    fresh = sub.manifest.with_name("manifest.db.new")
    for leftover in (fresh, *(fresh.with_name(fresh.name + s) for s in ("-wal", "-shm"))):
        with contextlib.suppress(FileNotFoundError):
            leftover.unlink()
    view_key = os.urandom(32)
    view_id = os.urandom(16)
    wrapped = recipients.wrap(
        view_key, recipient.public.recipient(), state.manifest_context(view_id)
    )
    view = Manifest.initialize(
        fresh,
        owner=recipient.fingerprint,
        wrapped_key=wrapped.to_bytes(),
        names=NameCipher(view_key),
        uid=os.getuid(),
        gid=os.getgid(),
        now_ns=share.created_ns,
        root_mode=0o555,
    )
    try:
        view.set_meta("manifest_id", view_id)
        view.set_meta("issuer", issuer.to_text().encode())
        view.set_meta("sequence", str(share.sequence).encode())
        _populate(view, share, recipient.fingerprint)
    finally:
        view.close()
    for suffix in ("-wal", "-shm"):
        with contextlib.suppress(FileNotFoundError):
            sub.manifest.with_name(sub.manifest.name + suffix).unlink()
    fresh.replace(sub.manifest)
    config = {"version": state.CONFIG_VERSION, "key": str(key_file.absolute()),
              "public": recipient.public.to_text()}  # fmt: skip
    sub.config.write_text(json.dumps(config, indent=2) + "\n")
    _accepted_path(sub).write_text(json.dumps({"sequence": share.sequence}) + "\n")
    return sub, share


def _populate(view: Manifest, share: sharing.ShareManifest, fingerprint: str) -> None:
    inos = {"": 1}
    uid, gid = os.getuid(), os.getgid()
    for entry in share.entries:
        parent_path, _, name = entry.path.rpartition("/")
        parent = inos[parent_path]
        # Read-only view: no write bits, whatever the issuer's modes.
        mode = entry.mode & 0o7555
        inode = view.create(
            parent,
            name.encode(),
            entry.kind,
            mode,
            uid,
            gid,
            entry.mtime_ns,
            target=entry.target,
            entry_id=entry.entry_id,
        )
        inos[entry.path] = inode.ino
        if entry.kind == "file":
            assert entry.cid and entry.salt and entry.stanza
            view.commit_version(
                inode.ino,
                cid=entry.cid,
                salt=entry.salt,
                size=entry.size,
                format=format.VERSION,
                mtime_ns=entry.mtime_ns,
                version_ns=share.created_ns,
                wraps={fingerprint: entry.stanza},
            )
