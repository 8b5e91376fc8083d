"""Interop packages: the whole-file JSON format of existing IPFS health-record scripts.

A package is one JSON object that points at one ciphertext on IPFS:

    {"cid": CID, "nonce": base64(12 bytes),
     "enc_keys": {RECIPIENT_ID: base64(RSA-OAEP-SHA256(file key)), ...}}

    ciphertext on IPFS = AES-256-GCM(file key, nonce, whole plaintext, no aad) || tag (16 bytes)

`export_package` reads a file's current version from the manifest and IPFS (no mount needed),
encrypts it once more in that format under a fresh key and nonce, adds and pins the ciphertext,
and wraps the key for each RSA public key given. `import_package` checks and opens a package and
stores its plaintext as a new file in medfs's own format (docs/FORMAT.md §1), wrapped for the
owner and every grantee, exactly like a file closed in the mount.

The format gives up what medfs's own objects guarantee: the whole file is in memory at once, one
AES-GCM call caps it at 2**31 - 1 bytes, there is no random access, nothing binds the key to the
file or the recipient, and recipient ids travel in the clear. docs/FORMAT.md §11 has the rest.

No pyfuse3, no trio: plain blocking code for the CLI.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import functools
import hashlib
import json
import os
import re
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.x509 import load_pem_x509_certificate

from medfs import format, identity, layout, recipients, state
from medfs.errors import (
    FormatError,
    IPFSError,
    KeyFileError,
    MedfsError,
    NotForIdentityError,
    UsageError,
)
from medfs.ipfs import IPFS
from medfs.manifest import Inode, Kind, new_entry_id, until_recipients_match

KEY_SIZE = 32
NONCE_SIZE = 12
TAG_SIZE = 16
# One AES-GCM call (cryptography's AESGCM, and so every reader built on it) takes at most
# 2**31 - 1 bytes of plaintext; decrypting that many (plus the tag) works in one call too.
MAX_PLAINTEXT = 2**31 - 1
MAX_CIPHERTEXT = MAX_PLAINTEXT + TAG_SIZE
# Existing scripts commonly use 2048-bit keys; medfs's own rsa-oaep identities need 3072.
RSA_MIN_BITS = 2048
RSA_MAX_BITS = recipients.RSA_MAX_BITS
# A package is a few hundred bytes per recipient: anything this large is not one.
MAX_PACKAGE_SIZE = 16 << 20
READ_CHUNK = 4 << 20
REQUIRED_FIELDS = ("cid", "nonce", "enc_keys")
WARNING = (
    "the package format holds the whole file in memory (here and in every reader), gives up"
    " random access, and has no protection against truncation or splicing beyond its one"
    " AES-GCM tag; medfs keeps its own copy in its own format"
)

_CID_RE = re.compile(r"[A-Za-z0-9]{1,128}")
_BASE64_RE = re.compile(r"[A-Za-z0-9+/]*={0,2}")
_OAEP = padding.OAEP(
    mgf=padding.MGF1(algorithm=hashes.SHA256()), algorithm=hashes.SHA256(), label=None
)


# -- the package document --------------------------------------------------------------------


@dataclass(frozen=True)
class Package:
    """A parsed package: where the ciphertext is, its nonce, and the wrapped file keys."""

    cid: str
    nonce: bytes
    enc_keys: dict[str, bytes]

    def to_json(self) -> dict[str, Any]:
        return {
            "cid": self.cid,
            "nonce": _b64encode(self.nonce),
            "enc_keys": {rid: _b64encode(body) for rid, body in self.enc_keys.items()},
        }

    def to_bytes(self) -> bytes:
        return (json.dumps(self.to_json(), indent=2) + "\n").encode("ascii")

    @classmethod
    def parse(cls, data: bytes) -> Package:
        """Parse a package strictly; every defect is a FormatError naming the field."""
        if len(data) > MAX_PACKAGE_SIZE:
            raise FormatError(f"the package is larger than {MAX_PACKAGE_SIZE >> 20} MiB")
        try:
            obj = json.loads(data.decode("utf-8"), object_pairs_hook=_no_duplicates)
        except UnicodeDecodeError:
            raise FormatError("the package is not UTF-8 JSON") from None
        except ValueError as err:
            raise FormatError(f"the package is not valid JSON: {err}") from None
        if not isinstance(obj, dict):
            raise FormatError("the package must be a JSON object")
        missing = [name for name in REQUIRED_FIELDS if name not in obj]
        if missing:
            names = ", ".join(repr(m) for m in missing)
            raise FormatError(
                f"the package has no {names} field" + ("s" if len(missing) > 1 else "")
            )
        cid = obj["cid"]
        if not isinstance(cid, str) or not _CID_RE.fullmatch(cid):
            raise FormatError("the package's 'cid' is not a CID")
        nonce = _b64field(obj["nonce"], "'nonce'")
        if len(nonce) != NONCE_SIZE:
            raise FormatError(f"the package's nonce is {len(nonce)} bytes, not {NONCE_SIZE}")
        keys = obj["enc_keys"]
        if not isinstance(keys, dict):
            raise FormatError("the package's 'enc_keys' must be an object of recipient ids")
        if not keys:
            raise FormatError("the package's 'enc_keys' is empty: no one can open it")
        enc_keys: dict[str, bytes] = {}
        for rid, value in keys.items():
            if not rid:
                raise FormatError("the package has an 'enc_keys' entry with an empty id")
            body = _b64field(value, f"'enc_keys' entry {rid!r}")
            if not RSA_MIN_BITS // 8 <= len(body) <= RSA_MAX_BITS // 8:
                raise FormatError(
                    f"the package's 'enc_keys' entry {rid!r} is {len(body)} bytes: no RSA key"
                    f" of {RSA_MIN_BITS}..{RSA_MAX_BITS} bits makes that"
                )
            enc_keys[rid] = body
        return cls(cid=cid, nonce=nonce, enc_keys=enc_keys)


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    keys = [key for key, _ in pairs]
    if len(set(keys)) != len(keys):
        raise ValueError("a key appears twice")
    return dict(pairs)


def _b64encode(data: bytes) -> str:
    # Padded standard base64, as `base64.b64encode` in the existing scripts writes it.
    return base64.b64encode(data).decode("ascii")


def _b64field(value: object, what: str) -> bytes:
    """Standard base64, padded or not; nothing else (no whitespace, no URL-safe alphabet)."""
    if not isinstance(value, str) or not _BASE64_RE.fullmatch(value):
        raise FormatError(f"the package's {what} is not base64 text")
    try:
        return base64.b64decode(
            value.rstrip("=") + "=" * (-len(value.rstrip("=")) % 4), validate=True
        )
    except binascii.Error:
        raise FormatError(f"the package's {what} is not valid base64") from None


# -- RSA keys ------------------------------------------------------------------------------------


def _check_bits(key: rsa.RSAPublicKey | rsa.RSAPrivateKey, where: str) -> None:
    if key.key_size < RSA_MIN_BITS:
        raise KeyFileError(
            f"{where} is a {key.key_size}-bit RSA key; packages need at least {RSA_MIN_BITS} bits",
            hint="make a new one: openssl genpkey -algorithm RSA -pkeyopt rsa_keygen_bits:3072",
        )
    if key.key_size > RSA_MAX_BITS:
        raise KeyFileError(f"{where}: RSA keys above {RSA_MAX_BITS} bits are not supported")


def load_public_pem(data: bytes, where: str) -> rsa.RSAPublicKey:
    """An RSA public key from a PEM file: PUBLIC KEY, RSA PUBLIC KEY, or a CERTIFICATE."""
    if b"PRIVATE KEY-----" in data:
        raise KeyFileError(
            f"{where} holds a private key; a package is addressed to a public key",
            hint=f"extract it with: openssl pkey -in {where} -pubout -out PUBLIC.pem",
        )
    key: object
    try:
        if b"-----BEGIN CERTIFICATE-----" in data:
            key = load_pem_x509_certificate(data).public_key()
        else:
            key = serialization.load_pem_public_key(data)
    except ValueError:
        raise KeyFileError(f"{where} is not a PEM public key or certificate") from None
    if not isinstance(key, rsa.RSAPublicKey):
        raise KeyFileError(f"{where} is not an RSA key (packages use RSA-OAEP only)")
    _check_bits(key, where)
    return key


def load_private_pem(data: bytes, where: str) -> rsa.RSAPrivateKey:
    """An unencrypted RSA private key from a PEM file (which may also hold its certificate)."""
    try:
        key = identity.load_rsa_pem(data)
    except KeyFileError as err:
        raise KeyFileError(f"{where}: {err.message}", hint=err.hint) from None
    _check_bits(key, where)
    return key


def key_fingerprint(key: rsa.RSAPublicKey) -> str:
    """SHA-256 of the key's SubjectPublicKeyInfo (DER), hex: what the audit log records."""
    der = key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return hashlib.sha256(der).hexdigest()


