"""Offset arithmetic between a plaintext and its encrypted object (format v1).

An object is a fixed-size header followed by segments. Every segment but the last holds exactly
`segment_size` plaintext bytes; the last holds 1..segment_size bytes, or 0 bytes only when the
whole plaintext is empty. Each segment carries a `TAG_SIZE`-byte authentication tag after its
ciphertext. Because that rule leaves exactly one segmentation for each plaintext size, the
plaintext size follows from the ciphertext size and vice versa, and a ciphertext size that no
plaintext size maps to is rejected.

This module only counts; it never touches keys or bytes. The segment size is a parameter so the
arithmetic can be property-tested on tiny segments; objects on disk use `SEGMENT_SIZE`.
"""

from __future__ import annotations

from dataclasses import dataclass

from medfs.errors import FormatError

HEADER_SIZE = 42
TAG_SIZE = 16
SEGMENT_SIZE = 65536


@dataclass(frozen=True)
class Span:
    """The segments a plaintext byte range needs, and where to find them.

    Fetch `ciphertext_length` bytes at `ciphertext_offset` (one contiguous read), decrypt segments
    `first..last` inclusive, and take `length` plaintext bytes starting `skip` bytes into the first
    segment's plaintext. `last_is_final` says whether segment `last` is the object's final one,
    which is the flag its nonce must carry.
    """

    first: int
    last: int
    ciphertext_offset: int
    ciphertext_length: int
    skip: int
    length: int
    last_is_final: bool


def _check_segment_size(segment_size: int) -> None:
    if segment_size < 1:
        raise ValueError(f"segment size must be positive, not {segment_size}")


def segment_count(plaintext_size: int, segment_size: int = SEGMENT_SIZE) -> int:
    """How many segments a plaintext of this size is cut into (an empty one still has one)."""
    _check_segment_size(segment_size)
    if plaintext_size < 0:
        raise ValueError(f"plaintext size must not be negative, not {plaintext_size}")
    return max(1, -(-plaintext_size // segment_size))


def ciphertext_size(plaintext_size: int, segment_size: int = SEGMENT_SIZE) -> int:
    """The size of the object that encrypts `plaintext_size` bytes."""
    return HEADER_SIZE + plaintext_size + TAG_SIZE * segment_count(plaintext_size, segment_size)


def plaintext_size(ciphertext_size: int, segment_size: int = SEGMENT_SIZE) -> int:
    """The plaintext size an object of `ciphertext_size` bytes holds; FormatError if none does."""
    _check_segment_size(segment_size)
    body = ciphertext_size - HEADER_SIZE
    if body < TAG_SIZE:
        raise FormatError(f"encrypted object too short ({ciphertext_size} bytes)")
    stride = segment_size + TAG_SIZE
    full, rest = divmod(body, stride)
    if rest == 0:
        return full * segment_size
    # A partial last segment needs its tag plus at least one byte, unless it is the only segment
    # (the empty plaintext); an empty final segment after full ones would be a second encoding.
    if rest < TAG_SIZE or (rest == TAG_SIZE and full > 0):
        raise FormatError(f"encrypted object has an impossible size ({ciphertext_size} bytes)")
    return full * segment_size + rest - TAG_SIZE


def segment_plaintext_length(
    index: int, plaintext_size: int, segment_size: int = SEGMENT_SIZE
) -> int:
    """How many plaintext bytes segment `index` holds."""
    count = segment_count(plaintext_size, segment_size)
    if not 0 <= index < count:
        raise ValueError(f"segment {index} out of range (object has {count})")
    if index < count - 1:
        return segment_size
    return plaintext_size - index * segment_size


def segment_offset(index: int, segment_size: int = SEGMENT_SIZE) -> int:
    """Where segment `index` starts in the object."""
    _check_segment_size(segment_size)
    return HEADER_SIZE + index * (segment_size + TAG_SIZE)


def span(
    plaintext_size: int, offset: int, length: int, segment_size: int = SEGMENT_SIZE
) -> Span | None:
    """The segments holding plaintext bytes [offset, offset + length), clamped to the end.

    Returns None when nothing has to be read (length 0 before the end). A range that reaches the
    end of the plaintext (or starts at or after it) always includes the final segment, so a reader
    that reads until it gets no more bytes has authenticated the final-segment flag and so has
    detected truncation.
    """
    if offset < 0 or length < 0:
        raise ValueError(f"offset and length must not be negative ({offset}, {length})")
    count = segment_count(plaintext_size, segment_size)
    end = min(offset + length, plaintext_size)
    if end >= plaintext_size:
        last = count - 1
        first = min(offset // segment_size, last)
    elif length == 0:
        return None
    else:
        first = offset // segment_size
        last = (end - 1) // segment_size
    start = segment_offset(first, segment_size)
    stop = segment_offset(last, segment_size) + (
        segment_plaintext_length(last, plaintext_size, segment_size) + TAG_SIZE
    )
    skip = min(offset, plaintext_size) - first * segment_size
    return Span(
        first=first,
        last=last,
        ciphertext_offset=start,
        ciphertext_length=stop - start,
        skip=skip,
        length=max(0, end - offset),
        last_is_final=last == count - 1,
    )
