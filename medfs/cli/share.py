"""`medfs share`, `medfs revoke`, `medfs grants`."""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from medfs import control, durable, identity, state
from medfs.errors import MedfsError, OutputError, UsageError
from medfs.paths import manifest_path, state_dir

if TYPE_CHECKING:
    from medfs import access, audit, sharing
    from medfs.ipfs import IPFS

# The modules that do the work (and the HTTP stack below them) are imported only once the
# key has started unlocking (see _unlocking), or not at all when the mount does the share.

# A share of many thousands of files takes the mount a while; a mount that hangs, no longer.
SHARE_TIMEOUT = 600.0


def register(sub: Any, common: argparse.ArgumentParser) -> None:
    share = sub.add_parser("share", parents=[common], help="let someone read files or folders")
    share.add_argument("paths", nargs="+", metavar="PATH")
    share.add_argument("--to", required=True, metavar="NAME.pub", help="the recipient")
    _outputs(share)
    share.set_defaults(func=run_share)

    revoke = sub.add_parser("revoke", parents=[common], help="take access back (re-encrypts)")
    revoke.add_argument("paths", nargs="+", metavar="PATH")
    revoke.add_argument("--from", dest="from_", required=True, metavar="NAME.pub")
    _outputs(revoke, directory=True)
    revoke.set_defaults(func=run_revoke)

    grants = sub.add_parser("grants", parents=[common], help="list who can read what")
    grants.add_argument("path", nargs="?", metavar="PATH")
    grants.add_argument("--json", action="store_true", help="print JSON")
    grants.add_argument("--passphrase-file", metavar="FILE", help="read the passphrase from FILE")
    grants.set_defaults(func=run_grants)


def _outputs(parser: argparse.ArgumentParser, *, directory: bool = False) -> None:
    if directory:
        parser.add_argument("--out", metavar="DIR", help="write fresh share manifests here")
    else:
        parser.add_argument("--out", metavar="FILE", help="write the share manifest here")
    parser.add_argument("--publish", action="store_true", help="add it to IPFS, print its CID")
    parser.add_argument("--passphrase-file", metavar="FILE", help="read the passphrase from FILE")


def _unlocking(layout: state.Layout, passphrase: str) -> state.Unlocking:
    """The key unlocking in a thread (see `state.Unlocking`)."""
    unlocking = state.Unlocking(layout, passphrase)
    # Loaded while scrypt runs in its thread: ~0.3 s of a share's 2 s, for nothing.
    for module in ("medfs.access", "medfs.audit", "medfs.kubo", "medfs.sharing"):
        importlib.import_module(module)
    return unlocking


def _layout_and_passphrase(args: argparse.Namespace) -> tuple[state.Layout, str]:
    layout = state.Layout(state_dir(args.state))
    state.read_config(layout)
    return layout, identity.get_passphrase(passphrase_file=args.passphrase_file)


def _session(args: argparse.Namespace) -> tuple[state.Layout, state.Session]:
    layout, passphrase = _layout_and_passphrase(args)
    return layout, _unlocking(layout, passphrase).wait()


def journal(layout: state.Layout, session: state.Session) -> audit.AuditLog:
    """The state directory's audit log (shared with a running mount: one chain)."""
    from medfs import audit

    return audit.AuditLog(
        audit.log_path(layout.root), session.owner, audit.audit_key(session.manifest_key)
    )


def _mountpoint(layout: state.Layout) -> str | None:
    holder = state.holder(layout)
    return str(holder["mountpoint"]) if holder and holder.get("mountpoint") else None


def _manifest_place(out: str | None) -> Path | None:
    """`share --out`, checked before anything is granted: a directory to name the manifest
    in, or a file in a directory that exists."""
    if out is None:
        return None
    path = Path(out)
    if not path.is_dir() and not path.parent.is_dir():
        raise UsageError(
            f"{path.parent}: no such directory",
            hint="name a file in an existing directory, or the directory itself, with --out",
        )
    return path


def _manifests_directory(out: str | None) -> Path | None:
    """`revoke --out`, made before the revocation starts."""
    if out is None:
        return None
    path = Path(out)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise UsageError(
            f"{path} is not a directory", hint="revoke --out names a directory for the manifests"
        ) from None
    except OSError as err:
        raise UsageError(f"cannot create {path}: {err.strerror}") from None
    return path


