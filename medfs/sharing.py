"""Share manifests: what an issuer shares with one recipient, signed, then encrypted to them.

A share manifest lists the shared entries (paths relative to the shared root, kinds, modes, times,
sizes, and for files the CID, object salt and the content key wrapped for the recipient), the
issuer's public identity, the recipient's fingerprint, a sequence number that only grows per
(issuer, recipient), a creation time, and provider hints (peer IDs and multiaddrs to fetch from).

    body        = canonical JSON of the manifest (sorted keys, no whitespace, ASCII only)
    signed_blob = I2OSP(len(body), 4) || body || Ed25519 signature (64), purpose "share-manifest"
    envelope    = "MEDFSSHR" || 0x01 || I2OSP(len(stanza), 2) || stanza || object
    object      = format v1 object of signed_blob under a fresh random key; `stanza` wraps that key
                  to the recipient, bound to entry_context(b"medfs share manifest", object salt)

docs/FORMAT.md ("Share manifests") has the byte-level description and what each check defends.

Opening refuses, each with its own error: a manifest addressed to another identity
(NotForIdentityError, both for the envelope and for the signed recipient field), one that is
corrupt or cannot be decrypted or is not canonical (FormatError), and one whose signature does not
verify against the issuer key the caller trusts (SignatureError). Rollback is the caller's check:
compare `.sequence` with the last one accepted from that issuer.

Pure code: bytes in, bytes out. No message raised here contains a path or a name, only entry
indexes, so errors can be logged without leaking what was shared.
"""

from __future__ import annotations

import functools
import json
import re
from dataclasses import dataclass
from typing import Any, Final

from medfs import envelope, format, recipients
from medfs.errors import FormatError, KeyFileError, NotForIdentityError, SignatureError
from medfs.identity import Identity, PublicIdentity
from medfs.recipients import Stanza

FORMAT_NAME: Final = "medfs-share-v1"
SIGNATURE_PURPOSE: Final = "share-manifest"
MAGIC: Final = b"MEDFSSHR"
VERSION: Final = envelope.VERSION
# What the envelope's key wrap is bound to (as the "entry id" of recipients.entry_context). It is
# 20 bytes, and file entry ids are 16, so a file's wrap can never open as a manifest's, nor back.
ENVELOPE_CONTEXT_ID: Final = b"medfs share manifest"
SIGNATURE_SIZE: Final = 64

MAX_MANIFEST_SIZE: Final = 256 * 1024 * 1024  # the whole envelope, in bytes
MAX_ENTRIES: Final = 10_000_000
MAX_PROVIDERS: Final = 64
MAX_ADDRESSES: Final = 64  # per provider
MAX_ADDRESS_LENGTH: Final = 1024
MAX_PEER_ID_LENGTH: Final = 128
MAX_CID_LENGTH: Final = 256
NAME_MAX: Final = 255  # bytes of UTF-8 per path component, as on Linux (and manifest.NAME_MAX)
PATH_MAX: Final = 4095  # bytes of UTF-8 per path (and the symlink target limit)
MAX_INT: Final = 2**63 - 1
MIN_INT: Final = -(2**63)
ENTRY_ID_SIZE: Final = 16

KINDS: Final = ("file", "dir", "symlink")

_BODY_LENGTH_SIZE = 4
# Printable ASCII without space: CIDs and peer IDs are multibase text, addresses are multiaddrs.
_CID_RE = re.compile(r"[A-Za-z0-9]+")
_PEER_ID_RE = re.compile(r"[A-Za-z0-9]+")
_ADDRESS_RE = re.compile(r"/[\x21-\x7e]*")

_MANIFEST_KEYS = frozenset(
    {"format", "issuer", "recipient", "sequence", "created_ns", "name", "providers", "entries"}
)
_PROVIDER_KEYS = frozenset({"peer_id", "addresses"})
_ENTRY_KEYS = frozenset(
    {"path", "kind", "mode", "mtime_ns", "size", "entry_id", "cid", "salt", "stanza", "target"}
)


# --- the manifest ------------------------------------------------------------------------------


def _fail(message: str) -> FormatError:
    return FormatError(f"invalid share manifest: {message}")


def _check_int(value: object, what: str, low: int, high: int) -> int:
    # bool is an int in Python, and must not pass for one here.
    if type(value) is not int or not low <= value <= high:
        raise _fail(f"{what} must be an integer in {low}..{high}")
    return value


def _utf8(text: str, what: str) -> bytes:
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError:
        # Lone surrogates (for example from os.fsdecode of a non-UTF-8 name) have no JSON form
        # that other implementations read back the same way.
        raise _fail(f"{what} is not valid Unicode") from None


