"""Identities: a recipient key and an Ed25519 signing key; their files, fingerprints, signatures.

An identity is one encryption (recipient) key of a `recipients.Kind` and one Ed25519 signing key;
every kind, RSA included, carries the signing key so any identity can sign share manifests and
audit entries. Its fingerprint is over the canonical public encoding of both keys, so the one short
name a person compares covers everything in their public file.

Files (docs/FORMAT.md has the exact layout):

- NAME.pub: text, safe to mail: three header lines, a blank line, the public encoding in base64
  wrapped at 64 columns. The stated fingerprint must match the encoded keys.
- NAME.key: text, mode 0600: header lines naming the scrypt parameters and salt, a blank line, then
  the secret encoding sealed with AES-256-GCM under the scrypt-derived key, with the header text as
  associated data.
"""

from __future__ import annotations

import contextlib
import getpass
import os
import re
import stat
import unicodedata
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

from medfs import durable, recipients
from medfs.errors import FormatError, KeyFileError, PassphraseError, UsageError
from medfs.recipients import Kind, Recipient, RecipientSecret, Stanza

PUBLIC_MAGIC = b"medfs-id"
SECRET_MAGIC = b"medfs-sk"
ENCODING_VERSION = 1
PUBLIC_FILE_TITLE = "medfs public identity v1"
KEY_FILE_TITLE = "medfs secret identity v1"
SIGNATURE_LABEL = b"medfs v1 signature"

# scrypt with r=8, p=1. 2**18 costs 256 MiB and about 0.8 s here, age's default. Readers accept
# 2**10..2**20 so tests can write cheap files through the explicit `log2_n` argument; the CLI
# always writes the default.
SCRYPT_R = 8
SCRYPT_P = 1
DEFAULT_SCRYPT_LOG2_N = 18
MIN_SCRYPT_LOG2_N = 10
MAX_SCRYPT_LOG2_N = 20
SCRYPT_SALT_SIZE = 32
# Each key-file key is used once (fresh salt per write), so a fixed nonce never repeats under it.
_KEY_FILE_NONCE = bytes(12)

PASSPHRASE_ENV = "MEDFS_PASSPHRASE"  # noqa: S105 (the variable name, not a secret)
BASE64_LINE = 64
MAX_FILE_SIZE = 64 * 1024

_KIND_CODES = {Kind.MLKEM768_X25519: 1, Kind.X25519: 2, Kind.RSA_OAEP: 3}
_CODE_KINDS = {code: kind for kind, code in _KIND_CODES.items()}
_ED25519_SIZE = 32


def _pack(magic: bytes, kind: Kind, signing: bytes, key: bytes) -> bytes:
    return (
        magic
        + bytes((ENCODING_VERSION, _KIND_CODES[kind]))
        + signing
        + len(key).to_bytes(2, "big")
        + key
    )


def _unpack(magic: bytes, data: bytes, what: str) -> tuple[Kind, bytes, bytes]:
    fixed = len(magic) + 2 + _ED25519_SIZE + 2
    if len(data) < fixed or data[: len(magic)] != magic:
        raise KeyFileError(f"malformed {what}")
    version, code = data[len(magic)], data[len(magic) + 1]
    if version != ENCODING_VERSION:
        raise KeyFileError(f"unsupported {what} version {version}")
    if code not in _CODE_KINDS:
        raise KeyFileError(f"unknown key kind {code} in {what}")
    signing = data[len(magic) + 2 : len(magic) + 2 + _ED25519_SIZE]
    length = int.from_bytes(data[fixed - 2 : fixed], "big")
    if len(data) != fixed + length:
        raise KeyFileError(f"malformed {what} (length mismatch)")
    return _CODE_KINDS[code], signing, data[fixed:]


def _signed_message(purpose: str, data: bytes) -> bytes:
    if not purpose or not purpose.isascii() or "\x00" in purpose:
        raise ValueError("a signature purpose must be non-empty ASCII without NUL")
    return SIGNATURE_LABEL + b"\x00" + purpose.encode("ascii") + b"\x00" + data


def readers(owner: Recipient, grantees: Mapping[str, bytes]) -> list[Recipient]:
    """Whom a new version is wrapped for: the owner, then each grantee, from the public files
    `Manifest.grantees` gives."""
    return [owner, *(PublicIdentity.from_text(p.decode()).recipient() for p in grantees.values())]


