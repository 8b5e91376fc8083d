"""Encrypted object format v1: a short header, then AES-256-GCM segments in the STREAM construction.

Layout (docs/FORMAT.md has the byte-level description):

    header   = magic "MEDFSOBJ" | version 0x01 | log2(segment size) 0x10 | salt (32 bytes)
    segment  = AES-256-GCM(payload key, nonce, plaintext segment, aad = header) -> ct || tag
    nonce    = segment counter (11 bytes, big-endian) | 0x01 on the final segment, else 0x00
    payload key = HKDF-SHA256(ikm = content key, salt = header salt, info = PAYLOAD_INFO)

The counter and final flag in the nonce detect reordering, dropping, duplication, truncation and
extension; the per-object salt in the key derivation detects splicing between objects; the header
as AAD makes every header bit authenticated. Any segment still decrypts alone (random access).

Every function here is pure: bytes in, bytes out, memory bounded by a couple of segments.
Plaintext a decryptor has yielded is only known to be complete and in order once the iterator
has finished without raising.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.utils import Buffer

from medfs import layout
from medfs.errors import FormatError

MAGIC = b"MEDFSOBJ"
VERSION = 1
SEGMENT_SIZE_LOG2 = 16
SEGMENT_SIZE = 1 << SEGMENT_SIZE_LOG2
SALT_SIZE = 32
KEY_SIZE = 32
HEADER_SIZE = len(MAGIC) + 2 + SALT_SIZE
PAYLOAD_INFO = b"medfs v1 payload key"

# A fetch function returns exactly `length` bytes of the object starting at `offset`.
Fetch = Callable[[int, int], bytes]

assert HEADER_SIZE == layout.HEADER_SIZE
assert SEGMENT_SIZE == layout.SEGMENT_SIZE


def new_content_key() -> bytes:
    """A fresh random content key. Use a new one for every version of every file."""
    return os.urandom(KEY_SIZE)


@dataclass(frozen=True)
class Header:
    """A parsed v1 header. Its only variable field is the salt."""

    salt: bytes

    def __post_init__(self) -> None:
        if len(self.salt) != SALT_SIZE:
            raise ValueError(f"salt must be {SALT_SIZE} bytes")

    def to_bytes(self) -> bytes:
        return MAGIC + bytes((VERSION, SEGMENT_SIZE_LOG2)) + self.salt

    @classmethod
    def parse(cls, data: bytes) -> Header:
        """Parse exactly HEADER_SIZE bytes; anything else is a FormatError."""
        if len(data) != HEADER_SIZE:
            raise FormatError(f"object header must be {HEADER_SIZE} bytes, got {len(data)}")
        if data[: len(MAGIC)] != MAGIC:
            raise FormatError("not a medfs encrypted object (bad magic)")
        version, size_log2 = data[len(MAGIC)], data[len(MAGIC) + 1]
        if version != VERSION:
            raise FormatError(f"unsupported object format version {version}")
        if size_log2 != SEGMENT_SIZE_LOG2:
            # v1 allows one segment size only, so there is one encoding per plaintext.
            raise FormatError(f"unsupported segment size 2**{size_log2}")
        return cls(salt=bytes(data[len(MAGIC) + 2 :]))


def _nonce(counter: int, final: bool) -> bytes:
    return counter.to_bytes(11, "big") + (b"\x01" if final else b"\x00")


class _SegmentCipher:
    """The per-object AEAD: one derived key, the header as associated data."""

    def __init__(self, content_key: bytes, header: Header) -> None:
        if len(content_key) != KEY_SIZE:
            raise ValueError(f"content key must be {KEY_SIZE} bytes")
        payload_key = HKDF(
            algorithm=hashes.SHA256(), length=KEY_SIZE, salt=header.salt, info=PAYLOAD_INFO
        ).derive(content_key)
        self._aead = AESGCM(payload_key)
        self._aad = header.to_bytes()

    def seal(self, counter: int, final: bool, plaintext: Buffer) -> bytes:
        return self._aead.encrypt(_nonce(counter, final), plaintext, self._aad)

    def open(self, counter: int, final: bool, ciphertext: Buffer) -> bytes:
        try:
            return self._aead.decrypt(_nonce(counter, final), ciphertext, self._aad)
        except InvalidTag:
            raise _unauthentic(counter) from None

    def open_into(self, counter: int, final: bool, ciphertext: Buffer, out: Buffer) -> None:
        try:
            self._aead.decrypt_into(_nonce(counter, final), ciphertext, self._aad, out)
        except InvalidTag:
            raise _unauthentic(counter) from None


def _unauthentic(counter: int) -> FormatError:
    return FormatError(
        f"segment {counter} of the encrypted object fails authentication "
        "(corrupt, truncated, reordered, or the wrong key)"
    )


def encrypt(
    content_key: bytes, chunks: Iterable[bytes], *, salt: bytes | None = None
) -> Iterator[bytes]:
    """Encrypt plaintext chunks of any sizes; yields the header, then one item per segment.

    `salt` exists so test vectors can be reproduced; leave it None everywhere else.
    """
    header = Header(salt=os.urandom(SALT_SIZE) if salt is None else salt)
    cipher = _SegmentCipher(content_key, header)
    yield header.to_bytes()
    # Full segments are sealed straight from the chunk; only what straddles chunks is copied
    # (`held`). A segment is sealed once a byte beyond it exists: only then is it not final.
    held = bytearray()
    counter = 0
    for chunk in chunks:
        with memoryview(chunk) as view:
            pos = 0
            if held:
                pos = min(SEGMENT_SIZE - len(held), len(view))
                held += view[:pos]
                if len(held) < SEGMENT_SIZE or pos == len(view):
                    continue
                yield cipher.seal(counter, False, held)
                counter += 1
                held = bytearray()
            while len(view) - pos > SEGMENT_SIZE:
                yield cipher.seal(counter, False, view[pos : pos + SEGMENT_SIZE])
                pos += SEGMENT_SIZE
                counter += 1
            held += view[pos:]
    yield cipher.seal(counter, True, held)


def encrypt_bytes(content_key: bytes, plaintext: bytes, *, salt: bytes | None = None) -> bytes:
    """Whole-buffer convenience form of `encrypt`."""
    return b"".join(encrypt(content_key, [plaintext], salt=salt))


def decrypt(content_key: bytes, chunks: Iterable[bytes]) -> Iterator[bytes]:
    """Decrypt a whole object from ciphertext chunks of any sizes; yields plaintext per segment.

    Raises FormatError on any malformation, including truncation, which can only be known at the
    end: the output is trustworthy once the iterator is exhausted without an error.
    """
    stride = SEGMENT_SIZE + layout.TAG_SIZE
    buffer = bytearray()
    cipher: _SegmentCipher | None = None
    counter = 0
    for chunk in chunks:
        buffer += chunk
        if cipher is None:
            if len(buffer) < HEADER_SIZE:
                continue
            cipher = _SegmentCipher(content_key, Header.parse(bytes(buffer[:HEADER_SIZE])))
            del buffer[:HEADER_SIZE]
        # As in `encrypt`: a segment is known not to be final once a byte beyond it has arrived.
        done = 0
        with memoryview(buffer) as view:
            while len(buffer) - done > stride:
                yield cipher.open(counter, False, view[done : done + stride])
                done += stride
                counter += 1
        del buffer[:done]
    if cipher is None:
        raise FormatError("encrypted object too short for its header")
    if len(buffer) < layout.TAG_SIZE:
        raise FormatError("encrypted object is truncated (final segment missing or cut short)")
    if len(buffer) == layout.TAG_SIZE and counter > 0:
        raise FormatError("encrypted object ends with an empty segment after full ones")
    yield cipher.open(counter, True, buffer)


def decrypt_bytes(content_key: bytes, ciphertext: bytes) -> bytes:
    """Whole-buffer convenience form of `decrypt`."""
    return b"".join(decrypt(content_key, [ciphertext]))


def read_header(fetch: Fetch) -> Header:
    """Fetch and parse an object's header (for example to learn its salt before unwrapping)."""
    return Header.parse(_fetch_exact(fetch, 0, HEADER_SIZE))