def _write_manifest(
    out: Path | None, fingerprint: str, sequence: int, sealed: bytes, again: str | None = None
) -> Path:
    """The sealed share manifest, at OUT (a file, or a directory to name it in) or here.
    `again` is the hint for a manifest that could not be written."""
    name = f"share-{fingerprint[:16]}-{sequence}.medfs-share"
    path = out if out is not None and not out.is_dir() else (out or Path.cwd()) / name
    try:
        # Synced before the command says where it is: the recipient may be sent it at once.
        durable.replace(path, sealed)
    except OSError as err:
        tmp = path.with_name(path.name + ".tmp")
        if tmp.is_file() and not tmp.is_symlink():
            tmp.unlink(missing_ok=True)  # a partial manifest is of no use to anyone
        raise OutputError(
            f"cannot write the share manifest for {fingerprint} to {path}: {err.strerror}",
            hint=again,
        ) from None
    return path


def _publish(ipfs: IPFS, sealed: bytes, providers: tuple[sharing.Provider, ...]) -> None:
    cid = ipfs.add(sealed)
    peer = providers[0].addresses[0] if providers and providers[0].addresses else ""
    print(f"published as {cid}")
    print(f"recipient: medfs mount MOUNTPOINT --manifest {cid} --peer {peer} --from ISSUER.pub")


def _deliver(
    session: state.Session,
    fingerprint: str,
    ipfs: IPFS,
    out: Path | None,
    publish: bool,
) -> int:
    """A fresh share manifest for one recipient of the grants, written (and published)."""
    from medfs import access, sharing

    providers = access.providers_of(ipfs)
    recipient = None
    for pub_text in {p for _path, p in access.grants_of(session).get(fingerprint, [])}:
        recipient = identity.PublicIdentity.from_text(pub_text)
    if recipient is None:
        raise UsageError(f"nothing is shared with {fingerprint}")
    manifest = access.build_share(session, fingerprint, providers)
    sealed = sharing.seal(manifest, session.owner, recipient)
    path = _write_manifest(out, fingerprint, manifest.sequence, sealed)
    count = len(manifest.entries)
    print(f"share manifest #{manifest.sequence} for {fingerprint}: {count} entries -> {path}")
    if publish:
        _publish(ipfs, sealed, providers)
    return manifest.sequence


def run_share(args: argparse.Namespace) -> int:
    to = identity.read_public_file(args.to)
    out = _manifest_place(args.out)
    layout, passphrase = _layout_and_passphrase(args)
    where = _mountpoint(layout)
    paths = [manifest_path(p, where) for p in args.paths]
    done, node = None, None
    if where is not None:  # the mount has the key unlocked: no scrypt here (medfs/control.py)
        request = control.ShareRequest(passphrase, paths, to.to_text())
        done = control.ask_share(layout.root, request, timeout=SHARE_TIMEOUT)
    if done is None:
        done, node = _share_here(args, layout, passphrase, paths, to)
    print(f"granted {to.fingerprint} {', '.join(paths)} ({done.wrapped} files wrapped)")
    again = "the grant is made: run the share again, with --out naming a writable place"
    path = _write_manifest(out, to.fingerprint, done.sequence, done.sealed, again)
    print(f"share manifest #{done.sequence} for {to.fingerprint}: {done.entries} entries -> {path}")
    if args.publish:
        ipfs, providers = node or _node(layout, args)
        _publish(ipfs, done.sealed, providers)
    return 0


def _node(
    layout: state.Layout, args: argparse.Namespace
) -> tuple[IPFS, tuple[sharing.Provider, ...]]:
    """The node's client and the addresses a recipient fetches from (asked of the node)."""
    from medfs import access
    from medfs.ipfs import IPFS
    from medfs.kubo import resolve_api

    ipfs = IPFS(resolve_api(layout.root, args.api))
    return ipfs, access.providers_of(ipfs)