def _check_component(name: str, what: str) -> None:
    if not name:
        raise _fail(f"{what} has an empty component")
    if name in (".", ".."):
        raise _fail(f"{what} has a '.' or '..' component")
    if "\x00" in name or "/" in name:
        raise _fail(f"{what} contains NUL or '/' in a component")
    if len(_utf8(name, what)) > NAME_MAX:
        raise _fail(f"{what} has a component longer than {NAME_MAX} bytes")


def check_path(path: str, what: str = "path") -> None:
    """A relative, "/"-separated path with no empty, "." or ".." component; FormatError if not."""
    if not isinstance(path, str) or not path:
        raise _fail(f"{what} must be a non-empty string (the root itself is implicit)")
    if len(_utf8(path, what)) > PATH_MAX:
        raise _fail(f"{what} is longer than {PATH_MAX} bytes")
    # A leading "/" or a doubled or trailing "/" shows up as an empty component.
    for component in path.split("/"):
        _check_component(component, what)


def _check_bytes(value: object, what: str, size: int) -> bytes:
    if not isinstance(value, bytes) or len(value) != size:
        raise _fail(f"{what} must be {size} bytes")
    return value


@dataclass(frozen=True)
class Provider:
    """A node the recipient's node can connect to and fetch the shared objects from."""

    peer_id: str
    addresses: tuple[str, ...]  # multiaddrs, e.g. "/ip4/127.0.0.1/tcp/4001/p2p/12D3..."

    def __post_init__(self) -> None:
        if (
            not isinstance(self.peer_id, str)
            or len(self.peer_id) > MAX_PEER_ID_LENGTH
            or not _PEER_ID_RE.fullmatch(self.peer_id)
        ):
            raise _fail(f"a provider peer ID must be 1..{MAX_PEER_ID_LENGTH} letters and digits")
        if not isinstance(self.addresses, tuple) or len(self.addresses) > MAX_ADDRESSES:
            raise _fail(f"a provider has at most {MAX_ADDRESSES} addresses")
        for address in self.addresses:
            if (
                not isinstance(address, str)
                or len(address) > MAX_ADDRESS_LENGTH
                or not _ADDRESS_RE.fullmatch(address)
            ):
                raise _fail("a provider address must be a multiaddr of printable ASCII")
        if len(set(self.addresses)) != len(self.addresses):
            raise _fail("a provider lists the same address twice")


@dataclass(frozen=True)
class SharedEntry:
    """One shared file, directory or symlink, as the recipient's side will see it.

    Files carry `cid`, `salt` and `stanza` (the content key wrapped for the recipient, bound to
    `entry_id` and `salt`); symlinks carry `target`; directories carry neither.
    """

    path: str  # relative to the shared root; see check_path
    kind: str  # "file" | "dir" | "symlink"
    mode: int  # permission bits 0..0o7777
    mtime_ns: int
    size: int  # plaintext size (files), 0 (dirs), len(target) (symlinks)
    entry_id: bytes  # 16 bytes
    cid: str | None = None
    salt: bytes | None = None  # the object's 32-byte header salt
    stanza: bytes | None = None  # recipients.Stanza.to_bytes()
    target: bytes | None = None

    def __post_init__(self) -> None:
        check_path(self.path)
        if self.kind not in KINDS:
            raise _fail("an entry's kind must be 'file', 'dir' or 'symlink'")
        _check_int(self.mode, "an entry's mode", 0, 0o7777)
        _check_int(self.mtime_ns, "an entry's mtime_ns", MIN_INT, MAX_INT)
        _check_int(self.size, "an entry's size", 0, MAX_INT)
        _check_bytes(self.entry_id, "an entry id", ENTRY_ID_SIZE)
        is_file = self.kind == "file"
        if is_file != (self.cid is not None) or is_file != (self.salt is not None):
            raise _fail("a file, and only a file, has a CID and an object salt")
        if is_file != (self.stanza is not None):
            raise _fail("a file, and only a file, has a wrapped key")
        if (self.kind == "symlink") != (self.target is not None):
            raise _fail("a symlink, and only a symlink, has a target")
        if self.cid is not None and (
            not isinstance(self.cid, str)
            or len(self.cid) > MAX_CID_LENGTH
            or not _CID_RE.fullmatch(self.cid)
        ):
            raise _fail(f"a CID must be 1..{MAX_CID_LENGTH} letters and digits")
        if self.salt is not None:
            _check_bytes(self.salt, "an object salt", format.SALT_SIZE)
        if self.stanza is not None:
            self.parsed_stanza()
        if self.target is not None:
            if not isinstance(self.target, bytes) or not 0 < len(self.target) <= PATH_MAX:
                raise _fail(f"a symlink target must be 1..{PATH_MAX} bytes")
            if b"\x00" in self.target:
                raise _fail("a symlink target contains NUL")
            if self.size != len(self.target):
                raise _fail("a symlink's size must be the length of its target")
        if self.kind == "dir" and self.size != 0:
            raise _fail("a directory's size must be 0")

    def parsed_stanza(self) -> Stanza:
        """The wrapped content key (files only)."""
        return self._stanza

    # Parsed once: a share of thousands of files checks each entry's recipient and kind again
    # after making it, and parsing is most of what checking an entry costs.
    @functools.cached_property
    def _stanza(self) -> Stanza:
        if not isinstance(self.stanza, bytes):
            raise _fail("this entry has no wrapped key")
        stanza = Stanza.from_bytes(self.stanza)
        if stanza.to_bytes() != self.stanza:
            raise _fail("non-canonical wrapped key")
        return stanza

    def context(self) -> bytes:
        """What this file's wrap is bound to: recipients.entry_context(entry_id, salt)."""
        if self.salt is None:
            raise _fail("this entry has no object salt")
        return recipients.entry_context(self.entry_id, self.salt)