def _fetch_exact(fetch: Fetch, offset: int, length: int) -> bytes:
    data = fetch(offset, length)
    if len(data) != length:
        raise FormatError(
            f"encrypted object does not match its stated size "
            f"(asked for {length} bytes at {offset}, got {len(data)})"
        )
    return data


class Segments:
    """Opens one object's segments one at a time, from ciphertext the caller fetched: for a
    reader that fetches a range ahead and opens each segment only when it is used.

    `ciphertext_size` is the object's full size, as for `ObjectReader`: it fixes which segment
    is final. Segment `index` is exactly the bytes `layout.segment_offset(index)` onwards,
    `segment_plaintext_length(index) + TAG_SIZE` of them; anything else is a FormatError.
    """

    def __init__(self, content_key: bytes, header: Header, ciphertext_size: int) -> None:
        self.plaintext_size = layout.plaintext_size(ciphertext_size)
        self.count = layout.segment_count(self.plaintext_size)
        self._cipher = _SegmentCipher(content_key, header)

    def _check(self, index: int, ciphertext: Buffer) -> bool:
        """Whether segment `index` is the final one; FormatError if `ciphertext` cannot be it.
        (Every read opens a few: the length is worked out here, not by `layout`'s checks.)"""
        if not 0 <= index < self.count:
            raise FormatError(f"segment {index} is not in the object (it has {self.count})")
        final = index == self.count - 1
        plain = self.plaintext_size - index * SEGMENT_SIZE if final else SEGMENT_SIZE
        expected, got = plain + layout.TAG_SIZE, memoryview(ciphertext).nbytes
        if got != expected:
            raise FormatError(f"segment {index} must be {expected} bytes of ciphertext, got {got}")
        return final

    def open(self, index: int, ciphertext: Buffer) -> bytes:
        """The plaintext of segment `index`, authenticated."""
        return self._cipher.open(index, self._check(index, ciphertext), ciphertext)

    def open_into(self, index: int, ciphertext: Buffer, out: Buffer) -> None:
        """`open`, written into `out` (exactly the segment's plaintext length) instead of a new
        buffer. On a FormatError, `out` holds nothing to use."""
        self._cipher.open_into(index, self._check(index, ciphertext), ciphertext, out)


