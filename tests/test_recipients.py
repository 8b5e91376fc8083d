"""Recipient key wrapping (medfs/recipients.py): round trips, bindings, strict stanzas."""

from __future__ import annotations

import functools

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from hypothesis import given
from hypothesis import strategies as st

from medfs import recipients as r
from medfs.errors import FormatError, NotForIdentityError
from medfs.recipients import Kind, Stanza

KEY = bytes(range(32))
CONTEXT = r.entry_context(b"entry-1", b"s" * 32)


@functools.cache
def secret(kind: Kind, name: str = "alice") -> r.RecipientSecret:
    raw = r.generate_secret(kind)
    public = r.public_key_of(kind, raw)
    # Any encoding works for the fingerprint here; identity.py fingerprints the whole identity.
    return r.RecipientSecret(kind, raw, r.fingerprint(name.encode() + public))


@pytest.mark.parametrize("kind", list(Kind))
def test_round_trip_every_kind(kind):
    me = secret(kind)
    stanza = r.wrap(KEY, me.recipient(), CONTEXT)
    assert stanza.kind is kind
    assert stanza.fingerprint == me.fingerprint
    assert me.unwrap(stanza, CONTEXT) == KEY
    again = Stanza.from_text(stanza.to_text())
    assert again == stanza
    assert Stanza.from_bytes(stanza.to_bytes()) == stanza
    assert me.unwrap(again, CONTEXT) == KEY


@pytest.mark.parametrize("kind", list(Kind))
def test_wraps_are_randomised(kind):
    me = secret(kind)
    assert r.wrap(KEY, me.recipient(), CONTEXT) != r.wrap(KEY, me.recipient(), CONTEXT)


def test_body_sizes():
    assert len(r.wrap(KEY, secret(Kind.MLKEM768_X25519).recipient(), CONTEXT).body) == 1168
    assert len(r.wrap(KEY, secret(Kind.X25519).recipient(), CONTEXT).body) == 80
    assert len(r.wrap(KEY, secret(Kind.RSA_OAEP).recipient(), CONTEXT).body) == 384


@pytest.mark.parametrize("kind", list(Kind))
def test_wrap_moved_to_another_entry_does_not_open(kind):
    me = secret(kind)
    stanza = r.wrap(KEY, me.recipient(), CONTEXT)
    with pytest.raises(FormatError, match="authentication"):
        me.unwrap(stanza, r.entry_context(b"entry-2", b"s" * 32))
    with pytest.raises(FormatError, match="authentication"):
        me.unwrap(stanza, r.entry_context(b"entry-1", b"t" * 32))


@pytest.mark.parametrize("kind", list(Kind))
def test_wrap_for_someone_else_is_not_for_this_identity(kind):
    me, other = secret(kind), secret(kind, "bob")
    stanza = r.wrap(KEY, other.recipient(), CONTEXT)
    with pytest.raises(NotForIdentityError):
        me.unwrap(stanza, CONTEXT)


@pytest.mark.parametrize("kind", [Kind.MLKEM768_X25519, Kind.X25519])
def test_relabelled_fingerprint_fails_authentication(kind):
    # The fingerprint is part of the HPKE info, so relabelling a stanza does not make it open.
    me = secret(kind)
    other_twin = r.RecipientSecret(kind, me.secret_bytes(), r.fingerprint(b"someone else"))
    stanza = r.wrap(KEY, other_twin.recipient(), CONTEXT)
    relabelled = Stanza(kind, me.fingerprint, stanza.body)
    with pytest.raises(FormatError):
        me.unwrap(relabelled, CONTEXT)