@dataclass(frozen=True)
class ShareManifest:
    """Everything one issuer shares with one recipient at one sequence number.

    `entries` are in strictly increasing order of path (by code point, which is the order of
    their UTF-8 bytes), so paths are unique and every parent comes before its children; every
    parent of an entry is itself an entry of kind "dir" (or the implicit root). Entry ids are
    unique, and every wrapped key is addressed to `recipient`.
    """

    issuer: PublicIdentity
    recipient: str  # the recipient's fingerprint
    sequence: int  # >= 1; grows per (issuer, recipient)
    created_ns: int
    name: str  # display name of the share; "" or one valid path component
    providers: tuple[Provider, ...]
    entries: tuple[SharedEntry, ...]

    def __post_init__(self) -> None:
        if not isinstance(self.issuer, PublicIdentity):
            raise _fail("the issuer must be a public identity")
        if not isinstance(self.recipient, str) or not recipients.is_fingerprint(self.recipient):
            raise _fail("the recipient must be an identity fingerprint")
        _check_int(self.sequence, "the sequence number", 1, MAX_INT)
        _check_int(self.created_ns, "the creation time", 0, MAX_INT)
        if not isinstance(self.name, str):
            raise _fail("the share name must be a string")
        if self.name:
            # One component, so a recipient can use it as a directory name as it stands.
            _check_component(self.name, "the share name")
        self._check_providers()
        self._check_entries()

    def _check_providers(self) -> None:
        if not isinstance(self.providers, tuple) or len(self.providers) > MAX_PROVIDERS:
            raise _fail(f"a share lists at most {MAX_PROVIDERS} providers")
        if not all(isinstance(provider, Provider) for provider in self.providers):
            raise _fail("providers must be Provider values")
        if len({provider.peer_id for provider in self.providers}) != len(self.providers):
            raise _fail("a provider is listed twice")

    def _check_entries(self) -> None:
        if not isinstance(self.entries, tuple) or len(self.entries) > MAX_ENTRIES:
            raise _fail(f"a share holds at most {MAX_ENTRIES} entries")
        dirs: set[str] = set()
        ids: set[bytes] = set()
        previous: str | None = None
        for index, entry in enumerate(self.entries):
            if not isinstance(entry, SharedEntry):
                raise _fail("entries must be SharedEntry values")
            if previous is not None and entry.path <= previous:
                raise _fail(f"entry {index} is out of order or repeats a path")
            previous = entry.path
            parent, slash, _ = entry.path.rpartition("/")
            if slash and parent not in dirs:
                raise _fail(f"entry {index}: its parent directory is not an entry before it")
            if entry.kind == "dir":
                dirs.add(entry.path)
            if entry.entry_id in ids:
                raise _fail(f"entry {index} repeats another entry's id")
            ids.add(entry.entry_id)
            if entry.stanza is not None:
                stanza = entry.parsed_stanza()
                if stanza.fingerprint != self.recipient:
                    raise _fail(f"entry {index}: its wrapped key is for another recipient")


# --- canonical body ------------------------------------------------------------------------------


def _dump(value: object) -> bytes:
    return json.dumps(
        value, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False
    ).encode("ascii")


def _opt_b64(data: bytes | None) -> str | None:
    return None if data is None else recipients.b64encode(data)