# -- export --------------------------------------------------------------------------------------


def check_size(size: int, path: str) -> None:
    """Refuse a file one AES-GCM call cannot hold (checked before reading a byte)."""
    if size > MAX_PLAINTEXT:
        raise UsageError(
            f"{path} is {size:,} bytes; a package encrypts the whole file in one AES-GCM call,"
            f" which holds at most {MAX_PLAINTEXT:,} bytes (2 GiB - 1)",
            hint="share it with medfs itself ('medfs share'), which has no size limit",
        )


def _resolve(session: state.Session, path: str) -> Inode | None:
    try:
        return session.manifest.resolve(path)
    except OSError as err:  # a name too long, or not a name at all
        raise UsageError(f"{path}: {err.strerror or 'invalid path'}") from None


def file_inode(session: state.Session, path: str) -> Inode:
    inode = _resolve(session, path)
    if inode is None:
        raise UsageError(f"{path}: no such file in medfs")
    if inode.kind is not Kind.FILE:
        raise UsageError(f"{path} is not a regular file: a package holds one file")
    if inode.cid is None or inode.salt is None:
        raise UsageError(
            f"{path} has no stored version yet", hint="close the file in the mount, then retry"
        )
    return inode


def _read_plaintext(session: state.Session, inode: Inode, ipfs: IPFS) -> bytearray:
    """The whole current version of `inode`, authenticated segment by segment."""
    assert inode.cid is not None and inode.salt is not None
    cid = inode.cid
    owner = session.owner
    stanza = session.manifest.wraps(inode.ino).get(owner.fingerprint)
    if stanza is None:
        raise NotForIdentityError(f"inode {inode.ino}: no key is wrapped for the owner")
    key = owner.unwrap(
        recipients.Stanza.from_bytes(stanza), recipients.entry_context(inode.entry_id, inode.salt)
    )
    reader = format.ObjectReader(
        key,
        lambda offset, length: ipfs.cat(cid, offset, length),
        layout.ciphertext_size(inode.size),
        header=format.Header(inode.salt),
    )
    plain = bytearray()
    for offset in range(0, inode.size, READ_CHUNK):
        plain += reader.read(offset, READ_CHUNK)
    if len(plain) != inode.size:
        raise FormatError(f"{cid} holds {len(plain)} bytes, not the {inode.size} recorded")
    return plain


