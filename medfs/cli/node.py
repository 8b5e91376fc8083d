"""`medfs node start | stop | status`: the embedded private Kubo node."""

from __future__ import annotations

import argparse
import json
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
