"""`medfs init`, `medfs mount`, `medfs umount`."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

from medfs import access, audit, identity, mount, state
from medfs.errors import MedfsError, UsageError
from medfs.ipfs import IPFS
from medfs.kubo import resolve_api
from medfs.paths import state_dir

MOUNT_OPTIONS = {"ro", "rw", "allow_other"}
PENDING_EXIT = 10


def register(sub: Any, common: argparse.ArgumentParser) -> None:
    init = sub.add_parser("init", parents=[common], help="create a state directory")
    init.add_argument("--key", metavar="NAME.key", help="bind this identity (default: create one)")
    init.add_argument("--passphrase-file", metavar="FILE", help="read the passphrase from FILE")
    init.set_defaults(func=run_init)

    mnt = sub.add_parser("mount", parents=[common], help="mount the encrypted filesystem")
    mnt.add_argument("mountpoint", metavar="MOUNTPOINT")
    mnt.add_argument("--foreground", action="store_true", help="serve in this process")
    mnt.add_argument(
        "-o", dest="options", action="append", default=[], metavar="OPT",
        help="mount options: ro, allow_other (repeat or separate with commas)",
    )  # fmt: skip
    mnt.add_argument("--passphrase-file", metavar="FILE", help="read the passphrase from FILE")
    mnt.add_argument(
        "--manifest", metavar="FILE|CID", help="mount what someone shared with you (read-only)"
    )
    mnt.add_argument("--from", dest="issuer", metavar="ISSUER.pub", help="who shared it")
    mnt.add_argument("--key", metavar="NAME.key", help="your identity (default: the state's)")
    mnt.add_argument(
        "--peer", action="append", default=[], metavar="MULTIADDR",
        help="connect to this node first (to fetch a manifest given by CID)",
    )  # fmt: skip
    mnt.add_argument(
        "--timeout", type=float, metavar="SECONDS",
        default=float(os.environ.get("MEDFS_IPFS_TIMEOUT", mount.DEFAULT_READ_TIMEOUT)),
        help="a read the IPFS node cannot serve fails (EIO) after this long"
        " (default: $MEDFS_IPFS_TIMEOUT, else %(default)s)",
    )  # fmt: skip
    mnt.add_argument("--node-state", help=argparse.SUPPRESS)
    # Internal: the background daemon reports readiness on this fd and reads the passphrase
    # from stdin.
    mnt.add_argument("--daemon-ready-fd", type=int, help=argparse.SUPPRESS)
    mnt.set_defaults(func=run_mount)

    umnt = sub.add_parser("umount", parents=[common], help="flush, unmount, stop the daemon")
    umnt.add_argument("mountpoint", metavar="MOUNTPOINT")
    umnt.set_defaults(func=run_umount)


def run_init(args: argparse.Namespace) -> int:
    layout = state.Layout(state_dir(args.state))
    if layout.config.exists():
        raise UsageError(f"{layout.root} is already initialised")
    key = Path(args.key) if args.key else None
    passphrase = identity.get_passphrase(passphrase_file=args.passphrase_file, confirm=key is None)
    owner = state.init(layout, passphrase, key=key)
    print(f"initialised {layout.root}")
    print(f"owner identity {owner.fingerprint}")
    print(f"key file:    {state.key_path(layout)}")
    if key is None:
        print(f"public file: {layout.root / 'owner.pub'} (give it to people who share with you)")
    return 0


def _mount_options(raw: list[str]) -> set[str]:
    options = {o.strip() for item in raw for o in item.split(",") if o.strip()}
    unknown = options - MOUNT_OPTIONS
    if unknown:
        raise UsageError(
            f"unknown mount option(s): {', '.join(sorted(unknown))}",
            hint="medfs mount supports -o ro and -o allow_other",
        )
    if {"ro", "rw"} <= options:
        raise UsageError("-o ro and -o rw contradict each other")
    return options


def _record(layout: state.Layout, passphrase: str, event: str, **details: object) -> None:
    """Record a share manifest decision in the recipient's own audit log."""
    try:
        session = state.unlock(layout, passphrase)
    except MedfsError as err:
        print(f"medfs: warning: not recorded in the audit log: {err.message}", file=sys.stderr)
        return
    try:
        with audit.AuditLog(
            audit.log_path(layout.root), session.owner, audit.audit_key(session.manifest_key)
        ) as log:
            log.append(event, cid=None, **details)
    finally:
        session.manifest.close()


def _accept_share(
    args: argparse.Namespace, layout: state.Layout, passphrase: str, api: str
) -> state.Layout:
    """Check the share manifest and prepare its read-only view; return the view's layout."""
    if not args.issuer:
        raise UsageError(
            "--manifest needs --from ISSUER.pub: the key the manifest must be signed with"
        )
    key = Path(args.key) if args.key else state.key_path(layout)
    recipient = identity.read_key_file(key, passphrase)
    issuer = identity.read_public_file(args.issuer)
    ipfs = IPFS(api, timeout=args.timeout)
    try:
        for peer in args.peer:
            ipfs.swarm_connect(peer)
        source = Path(args.manifest)
        if source.is_file():
            data = source.read_bytes()
        elif args.manifest.startswith(("bafy", "bafk", "Qm")):
            data = ipfs.cat(args.manifest)
        else:
            raise UsageError(f"{args.manifest}: no such file, and not a CID")
        try:
            sub, share = access.accept(layout, data, recipient, key, issuer)
        except MedfsError as err:
            _record(layout, passphrase, "manifest-refused", issuer=issuer.fingerprint,
                    reason=err.message)  # fmt: skip
            raise
        _record(layout, passphrase, "manifest-accepted", issuer=issuer.fingerprint,
                sequence=share.sequence, entries=len(share.entries))  # fmt: skip
        reached = 0
        for provider in share.providers:
            for address in provider.addresses:
                try:
                    ipfs.swarm_connect(address)
                    reached += 1
                    break
                except MedfsError:
                    continue
        if share.providers and not reached:
            print(
                "medfs: warning: could not connect to the issuer's node; files can be read only"
                " if this node finds their blocks another way",
                file=sys.stderr,
            )
        print(
            f"share #{share.sequence} from {issuer.fingerprint}: {len(share.entries)} entries",
            file=sys.stderr,
        )
        return sub
    finally:
        ipfs.close()


