"""`medfs ls` and `medfs stat`: what is stored where, with CIDs and recipients.

A path inside a running mount is answered by the mount itself (through a read-only extended
attribute), with no passphrase. Any other path is looked up in the manifest of the state
directory, which needs the owner's passphrase because names are stored encrypted.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import time
from pathlib import Path
from typing import Any

from medfs import identity, state
from medfs.errors import UsageError
from medfs.manifest import Inode
from medfs.paths import state_dir

XATTR_INFO = "user.medfs.info"


def register(sub: Any, common: argparse.ArgumentParser) -> None:
    ls = sub.add_parser("ls", parents=[common], help="list files with their CIDs")
    ls.add_argument("path", nargs="?", metavar="PATH", help="in a mount, or in the manifest")
    ls.add_argument("--json", action="store_true", help="print JSON")
    ls.add_argument("--passphrase-file", metavar="FILE", help="read the passphrase from FILE")
    ls.set_defaults(func=run_ls)
    st = sub.add_parser("stat", parents=[common], help="show one file's CID, size, recipients")
    st.add_argument("path", metavar="PATH")
    st.add_argument("--json", action="store_true", help="print JSON")
    st.add_argument("--passphrase-file", metavar="FILE", help="read the passphrase from FILE")
    st.set_defaults(func=run_stat)


def _from_mount(path: Path) -> dict[str, Any] | None:
    """Facts about `path` from the mount serving it, or None if no medfs mount serves it."""
    try:
        raw = os.getxattr(path, XATTR_INFO, follow_symlinks=False)
    except OSError as err:
        if err.errno in (errno.ENODATA, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EPERM):
            return None
        if err.errno == errno.ENOENT:
            return None
        raise UsageError(f"cannot read {path}: {err.strerror}") from None
    info: dict[str, Any] = json.loads(raw)
    info["path"] = str(path)
    return info


def _from_inode(path: str, inode: Inode, recipients: list[str]) -> dict[str, Any]:
    return {
        "path": path,
        "kind": inode.kind,
        "cid": inode.cid,
        "size": inode.size,
        "version_ns": inode.version_ns,
        "mtime_ns": inode.mtime_ns,
        "format": inode.format,
        "recipients": sorted(recipients),
    }


def _rows(args: argparse.Namespace, listing: bool) -> list[dict[str, Any]]:
    target = Path(args.path) if args.path else None
    if target is not None and target.exists():
        info = _from_mount(target)
        if info is not None:
            if not listing or info["kind"] != "dir":
                return [info]
            rows = []
            for child in sorted(target.iterdir()):
                row = _from_mount(child)
                if row is not None:
                    rows.append(row)
            return rows
    layout = state.Layout(state_dir(args.state))
    holder = state.holder(layout)
    if target is None and holder and holder.get("mountpoint"):
        return _rows(argparse.Namespace(**{**vars(args), "path": holder["mountpoint"]}), listing)
    state.read_config(layout)
    passphrase = identity.get_passphrase(passphrase_file=args.passphrase_file)
    manifest = state.unlock(layout, passphrase).manifest
    try:
        wanted = str(args.path or "/")
        inode = manifest.resolve(wanted)
        if inode is None:
            raise UsageError(
                f"{wanted}: no such file in the manifest of {layout.root}",
                hint="give a path inside a mount, or a path relative to the medfs root",
            )
        shown = "/" + wanted.strip("/")
        if not listing or inode.kind != "dir":
            return [_from_inode(shown, inode, list(manifest.wraps(inode.ino)))]
        return [
            _from_inode(
                shown.rstrip("/") + "/" + os.fsdecode(name), child, list(manifest.wraps(child.ino))
            )
            for _id, name, child in manifest.children(inode.ino)
        ]
    finally:
        manifest.close()


def _when(ns: int | None) -> str:
    if not ns:
        return "-"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ns / 1e9))


def run_ls(args: argparse.Namespace) -> int:
    rows = _rows(args, listing=True)
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    for row in rows:
        kind = {"dir": "d", "symlink": "l"}.get(row["kind"], "-")
        cid = row.get("cid") or "-"
        print(f"{kind} {row['size']:>12} {_when(row.get('version_ns'))}  {cid:<62} {row['path']}")
    return 0


def run_stat(args: argparse.Namespace) -> int:
    (row,) = _rows(args, listing=False)
    if args.json:
        print(json.dumps(row, indent=2))
        return 0
    print(f"path:       {row['path']}")
    print(f"kind:       {row['kind']}")
    print(f"cid:        {row.get('cid') or '-'}")
    print(f"size:       {row['size']}")
    print(f"version:    {_when(row.get('version_ns'))}")
    print(f"recipients: {', '.join(row.get('recipients') or []) or '-'}")
    return 0