@dataclass(frozen=True)
class Exported:
    package: Package
    size: int
    recipients: dict[str, str]  # id -> key fingerprint (SHA-256 of the SPKI)


def export_package(
    session: state.Session,
    path: str,
    to: Sequence[tuple[str, rsa.RSAPublicKey]],
    ipfs: IPFS,
) -> Exported:
    """Encrypt `path`'s current version as a package for each (id, public key); pinned."""
    ids = [rid for rid, _key in to]
    if not to:
        raise UsageError("a package needs at least one recipient")
    if len(set(ids)) != len(ids) or not all(ids):
        raise UsageError("recipient ids must be non-empty and distinct", hint="name them with --id")
    inode = file_inode(session, path)
    check_size(inode.size, path)
    plain = _read_plaintext(session, inode, ipfs)
    file_key = AESGCM.generate_key(bit_length=256)
    nonce = os.urandom(NONCE_SIZE)
    ciphertext = AESGCM(file_key).encrypt(nonce, plain, None)
    del plain
    enc_keys = {rid: key.encrypt(file_key, _OAEP) for rid, key in to}
    cid = ipfs.add(ciphertext)
    package = Package(cid=cid, nonce=nonce, enc_keys=enc_keys)
    return Exported(package, inode.size, {rid: key_fingerprint(key) for rid, key in to})


# -- import --------------------------------------------------------------------------------------


def open_key(
    package: Package, key: rsa.RSAPrivateKey, prefer_id: str | None = None
) -> tuple[str, bytes]:
    """(id, file key) of the first entry `key` opens: `prefer_id`'s first, then in order."""
    order = sorted(package.enc_keys, key=lambda rid: rid != prefer_id)
    size = (key.key_size + 7) // 8
    for rid in order:
        body = package.enc_keys[rid]
        if len(body) != size:
            continue  # made with a key of another size: not ours
        try:
            file_key = key.decrypt(body, _OAEP)
        except ValueError:
            continue
        if len(file_key) != KEY_SIZE:
            raise FormatError(
                f"the package's entry {rid!r} opens but holds a {len(file_key)}-byte key,"
                f" not {KEY_SIZE}"
            )
        return rid, file_key
    ids = ", ".join(repr(rid) for rid in package.enc_keys)
    raise NotForIdentityError(
        f"no entry of the package opens with this private key (entries: {ids})",
        hint="the package is addressed to other keys: ask its sender to add your public key",
    )