def encode_body(manifest: ShareManifest) -> bytes:
    """The canonical encoding of a manifest: exactly the bytes that are signed."""
    return _dump(
        {
            "format": FORMAT_NAME,
            "issuer": recipients.b64encode(manifest.issuer.to_bytes()),
            "recipient": manifest.recipient,
            "sequence": manifest.sequence,
            "created_ns": manifest.created_ns,
            "name": manifest.name,
            "providers": [
                {"peer_id": provider.peer_id, "addresses": list(provider.addresses)}
                for provider in manifest.providers
            ],
            "entries": [
                {
                    "path": entry.path,
                    "kind": entry.kind,
                    "mode": entry.mode,
                    "mtime_ns": entry.mtime_ns,
                    "size": entry.size,
                    "entry_id": recipients.b64encode(entry.entry_id),
                    "cid": entry.cid,
                    "salt": _opt_b64(entry.salt),
                    # Already canonical ASCII text; base64 of it would only make it longer.
                    "stanza": None if entry.stanza is None else entry.stanza.decode("ascii"),
                    "target": _opt_b64(entry.target),
                }
                for entry in manifest.entries
            ],
        }
    )


class _NotJSON(ValueError):
    pass


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result = dict(pairs)
    if len(result) != len(pairs):
        raise _NotJSON("duplicate key")
    return result


def _reject(text: str) -> Any:
    raise _NotJSON(f"{text[:20]!r} is not allowed")