def run_mount(args: argparse.Namespace) -> int:
    if args.daemon_ready_fd is not None:
        return _run_daemon(args)
    layout = state.Layout(state_dir(args.state))
    state.read_config(layout)
    # A bad setting fails here, before the passphrase is asked for, not later in the daemon.
    mount.staging_limit()
    mount.copies_limit()
    options = _mount_options(args.options)
    mountpoint = mount.check_mountpoint(Path(args.mountpoint))
    if args.manifest:
        options.add("ro")
        passphrase = identity.get_passphrase(passphrase_file=args.passphrase_file)
        api = resolve_api(layout.root, args.api)
        layout = _accept_share(args, layout, passphrase, api)
        mount_options = mount.MountOptions(
            mountpoint=mountpoint, api=api, read_only=True, allow_other="allow_other" in options,
            timeout=args.timeout, node_state=None if args.api else layout.root.parent.parent,
        )  # fmt: skip
        return _start(args, layout, mount_options, passphrase)
    holder = state.holder(layout)
    if holder:
        raise mount.MountError(
            f"{layout.root} is already mounted at {holder.get('mountpoint')}"
            f" (pid {holder.get('pid')})",
            hint="one mount per state directory; unmount it first",
        )
    passphrase = identity.get_passphrase(passphrase_file=args.passphrase_file)
    mount_options = mount.MountOptions(
        mountpoint=mountpoint,
        api=resolve_api(layout.root, args.api),
        read_only="ro" in options,
        allow_other="allow_other" in options,
        timeout=args.timeout,
        node_state=None if args.api else layout.root,
    )
    return _start(args, layout, mount_options, passphrase)


def _start(
    args: argparse.Namespace,
    layout: state.Layout,
    mount_options: mount.MountOptions,
    passphrase: str,
) -> int:
    mountpoint = mount_options.mountpoint
    if args.foreground:
        logging.getLogger().setLevel(logging.INFO)
        pending = mount.serve(
            layout,
            mount_options,
            passphrase,
            ready=lambda: print(f"medfs: mounted {mountpoint}", file=sys.stderr, flush=True),
        )
        return _report_pending([f"inode {p.ino}: {p.error}" for p in pending])
    mount.spawn_daemon(layout, mount_options, passphrase)
    print(f"mounted {mountpoint} (log: {layout.log})")
    return 0


def _run_daemon(args: argparse.Namespace) -> int:
    """The background daemon: passphrase on stdin, readiness reported on the ready fd."""
    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        force=True,
    )
    ready_fd: int = args.daemon_ready_fd
    reported = False

    def report(message: dict[str, object]) -> None:
        nonlocal reported
        if not reported:
            reported = True
            os.write(ready_fd, json.dumps(message).encode())
            os.close(ready_fd)

    try:
        passphrase = sys.stdin.readline().rstrip("\n")
        layout = state.Layout(state_dir(args.state))
        options = _mount_options(args.options)
        mount_options = mount.MountOptions(
            mountpoint=Path(args.mountpoint).absolute(),
            api=args.api,
            read_only="ro" in options,
            allow_other="allow_other" in options,
            timeout=args.timeout,
            node_state=Path(args.node_state) if args.node_state else None,
        )
        pending = mount.serve(layout, mount_options, passphrase, ready=lambda: report({"ok": 1}))
    except MedfsError as err:
        logging.getLogger("medfs").error("%s", err.message)
        report({"error": err.message, "hint": err.hint, "code": err.exit_code})
        return err.exit_code
    except BaseException as err:
        logging.getLogger("medfs").exception("the mount daemon failed")
        report({"error": f"the mount daemon failed: {err!r}", "hint": None, "code": 1})
        raise
    return 0 if not pending else PENDING_EXIT


def run_umount(args: argparse.Namespace) -> int:
    mountpoint = Path(args.mountpoint)
    pending = mount.unmount(mountpoint, None)
    if not pending:
        print(f"unmounted {mountpoint.absolute()}")
    return _report_pending(pending)


def _report_pending(pending: list[str]) -> int:
    if not pending:
        return 0
    print(
        "medfs: error: not on IPFS yet (encrypted copies stay in the staging area;"
        " the next mount uploads them):",
        file=sys.stderr,
    )
    for item in pending:
        print(f"  {item}", file=sys.stderr)
    print(
        "medfs: hint: check the IPFS node ('medfs node status'), then mount again", file=sys.stderr
    )
    return PENDING_EXIT