def fetch_plaintext(package: Package, file_key: bytes, ipfs: IPFS) -> bytes:
    """Fetch the package's ciphertext (size checked first) and open it."""
    try:
        size = ipfs.stat(package.cid).size
    except IPFSError as err:
        raise IPFSError(
            f"cannot find the package's ciphertext {package.cid} on IPFS: {err.message}",
            hint="the node that holds it must be reachable (and pinned there);"
            " --timeout sets how long to wait",
        ) from None
    if size < TAG_SIZE:
        raise FormatError(f"the package's ciphertext is {size} bytes: too short for its tag")
    if size > MAX_CIPHERTEXT:
        raise FormatError(
            f"the package's ciphertext is {size:,} bytes: more than one AES-GCM call can open"
        )
    ciphertext = ipfs.cat(package.cid)
    if len(ciphertext) != size:
        raise FormatError(f"{package.cid} returned {len(ciphertext)} bytes, not {size}")
    try:
        return AESGCM(file_key).decrypt(package.nonce, ciphertext, None)
    except InvalidTag:
        raise FormatError(
            "the package's ciphertext fails authentication (tampered or truncated, or the"
            " nonce or key belongs to another package)"
        ) from None


@dataclass(frozen=True)
class Imported:
    path: str
    package_cid: str
    cid: str  # the new medfs version
    size: int
    opened_as: str  # the enc_keys entry that opened


def _target(session: state.Session, path: str) -> tuple[Inode, bytes]:
    """(parent directory, name) of a path that must not exist yet."""
    parent_path, _, name = ("/" + path.strip("/")).rpartition("/")
    if not name or name in (".", ".."):
        raise UsageError(f"{path}: give the path of the new file, e.g. /inbox/record.pdf")
    if _resolve(session, path) is not None:
        raise UsageError(
            f"{path} already exists in medfs", hint="import under another name, or remove it first"
        )
    parent = _resolve(session, parent_path or "/")
    if parent is None or parent.kind is not Kind.DIR:
        raise UsageError(
            f"{parent_path or '/'}: no such directory in medfs",
            hint="create it first (mkdir in the mount), then import",
        )
    return parent, os.fsencode(name)


def _chunks(data: bytes) -> Iterator[bytes]:
    view = memoryview(data)
    for offset in range(0, len(data), READ_CHUNK):
        yield bytes(view[offset : offset + READ_CHUNK])


def import_package(
    session: state.Session,
    package_bytes: bytes,
    private_key: rsa.RSAPrivateKey,
    as_path: str,
    ipfs: IPFS,
    *,
    prefer_id: str | None = None,
    mode: int = 0o600,
) -> Imported:
    """Open a package and store its file at `as_path`; on any failure nothing is stored."""
    package = Package.parse(package_bytes)
    parent, name = _target(session, as_path)
    opened_as, file_key = open_key(package, private_key, prefer_id)
    plain = fetch_plaintext(package, file_key, ipfs)

    manifest, owner = session.manifest, session.owner
    entry_id = new_entry_id()
    content_key = format.new_content_key()
    encrypted = format.encrypt(content_key, _chunks(plain))
    header = next(encrypted)
    salt = format.Header.parse(header).salt

    def stream() -> Iterator[bytes]:
        yield header
        yield from encrypted

    context = recipients.entry_context(entry_id, salt)

    def commit(ino: int) -> None:
        # A fresh inode has no grants of its own: its readers are the owner and the grantees
        # of the directories above it, as for a file created in the mount.
        to = identity.readers(owner.public.recipient(), manifest.grantees(ino))
        manifest.commit_version(
            ino, cid=cid, salt=salt, size=len(plain), format=format.VERSION, mtime_ns=now,
            version_ns=now, wraps=recipients.wrap_all(content_key, to, context), expected_cid=None,
        )  # fmt: skip

    cid = ipfs.add(stream())
    now = time.time_ns()
    created: Inode | None = None
    try:
        created = manifest.create(
            parent.ino, name, Kind.FILE, mode, os.getuid(), os.getgid(), now, entry_id=entry_id
        )
        until_recipients_match(functools.partial(commit, created.ino))
    except BaseException as err:
        if created is not None:
            with contextlib.suppress(Exception):
                manifest.unlink(parent.ino, name, now_ns=time.time_ns())
                manifest.delete_inode(created.ino)
        with contextlib.suppress(MedfsError):
            ipfs.unpin(cid)
        if isinstance(err, FileExistsError):
            raise UsageError(f"{as_path} was created meanwhile; nothing was imported") from None
        raise
    path = "/" + as_path.strip("/")
    return Imported(path, package.cid, cid, len(plain), opened_as)


def recipients_json(ids: Mapping[str, str]) -> list[dict[str, str]]:
    """The audit detail for recipients: id and key fingerprint, in the package's order."""
    return [{"id": rid, "key_sha256": fpr} for rid, fpr in ids.items()]
