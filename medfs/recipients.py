"""Recipient key wrapping: a content key sealed to one recipient as a typed, canonical stanza.

Three recipient kinds, all built on `cryptography` primitives:

- `mlkem768-x25519` (default): HPKE base mode, KEM ML-KEM-768+X25519 hybrid, HKDF-SHA256,
  AES-256-GCM. Stays confidential if either ML-KEM-768 or X25519 holds.
- `x25519`: the same HPKE suite with DHKEM(X25519).
- `rsa-oaep`: RSA-OAEP with SHA-256 and MGF1-SHA-256, keys of at least 3072 bits (for
  institutions whose keys live in existing RSA infrastructure).

Every wrap is bound to the recipient's fingerprint and to a caller-supplied `context` (HPKE `info`,
OAEP label), so a stanza copied onto another entry, or relabelled for another recipient, fails to
open. Use `entry_context(entry_id, object_salt)` to build the context.

A stanza whose fingerprint is not the identity's raises NotForIdentityError; a stanza that is
malformed or fails authentication raises FormatError.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from enum import StrEnum

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, hpke, serialization
from cryptography.hazmat.primitives.asymmetric import mlkem, padding, rsa, x25519

from medfs.errors import FormatError, NotForIdentityError

CONTENT_KEY_SIZE = 32
RSA_MIN_BITS = 3072
RSA_MAX_BITS = 16384
RSA_DEFAULT_BITS = 3072
WRAP_LABEL = b"medfs v1 wrap"
CONTEXT_LABEL = b"medfs v1 entry"
FINGERPRINT_LABEL = b"medfs v1 fingerprint"
FINGERPRINT_PREFIX = "medfs1"
# 20 bytes (160 bits) of SHA-256: 32 base32 characters, far beyond any second-preimage search.
FINGERPRINT_BYTES = 20

_MLKEM_PUBLIC_SIZE = 1184
_MLKEM_SEED_SIZE = 64
_X25519_SIZE = 32
_AEAD_TAG_SIZE = 16


class Kind(StrEnum):
    MLKEM768_X25519 = "mlkem768-x25519"
    X25519 = "x25519"
    RSA_OAEP = "rsa-oaep"


DEFAULT_KIND = Kind.MLKEM768_X25519

_HPKE_KEMS = {Kind.MLKEM768_X25519: hpke.KEM.MLKEM768_X25519, Kind.X25519: hpke.KEM.X25519}
_HPKE_BODY_SIZES = {
    kind: kem.enc_length() + CONTENT_KEY_SIZE + _AEAD_TAG_SIZE for kind, kem in _HPKE_KEMS.items()
}
_OAEP_HASH = hashes.SHA256()
_FINGERPRINT_RE = re.compile(FINGERPRINT_PREFIX + r"[a-z2-7]{32}")
_BASE64_RE = re.compile(r"[A-Za-z0-9+/]*")


def _suite(kind: Kind) -> hpke.Suite:
    return hpke.Suite(_HPKE_KEMS[kind], hpke.KDF.HKDF_SHA256, hpke.AEAD.AES_256_GCM)


def _oaep(label: bytes) -> padding.OAEP:
    return padding.OAEP(mgf=padding.MGF1(algorithm=_OAEP_HASH), algorithm=_OAEP_HASH, label=label)


def b64encode(data: bytes) -> str:
    """Standard base64 without padding: the one text encoding of bytes medfs writes."""
    return base64.b64encode(data).decode("ascii").rstrip("=")


def b64decode(text: str) -> bytes:
    """Strict inverse of `b64encode`: any other spelling of the same bytes is rejected."""
    if not _BASE64_RE.fullmatch(text) or len(text) % 4 == 1:
        raise FormatError("invalid base64")
    try:
        data = base64.b64decode(text + "=" * (-len(text) % 4), validate=True)
    except binascii.Error:
        raise FormatError("invalid base64") from None
    # Non-zero unused bits in the last character would give a second spelling.
    if b64encode(data) != text:
        raise FormatError("non-canonical base64")
    return data


def fingerprint(public_encoding: bytes) -> str:
    """The short printable name of a public identity: "medfs1" + base32(SHA-256 prefix)."""
    digest = hashlib.sha256(FINGERPRINT_LABEL + b"\x00" + public_encoding).digest()
    encoded = base64.b32encode(digest[:FINGERPRINT_BYTES]).decode("ascii").lower()
    return FINGERPRINT_PREFIX + encoded


def is_fingerprint(text: str) -> bool:
    return _FINGERPRINT_RE.fullmatch(text) is not None


def entry_context(entry_id: bytes, object_salt: bytes) -> bytes:
    """The binding context for a wrap: which entry, and which version of it (the header salt).

    Both parts are length-prefixed so no two (entry, salt) pairs give the same bytes.
    """
    if not entry_id or not object_salt:
        raise ValueError("entry id and object salt must not be empty")
    parts = (CONTEXT_LABEL, entry_id, object_salt)
    return b"".join(len(part).to_bytes(4, "big") + part for part in parts)


def _wrap_info(kind: Kind, recipient_fingerprint: str, context: bytes) -> bytes:
    if not context:
        raise ValueError("a wrap must be bound to a non-empty context")
    # kind and fingerprint never contain NUL, and context comes last, so this is unambiguous.
    return b"\x00".join((WRAP_LABEL, kind.encode(), recipient_fingerprint.encode(), context))


@dataclass(frozen=True)
class Stanza:
    """One wrapped content key. Text form: `KIND FINGERPRINT BASE64BODY` (one line, ASCII)."""

    kind: Kind
    fingerprint: str
    body: bytes

    def __post_init__(self) -> None:
        _check_stanza(self.kind, self.fingerprint, self.body)

    def to_text(self) -> str:
        return f"{self.kind.value} {self.fingerprint} {b64encode(self.body)}"

    def to_bytes(self) -> bytes:
        return self.to_text().encode("ascii")

    @classmethod
    def from_text(cls, text: str) -> Stanza:
        fields = text.split(" ")
        if len(fields) != 3:
            raise FormatError("a stanza must be exactly three space-separated fields")
        kind_text, fpr, body_text = fields
        try:
            kind = Kind(kind_text)
        except ValueError:
            raise FormatError(f"unknown stanza kind {kind_text[:40]!r}") from None
        return cls(kind, fpr, b64decode(body_text))

    @classmethod
    def from_bytes(cls, data: bytes) -> Stanza:
        try:
            text = data.decode("ascii")
        except UnicodeDecodeError:
            raise FormatError("a stanza must be ASCII") from None
        return cls.from_text(text)


def _check_stanza(kind: Kind, fpr: str, body: bytes) -> None:
    if not isinstance(kind, Kind):
        raise FormatError(f"unknown stanza kind {kind!r}")
    if not is_fingerprint(fpr):
        raise FormatError("malformed recipient fingerprint in stanza")
    if kind in _HPKE_BODY_SIZES:
        if len(body) != _HPKE_BODY_SIZES[kind]:
            raise FormatError(f"{kind.value} stanza body must be {_HPKE_BODY_SIZES[kind]} bytes")
    elif not RSA_MIN_BITS // 8 <= len(body) <= RSA_MAX_BITS // 8:
        raise FormatError("rsa-oaep stanza body has an impossible length")


def _load_rsa_public(data: bytes) -> rsa.RSAPublicKey:
    try:
        key = serialization.load_der_public_key(data)
    except ValueError:
        raise FormatError("malformed RSA public key") from None
    if not isinstance(key, rsa.RSAPublicKey):
        raise FormatError("not an RSA public key")
    _check_rsa_bits(key.key_size)
    canonical = key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    if canonical != data:
        raise FormatError("non-canonical RSA public key encoding")
    return key


def _check_rsa_bits(bits: int) -> None:
    if bits < RSA_MIN_BITS:
        raise FormatError(f"RSA keys must have at least {RSA_MIN_BITS} bits, this one has {bits}")
    if bits > RSA_MAX_BITS:
        raise FormatError(f"RSA keys above {RSA_MAX_BITS} bits are not supported")


_PublicKey = x25519.X25519PublicKey | hpke.MLKEM768X25519PublicKey | rsa.RSAPublicKey


def _load_public(kind: Kind, data: bytes) -> _PublicKey:
    try:
        if kind is Kind.MLKEM768_X25519:
            if len(data) != _MLKEM_PUBLIC_SIZE + _X25519_SIZE:
                raise FormatError("mlkem768-x25519 public key must be 1216 bytes")
            return hpke.MLKEM768X25519PublicKey(
                mlkem.MLKEM768PublicKey.from_public_bytes(data[:_MLKEM_PUBLIC_SIZE]),
                x25519.X25519PublicKey.from_public_bytes(data[_MLKEM_PUBLIC_SIZE:]),
            )
        if kind is Kind.X25519:
            if len(data) != _X25519_SIZE:
                raise FormatError("x25519 public key must be 32 bytes")
            return x25519.X25519PublicKey.from_public_bytes(data)
    except ValueError:
        raise FormatError(f"malformed {kind.value} public key") from None
    return _load_rsa_public(data)


@dataclass(frozen=True)
class Recipient:
    """Someone a content key can be wrapped to: a typed public key and its identity fingerprint."""

    kind: Kind
    public_key: bytes
    fingerprint: str
    _key: _PublicKey = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not is_fingerprint(self.fingerprint):
            raise FormatError("malformed recipient fingerprint")
        object.__setattr__(self, "_key", _load_public(self.kind, self.public_key))


def wrap(content_key: bytes, recipient: Recipient, context: bytes) -> Stanza:
    """Seal `content_key` to `recipient`, bound to `context` (see `entry_context`)."""
    if len(content_key) != CONTENT_KEY_SIZE:
        raise ValueError(f"content key must be {CONTENT_KEY_SIZE} bytes")
    info = _wrap_info(recipient.kind, recipient.fingerprint, context)
    key = recipient._key
    try:
        if isinstance(key, rsa.RSAPublicKey):
            body = key.encrypt(content_key, _oaep(info))
        else:
            body = _suite(recipient.kind).encrypt(content_key, key, info=info)
    except ValueError:
        # For example an X25519 public key of low order, which gives an all-zero shared secret.
        raise FormatError(f"cannot wrap to recipient {recipient.fingerprint}") from None
    return Stanza(recipient.kind, recipient.fingerprint, body)


def wrap_all(content_key: bytes, to: Iterable[Recipient], context: bytes) -> dict[str, bytes]:
    """`content_key` wrapped for each of `to`: a version's wraps, stanza bytes by fingerprint."""
    return {r.fingerprint: wrap(content_key, r, context).to_bytes() for r in to}