def _object(value: object, keys: frozenset[str], what: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise _fail(f"{what} must be a JSON object")
    if value.keys() != keys:
        missing = sorted(keys - value.keys())
        unknown = sorted(value.keys() - keys)
        raise _fail(
            f"{what}: missing keys {missing}, unknown keys {[key[:40] for key in unknown[:5]]}"
        )
    return value


def _array(value: object, what: str, limit: int) -> list[Any]:
    if not isinstance(value, list) or len(value) > limit:
        raise _fail(f"{what} must be a JSON array of at most {limit} items")
    return value


def _string(value: object, what: str) -> str:
    if not isinstance(value, str):
        raise _fail(f"{what} must be a string")
    return value


def _opt_string(value: object, what: str) -> str | None:
    return None if value is None else _string(value, what)


def _opt_bytes(value: object, what: str) -> bytes | None:
    return None if value is None else recipients.b64decode(_string(value, what))


def _parse_entry(value: object, index: int) -> SharedEntry:
    what = f"entry {index}"
    item = _object(value, _ENTRY_KEYS, what)
    stanza = _opt_string(item["stanza"], f"{what} stanza")
    return SharedEntry(
        path=_string(item["path"], f"{what} path"),
        kind=_string(item["kind"], f"{what} kind"),
        mode=item["mode"],
        mtime_ns=item["mtime_ns"],
        size=item["size"],
        entry_id=recipients.b64decode(_string(item["entry_id"], f"{what} entry_id")),
        cid=_opt_string(item["cid"], f"{what} cid"),
        salt=_opt_bytes(item["salt"], f"{what} salt"),
        stanza=None if stanza is None else stanza.encode("ascii"),
        target=_opt_bytes(item["target"], f"{what} target"),
    )


def _parse_provider(value: object) -> Provider:
    item = _object(value, _PROVIDER_KEYS, "a provider")
    addresses = _array(item["addresses"], "a provider's addresses", MAX_ADDRESSES)
    return Provider(
        peer_id=_string(item["peer_id"], "a provider's peer ID"),
        addresses=tuple(_string(address, "a provider address") for address in addresses),
    )


def parse_body(body: bytes) -> ShareManifest:
    """Strict inverse of `encode_body`: any other spelling of a manifest is a FormatError.

    This only parses: it does not check a signature (`open_manifest` does).
    """
    try:
        text = body.decode("ascii")
        tree = json.loads(
            text,
            object_pairs_hook=_no_duplicates,
            parse_float=_reject,
            parse_constant=_reject,
        )
    except (ValueError, RecursionError):
        # UnicodeDecodeError and JSONDecodeError are ValueErrors, as is an integer too long
        # for Python's digit limit.
        raise _fail("the body is not canonical ASCII JSON") from None
    top = _object(tree, _MANIFEST_KEYS, "the manifest")
    if top["format"] != FORMAT_NAME:
        raise _fail(f"unsupported format {str(top['format'])[:40]!r}")
    try:
        issuer = PublicIdentity.from_bytes(recipients.b64decode(_string(top["issuer"], "issuer")))
    except KeyFileError as err:
        raise _fail(f"the issuer's public identity: {err.message}") from None
    providers = _array(top["providers"], "providers", MAX_PROVIDERS)
    entries = _array(top["entries"], "entries", MAX_ENTRIES)
    manifest = ShareManifest(
        issuer=issuer,
        recipient=_string(top["recipient"], "recipient"),
        sequence=top["sequence"],
        created_ns=top["created_ns"],
        name=_string(top["name"], "name"),
        providers=tuple(_parse_provider(item) for item in providers),
        entries=tuple(_parse_entry(item, index) for index, item in enumerate(entries)),
    )
    if encode_body(manifest) != body:
        raise _fail("the body is not in canonical form (whitespace, key order or escapes)")
    return manifest


# --- signing and the envelope ---------------------------------------------------------------------


def _sign(body: bytes, issuer: Identity) -> bytes:
    signature = issuer.sign(SIGNATURE_PURPOSE, body)
    return len(body).to_bytes(_BODY_LENGTH_SIZE, "big") + body + signature


def _split_signed(blob: bytes) -> tuple[bytes, bytes]:
    if len(blob) < _BODY_LENGTH_SIZE + SIGNATURE_SIZE:
        raise _fail("the signed manifest is too short")
    length = int.from_bytes(blob[:_BODY_LENGTH_SIZE], "big")
    if len(blob) != _BODY_LENGTH_SIZE + length + SIGNATURE_SIZE:
        raise _fail("the signed manifest's length does not match its body")
    return blob[_BODY_LENGTH_SIZE : _BODY_LENGTH_SIZE + length], blob[-SIGNATURE_SIZE:]


def _encrypt_envelope(signed_blob: bytes, recipient: PublicIdentity) -> bytes:
    data = envelope.seal(MAGIC, ENVELOPE_CONTEXT_ID, signed_blob, recipient)
    if len(data) > MAX_MANIFEST_SIZE:
        raise _fail(f"the sealed manifest would exceed {MAX_MANIFEST_SIZE} bytes")
    return data


def _decrypt_envelope(data: bytes, recipient: Identity) -> bytes:
    # A stanza for another identity: NotForIdentityError, from the unwrap.
    return envelope.open(
        data,
        MAGIC,
        ENVELOPE_CONTEXT_ID,
        recipient,
        what="share manifest",
        max_size=MAX_MANIFEST_SIZE,
    )


def _check_pair(manifest: ShareManifest, issuer: PublicIdentity, recipient: PublicIdentity) -> None:
    if manifest.issuer != issuer:
        raise SignatureError(
            f"the share manifest names issuer {manifest.issuer.fingerprint}, "
            f"but is signed by {issuer.fingerprint}"
        )
    if manifest.recipient != recipient.fingerprint:
        raise NotForIdentityError(
            f"the share manifest is addressed to {manifest.recipient}, "
            f"not to {recipient.fingerprint}",
            hint="it was forwarded or re-encrypted by someone else; ask the issuer to share again",
        )
    for index, entry in enumerate(manifest.entries):
        if entry.stanza is not None and entry.parsed_stanza().kind is not recipient.kind:
            raise _fail(f"entry {index}: its wrapped key is of another kind than the recipient")


def seal(manifest: ShareManifest, issuer: Identity, recipient: PublicIdentity) -> bytes:
    """Sign `manifest` with `issuer`'s key and encrypt it to `recipient`: the bytes to send."""
    if manifest.issuer != issuer.public:
        raise ValueError("the manifest names another issuer than the signing identity")
    if manifest.recipient != recipient.fingerprint:
        raise ValueError("the manifest is addressed to another recipient than the one given")
    _check_pair(manifest, issuer.public, recipient)
    return _encrypt_envelope(_sign(encode_body(manifest), issuer), recipient)


def open_manifest(data: bytes, recipient: Identity, issuer: PublicIdentity) -> ShareManifest:
    """Decrypt, verify against the trusted `issuer` key, and parse a sealed share manifest.

    NotForIdentityError: addressed to another identity (in the envelope, or in the signed body).
    SignatureError: not signed by `issuer`. FormatError: corrupt, cannot decrypt, not canonical.
    The caller still has to refuse a `.sequence` not above the last one accepted from `issuer`.
    """
    body, signature = _split_signed(_decrypt_envelope(bytes(data), recipient))
    try:
        issuer.verify(SIGNATURE_PURPOSE, body, signature)
    except FormatError:
        raise SignatureError(
            f"the share manifest is not signed by {issuer.fingerprint}",
            hint="check that the issuer's public file is the one they gave you",
        ) from None
    manifest = parse_body(body)
    _check_pair(manifest, issuer, recipient.public)
    return manifest