@dataclass(frozen=True)
class PublicIdentity:
    """What others know of an identity: its recipient key, signing key and fingerprint."""

    kind: Kind
    encryption_key: bytes
    signing_key: bytes
    fingerprint: str = field(init=False)
    _verifier: ed25519.Ed25519PublicKey = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if len(self.signing_key) != _ED25519_SIZE:
            raise KeyFileError("an Ed25519 public key must be 32 bytes")
        try:
            verifier = ed25519.Ed25519PublicKey.from_public_bytes(self.signing_key)
        except ValueError:
            raise KeyFileError("malformed Ed25519 public key") from None
        object.__setattr__(self, "_verifier", verifier)
        object.__setattr__(self, "fingerprint", recipients.fingerprint(self.to_bytes()))
        try:
            self.recipient()
        except FormatError as err:
            raise KeyFileError(err.message) from None

    def to_bytes(self) -> bytes:
        """The canonical public encoding; the fingerprint is taken over exactly these bytes."""
        return _pack(PUBLIC_MAGIC, self.kind, self.signing_key, self.encryption_key)

    @classmethod
    def from_bytes(cls, data: bytes) -> PublicIdentity:
        kind, signing, key = _unpack(PUBLIC_MAGIC, data, "public identity")
        return cls(kind, key, signing)

    def recipient(self) -> Recipient:
        return Recipient(self.kind, self.encryption_key, self.fingerprint)

    def to_text(self) -> str:
        """The public file's contents."""
        return _armor(
            [PUBLIC_FILE_TITLE, f"fingerprint: {self.fingerprint}", f"kind: {self.kind.value}"],
            self.to_bytes(),
        )

    @classmethod
    def from_text(cls, text: str) -> PublicIdentity:
        header, body = _dearmor(text, 3, "public file")
        if header[0] != PUBLIC_FILE_TITLE:
            raise KeyFileError("not a medfs public identity file")
        fpr = _field(header[1], "fingerprint")
        kind = _field(header[2], "kind")
        public = cls.from_bytes(body)
        if public.kind.value != kind or public.fingerprint != fpr:
            raise KeyFileError("public file header does not match its keys (altered or corrupt)")
        return public

    def verify(self, purpose: str, data: bytes, signature: bytes) -> None:
        """Check an Ed25519 signature made by `Identity.sign(purpose, data)`; else FormatError."""
        try:
            self._verifier.verify(signature, _signed_message(purpose, data))
        except InvalidSignature:
            raise FormatError(f"signature by {self.fingerprint} does not verify") from None


class Identity:
    """A private identity: unwraps content keys addressed to it and signs."""

    def __init__(self, kind: Kind, secret: bytes, signing_seed: bytes) -> None:
        if len(signing_seed) != _ED25519_SIZE:
            raise KeyFileError("an Ed25519 secret key must be 32 bytes")
        self._signer = ed25519.Ed25519PrivateKey.from_private_bytes(signing_seed)
        self._signing_seed = signing_seed
        try:
            encryption_key = recipients.public_key_of(kind, secret)
        except FormatError as err:
            raise KeyFileError(err.message) from None
        self.public = PublicIdentity(
            kind, encryption_key, self._signer.public_key().public_bytes_raw()
        )
        self.kind = kind
        self.fingerprint = self.public.fingerprint
        self._recipient = RecipientSecret(kind, secret, self.fingerprint)

    def __repr__(self) -> str:
        return f"Identity({self.kind.value}, {self.fingerprint})"

    @classmethod
    def generate(cls, kind: Kind = recipients.DEFAULT_KIND) -> Identity:
        return cls(kind, recipients.generate_secret(kind), os.urandom(_ED25519_SIZE))

    @classmethod
    def from_rsa_key(cls, key: rsa.RSAPrivateKey) -> Identity:
        """An RSA-OAEP identity around an existing RSA key, with a new Ed25519 signing key."""
        try:
            secret = recipients.rsa_secret(key)
        except FormatError as err:
            raise KeyFileError(err.message) from None
        return cls(Kind.RSA_OAEP, secret, os.urandom(_ED25519_SIZE))

    def to_secret_bytes(self) -> bytes:
        """The canonical secret encoding (what a key file encrypts). Never log or store it bare."""
        return _pack(SECRET_MAGIC, self.kind, self._signing_seed, self._recipient.secret_bytes())

    @classmethod
    def from_secret_bytes(cls, data: bytes) -> Identity:
        kind, seed, secret = _unpack(SECRET_MAGIC, data, "secret identity")
        return cls(kind, secret, seed)

    def unwrap(self, stanza: Stanza, context: bytes) -> bytes:
        return self._recipient.unwrap(stanza, context)

    def unwrap_any(self, stanzas: Iterable[Stanza], context: bytes) -> bytes:
        return self._recipient.unwrap_any(stanzas, context)

    def sign(self, purpose: str, data: bytes) -> bytes:
        """Ed25519 signature over canonical bytes, domain-separated by `purpose`
        (for example "share-manifest" or "audit-entry") so one kind can't pass for another."""
        return self._signer.sign(_signed_message(purpose, data))