def _share_here(
    args: argparse.Namespace,
    layout: state.Layout,
    passphrase: str,
    paths: list[str],
    to: identity.PublicIdentity,
) -> tuple[control.Shared, tuple[IPFS, tuple[sharing.Provider, ...]]]:
    """The share done by this command, with the key unlocked here; and the node it asked."""
    unlocking = _unlocking(layout, passphrase)
    from medfs import access

    # Asked while scrypt runs; and a node that cannot be reached stops the share before
    # anything is granted.
    node = _node(layout, args)
    session = unlocking.wait()
    try:
        with journal(layout, session) as log:
            return access.share(session, paths, to, node[1], log), node
    finally:
        session.manifest.close()


class _ProgressBar:
    """Re-encryption progress on a terminal's stderr; `start` is revoke's `progress`."""

    def __init__(self) -> None:
        self.total = self.done = 0
        self.drawn = False

    def start(self, total: int) -> access.Progress | None:
        if not sys.stderr.isatty() or total <= 0:
            return None
        self.total = total
        return self.update

    def update(self, n: int) -> None:
        self.done += n
        width = 40
        filled = min(width, self.done * width // self.total)
        sys.stderr.write(
            f"\rre-encrypting [{'#' * filled}{'.' * (width - filled)}]"
            f" {self.done / 2**20:,.0f}/{self.total / 2**20:,.0f} MiB"
        )
        sys.stderr.flush()
        self.drawn = True

    def end(self) -> None:
        if self.drawn:  # the bar's line ends here, however far it got
            sys.stderr.write("\n")


def run_revoke(args: argparse.Namespace) -> int:
    who = identity.read_public_file(args.from_)
    out = _manifests_directory(args.out)
    layout, session = _session(args)
    from medfs import access
    from medfs.copies import LocalCopies
    from medfs.ipfs import IPFS
    from medfs.kubo import resolve_api

    try:
        where = _mountpoint(layout)
        paths = [manifest_path(p, where) for p in args.paths]
        ipfs = IPFS(resolve_api(layout.root, args.api), timeout=300)
        copies = LocalCopies.view(layout.copies)
        bar = _ProgressBar()
        try:
            done, others = access.revoke(session, paths, who.fingerprint, ipfs, bar.start, copies)
        finally:
            bar.end()
        with journal(layout, session) as log:
            log.append(
                "revoke",
                recipient=who.fingerprint,
                paths=paths,
                reencrypted=[{"path": r.path, "old": r.old_cid, "new": r.new_cid} for r in done],
            )
        size = sum(r.size for r in done)
        print(f"revoked {who.fingerprint} from {', '.join(paths)}")
        print(f"re-encrypted {len(done)} files ({size:,} bytes) under fresh keys")
        failed = []
        for fingerprint in sorted(others):
            # One recipient's manifest failing must not keep the others from theirs.
            try:
                _deliver(session, fingerprint, ipfs, out, args.publish)
            except MedfsError as err:
                said = err.message  # most name the recipient already: once is enough
                failed.append(said if fingerprint in said else f"{fingerprint}: {said}")
        if failed:
            raise OutputError(
                f"the revocation is done, but {len(failed)} of {len(others)} fresh share "
                f"manifests were not written: {'; '.join(failed)}",
                hint="run 'medfs share PATH --to THEIR.pub' for each of them: it writes a "
                "fresh manifest",
            )
    finally:
        session.manifest.close()
    return 0


def run_grants(args: argparse.Namespace) -> int:
    layout, session = _session(args)
    from medfs import access

    try:
        grants = access.grants_of(session)
        where = _mountpoint(layout)
        prefix = manifest_path(args.path, where) if args.path else None
    finally:
        session.manifest.close()
    rows = [
        {
            "path": path,
            "recipient": fpr,
            "kind": identity.PublicIdentity.from_text(public).kind.value,
        }
        for fpr, items in grants.items()
        for path, public in items
        if prefix is None or path == prefix or path.startswith(prefix.rstrip("/") + "/")
        or prefix.startswith(path.rstrip("/") + "/")
    ]  # fmt: skip
    rows.sort(key=lambda r: (r["path"], r["recipient"]))
    if args.json:
        print(json.dumps(rows, indent=2))
    elif not rows:
        print("nothing is shared")
    else:
        for row in rows:
            print(f"{row['path']}  ->  {row['recipient']} ({row['kind']})")
    return 0
