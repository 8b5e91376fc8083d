"""`medfs keygen` and `medfs id`: create an identity, show who a key or public file belongs to."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from medfs import identity, recipients
from medfs.errors import KeyFileError, UsageError

IDENTITY_ENV = "MEDFS_IDENTITY"


def register(
    sub: argparse._SubParsersAction[argparse.ArgumentParser], common: argparse.ArgumentParser
) -> None:
    keygen = sub.add_parser(
        "keygen",
        parents=[common],
        help="create a new identity (NAME.key and NAME.pub)",
        description=(
            "Create NAME.key (private, passphrase-protected, mode 0600) and NAME.pub (public, safe "
            "to mail). The default is a post-quantum hybrid ML-KEM-768+X25519 encryption key; "
            "every identity also gets an Ed25519 signing key."
        ),
    )
    keygen.add_argument("--out", required=True, metavar="NAME", help="write NAME.key and NAME.pub")
    kind = keygen.add_mutually_exclusive_group()
    kind.add_argument("--classic", action="store_true", help="an X25519 key instead of the hybrid")
    kind.add_argument("--rsa", action="store_true", help="an RSA-OAEP key (3072 bits if new)")
    keygen.add_argument(
        "--from-pem",
        metavar="FILE",
        help="with --rsa: use the RSA private key in this PEM file (at least 3072 bits)",
    )
    _passphrase_option(keygen)
    keygen.set_defaults(func=run_keygen)

    show = sub.add_parser(
        "id",
        parents=[common],
        help="print the fingerprint and public file of a key or public file",
        description="Print the fingerprint and public file of an identity.",
    )
    show.add_argument(
        "file",
        nargs="?",
        metavar="KEYFILE|PUBFILE",
        help=f"a .key or .pub file (default: ${IDENTITY_ENV})",
    )
    show.add_argument("--json", action="store_true", help="print JSON")
    _passphrase_option(show)
    show.set_defaults(func=run_id)


def _passphrase_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--passphrase-file",
        metavar="FILE",
        help=f"read the passphrase from FILE (default: ${identity.PASSPHRASE_ENV}, else a prompt)",
    )


def run_keygen(args: argparse.Namespace) -> int:
    if args.from_pem and not args.rsa:
        raise UsageError("--from-pem needs --rsa")
    if args.rsa:
        if args.from_pem:
            try:
                pem = Path(args.from_pem).read_bytes()
            except OSError as err:
                raise KeyFileError(f"cannot read {args.from_pem}: {err.strerror}") from None
            new = identity.Identity.from_rsa_key(identity.load_rsa_pem(pem))
        else:
            new = identity.Identity.generate(recipients.Kind.RSA_OAEP)
    elif args.classic:
        new = identity.Identity.generate(recipients.Kind.X25519)
    else:
        new = identity.Identity.generate()
    out = Path(args.out)
    for suffix in (".key", ".pub"):
        existing = out.with_name(out.name + suffix)
        if existing.exists() or existing.is_symlink():
            # Ask for no passphrase when the command can't succeed anyway.
            raise KeyFileError(f"{existing} already exists; refusing to overwrite it")
    passphrase = identity.get_passphrase(passphrase_file=args.passphrase_file, confirm=True)
    key_path, pub_path = identity.write_identity_files(out, new, passphrase)
    print(f"fingerprint: {new.fingerprint}")
    print(f"kind: {new.kind.value}")
    print(f"private key: {key_path} (keep it secret; it is protected by your passphrase)")
    print(f"public file: {pub_path} (give this to people who share records with you)")
    return 0


def run_id(args: argparse.Namespace) -> int:
    path = args.file or os.environ.get(IDENTITY_ENV)
    if not path:
        raise UsageError(
            "no identity file given",
            hint=f"pass a .key or .pub file, or set {IDENTITY_ENV}",
        )
    source, text = identity.read_any_file(path)
    if source == "key":
        passphrase = identity.get_passphrase(passphrase_file=args.passphrase_file)
        public = identity.decrypt_identity(text, passphrase).public
    else:
        public = identity.PublicIdentity.from_text(text)
    public_text = public.to_text()
    if args.json:
        payload = {
            "fingerprint": public.fingerprint,
            "kind": public.kind.value,
            "signing_key": recipients.b64encode(public.signing_key),
            "source": source,
            "public_file": public_text,
        }
        json.dump(payload, sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        sys.stdout.write(public_text)
    return 0
