"""Offset arithmetic between plaintext and ciphertext (medfs/layout.py)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from medfs import layout
from medfs.errors import FormatError

H = layout.HEADER_SIZE
T = layout.TAG_SIZE
S = layout.SEGMENT_SIZE


@pytest.mark.parametrize(
    ("plain", "cipher"),
    [
        (0, H + T),
        (1, H + 1 + T),
        (S - 1, H + S - 1 + T),
        (S, H + S + T),
        (S + 1, H + S + 1 + 2 * T),
        (2 * S, H + 2 * S + 2 * T),
        (10 * S + 5, H + 10 * S + 5 + 11 * T),
    ],
)
def test_sizes_at_v1_segment_size(plain, cipher):
    assert layout.ciphertext_size(plain) == cipher
    assert layout.plaintext_size(cipher) == plain


@pytest.mark.parametrize(
    "cipher",
    [
        0,
        H,
        H + T - 1,  # too short for even the empty final segment
        H + S + T + 1,  # a one-byte "segment" shorter than its tag
        H + S + T + T - 1,
        H + S + T + T,  # an empty final segment after a full one: a second encoding of S bytes
    ],
)
def test_impossible_ciphertext_sizes_are_format_errors(cipher):
    with pytest.raises(FormatError):
        layout.plaintext_size(cipher)


def test_segment_offsets_and_lengths():
    assert layout.segment_offset(0) == H
    assert layout.segment_offset(3) == H + 3 * (S + T)
    assert layout.segment_count(0) == 1
    assert layout.segment_count(S) == 1
    assert layout.segment_count(S + 1) == 2
    assert layout.segment_plaintext_length(0, 0) == 0
    assert layout.segment_plaintext_length(1, S + 1) == 1
    with pytest.raises(ValueError, match="out of range"):
        layout.segment_plaintext_length(2, S + 1)


@given(st.integers(0, 10_000), st.integers(1, 64))
def test_size_round_trip(plain, segment):
    assert layout.plaintext_size(layout.ciphertext_size(plain, segment), segment) == plain


@given(st.integers(0, 10_000), st.integers(1, 64))
def test_every_valid_ciphertext_size_has_exactly_one_plaintext_size(cipher, segment):
    try:
        plain = layout.plaintext_size(cipher, segment)
    except FormatError:
        return
    assert layout.ciphertext_size(plain, segment) == cipher


def _segments(plain: bytes, segment: int) -> list[bytes]:
    count = layout.segment_count(len(plain), segment)
    return [plain[i * segment : (i + 1) * segment] for i in range(count)]


@given(st.data(), st.integers(0, 500), st.integers(1, 40))
def test_span_selects_the_segments_holding_the_range(data, size, segment):
    plain = bytes(i % 251 for i in range(size))
    offset = data.draw(st.integers(0, size + 50), label="offset")
    length = data.draw(st.integers(0, size + 50), label="length")
    where = layout.span(size, offset, length, segment)
    count = layout.segment_count(size, segment)
    if where is None:
        assert length == 0
        assert offset < size
        return
    parts = _segments(plain, segment)
    joined = b"".join(parts[where.first : where.last + 1])
    assert joined[where.skip : where.skip + where.length] == plain[offset : offset + length]
    assert where.ciphertext_offset == layout.segment_offset(where.first, segment)
    expected = sum(len(p) + layout.TAG_SIZE for p in parts[where.first : where.last + 1])
    assert where.ciphertext_length == expected
    assert where.last_is_final == (where.last == count - 1)
    # Reaching the end must include the final segment, so its flag gets checked.
    if offset + length >= size:
        assert where.last_is_final


def test_span_inside_one_segment_reads_only_that_segment():
    where = layout.span(3 * S, S + 10, 20)
    assert where is not None
    assert (where.first, where.last, where.skip, where.length) == (1, 1, 10, 20)
    assert where.ciphertext_length == S + T
    assert not where.last_is_final


def test_span_past_the_end_still_reads_the_final_segment():
    where = layout.span(S + 5, S + 100, 10)
    assert where is not None
    assert (where.first, where.last, where.length) == (1, 1, 0)
    assert where.last_is_final


def test_negative_arguments_are_rejected():
    with pytest.raises(ValueError):
        layout.span(10, -1, 1)
    with pytest.raises(ValueError):
        layout.ciphertext_size(-1)
