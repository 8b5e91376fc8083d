"""Entry point: parse the command line, run one command, turn `MedfsError` into a message."""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from collections.abc import Sequence

from medfs import __version__, state
from medfs.errors import MedfsError
from medfs.paths import state_dir

# Each command module offers `register(subparsers, common)`; its parsers set `func`. The
# order here is the order of `medfs --help`.
COMMAND_MODULES: tuple[str, ...] = (
    "keys", "mount", "share", "inspect", "audit", "node", "verify", "backup", "package",
)  # fmt: skip
# Which module registers each command. A command line naming one of them imports that module
# alone: the others pull in pyfuse3, trio and the HTTP stack, ~0.2 s of every `medfs share`.
COMMANDS: dict[str, str] = {
    "keygen": "keys", "id": "keys",
    "init": "mount", "mount": "mount", "umount": "mount",
    "share": "share", "revoke": "share", "grants": "share",
    "ls": "inspect", "stat": "inspect",
    "audit": "audit",
    "node": "node",
    "verify": "verify",
    "status": "backup", "backup": "backup", "restore": "backup",
    "export-package": "package", "import-package": "package",
}  # fmt: skip


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


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser of every command, or, given a known `command`, of its module's alone."""
    parser = argparse.ArgumentParser(
        prog="medfs", description="Encrypted filesystem for health records on IPFS."
    )
    parser.add_argument("--version", action="version", version=f"medfs {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    common = common_options()
    names = [COMMANDS[command]] if command in COMMANDS else COMMAND_MODULES
    for name in names:
        importlib.import_module(f"medfs.cli.{name}").register(sub, common)
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
    argv = list(sys.argv[1:] if argv is None else argv)
    # The command is the first argument: the top level has no options that take a value.
    args = build_parser(argv[0] if argv else None).parse_args(argv)
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