# --- text armor ---------------------------------------------------------------------------------


def _armor(header: list[str], body: bytes) -> str:
    encoded = recipients.b64encode(body)
    lines = [encoded[i : i + BASE64_LINE] for i in range(0, len(encoded), BASE64_LINE)]
    return "\n".join([*header, "", *lines]) + "\n"


def _dearmor(text: str, header_lines: int, what: str) -> tuple[list[str], bytes]:
    """Split strictly: header lines, one blank line, base64 lines of exactly 64 but the last."""
    if not text.endswith("\n") or "\r" in text:
        raise KeyFileError(f"malformed {what} (lines must end in a single LF)")
    lines = text[:-1].split("\n")
    if len(lines) < header_lines + 2 or lines[header_lines] != "":
        raise KeyFileError(f"malformed {what} (expected {header_lines} header lines, a blank line)")
    body = lines[header_lines + 1 :]
    if any(len(line) != BASE64_LINE for line in body[:-1]) or not 0 < len(body[-1]) <= BASE64_LINE:
        raise KeyFileError(f"malformed {what} (base64 must be wrapped at {BASE64_LINE} columns)")
    try:
        data = recipients.b64decode("".join(body))
    except FormatError:
        raise KeyFileError(f"malformed {what} (bad base64)") from None
    return lines[:header_lines], data


def _field(line: str, name: str) -> str:
    prefix = f"{name}: "
    if not line.startswith(prefix):
        raise KeyFileError(f"malformed file: expected a {name!r} line")
    return line[len(prefix) :]


# --- key files ----------------------------------------------------------------------------------


def _normalize(passphrase: str) -> bytes:
    # The same passphrase typed on two systems may arrive in different Unicode normal forms.
    return unicodedata.normalize("NFC", passphrase).encode("utf-8")


def _file_key(passphrase: str, salt: bytes, log2_n: int) -> bytes:
    kdf = Scrypt(salt=salt, length=32, n=1 << log2_n, r=SCRYPT_R, p=SCRYPT_P)
    return kdf.derive(_normalize(passphrase))


def encrypt_identity(
    identity: Identity,
    passphrase: str,
    *,
    log2_n: int = DEFAULT_SCRYPT_LOG2_N,
    salt: bytes | None = None,
) -> str:
    """The key file's contents: `identity` sealed under `passphrase`.

    `log2_n` below the default is for tests only; `salt` exists for reproducible test vectors.
    """
    if not passphrase:
        raise UsageError("refusing to protect a key with an empty passphrase")
    if not MIN_SCRYPT_LOG2_N <= log2_n <= MAX_SCRYPT_LOG2_N:
        raise ValueError(f"scrypt log2 N must be in {MIN_SCRYPT_LOG2_N}..{MAX_SCRYPT_LOG2_N}")
    salt = os.urandom(SCRYPT_SALT_SIZE) if salt is None else salt
    header = [
        KEY_FILE_TITLE,
        f"fingerprint: {identity.fingerprint}",
        f"kind: {identity.kind.value}",
        f"kdf: scrypt log2n={log2_n} r={SCRYPT_R} p={SCRYPT_P}",
        f"salt: {recipients.b64encode(salt)}",
    ]
    aad = ("\n".join(header) + "\n\n").encode("ascii")
    sealed = AESGCM(_file_key(passphrase, salt, log2_n)).encrypt(
        _KEY_FILE_NONCE, identity.to_secret_bytes(), aad
    )
    return _armor(header, sealed)