@pytest.mark.parametrize("kind", list(Kind))
def test_flipped_body_bits_fail(kind):
    me = secret(kind)
    stanza = r.wrap(KEY, me.recipient(), CONTEXT)
    for index in (0, len(stanza.body) // 2, len(stanza.body) - 1):
        body = bytearray(stanza.body)
        body[index] ^= 0x80
        with pytest.raises(FormatError):
            me.unwrap(Stanza(kind, stanza.fingerprint, bytes(body)), CONTEXT)


def test_kind_mismatch_with_matching_fingerprint_is_corrupt():
    me = secret(Kind.MLKEM768_X25519)
    other = secret(Kind.X25519)
    body = r.wrap(KEY, other.recipient(), CONTEXT).body
    with pytest.raises(FormatError, match="does not match"):
        me.unwrap(Stanza(Kind.X25519, me.fingerprint, body), CONTEXT)


def test_unwrap_any():
    me, bob = secret(Kind.MLKEM768_X25519), secret(Kind.MLKEM768_X25519, "bob")
    for_bob = r.wrap(KEY, bob.recipient(), CONTEXT)
    for_me = r.wrap(KEY, me.recipient(), CONTEXT)
    assert me.unwrap_any([for_bob, for_me], CONTEXT) == KEY
    with pytest.raises(NotForIdentityError, match="no wrapped key"):
        me.unwrap_any([for_bob], CONTEXT)
    with pytest.raises(NotForIdentityError):
        me.unwrap_any([], CONTEXT)
    moved = r.wrap(KEY, me.recipient(), b"elsewhere")
    with pytest.raises(FormatError):
        me.unwrap_any([for_bob, moved], CONTEXT)
    assert me.unwrap_any([moved, for_me], CONTEXT) == KEY


def test_stanza_text_form():
    me = secret(Kind.X25519)
    text = r.wrap(KEY, me.recipient(), CONTEXT).to_text()
    kind, fpr, body = text.split(" ")
    assert kind == "x25519"
    assert fpr == me.fingerprint
    assert "=" not in body
    assert text.isascii()
    assert "\n" not in text


@pytest.mark.parametrize(
    "mutate",
    [
        lambda t: t + "\n",
        lambda t: " " + t,
        lambda t: t + " ",
        lambda t: t.replace(" ", "  ", 1),
        lambda t: t.replace(" ", "\t", 1),
        lambda t: t + "==",
        lambda t: "X25519" + t[len("x25519") :],  # kinds are case-sensitive
        lambda t: "rsa-pss" + t[len("x25519") :],
        lambda t: t.replace("medfs1", "medfs2", 1),
        lambda t: t.replace("medfs1", "MEDFS1", 1),
        lambda t: t[:-1] + "!",
        lambda t: "",
    ],
)
def test_stanza_parse_is_strict(mutate):
    text = r.wrap(KEY, secret(Kind.X25519).recipient(), CONTEXT).to_text()
    with pytest.raises(FormatError):
        Stanza.from_text(mutate(text))


@pytest.mark.parametrize("kind", list(Kind))
def test_stanza_body_length_is_checked(kind):
    body = r.wrap(KEY, secret(kind).recipient(), CONTEXT).body
    fpr = secret(kind).fingerprint
    for bad in (body[:-1], body + b"\x00") if kind is not Kind.RSA_OAEP else (body[:100], body * 6):
        with pytest.raises(FormatError, match="body"):
            Stanza(kind, fpr, bad)
        with pytest.raises(FormatError, match="body"):
            Stanza.from_text(f"{kind.value} {fpr} {r.b64encode(bad)}")


def test_stanza_bytes_must_be_ascii():
    with pytest.raises(FormatError, match="ASCII"):
        Stanza.from_bytes("x25519 medfs1é".encode())


def test_non_canonical_base64_is_rejected():
    assert r.b64decode("AQ") == b"\x01"
    with pytest.raises(FormatError, match="non-canonical"):
        r.b64decode("AR")  # same byte, a non-zero unused bit
    for bad in ("AQ==", "A", "A Q", "AQ\n", "-_"):
        with pytest.raises(FormatError):
            r.b64decode(bad)


@given(st.binary(max_size=200))
def test_base64_round_trip(data):
    assert r.b64decode(r.b64encode(data)) == data


def test_fingerprints_are_short_stable_and_printable():
    fpr = r.fingerprint(b"public key")
    assert fpr == r.fingerprint(b"public key")
    assert fpr != r.fingerprint(b"public kez")
    assert fpr.startswith("medfs1")
    assert len(fpr) == 38
    assert r.is_fingerprint(fpr)
    assert not r.is_fingerprint(fpr + "a")
    assert not r.is_fingerprint(fpr.upper())


def test_entry_context_is_unambiguous():
    assert r.entry_context(b"a", b"bc") != r.entry_context(b"ab", b"c")
    with pytest.raises(ValueError):
        r.entry_context(b"", b"salt")


def test_wrap_demands_a_context_and_a_content_key():
    me = secret(Kind.X25519)
    with pytest.raises(ValueError, match="context"):
        r.wrap(KEY, me.recipient(), b"")
    with pytest.raises(ValueError, match="32 bytes"):
        r.wrap(KEY[:16], me.recipient(), CONTEXT)


def test_rsa_below_3072_bits_is_refused():
    small = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    with pytest.raises(FormatError, match="at least 3072"):
        r.rsa_secret(small)
    with pytest.raises(FormatError, match="at least 3072"):
        r.generate_secret(Kind.RSA_OAEP, rsa_bits=2048)
    spki = small.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    with pytest.raises(FormatError, match="at least 3072"):
        r.Recipient(Kind.RSA_OAEP, spki, r.fingerprint(spki))


def test_rsa_ciphertext_of_wrong_length_is_corrupt():
    me = secret(Kind.RSA_OAEP)
    stanza = r.wrap(KEY, me.recipient(), CONTEXT)
    with pytest.raises(FormatError):
        me.unwrap(Stanza(Kind.RSA_OAEP, me.fingerprint, stanza.body + b"\x00"), CONTEXT)


@pytest.mark.parametrize(
    ("kind", "public"),
    [
        (Kind.X25519, bytes(31)),
        (Kind.MLKEM768_X25519, bytes(1215)),
        (Kind.MLKEM768_X25519, b"\xff" * 1216),  # ML-KEM coefficients out of range
        (Kind.RSA_OAEP, b"not DER"),
    ],
)
def test_malformed_public_keys_are_rejected(kind, public):
    with pytest.raises(FormatError):
        r.Recipient(kind, public, r.fingerprint(public))


def test_low_order_x25519_key_cannot_be_wrapped_to():
    recipient = r.Recipient(Kind.X25519, bytes(32), r.fingerprint(b"zero"))
    with pytest.raises(FormatError, match="cannot wrap"):
        r.wrap(KEY, recipient, CONTEXT)


def test_secret_encodings_round_trip_and_are_strict():
    for kind in Kind:
        me = secret(kind)
        assert r.public_key_of(kind, me.secret_bytes()) == me.public_key
    with pytest.raises(FormatError):
        r.public_key_of(Kind.X25519, bytes(33))
    with pytest.raises(FormatError):
        r.public_key_of(Kind.MLKEM768_X25519, bytes(95))
    with pytest.raises(FormatError):
        r.public_key_of(Kind.RSA_OAEP, secret(Kind.RSA_OAEP).secret_bytes() + b"\x00")


def test_secret_repr_shows_no_key_material():
    me = secret(Kind.X25519)
    assert me.secret_bytes().hex() not in repr(me)
    assert me.fingerprint in repr(me)
