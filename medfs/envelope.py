"""The encrypted envelope around share manifests and manifest snapshots.

    envelope = MAGIC (8 bytes) || VERSION (0x01) || I2OSP(len(stanza), 2) || stanza || object
    object   = format v1 object (medfs.format) of the payload under a fresh random content key
    stanza   = that key wrapped for the recipient (canonical recipients.Stanza), bound to
               recipients.entry_context(label, the object's header salt)

Each user has its own magic and label, so one kind of envelope can never open as another:
docs/FORMAT.md §7.1 (share manifests, medfs/sharing.py) and §10.1 (manifest snapshots,
medfs/backup.py) give the byte layouts and what each check defends.

Pure code: bytes in, bytes out. Signing and parsing the payload are the callers' business.
"""

from __future__ import annotations

from typing import Final

from medfs import format, recipients
from medfs.errors import FormatError, NotForIdentityError
from medfs.identity import Identity, PublicIdentity
from medfs.recipients import Stanza

VERSION: Final = 1
MAGIC_SIZE: Final = 8

_LENGTH_SIZE = 2
_FIXED = MAGIC_SIZE + 1 + _LENGTH_SIZE


def _check_magic(magic: bytes) -> None:
    if len(magic) != MAGIC_SIZE:
        raise ValueError(f"an envelope magic is {MAGIC_SIZE} bytes")


def seal(magic: bytes, label: bytes, payload: bytes, recipient: PublicIdentity) -> bytes:
    """Encrypt `payload` under a fresh key and wrap that key for `recipient`.

    The caller bounds the size of the result (each kind refuses it with its own error).
    """
    _check_magic(magic)
    key = format.new_content_key()
    sealed = format.encrypt_bytes(key, payload)
    salt = format.Header.parse(sealed[: format.HEADER_SIZE]).salt
    context = recipients.entry_context(label, salt)
    stanza = recipients.wrap(key, recipient.recipient(), context).to_bytes()
    return magic + bytes((VERSION,)) + len(stanza).to_bytes(_LENGTH_SIZE, "big") + stanza + sealed


def open(
    data: bytes,
    magic: bytes,
    label: bytes,
    opener: Identity,
    *,
    what: str,
    max_size: int,
    not_for_hint: str | None = None,
) -> bytes:
    """The payload of an envelope sealed for `opener`, checked in the order of FORMAT.md §7.3.

    `what` names the kind in messages ("share manifest"). FormatError: over `max_size` bytes (before
    any work), bad magic or version, truncated, non-canonical stanza, a wrap or object that does
    not open, anything after the object. NotForIdentityError: the stanza is for another identity;
    with `not_for_hint`, that is refused before the object is looked at, naming both fingerprints.
    """
    _check_magic(magic)
    if len(data) > max_size:
        raise FormatError(f"invalid {what}: larger than {max_size} bytes")
    if len(data) < _FIXED or data[:MAGIC_SIZE] != magic:
        raise FormatError(f"not a medfs {what} (bad magic)")
    if data[MAGIC_SIZE] != VERSION:
        raise FormatError(f"unsupported {what} version {data[MAGIC_SIZE]}")
    length = int.from_bytes(data[MAGIC_SIZE + 1 : _FIXED], "big")
    if len(data) < _FIXED + length + format.HEADER_SIZE:
        raise FormatError(f"invalid {what}: truncated envelope")
    raw_stanza = data[_FIXED : _FIXED + length]
    stanza = Stanza.from_bytes(raw_stanza)
    if stanza.to_bytes() != raw_stanza:
        raise FormatError(f"invalid {what}: non-canonical envelope stanza")
    if not_for_hint is not None and stanza.fingerprint != opener.fingerprint:
        raise NotForIdentityError(
            f"this {what} belongs to identity {stanza.fingerprint}, not {opener.fingerprint}",
            hint=not_for_hint,
        )
    sealed = data[_FIXED + length :]
    salt = format.Header.parse(sealed[: format.HEADER_SIZE]).salt
    # NotForIdentityError here too if the stanza is addressed to someone else.
    key = opener.unwrap(stanza, recipients.entry_context(label, salt))
    # decrypt_bytes requires the object to end exactly at the end of `data`.
    return format.decrypt_bytes(key, sealed)
