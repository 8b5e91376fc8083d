"""Entry point: parse the command line, run one command, turn `MedfsError` into a message."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from types import ModuleType

from medfs import __version__, state
from medfs.cli import audit, backup, inspect, keys, mount, node, package, share, verify
from medfs.errors import MedfsError
from medfs.paths import state_dir

# Each command module offers `register(subparsers, common)`; its parsers set `func`.
COMMAND_MODULES: tuple[ModuleType, ...] = (
    keys, mount, share, inspect, audit, node, verify, backup, package,
)  # fmt: skip


def common_options() -> argparse.ArgumentParser:
    """Options every command accepts, so `medfs CMD --state DIR` works after the command name."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--state",
        metavar="DIR",
        default=os.environ.get("MEDFS_STATE"),
        help="state directory (default: $MEDFS_STATE, else $XDG_DATA_HOME/medfs)",
    )
    common.add_argument(
        "--api",
        metavar="MULTIADDR",
        default=os.environ.get("MEDFS_IPFS_API"),
        help="Kubo RPC API to use instead of the embedded node (default: $MEDFS_IPFS_API)",
    )
    common.add_argument("-v", "--verbose", action="store_true", help="log what medfs does")
    return common


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="medfs", description="Encrypted filesystem for health records on IPFS."
    )
    parser.add_argument("--version", action="version", version=f"medfs {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    common = common_options()
    for module in COMMAND_MODULES:
        module.register(sub, common)
    return parser


def print_error(err: MedfsError) -> None:
    print(f"medfs: error: {err.message}", file=sys.stderr)
    if err.hint:
        print(f"medfs: hint: {err.hint}", file=sys.stderr)


def _follow_the_mount(args: argparse.Namespace) -> None:
    """While the state directory is mounted against an external node (--api), commands such
    as share, revoke or verify must use that node, not start the embedded one."""
    if args.command == "node" or getattr(args, "api", None) or not hasattr(args, "state"):
        return
    holder = state.holder(state.Layout(state_dir(args.state)))
    if holder and isinstance(holder.get("api"), str):
        args.api = holder["api"]


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="medfs: %(levelname)s: %(message)s",
    )
    try:
        _follow_the_mount(args)
        code: int = args.func(args)
    except MedfsError as err:
        print_error(err)
        return err.exit_code
    except KeyboardInterrupt:
        print("medfs: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # The reader went away (`medfs ls | head`): stop quietly, as other tools do.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 128 + 13
    return code
