"""`medfs status`, `medfs backup`, `medfs restore`: manifest snapshots on IPFS, and the state.

`status` needs no passphrase. `backup` signs a snapshot now, so it asks for the passphrase;
the mount daemon takes one by itself at every umount and every $MEDFS_BACKUP_MINUTES while
mounted. `restore` rebuilds a state directory on another machine from a snapshot's CID.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from medfs import backup, identity, mount, state
from medfs.errors import MedfsError
from medfs.ipfs import IPFS
from medfs.kubo import EmbeddedNode, resolve_api
from medfs.paths import state_dir

# Restoring with --fetch pins whole objects, which may have to come from another node.
FETCH_TIMEOUT = 600.0


def register(sub: Any, common: argparse.ArgumentParser) -> None:
    status = sub.add_parser(
        "status", parents=[common], help="the state directory, mount, node and last backup"
    )
    status.add_argument("--json", action="store_true", help="print JSON")
    status.set_defaults(func=run_status)

    take = sub.add_parser(
        "backup", parents=[common], help="add an encrypted, signed manifest snapshot to IPFS now"
    )
    take.add_argument("--passphrase-file", metavar="FILE", help="read the passphrase from FILE")
    take.set_defaults(func=run_backup)

    restore = sub.add_parser(
        "restore",
        parents=[common],
        help="rebuild a state directory from a manifest snapshot",
        description="Rebuild a working state directory (--state NEWDIR) from the snapshot at"
        " --from-cid, which must be signed by and encrypted to the identity in --key. The"
        " records themselves stay on IPFS: this node must reach a node that holds them"
        " (--peer), and --fetch pins them all here now.",
    )
    restore.add_argument("--from-cid", required=True, metavar="CID", help="the snapshot")
    restore.add_argument("--key", required=True, metavar="NAME.key", help="the owner's key file")
    restore.add_argument(
        "--peer", action="append", default=[], metavar="MULTIADDR",
        help="connect to this node first (one that holds the snapshot and records)",
    )  # fmt: skip
    restore.add_argument(
        "--fetch", action="store_true", help="pin every record on this node now (fetches them)"
    )
    restore.add_argument("--passphrase-file", metavar="FILE", help="read the passphrase from FILE")
    restore.set_defaults(func=run_restore)


def _when(ns: int) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ns / 1e9))


def _node(args: argparse.Namespace, root: Path) -> dict[str, Any]:
    if args.api:
        return {"api": args.api, "embedded": False}
    try:
        return {"embedded": True, **EmbeddedNode(root).status().as_json()}
    except MedfsError as err:
        return {"embedded": True, "running": False, "error": err.message}


def _umount_report(layout: state.Layout) -> dict[str, Any] | None:
    try:
        report = json.loads(mount.report_path(layout).read_text())
    except (OSError, ValueError):
        return None
    return report if isinstance(report, dict) else None


def run_status(args: argparse.Namespace) -> int:
    layout = state.Layout(state_dir(args.state))
    owner = state.owner_public(layout)
    holder = state.holder(layout)
    backups = backup.load_backups(layout)
    info: dict[str, Any] = {
        "state": str(layout.root),
        "owner": owner.fingerprint,
        "key": str(state.key_path(layout)),
        "mounted": holder is not None,
        "mountpoint": holder.get("mountpoint") if holder else None,
        "pid": holder.get("pid") if holder else None,
        "node": _node(args, layout.root),
        "last_backup": backups[-1].as_json() if backups else None,
        "backups": [b.as_json() for b in backups],
        "umount_report": None if holder else _umount_report(layout),
    }
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    print(f"state:       {info['state']}")
    print(f"owner:       {info['owner']} ({info['key']})")
    if holder:
        print(f"mounted:     at {info['mountpoint']} (daemon pid {info['pid']})")
    else:
        print("mounted:     no")
    node = info["node"]
    if not node["embedded"]:
        print(f"node:        {node['api']} (--api)")
    elif node.get("running"):
        print(f"node:        embedded, running at {node['api']} (peer {node.get('peer_id')})")
    else:
        print(
            f"node:        embedded, not running{': ' + node['error'] if 'error' in node else ''}"
        )
    if backups:
        last = backups[-1]
        print(f"last backup: {last.cid} at {_when(last.time_ns)} ({last.entries} entries)")
        print(f"             {len(backups)} snapshot(s) kept pinned")
    else:
        print("last backup: none yet (one is taken at every umount, or run 'medfs backup')")
    report = info["umount_report"]
    if report is not None:
        pending = report.get("pending") or []
        if pending:
            print(f"last umount: {len(pending)} file(s) could not be saved:")
            for item in pending:
                print(f"  inode {item.get('inode')}: {item.get('error')}")
        else:
            print("last umount: everything saved")
    return 0


def run_backup(args: argparse.Namespace) -> int:
    layout = state.Layout(state_dir(args.state))
    state.read_config(layout)
    passphrase = identity.get_passphrase(passphrase_file=args.passphrase_file)
    session = state.unlock(layout, passphrase)
    try:
        client = IPFS(resolve_api(layout.root, args.api))
        try:
            taken = backup.upload(session, layout, client)
        finally:
            client.close()
    finally:
        session.manifest.close()
    assert taken is not None  # forced: always uploads
    print(taken.cid)
    return 0


def run_restore(args: argparse.Namespace) -> int:
    new_state = state.Layout(state_dir(args.state))
    backup.check_new_state(new_state)  # before starting a node in it
    key = Path(args.key)
    passphrase = identity.get_passphrase(passphrase_file=args.passphrase_file)
    client = IPFS(resolve_api(new_state.root, args.api), timeout=FETCH_TIMEOUT)
    try:
        for peer in args.peer:
            client.swarm_connect(peer)
        restored = backup.restore(
            args.from_cid, key, passphrase, new_state, client, fetch_objects=args.fetch
        )
    finally:
        client.close()
    print(f"restored {restored.layout.root} from {args.from_cid}")
    print(f"owner identity {restored.owner}")
    print(
        f"snapshot of {_when(restored.created_ns)}: {restored.entries} entries"
        f" ({restored.files} files), {restored.anchors} audit anchor(s) of the old log kept"
    )
    if args.fetch:
        print(f"pinned {restored.fetched} record(s) on this node")
        if restored.missing:
            print(f"medfs: warning: {len(restored.missing)} record(s) could not be fetched:")
            for cid in restored.missing:
                print(f"  {cid}")
            return 1
    return 0