class ObjectReader:
    """Random-access decryption of one object through `fetch(offset, length) -> bytes`.

    `ciphertext_size` is the object's full size (from the manifest or the store); it fixes which
    segment is final. Each `read` makes exactly one `fetch` call for one contiguous range.
    """

    def __init__(
        self,
        content_key: bytes,
        fetch: Fetch,
        ciphertext_size: int,
        *,
        header: Header | None = None,
    ) -> None:
        self.plaintext_size = layout.plaintext_size(ciphertext_size)
        self.ciphertext_size = ciphertext_size
        self.header = read_header(fetch) if header is None else header
        self._fetch = fetch
        self._segments = Segments(content_key, self.header, ciphertext_size)

    def read(self, offset: int, length: int) -> bytes:
        """Plaintext bytes [offset, offset + length), shorter only at the end of the object."""
        where = layout.span(self.plaintext_size, offset, length)
        if where is None:
            return b""
        data = memoryview(
            _fetch_exact(self._fetch, where.ciphertext_offset, where.ciphertext_length)
        )
        stride = SEGMENT_SIZE + layout.TAG_SIZE
        parts = []
        for index in range(where.first, where.last + 1):
            start = (index - where.first) * stride
            parts.append(self._segments.open(index, data[start : start + stride]))
        plain = b"".join(parts)
        if where.skip == 0 and where.length == len(plain):
            return plain
        return bytes(memoryview(plain)[where.skip : where.skip + where.length])


def decrypt_range(
    content_key: bytes, fetch: Fetch, ciphertext_size: int, offset: int, length: int
) -> bytes:
    """One-shot form of `ObjectReader(...).read(offset, length)` (fetches the header too)."""
    return ObjectReader(content_key, fetch, ciphertext_size).read(offset, length)