_PrivateKey = x25519.X25519PrivateKey | hpke.MLKEM768X25519PrivateKey | rsa.RSAPrivateKey


def generate_secret(kind: Kind = DEFAULT_KIND, *, rsa_bits: int = RSA_DEFAULT_BITS) -> bytes:
    """A new private key of `kind`, in its canonical secret encoding."""
    if kind is Kind.MLKEM768_X25519:
        return (
            mlkem.MLKEM768PrivateKey.generate().private_bytes_raw()
            + x25519.X25519PrivateKey.generate().private_bytes_raw()
        )
    if kind is Kind.X25519:
        return x25519.X25519PrivateKey.generate().private_bytes_raw()
    _check_rsa_bits(rsa_bits)
    return rsa_secret(rsa.generate_private_key(public_exponent=65537, key_size=rsa_bits))


def rsa_secret(key: rsa.RSAPrivateKey) -> bytes:
    """The canonical secret encoding of an RSA key (unencrypted PKCS#8 DER)."""
    _check_rsa_bits(key.key_size)
    return key.private_bytes(
        serialization.Encoding.DER,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _load_private(kind: Kind, secret: bytes) -> _PrivateKey:
    try:
        if kind is Kind.MLKEM768_X25519:
            if len(secret) != _MLKEM_SEED_SIZE + _X25519_SIZE:
                raise FormatError("mlkem768-x25519 secret key must be 96 bytes")
            return hpke.MLKEM768X25519PrivateKey(
                mlkem.MLKEM768PrivateKey.from_seed_bytes(secret[:_MLKEM_SEED_SIZE]),
                x25519.X25519PrivateKey.from_private_bytes(secret[_MLKEM_SEED_SIZE:]),
            )
        if kind is Kind.X25519:
            if len(secret) != _X25519_SIZE:
                raise FormatError("x25519 secret key must be 32 bytes")
            return x25519.X25519PrivateKey.from_private_bytes(secret)
        key = serialization.load_der_private_key(secret, password=None)
    except (ValueError, TypeError):
        raise FormatError(f"malformed {kind.value} secret key") from None
    if not isinstance(key, rsa.RSAPrivateKey):
        raise FormatError("not an RSA private key")
    if rsa_secret(key) != secret:
        raise FormatError("non-canonical RSA private key encoding")
    return key


def public_key_of(kind: Kind, secret: bytes) -> bytes:
    """The canonical public encoding matching a canonical secret encoding."""
    key = _load_private(kind, secret)
    if isinstance(key, rsa.RSAPrivateKey):
        return key.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    if isinstance(key, x25519.X25519PrivateKey):
        return key.public_key().public_bytes_raw()
    # The hybrid key object does not expose its halves, so rebuild them from the secret encoding.
    mlkem_key = mlkem.MLKEM768PrivateKey.from_seed_bytes(secret[:_MLKEM_SEED_SIZE])
    x_key = x25519.X25519PrivateKey.from_private_bytes(secret[_MLKEM_SEED_SIZE:])
    return mlkem_key.public_key().public_bytes_raw() + x_key.public_key().public_bytes_raw()


class RecipientSecret:
    """The private half of a recipient: unwraps stanzas addressed to its fingerprint."""

    def __init__(self, kind: Kind, secret: bytes, fingerprint: str) -> None:
        if not is_fingerprint(fingerprint):
            raise FormatError("malformed recipient fingerprint")
        self.kind = kind
        self.fingerprint = fingerprint
        self._secret = secret
        self._key = _load_private(kind, secret)
        self.public_key = public_key_of(kind, secret)

    def __repr__(self) -> str:
        return f"RecipientSecret({self.kind.value}, {self.fingerprint})"

    def secret_bytes(self) -> bytes:
        return self._secret

    def recipient(self) -> Recipient:
        return Recipient(self.kind, self.public_key, self.fingerprint)

    def unwrap(self, stanza: Stanza, context: bytes) -> bytes:
        """The content key in `stanza`; NotForIdentityError if it is addressed to someone else."""
        if stanza.fingerprint != self.fingerprint:
            raise NotForIdentityError(
                f"the wrapped key is for {stanza.fingerprint}, not for {self.fingerprint}"
            )
        if stanza.kind is not self.kind:
            raise FormatError(f"stanza kind {stanza.kind.value} does not match its recipient")
        info = _wrap_info(self.kind, self.fingerprint, context)
        key = self._key
        try:
            if isinstance(key, rsa.RSAPrivateKey):
                if len(stanza.body) != (key.key_size + 7) // 8:
                    raise ValueError("ciphertext length does not match the key")
                content_key = key.decrypt(stanza.body, _oaep(info))
            else:
                content_key = _suite(self.kind).decrypt(stanza.body, key, info=info)
        except (InvalidTag, ValueError):
            # HPKE reports InvalidTag, OAEP ValueError: both mean corrupt or bound elsewhere.
            raise FormatError(
                "the wrapped key fails authentication (corrupt, or bound to another entry)"
            ) from None
        if len(content_key) != CONTENT_KEY_SIZE:
            raise FormatError("the wrapped key has the wrong length")
        return content_key

    def unwrap_any(self, stanzas: Iterable[Stanza], context: bytes) -> bytes:
        """Unwrap the first stanza addressed to this identity that opens."""
        mine = [stanza for stanza in stanzas if stanza.fingerprint == self.fingerprint]
        if not mine:
            raise NotForIdentityError(f"no wrapped key is addressed to {self.fingerprint}")
        error: FormatError | None = None
        for stanza in mine:
            try:
                return self.unwrap(stanza, context)
            except FormatError as err:
                error = err
        assert error is not None
        raise error
