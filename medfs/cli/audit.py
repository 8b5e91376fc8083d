"""`medfs audit show | verify | anchor`: read, check and anchor the state directory's audit log.

`verify` needs no passphrase: the chain and the signatures check against public identities, so
an auditor can prove the log intact without reading a path. `show` opens the sealed details and
so needs the owner's passphrase; `anchor` signs, and so does too.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Any

from medfs import audit, identity, state
from medfs.errors import AuditError, FormatError, UsageError
from medfs.identity import PublicIdentity
from medfs.ipfs import IPFS
from medfs.kubo import resolve_api
from medfs.paths import state_dir

# Details shown after the path in the human-readable listing, in this order.
_SHOWN_FIRST = ("new_path", "recipient", "recipients", "paths", "reason", "pid", "uid", "command")


def register(sub: Any, common: argparse.ArgumentParser) -> None:
    parser = sub.add_parser("audit", help="show, verify and anchor the audit log")
    actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True)

    show = actions.add_parser("show", parents=[common], help="list the log's entries")
    show.add_argument("--path", metavar="P", help="only entries about P or anything below it")
    show.add_argument(
        "--since", metavar="T", help="only entries at or after T (ISO 8601, or unix seconds)"
    )
    show.add_argument("--json", action="store_true", help="print JSON")
    show.add_argument("--passphrase-file", metavar="FILE", help="read the passphrase from FILE")
    show.set_defaults(func=run_show)

    check = actions.add_parser(
        "verify", parents=[common], help="check the chain, signatures and anchors (no passphrase)"
    )
    check.add_argument(
        "--anchor",
        metavar="CID",
        action="append",
        default=[],
        help="also check against this anchor, fetched from IPFS (repeatable)",
    )
    check.add_argument(
        "--public",
        metavar="FILE",
        action="append",
        default=[],
        help="also trust entries signed by this public identity (repeatable)",
    )
    check.set_defaults(func=run_verify)

    anchor = actions.add_parser(
        "anchor", parents=[common], help="publish the log's signed head to IPFS and record it"
    )
    anchor.add_argument("--passphrase-file", metavar="FILE", help="read the passphrase from FILE")
    anchor.set_defaults(func=run_anchor)


def parse_time(text: str) -> int:
    """Nanoseconds since the epoch from unix seconds or ISO 8601 (local time if no zone)."""
    try:
        return int(float(text) * 1e9)
    except ValueError:
        pass
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise UsageError(
            f"cannot read the time {text!r}",
            hint="give ISO 8601 such as 2025-03-01 or 2025-03-01T14:30:00+01:00, or unix seconds",
        ) from None
    return int(moment.timestamp() * 1e9)


def _when(ns: int) -> str:
    return (
        time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ns / 1e9))
        + f".{ns // 1_000_000 % 1000:03d}"
    )


def _unlocked(args: argparse.Namespace) -> tuple[state.Layout, state.Session]:
    layout = state.Layout(state_dir(args.state))
    state.read_config(layout)
    passphrase = identity.get_passphrase(passphrase_file=args.passphrase_file)
    session = state.unlock(layout, passphrase)
    session.manifest.close()  # only the key is needed
    return layout, session


def _line(entry: audit.Entry, owner: str) -> str:
    details = dict(entry.details)
    parts = [_when(entry.time_ns), f"#{entry.seq:<5}", f"{entry.event:<17}"]
    path = details.pop("path", None)
    if path is not None:
        parts.append(str(path))
    for key in (*_SHOWN_FIRST, *sorted(set(details) - set(_SHOWN_FIRST))):
        if key in details:
            value = details[key]
            shown = ",".join(map(str, value)) if isinstance(value, list) else str(value)
            parts.append(f"{key}={shown}")
    if entry.cid:
        parts.append(f"cid={entry.cid}")
    if entry.actor != owner:
        parts.append(f"by={entry.actor}")
    return "  ".join(parts)


def run_show(args: argparse.Namespace) -> int:
    since = parse_time(args.since) if args.since else None
    layout, session = _unlocked(args)
    owner = session.owner.public
    result = audit.verify(
        audit.log_path(layout.root),
        {owner.fingerprint: owner},
        audit.load_anchors(audit.anchors_path(layout.root)),
    )
    if not result.ok:
        where = f"entry {result.first_bad}: " if result.first_bad is not None else ""
        print(
            f"medfs: warning: the audit log does not verify ({where}{result.reason});"
            " see 'medfs audit verify'",
            file=sys.stderr,
        )
    entries = audit.read_entries(
        audit.log_path(layout.root),
        audit.audit_key(session.manifest_key),
        prefix=args.path,
        since_ns=since,
    )
    if args.json:
        print(json.dumps([entry.as_json() for entry in entries], indent=2))
        return 0
    for entry in entries:
        print(_line(entry, owner.fingerprint))
    return 0


def _fetch_anchor(args: argparse.Namespace, root: Path, cid: str) -> audit.Anchor:
    client = IPFS(resolve_api(root, args.api))
    try:
        data = client.cat(cid, 0, 64 * 1024)
    finally:
        client.close()
    try:
        return audit.Anchor.from_document(data, cid)
    except FormatError as err:
        raise AuditError(f"{cid} is not a medfs audit anchor: {err.message}") from None


def run_verify(args: argparse.Namespace) -> int:
    layout = state.Layout(state_dir(args.state))
    owner = state.owner_public(layout)
    trusted: dict[str, PublicIdentity] = {owner.fingerprint: owner}
    for path in args.public:
        public = identity.read_public_file(path)
        trusted[public.fingerprint] = public
    anchors = audit.load_anchors(audit.anchors_path(layout.root))
    for cid in args.anchor:
        fetched = _fetch_anchor(args, layout.root, cid)
        if fetched not in anchors:  # the same anchor recorded here too counts once
            anchors.append(fetched)
    log_path = audit.log_path(layout.root)
    result = audit.verify(log_path, trusted, anchors)
    if not result.ok:
        if result.first_bad is None:
            raise AuditError(f"audit {result.reason}")
        good = {0: "no entry verifies", 1: "entry 0 verifies"}.get(
            result.first_bad, f"entries 0..{result.first_bad - 1} verify"
        )
        raise AuditError(
            f"audit log entry {result.first_bad}: {result.reason}",
            hint=f"line {result.first_bad + 1} of {log_path}; {good}",
        )
    print(f"audit log intact: {result.count} entries, signed by {', '.join(sorted(trusted))}")
    if anchors:
        last = max(anchors, key=lambda a: a.count)
        print(
            f"checked against {len(anchors)} anchor(s); the last, {last.name} of"
            f" {_when(last.time_ns)}, covers {last.count} entries"
        )
    else:
        print("no anchors yet: entries cut off the end would go unnoticed ('medfs audit anchor')")
    return 0


def run_anchor(args: argparse.Namespace) -> int:
    layout, session = _unlocked(args)
    client = IPFS(resolve_api(layout.root, args.api))
    try:
        with audit.AuditLog(
            audit.log_path(layout.root),
            session.owner,
            audit.audit_key(session.manifest_key),
            anchors=audit.anchors_path(layout.root),
        ) as log:
            anchor = log.anchor(client)
    finally:
        client.close()
    print(anchor.cid)
    print(f"anchored {anchor.count} entries (head {anchor.head})", file=sys.stderr)
    return 0
