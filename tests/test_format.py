"""The STREAM object format (medfs/format.py): round trips, random access, strict parsing."""

from __future__ import annotations

import hashlib
import itertools
import random

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from medfs import format as fmt
from medfs import layout
from medfs.errors import FormatError

S = fmt.SEGMENT_SIZE
KEY = bytes(range(32))


def plaintext(size: int, seed: int = 0) -> bytes:
    return random.Random(seed).randbytes(size)


def chunked(data: bytes, size: int) -> list[bytes]:
    return [data[i : i + size] for i in range(0, len(data), size)]


class Fetcher:
    """A fetch function over bytes that records every call."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.calls: list[tuple[int, int]] = []

    def __call__(self, offset: int, length: int) -> bytes:
        self.calls.append((offset, length))
        return self.data[offset : offset + length]


INTERESTING_SIZES = [0, 1, S - 1, S, S + 1, 2 * S, 3 * S + 17]


@pytest.mark.parametrize("size", INTERESTING_SIZES)
def test_round_trip_and_size(size):
    data = plaintext(size)
    obj = fmt.encrypt_bytes(KEY, data)
    assert len(obj) == layout.ciphertext_size(size)
    assert fmt.decrypt_bytes(KEY, obj) == data


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 3 * S + 100), st.integers(1, 2 * S), st.integers(1, 2 * S), st.integers())
def test_round_trip_with_any_chunking(size, in_chunk, out_chunk, seed):
    data = plaintext(size, seed)
    salt = seed.to_bytes(32, "big", signed=True) if -(2**255) <= seed < 2**255 else bytes(32)
    pieces = list(fmt.encrypt(KEY, chunked(data, in_chunk), salt=salt))
    obj = b"".join(pieces)
    assert len(obj) == layout.ciphertext_size(size)
    # One encoding per plaintext and salt, however the plaintext came in.
    assert obj == fmt.encrypt_bytes(KEY, data, salt=salt)
    # The encryptor yields the header, then one item per segment.
    assert len(pieces) == 1 + layout.segment_count(size)
    assert b"".join(fmt.decrypt(KEY, chunked(obj, out_chunk))) == data


def test_empty_chunks_change_nothing():
    data = plaintext(S)
    salt = bytes(32)
    a = fmt.encrypt_bytes(KEY, data, salt=salt)
    b = b"".join(fmt.encrypt(KEY, [b"", data[:10], b"", data[10:], b""], salt=salt))
    assert a == b
    assert b"".join(fmt.decrypt(KEY, [b"", *chunked(a, 1000), b""])) == data


def test_each_object_has_a_fresh_salt():
    a = fmt.encrypt_bytes(KEY, b"same")
    b = fmt.encrypt_bytes(KEY, b"same")
    assert (
        fmt.Header.parse(a[: fmt.HEADER_SIZE]).salt != fmt.Header.parse(b[: fmt.HEADER_SIZE]).salt
    )
    assert a[fmt.HEADER_SIZE :] != b[fmt.HEADER_SIZE :]


def test_new_content_keys_are_random_and_sized():
    keys = {fmt.new_content_key() for _ in range(4)}
    assert len(keys) == 4
    assert all(len(key) == 32 for key in keys)


@settings(max_examples=60, deadline=None)
@given(st.data(), st.sampled_from([*INTERESTING_SIZES, 5 * S + 3]))
@example(data=None, size=0)
def test_range_read_equals_slice(data, size):
    obj = fmt.encrypt_bytes(KEY, plaintext(size))
    plain = plaintext(size)
    if data is None:
        offset, length = 0, 0
    else:
        offset = data.draw(st.integers(0, size + S), label="offset")
        length = data.draw(st.integers(0, size + S), label="length")
    fetch = Fetcher(obj)
    reader = fmt.ObjectReader(KEY, fetch, len(obj))
    assert reader.plaintext_size == size
    fetch.calls.clear()
    assert reader.read(offset, length) == plain[offset : offset + length]
    # At most one contiguous fetch per read (none for an empty read before the end).
    assert len(fetch.calls) <= 1


@settings(max_examples=30, deadline=None)
@given(st.integers(0, 4 * S), st.integers(0, 4 * S), st.integers(0, 4 * S), st.integers())
def test_decrypt_range_at_arbitrary_sizes(size, offset, length, seed):
    plain = plaintext(size, seed)
    obj = fmt.encrypt_bytes(KEY, plain)
    got = fmt.decrypt_range(KEY, Fetcher(obj), len(obj), offset, length)
    assert got == plain[offset : offset + length]


def test_segment_boundaries_exactly():
    size = 3 * S
    plain = plaintext(size)
    obj = fmt.encrypt_bytes(KEY, plain)
    reader = fmt.ObjectReader(KEY, Fetcher(obj), len(obj))
    for offset, length in [(S - 1, 2), (S, S), (S - 1, S + 2), (2 * S, S), (0, size), (size, 5)]:
        assert reader.read(offset, length) == plain[offset : offset + length]


def test_each_read_is_one_fetch_of_just_the_needed_segments():
    obj = fmt.encrypt_bytes(KEY, plaintext(4 * S))
    fetch = Fetcher(obj)
    reader = fmt.ObjectReader(KEY, fetch, len(obj))
    assert fetch.calls == [(0, fmt.HEADER_SIZE)]
    fetch.calls.clear()
    reader.read(S + 5, S)  # spans segments 1 and 2
    stride = S + layout.TAG_SIZE
    assert fetch.calls == [(layout.segment_offset(1), 2 * stride)]


def test_reader_with_known_header_fetches_no_header():
    obj = fmt.encrypt_bytes(KEY, b"hello")
    header = fmt.Header.parse(obj[: fmt.HEADER_SIZE])
    fetch = Fetcher(obj)
    reader = fmt.ObjectReader(KEY, fetch, len(obj), header=header)
    assert fetch.calls == []
    assert reader.read(0, 100) == b"hello"


def test_read_header_gives_the_salt():
    obj = fmt.encrypt_bytes(KEY, b"x", salt=b"s" * 32)
    assert fmt.read_header(Fetcher(obj)).salt == b"s" * 32


def test_reading_to_the_end_detects_truncation_at_a_segment_boundary():
    plain = plaintext(3 * S)
    obj = fmt.encrypt_bytes(KEY, plain)
    cut = obj[: layout.segment_offset(2)]  # two full segments, neither final
    reader = fmt.ObjectReader(KEY, Fetcher(cut), len(cut))
    assert reader.read(0, 10) == plain[:10]  # random access still works inside
    with pytest.raises(FormatError):
        reader.read(S, S)  # reaches the (apparent) end
    with pytest.raises(FormatError):
        reader.read(2 * S, 1)  # past the end: the final segment is still checked
    with pytest.raises(FormatError):
        fmt.decrypt_bytes(KEY, cut)


def test_wrong_key_fails_both_ways():
    obj = fmt.encrypt_bytes(KEY, b"secret")
    other = bytes(32)
    with pytest.raises(FormatError, match="authentication"):
        fmt.decrypt_bytes(other, obj)
    with pytest.raises(FormatError):
        fmt.decrypt_range(other, Fetcher(obj), len(obj), 0, 6)


def test_fetch_returning_short_data_is_a_format_error():
    obj = fmt.encrypt_bytes(KEY, plaintext(S + 10))

    def short_fetch(offset: int, length: int) -> bytes:
        return obj[offset : offset + length][:-1]

    with pytest.raises(FormatError, match="does not match its stated size"):
        fmt.ObjectReader(KEY, short_fetch, len(obj))
    reader = fmt.ObjectReader(KEY, Fetcher(obj[: fmt.HEADER_SIZE]), len(obj))
    with pytest.raises(FormatError, match="does not match its stated size"):
        reader.read(0, 1)


def test_impossible_ciphertext_size_is_rejected_before_fetching():
    fetch = Fetcher(b"")
    with pytest.raises(FormatError, match=r"impossible size|too short"):
        fmt.ObjectReader(KEY, fetch, fmt.HEADER_SIZE + S + 16 + 3)
    assert fetch.calls == []


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda h: h[:-1], "must be 42 bytes"),
        (lambda h: h + b"\x00", "must be 42 bytes"),
        (lambda h: b"X" + h[1:], "bad magic"),
        (lambda h: h[:8] + b"\x02" + h[9:], "version 2"),
        (lambda h: h[:8] + b"\x00" + h[9:], "version 0"),
        (lambda h: h[:9] + b"\x11" + h[10:], "segment size"),
    ],
)
def test_header_parse_is_strict(mutate, message):
    good = fmt.Header(salt=bytes(32)).to_bytes()
    assert fmt.Header.parse(good).salt == bytes(32)
    with pytest.raises(FormatError, match=message):
        fmt.Header.parse(mutate(good))


def test_every_header_bit_is_authenticated():
    obj = fmt.encrypt_bytes(KEY, b"payload")
    for bit in range(fmt.HEADER_SIZE * 8):
        mutated = bytearray(obj)
        mutated[bit // 8] ^= 1 << (bit % 8)
        with pytest.raises(FormatError):
            fmt.decrypt_bytes(KEY, bytes(mutated))


def test_streams_are_lazy_in_both_directions():
    consumed = 0

    def source():
        nonlocal consumed
        for _ in range(1000):
            consumed += 1
            yield b"\x00" * 4096

    out = fmt.encrypt(KEY, source())
    first = list(itertools.islice(out, 3))  # header and two segments
    assert len(first) == 3
    assert consumed <= 2 * S // 4096 + 2
    obj_chunks = fmt.encrypt(KEY, [b"\x01" * (10 * S)])
    pulled = 0

    def counted():
        nonlocal pulled
        for chunk in obj_chunks:
            pulled += 1
            yield chunk

    plain = fmt.decrypt(KEY, counted())
    assert next(plain) == b"\x01" * S
    assert pulled <= 3


def test_large_single_chunk_is_fine():
    data = plaintext(40 * S + 7)
    obj = fmt.encrypt_bytes(KEY, data)
    assert hashlib.sha256(fmt.decrypt_bytes(KEY, obj)).digest() == hashlib.sha256(data).digest()


def test_bad_key_length_is_a_programming_error():
    with pytest.raises(ValueError, match="32 bytes"):
        fmt.encrypt_bytes(b"short", b"")


def _segment(obj: bytes, index: int) -> bytes:
    """Segment `index` of `obj` as a reader fetches it."""
    start = layout.segment_offset(index)
    return obj[start : start + S + layout.TAG_SIZE]


def test_segments_open_each_segment_alone_and_into_a_buffer():
    plain = plaintext(2 * S + 100)
    obj = fmt.encrypt_bytes(KEY, plain)
    segments = fmt.Segments(KEY, fmt.Header.parse(obj[: fmt.HEADER_SIZE]), len(obj))
    assert [
        layout.segment_plaintext_length(i, segments.plaintext_size) for i in range(segments.count)
    ] == [S, S, 100]
    for index in (2, 0, 1):  # any order: each is opened with its own counter
        want = plain[index * S : index * S + layout.segment_plaintext_length(index, len(plain))]
        assert segments.open(index, memoryview(_segment(obj, index))) == want
        out = bytearray(len(want))
        segments.open_into(index, _segment(obj, index), out)
        assert out == want


@pytest.mark.parametrize(
    ("index", "change", "message"),
    [
        (1, lambda seg: seg[:5] + bytes([seg[5] ^ 1]) + seg[6:], "fails authentication"),
        (1, lambda seg: seg[:-1] + bytes([seg[-1] ^ 0x80]), "fails authentication"),  # tag
        (1, lambda seg: seg[:-1], "must be 65552 bytes"),  # cut short
        (1, lambda seg: seg + b"\0", "must be 65552 bytes"),  # one byte too many
        (2, lambda seg: seg[:-1], "must be 116 bytes"),  # the final segment, cut
        (3, lambda seg: seg, "not in the object"),  # no such segment
        (-1, lambda seg: seg, "not in the object"),
    ],
)
def test_segments_refuse_what_is_not_that_segment(index, change, message):
    obj = fmt.encrypt_bytes(KEY, plaintext(2 * S + 100))
    segments = fmt.Segments(KEY, fmt.Header.parse(obj[: fmt.HEADER_SIZE]), len(obj))
    ciphertext = change(_segment(obj, max(index, 0)))
    with pytest.raises(FormatError, match=message):
        segments.open(index, ciphertext)
    out = bytearray(layout.segment_plaintext_length(max(0, min(index, 2)), 2 * S + 100))
    with pytest.raises(FormatError, match=message):
        segments.open_into(index, ciphertext, out)


def test_segments_bind_position_finality_and_object():
    plain = plaintext(3 * S)
    obj = fmt.encrypt_bytes(KEY, plain)
    header = fmt.Header.parse(obj[: fmt.HEADER_SIZE])
    segments = fmt.Segments(KEY, header, len(obj))
    with pytest.raises(FormatError, match=r"segment 1 .* fails authentication"):
        segments.open(1, _segment(obj, 0))  # moved to another position
    # Cut after two segments, the second now looks final: it was sealed as not final.
    cut = fmt.Segments(KEY, header, layout.segment_offset(2))
    assert cut.open(0, _segment(obj, 0)) == plain[:S]
    with pytest.raises(FormatError, match="fails authentication"):
        cut.open(1, _segment(obj, 1))
    other = fmt.encrypt_bytes(KEY, plaintext(3 * S, seed=1))  # same key, another salt
    with pytest.raises(FormatError, match="fails authentication"):
        segments.open(1, _segment(other, 1))
    with pytest.raises(FormatError, match="fails authentication"):
        fmt.Segments(bytes(32), header, len(obj)).open(0, _segment(obj, 0))  # wrong key