def decrypt_identity(text: str, passphrase: str) -> Identity:
    """Open a key file's contents; PassphraseError if the passphrase is wrong."""
    header, sealed = _dearmor(text, 5, "key file")
    if header[0] != KEY_FILE_TITLE:
        raise KeyFileError("not a medfs secret key file")
    fpr = _field(header[1], "fingerprint")
    kind = _field(header[2], "kind")
    kdf = _field(header[3], "kdf")
    log2_n = _scrypt_log2_n(kdf)
    try:
        salt = recipients.b64decode(_field(header[4], "salt"))
    except FormatError:
        salt = b""
    if len(salt) != SCRYPT_SALT_SIZE:
        raise KeyFileError("malformed key file (bad salt)")
    aad = ("\n".join(header) + "\n\n").encode("ascii")
    try:
        secret = AESGCM(_file_key(passphrase, salt, log2_n)).decrypt(_KEY_FILE_NONCE, sealed, aad)
    except InvalidTag:
        raise PassphraseError(
            "wrong passphrase (or the key file is corrupt)",
            hint=f"the passphrase comes from --passphrase-file, ${PASSPHRASE_ENV}, or the prompt",
        ) from None
    identity = Identity.from_secret_bytes(secret)
    if identity.fingerprint != fpr or identity.kind.value != kind:
        raise KeyFileError("key file header does not match its keys")
    return identity


def _scrypt_log2_n(kdf: str) -> int:
    for log2_n in range(MIN_SCRYPT_LOG2_N, MAX_SCRYPT_LOG2_N + 1):
        if kdf == f"scrypt log2n={log2_n} r={SCRYPT_R} p={SCRYPT_P}":
            return log2_n
    raise KeyFileError(f"unsupported key derivation {kdf[:60]!r}")


def _read_text(path: Path, what: str) -> tuple[str, int]:
    """A small ASCII file's text and the mode of the very file read (fstat, not the path)."""
    try:
        # O_NONBLOCK so a FIFO planted at the path can't hang us before the S_ISREG check.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY)
    except FileNotFoundError:
        raise KeyFileError(f"{what} {path} does not exist") from None
    except OSError as err:
        raise KeyFileError(f"cannot open {what} {path}: {err.strerror}") from None
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise KeyFileError(f"{what} {path} is not a regular file")
        data = b""
        while len(data) <= MAX_FILE_SIZE:
            more = os.read(fd, MAX_FILE_SIZE + 1 - len(data))
            if not more:
                break
            data += more
    finally:
        os.close(fd)
    if len(data) > MAX_FILE_SIZE:
        raise KeyFileError(f"{what} {path} is too large to be a medfs file")
    try:
        return data.decode("ascii"), mode
    except UnicodeDecodeError:
        raise KeyFileError(f"{what} {path} is not a medfs file (not ASCII text)") from None


def _check_private(path: Path, mode: int) -> None:
    # Like ssh: a secret others can read may already be copied, so refuse rather than warn.
    if mode & 0o077:
        raise KeyFileError(
            f"key file {path} is accessible by group or others (mode {stat.S_IMODE(mode):04o})",
            hint=f"make it private with: chmod 600 {path}",
        )


def load_key_text(path: str | os.PathLike[str]) -> str:
    """Read a key file, refusing one that group or others can access."""
    text, mode = _read_text(Path(path), "key file")
    _check_private(Path(path), mode)
    return text


def read_key_file(path: str | os.PathLike[str], passphrase: str) -> Identity:
    return decrypt_identity(load_key_text(path), passphrase)


def read_public_file(path: str | os.PathLike[str]) -> PublicIdentity:
    return PublicIdentity.from_text(_read_text(Path(path), "public file")[0])


def read_any_file(path: str | os.PathLike[str]) -> tuple[str, str]:
    """("key" | "public", text) for a file that may be either; key files get the mode check."""
    text, mode = _read_text(Path(path), "file")
    first = text.split("\n", 1)[0]
    if first == KEY_FILE_TITLE:
        _check_private(Path(path), mode)
        return "key", text
    if first == PUBLIC_FILE_TITLE:
        return "public", text
    raise KeyFileError(f"{path} is not a medfs key file or public file")


