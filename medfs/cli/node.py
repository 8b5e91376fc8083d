"""`medfs node start | stop | status | gc`: the embedded private Kubo node."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

from medfs.errors import UsageError
from medfs.kubo import EmbeddedNode
from medfs.paths import state_dir


def register(sub: Any, common: argparse.ArgumentParser) -> None:
    node = sub.add_parser("node", help="manage the embedded private IPFS node")
    actions = node.add_subparsers(dest="action", metavar="ACTION", required=True)
    start = actions.add_parser("start", parents=[common], help="start it (no-op if running)")
    start.set_defaults(func=run_start)
    stop = actions.add_parser("stop", parents=[common], help="stop it")
    stop.set_defaults(func=run_stop)
    status = actions.add_parser("status", parents=[common], help="say whether it runs, and where")
    status.add_argument("--json", action="store_true", help="print JSON")
    status.set_defaults(func=run_status)
    gc = actions.add_parser(
        "gc", parents=[common], help="free the disk space of versions deleted or replaced"
    )
    gc.set_defaults(func=run_gc)


def _node(args: argparse.Namespace) -> EmbeddedNode:
    if args.api:
        raise UsageError(
            "'medfs node' manages the embedded node, but an external API is configured"
            f" ({args.api})",
            hint="unset MEDFS_IPFS_API / drop --api, or manage that node with its own tools",
        )
    return EmbeddedNode(state_dir(args.state))


def run_start(args: argparse.Namespace) -> int:
    node = _node(args)
    api = node.ensure_running()
    print(f"embedded IPFS node running: api {api}, repo {node.repo}")
    return 0


def run_stop(args: argparse.Namespace) -> int:
    node = _node(args)
    print("embedded IPFS node stopped" if node.stop() else "embedded IPFS node was not running")
    return 0


def run_status(args: argparse.Namespace) -> int:
    status = _node(args).status()
    if args.json:
        print(json.dumps(status.as_json(), indent=2))
    else:
        state = f"running, api {status.api}, pid {status.pid}" if status.running else "stopped"
        print(f"embedded IPFS node: {state}")
        print(f"repo:    {status.repo}")
        print(f"binary:  {status.binary} (Kubo {status.version})")
        if status.peer_id:
            print(f"peer id: {status.peer_id}")
    # Exit 0 either way: a stopped node is a state, not an error; scripts read --json.
    return 0


def _disk_bytes(root: Path) -> int:
    total = 0
    for where, _dirs, files in os.walk(root):
        for name in files:
            try:
                total += (Path(where) / name).lstat().st_blocks * 512
            except FileNotFoundError:
                continue  # removed by the collection meanwhile
    return total


def run_gc(args: argparse.Namespace) -> int:
    """Unpinned blocks stay in the node's repository until a collection: a deleted or
    replaced version's ciphertext keeps its disk space (and stays readable to anyone the
    node serves who has its CID) until then. Pinned versions are never touched, and adds
    in progress are not either: Kubo takes the pin lock for each add that pins."""
    from medfs.ipfs import IPFS

    node = _node(args)
    api = node.ensure_running()
    before = _disk_bytes(node.repo / "blocks")
    ipfs = IPFS(api, timeout=3600)
    try:
        removed = ipfs.gc()
    finally:
        ipfs.close()
    freed = max(0, before - _disk_bytes(node.repo / "blocks"))
    print(f"removed {removed} unpinned blocks from {node.repo}: {freed / (1 << 20):,.1f} MiB freed")
    return 0
