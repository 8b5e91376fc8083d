"""`medfs export-package` and `medfs import-package`: the whole-file package format of existing
IPFS health-record scripts (docs/FORMAT.md §11)."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

from medfs import identity, package, state
from medfs.cli.share import journal
from medfs.errors import KeyFileError, UsageError
from medfs.ipfs import IPFS
from medfs.kubo import resolve_api
from medfs.paths import manifest_path, state_dir

DEFAULT_TIMEOUT = 10.0


def register(sub: Any, common: argparse.ArgumentParser) -> None:
    export = sub.add_parser(
        "export-package",
        parents=[common],
        help="write a file as a whole-file package for RSA keys (interop)",
        description="Encrypt a medfs file into the JSON package format of existing IPFS"
        " scripts: AES-256-GCM of the whole file under a fresh key and nonce, added and pinned"
        " on IPFS, the key wrapped with RSA-OAEP-SHA256 for each --to. The whole file is held"
        " in memory, and files over 2 GiB - 1 byte are refused.",
    )
    export.add_argument("path", metavar="PATH", help="in the mount, or in the manifest")
    export.add_argument(
        "--to", action="append", required=True, metavar="RSA_PUBLIC.pem",
        help="a recipient's RSA public key or certificate (2048 bits or more); repeatable",
    )  # fmt: skip
    export.add_argument(
        "--id", action="append", default=[], metavar="NAME",
        help="the recipient id to write, once per --to in the same order"
        " (default: each PEM file's name without its suffix)",
    )  # fmt: skip
    export.add_argument("--out", required=True, metavar="PACKAGE.json", help="write it here")
    _shared(export)
    export.set_defaults(func=run_export)

    imp = sub.add_parser(
        "import-package",
        parents=[common],
        help="store a whole-file package's file in medfs (interop)",
        description="Open a JSON package of existing IPFS scripts with an RSA private key,"
        " fetch and authenticate its ciphertext, and store the file at --as in medfs's own"
        " format. Nothing is stored unless every check passes.",
    )
    imp.add_argument("package", metavar="PACKAGE.json")
    imp.add_argument(
        "--key", required=True, metavar="RSA_PRIVATE.pem", help="unencrypted PEM, mode 0600"
    )
    imp.add_argument(
        "--as", dest="as_path", required=True, metavar="PATH",
        help="the new file, in the mount or in the manifest (its directory must exist)",
    )  # fmt: skip
    imp.add_argument("--id", metavar="NAME", help="try this enc_keys entry first")
    _shared(imp)
    imp.set_defaults(func=run_import)


def _shared(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--timeout", type=float, metavar="SECONDS",
        default=float(os.environ.get("MEDFS_IPFS_TIMEOUT", DEFAULT_TIMEOUT)),
        help="give up on an IPFS request after this long"
        " (default: $MEDFS_IPFS_TIMEOUT, else %(default)s)",
    )  # fmt: skip
    parser.add_argument("--passphrase-file", metavar="FILE", help="read the passphrase from FILE")


def _read(path: str, what: str) -> bytes:
    try:
        with open(path, "rb") as fh:
            return fh.read(package.MAX_PACKAGE_SIZE + 1)
    except OSError as err:
        raise UsageError(f"cannot read {what} {path}: {err.strerror}") from None


def _session(args: argparse.Namespace) -> tuple[state.Layout, state.Session, str | None]:
    layout = state.Layout(state_dir(args.state))
    state.read_config(layout)
    passphrase = identity.get_passphrase(passphrase_file=args.passphrase_file)
    session = state.unlock(layout, passphrase)
    holder = state.holder(layout)
    mountpoint = str(holder["mountpoint"]) if holder and holder.get("mountpoint") else None
    return layout, session, mountpoint


def _recipients(args: argparse.Namespace) -> list[tuple[str, Any]]:
    if args.id and len(args.id) != len(args.to):
        raise UsageError(
            f"{len(args.id)} --id for {len(args.to)} --to",
            hint="give one --id per --to, in the same order, or none",
        )
    ids = args.id or [Path(p).name.partition(".")[0] or Path(p).name for p in args.to]
    if len(set(ids)) != len(ids) or not all(ids):
        raise UsageError(
            f"recipient ids must be non-empty and distinct: {', '.join(ids)}",
            hint="name each recipient with --id, in the order of --to",
        )
    out = []
    for rid, path in zip(ids, args.to, strict=True):
        try:
            data = Path(path).read_bytes()
        except OSError as err:
            raise KeyFileError(f"cannot read {path}: {err.strerror}") from None
        out.append((rid, package.load_public_pem(data, path)))
    return out


def run_export(args: argparse.Namespace) -> int:
    to = _recipients(args)
    out = Path(args.out)
    if not out.parent.is_dir():
        raise UsageError(f"{out.parent} is not a directory")
    layout, session, mountpoint = _session(args)
    try:
        path = manifest_path(args.path, mountpoint)
        size = package.file_inode(session, path).size
        package.check_size(size, path)  # before a byte is read
        print(f"medfs: warning: {package.WARNING}", file=sys.stderr)
        ipfs = IPFS(resolve_api(layout.root, args.api), timeout=args.timeout)
        done = package.export_package(session, path, to, ipfs)
        cid = done.package.cid
        try:
            tmp = out.with_name(out.name + ".tmp")
            tmp.write_bytes(done.package.to_bytes())
            tmp.replace(out)
        except OSError as err:
            ipfs.unpin(cid)
            raise UsageError(f"cannot write {out}: {err.strerror}") from None
        with journal(layout, session) as log:
            log.append(
                "export-package",
                cid=cid,
                path="/" + path.strip("/"),
                size=done.size,
                recipients=package.recipients_json(done.recipients),
            )
    finally:
        session.manifest.close()
    names = ", ".join(done.recipients)
    print(f"exported {path} ({done.size:,} bytes) for {names}: ciphertext {cid} -> {out}")
    return 0


def run_import(args: argparse.Namespace) -> int:
    data = _read(args.package, "package")
    key = package.load_private_pem(identity.load_key_text(args.key).encode("ascii"), args.key)
    layout, session, mountpoint = _session(args)
    try:
        as_path = manifest_path(args.as_path, mountpoint)
        ipfs = IPFS(resolve_api(layout.root, args.api), timeout=args.timeout)
        done = package.import_package(session, data, key, as_path, ipfs, prefer_id=args.id,
                                      mode=_default_mode())  # fmt: skip
        with journal(layout, session) as log:
            log.append(
                "import-package",
                cid=done.cid,
                path=done.path,
                package_cid=done.package_cid,
                opened_as=done.opened_as,
                size=done.size,
            )
    finally:
        session.manifest.close()
    where = f" (in the mount: {mountpoint.rstrip('/')}{done.path})" if mountpoint else ""
    print(f"imported {done.size:,} bytes as {done.path}{where}: version {done.cid}")
    return 0


def _default_mode() -> int:
    """0666 less the umask, as a file created by `cp` would get."""
    umask = os.umask(0o077)
    os.umask(umask)
    return 0o666 & ~umask
