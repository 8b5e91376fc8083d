"""`medfs verify [--deep] [--repair] [--json]`: check that every record is present and readable."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from medfs import identity, state, verify
from medfs.errors import VerifyError
from medfs.ipfs import IPFS
from medfs.kubo import resolve_api
from medfs.paths import state_dir

# Pinning an object that is not fully local fetches it; give that more than a request's time.
REPAIR_TIMEOUT = 300.0
FOREIGN_SHOWN = 10

DESCRIPTION = """\
Check every file version the manifest refers to: present on the node (checked offline: a
missing object is reported, never fetched), pinned, and the owner's wrapped key opens; with
--deep, every segment of every object authenticates. Then list pins nothing refers to.

Problems: missing (not on this node; not repairable here), unpinned (--repair pins it),
wrap (the owner's key does not open; not repairable), corrupt (a segment fails; not
repairable), orphan-pin (a medfs object this state made that no entry, anchor or recorded
snapshot refers to; --repair unpins it).

Orphans: only pins that start with a medfs object or snapshot magic are judged. On this
state's own embedded node every such pin counts; with --api (a node that may serve other
state directories too) only the objects this state's audit log or snapshot record shows it
made count, and the others are listed as foreign and never unpinned, unless --exclusive says
the node is this state's alone. While mounted, --repair leaves unrecorded orphans pinned
(they may be uploads about to be committed). --repair prints every pin and unpin it does.

Exit status 0 when nothing remains wrong (or everything was repaired), 14 otherwise.
"""


def register(sub: Any, common: argparse.ArgumentParser) -> None:
    parser = sub.add_parser(
        "verify",
        parents=[common],
        help="check that every record is present, pinned and readable",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--deep", action="store_true", help="decrypt every segment of every object")
    parser.add_argument(
        "--repair", action="store_true", help="pin unpinned records, unpin orphan medfs objects"
    )
    parser.add_argument(
        "--exclusive",
        action="store_true",
        help="the --api node serves only this state: every unreferenced medfs object is an orphan",
    )
    parser.add_argument("--json", action="store_true", help="print JSON")
    parser.add_argument("--passphrase-file", metavar="FILE", help="read the passphrase from FILE")
    parser.set_defaults(func=run_verify)


def _print(report: verify.Report) -> None:
    depth = "every segment authenticated" if report.deep else "use --deep to decrypt every segment"
    print(f"checked {report.files} files ({depth})")
    if report.problems:
        print("problems:")
        for p in report.problems:
            where = f" {p.path}" if p.path else ""
            segment = f" (segment {p.segment})" if p.segment is not None else ""
            fixed = "  [repaired]" if p.repaired else ""
            print(f"  {p.kind:<10} {p.cid}{where}: {p.detail}{segment}{fixed}")
    for action in report.actions:
        print(f"repair: {action}")
    if report.foreign:
        print(
            f"{len(report.foreign)} other medfs object(s) are pinned on this node with no record"
            " of this state making them (another state directory's?); left alone:"
        )
        for cid in report.foreign[:FOREIGN_SHOWN]:
            print(f"  {cid}")
        if len(report.foreign) > FOREIGN_SHOWN:
            print(f"  ... and {len(report.foreign) - FOREIGN_SHOWN} more (--json lists them all)")
    for note in report.notes:
        print(f"note: {note}")


def run_verify(args: argparse.Namespace) -> int:
    layout = state.Layout(state_dir(args.state))
    state.read_config(layout)
    passphrase = identity.get_passphrase(passphrase_file=args.passphrase_file)
    session = state.unlock(layout, passphrase)
    try:
        api = resolve_api(layout.root, args.api)
        client = IPFS(api, timeout=REPAIR_TIMEOUT if args.repair else 30.0)
        try:
            report = verify.check(
                session,
                layout,
                client,
                deep=args.deep,
                repair=args.repair,
                # Without --api the node is this state's embedded node: nobody else pins there.
                exclusive=args.exclusive or not args.api,
            )
        finally:
            client.close()
    finally:
        session.manifest.close()
    if args.json:
        print(json.dumps(report.as_json(), indent=2))
    else:
        _print(report)
    sys.stdout.flush()
    remaining = report.remaining
    if remaining:
        kinds = sorted({p.kind for p in remaining})
        raise VerifyError(
            f"{len(remaining)} problem(s) remain ({', '.join(kinds)})",
            hint="'medfs verify --repair' fixes unpinned records and orphan pins; missing,"
            " wrap and corrupt problems need the data from another node or a backup",
        )
    if not args.json:
        print("all records verified" + (" (after repairs)" if report.actions else ""))
    return 0