def write_identity_files(
    out: str | os.PathLike[str],
    identity: Identity,
    passphrase: str,
    *,
    log2_n: int = DEFAULT_SCRYPT_LOG2_N,
) -> tuple[Path, Path]:
    """Create OUT.key (mode 0600) and OUT.pub (0644); refuse if either exists."""
    base = Path(out)
    key_path = base.with_name(base.name + ".key")
    pub_path = base.with_name(base.name + ".pub")
    for path in (key_path, pub_path):
        if path.exists() or path.is_symlink():
            raise KeyFileError(f"{path} already exists; refusing to overwrite it")
    key_text = encrypt_identity(identity, passphrase, log2_n=log2_n)
    try:
        durable.write_new(key_path, key_text.encode("ascii"), 0o600)
    except FileExistsError:
        raise KeyFileError(f"{key_path} already exists; refusing to overwrite it") from None
    except OSError as err:
        raise KeyFileError(f"cannot create {key_path}: {err.strerror}") from None
    try:
        durable.write_new(pub_path, identity.public.to_text().encode("ascii"), 0o644)
    except OSError as err:
        # Leave no half identity behind: a key without its public file would be confusing.
        with contextlib.suppress(OSError):
            key_path.unlink()
        if isinstance(err, FileExistsError):
            raise KeyFileError(f"{pub_path} already exists; refusing to overwrite it") from None
        raise KeyFileError(f"cannot create {pub_path}: {err.strerror}") from None
    return key_path, pub_path


_PEM_BLOCK = re.compile(rb"-----BEGIN ([A-Z0-9 ]+)-----\r?\n.*?-----END \1-----", re.DOTALL)


def load_rsa_pem(data: bytes) -> rsa.RSAPrivateKey:
    """The RSA private key in a PEM file (which may also hold its certificate)."""
    labels = []
    for block in _PEM_BLOCK.finditer(data):
        label = block.group(1)
        labels.append(label)
        if not label.endswith(b"PRIVATE KEY"):
            continue
        try:
            key = serialization.load_pem_private_key(block.group(0), password=None)
        except TypeError:
            raise KeyFileError(
                "the PEM private key is encrypted",
                hint="decrypt a copy first, e.g. openssl pkey -in FILE -out PLAIN.pem",
            ) from None
        except ValueError:
            raise KeyFileError("malformed PEM private key") from None
        if not isinstance(key, rsa.RSAPrivateKey):
            raise KeyFileError("the PEM private key is not an RSA key")
        return key
    if b"CERTIFICATE" in labels:
        raise KeyFileError(
            "the PEM file holds a certificate but no private key",
            hint="an identity needs the private key that belongs to the certificate",
        )
    raise KeyFileError("no PEM private key found")


# --- passphrases --------------------------------------------------------------------------------


def get_passphrase(
    *,
    passphrase_file: str | os.PathLike[str] | None = None,
    confirm: bool = False,
    env: Mapping[str, str] | None = None,
) -> str:
    """The passphrase from --passphrase-file, else $MEDFS_PASSPHRASE, else a terminal prompt."""
    environ = os.environ if env is None else env
    if passphrase_file is not None:
        return _passphrase_from_file(Path(passphrase_file))
    if PASSPHRASE_ENV in environ:
        return environ[PASSPHRASE_ENV]
    try:
        os.close(os.open("/dev/tty", os.O_RDWR | os.O_NOCTTY))
    except OSError:
        raise UsageError(
            "a passphrase is needed but there is no terminal to ask on",
            hint=f"set {PASSPHRASE_ENV} or pass --passphrase-file FILE",
        ) from None
    passphrase = getpass.getpass("medfs passphrase: ")
    if confirm and getpass.getpass("medfs passphrase (again): ") != passphrase:
        raise UsageError("the passphrases do not match")
    return passphrase


def _passphrase_from_file(path: Path) -> str:
    try:
        data = path.read_bytes()
    except OSError as err:
        raise UsageError(f"cannot read passphrase file {path}: {err.strerror}") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise UsageError(f"passphrase file {path} is not UTF-8") from None
    # One trailing line ending is how editors and `echo` leave a file; anything else is meant.
    for ending in ("\r\n", "\n"):
        if text.endswith(ending):
            text = text[: -len(ending)]
            break
    if not text:
        raise UsageError(f"passphrase file {path} is empty")
    return text
