"""Share manifests (medfs/sharing.py): round trips, and refusal of every edit, forward and fake."""

from __future__ import annotations

import dataclasses
import functools
import json
import os

import pytest
from cryptography.hazmat.primitives.asymmetric import rsa
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from medfs import format, recipients, sharing
from medfs.errors import FormatError, NotForIdentityError, SignatureError
from medfs.identity import Identity
from medfs.recipients import Kind, Stanza
from medfs.sharing import Provider, SharedEntry, ShareManifest

KEY_A = bytes(range(32))
KEY_B = bytes(range(32, 64))
SALT_A = b"a" * 32
SALT_B = b"b" * 32
CID_A = "bafkreigh2akiscaildcqabsyg3dfr6chu3fgpregiymsck7e7aqa4s52zy"
CID_B = "bafkreibm6jg3ux5qumhcn2b3flc3tyu6dmlb4xa7u5bf44yegnrjhc4yeq"
PEER = "12D3KooWDpJ7As7BWAwRMfu1VU2WCqNjvq387JEYKDBj4kx6nXTN"


@functools.cache
def ident(kind: Kind, name: str = "") -> Identity:
    """One identity per (kind, name); `name` only tells people apart. One RSA key in all."""
    if kind is Kind.RSA_OAEP:
        return Identity.from_rsa_key(rsa_key())
    return Identity.generate(kind)


@functools.cache
def rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=3072)


def alice() -> Identity:
    return ident(Kind.MLKEM768_X25519, "alice")


def bob() -> Identity:
    return ident(Kind.X25519, "bob")


def carol() -> Identity:
    return ident(Kind.X25519, "carol")


def mallory() -> Identity:
    return ident(Kind.X25519, "mallory")


def file_entry(path, recipient, key=KEY_A, salt=SALT_A, cid=CID_A, entry_id=None, size=11):
    entry_id = entry_id or os.urandom(16)
    context = recipients.entry_context(entry_id, salt)
    stanza = recipients.wrap(key, recipient.recipient(), context).to_bytes()
    return SharedEntry(
        path=path,
        kind="file",
        mode=0o640,
        mtime_ns=1_700_000_000_123_456_789,
        size=size,
        entry_id=entry_id,
        cid=cid,
        salt=salt,
        stanza=stanza,
    )


def dir_entry(path, entry_id=None):
    return SharedEntry(path, "dir", 0o750, 1_700_000_000_000_000_000, 0, entry_id or os.urandom(16))


def link_entry(path, target=b"../elsewhere"):
    return SharedEntry(
        path, "symlink", 0o777, -5, len(target), os.urandom(16), target=target
    )  # a time before 1970 is allowed


def entries_for(recipient):
    return (
        dir_entry("labs"),
        file_entry("labs/2024 blood panel.pdf", recipient),
        dir_entry("labs/imaging"),
        file_entry("labs/imaging/knee-mri.dcm", recipient, KEY_B, SALT_B, CID_B, size=0),
        link_entry("labs/latest"),
        file_entry("notes-é😀.txt", recipient),
    )


def make_manifest(issuer=None, to=None, **changes) -> ShareManifest:
    issuer = issuer or alice()
    recipient = to or bob().public
    fields = {
        "issuer": issuer.public,
        "recipient": recipient.fingerprint,
        "sequence": 3,
        "created_ns": 1_700_000_001_000_000_000,
        "name": "records",
        "providers": (
            Provider(PEER, (f"/ip4/127.0.0.1/tcp/4001/p2p/{PEER}", "/ip6/::1/tcp/4001")),
        ),
        "entries": entries_for(recipient),
    }
    fields.update(changes)
    return ShareManifest(**fields)


@functools.cache
def sample() -> tuple[ShareManifest, bytes]:
    """Alice's manifest for Bob, sealed once."""
    manifest = make_manifest()
    return manifest, sharing.seal(manifest, alice(), bob().public)


def signed_parts() -> tuple[bytes, bytes]:
    """What Bob (or anyone holding Bob's key) sees inside the envelope: body and signature."""
    return sharing._split_signed(sharing._decrypt_envelope(sample()[1], bob()))


def envelope(body: bytes, signature: bytes, to=None) -> bytes:
    """A valid encryption around any body and signature: anyone with a public file can do this."""
    blob = len(body).to_bytes(4, "big") + body + signature
    return sharing._encrypt_envelope(blob, (to or bob()).public)


def signed_by(who: Identity, body: bytes, to=None) -> bytes:
    return sharing._encrypt_envelope(sharing._sign(body, who), (to or bob()).public)


def canonical(tree) -> bytes:
    return json.dumps(tree, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def refused_as_format_error(data: bytes) -> FormatError:
    """Opening fails with a plain FormatError (corrupt or malformed, not a signature problem)."""
    with pytest.raises(FormatError) as info:
        sharing.open_manifest(data, bob(), alice().public)
    assert not isinstance(info.value, SignatureError)
    return info.value


# --- round trips --------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", list(Kind))
def test_round_trip_every_recipient_kind(kind):
    recipient = ident(kind, "recipient")
    manifest = make_manifest(to=recipient.public)
    sealed = sharing.seal(manifest, alice(), recipient.public)
    opened = sharing.open_manifest(sealed, recipient, alice().public)
    assert opened == manifest
    assert opened.sequence == 3
    # The recipient can open every file's wrap, bound to that entry and version.
    keys = {
        entry.path: recipient.unwrap(entry.parsed_stanza(), entry.context())
        for entry in opened.entries
        if entry.kind == "file"
    }
    assert keys == {
        "labs/2024 blood panel.pdf": KEY_A,
        "labs/imaging/knee-mri.dcm": KEY_B,
        "notes-é😀.txt": KEY_A,
    }


@pytest.mark.parametrize("kind", list(Kind))
def test_every_kind_can_issue(kind):
    issuer = ident(kind, "issuer")
    manifest = make_manifest(issuer=issuer)
    opened = sharing.open_manifest(
        sharing.seal(manifest, issuer, bob().public), bob(), issuer.public
    )
    assert opened == manifest


def test_empty_share_and_no_providers_round_trip():
    manifest = make_manifest(entries=(), providers=(), name="", sequence=1, created_ns=0)
    sealed = sharing.seal(manifest, alice(), bob().public)
    assert sharing.open_manifest(sealed, bob(), alice().public) == manifest


def test_seal_is_randomised_and_encoding_is_deterministic():
    manifest, sealed = sample()
    again = sharing.seal(manifest, alice(), bob().public)
    assert again != sealed  # fresh key, salt and wrap each time
    assert sharing.encode_body(manifest) == sharing.encode_body(make_manifest_copy(manifest))
    assert sharing.parse_body(sharing.encode_body(manifest)) == manifest


def make_manifest_copy(manifest):
    return dataclasses.replace(manifest, entries=tuple(manifest.entries))


def test_body_is_canonical_ascii_json():
    body, _ = signed_parts()
    assert body.isascii()
    tree = json.loads(body)
    assert canonical(tree) == body
    assert tree["format"] == "medfs-share-v1"
    assert list(tree) == sorted(tree)
    assert tree["recipient"] == bob().fingerprint
    assert tree["entries"][0]["cid"] is None  # every key present, null where it does not apply


def test_envelope_layout_and_what_it_shows():
    sealed = sample()[1]
    assert sealed[:9] == b"MEDFSSHR\x01"
    length = int.from_bytes(sealed[9:11], "big")
    stanza = Stanza.from_bytes(sealed[11 : 11 + length])
    assert stanza.fingerprint == bob().fingerprint
    assert stanza.kind is Kind.X25519
    body, signature = signed_parts()
    assert len(sealed) == 11 + length + len(
        format.encrypt_bytes(KEY_A, b"\0" * (4 + len(body) + 64))
    )
    assert len(signature) == 64
    # The recipient's fingerprint is visible; paths, CIDs, providers and the issuer are not.
    assert bob().fingerprint.encode() in sealed
    for secret in (b"blood panel", b"labs", CID_A.encode(), PEER.encode(), b"127.0.0.1"):
        assert secret not in sealed
    assert alice().fingerprint.encode() not in sealed
    assert alice().public.to_bytes()[:40] not in sealed


# --- who may open it ----------------------------------------------------------------------------


def test_another_recipient_is_told_it_is_not_for_them():
    with pytest.raises(NotForIdentityError) as info:
        sharing.open_manifest(sample()[1], carol(), alice().public)
    assert info.value.exit_code == 8


def test_wrong_issuer_key_is_a_signature_error_naming_it():
    with pytest.raises(SignatureError) as info:
        sharing.open_manifest(sample()[1], bob(), mallory().public)
    assert mallory().fingerprint in info.value.message
    assert info.value.exit_code == 11
    assert isinstance(info.value, FormatError)


def test_forwarded_manifest_is_refused_by_the_new_recipient():
    # Bob decrypts Alice's signed manifest and re-encrypts it, signature intact, to Carol.
    body, signature = signed_parts()
    forwarded = envelope(body, signature, to=carol())
    with pytest.raises(NotForIdentityError) as info:
        sharing.open_manifest(forwarded, carol(), alice().public)
    assert bob().fingerprint in info.value.message
    # It still opens for Bob: the re-encryption itself is harmless, the signed recipient decides.
    assert sharing.open_manifest(envelope(body, signature), bob(), alice().public) == sample()[0]


def test_manifest_naming_another_issuer_is_refused():
    # Mallory signs a body that claims to be from Alice: verifying against Alice fails...
    body, _ = signed_parts()
    forged = signed_by(mallory(), body)
    with pytest.raises(SignatureError):
        sharing.open_manifest(forged, bob(), alice().public)
    # ...and verifying against Mallory (whose key did sign) fails on the named issuer.
    with pytest.raises(SignatureError) as info:
        sharing.open_manifest(forged, bob(), mallory().public)
    assert alice().fingerprint in info.value.message


def test_signature_over_another_purpose_does_not_verify():
    body, _ = signed_parts()
    other = alice().sign("audit-entry", body)
    with pytest.raises(SignatureError):
        sharing.open_manifest(envelope(body, other), bob(), alice().public)


# --- edits: every field is covered by the signature ---------------------------------------------


def _edit_path(t):
    t["entries"][1]["path"] = "labs/2025 blood panel.pdf"


def _edit_cid(t):
    t["entries"][1]["cid"] = CID_B


def _edit_wrap(t):
    # A valid wrap, for Bob, of another key: only the signature says it is not Alice's.
    e = t["entries"][1]
    context = recipients.entry_context(recipients.b64decode(e["entry_id"]), SALT_A)
    e["stanza"] = recipients.wrap(KEY_B, bob().public.recipient(), context).to_text()


def _edit_swap_wraps(t):
    a, b = t["entries"][1], t["entries"][5]
    a["stanza"], b["stanza"] = b["stanza"], a["stanza"]


def _edit_salt(t):
    t["entries"][1]["salt"] = recipients.b64encode(SALT_B)


def _edit_entry_id(t):
    t["entries"][1]["entry_id"] = recipients.b64encode(b"x" * 16)


def _edit_sequence(t):
    t["sequence"] += 1000


def _edit_recipient(t):
    t["recipient"] = carol().fingerprint


def _edit_issuer(t):
    t["issuer"] = recipients.b64encode(mallory().public.to_bytes())


def _edit_providers(t):
    t["providers"][0]["addresses"][0] = f"/ip4/203.0.113.9/tcp/4001/p2p/{PEER}"


def _edit_drop_provider(t):
    t["providers"] = []


def _edit_name(t):
    t["name"] = "other"


def _edit_created(t):
    t["created_ns"] += 1


def _edit_mode(t):
    t["entries"][1]["mode"] = 0o644


def _edit_size(t):
    t["entries"][1]["size"] = 12


def _edit_mtime(t):
    t["entries"][1]["mtime_ns"] += 1


def _edit_target(t):
    t["entries"][4]["target"] = recipients.b64encode(b"/etc/passwd")
    t["entries"][4]["size"] = len(b"/etc/passwd")


def _edit_drop_entry(t):
    del t["entries"][5]


def _edit_format(t):
    t["format"] = "medfs-share-v2"


EDITS = [
    _edit_path,
    _edit_cid,
    _edit_wrap,
    _edit_swap_wraps,
    _edit_salt,
    _edit_entry_id,
    _edit_sequence,
    _edit_recipient,
    _edit_issuer,
    _edit_providers,
    _edit_drop_provider,
    _edit_name,
    _edit_created,
    _edit_mode,
    _edit_size,
    _edit_mtime,
    _edit_target,
    _edit_drop_entry,
    _edit_format,
]


@pytest.mark.parametrize("edit", EDITS, ids=lambda edit: edit.__name__[6:])
def test_edited_field_in_a_validly_encrypted_envelope_is_refused(edit):
    body, signature = signed_parts()
    tree = json.loads(body)
    edit(tree)
    edited = canonical(tree)
    assert edited != body
    with pytest.raises(SignatureError):
        sharing.open_manifest(envelope(edited, signature), bob(), alice().public)


@pytest.mark.parametrize("bit", [0, 7, 100, 511])
def test_edited_signature_is_refused(bit):
    body, signature = signed_parts()
    edited = bytearray(signature)
    edited[bit // 8] ^= 1 << (bit % 8)
    with pytest.raises(SignatureError):
        sharing.open_manifest(envelope(body, bytes(edited)), bob(), alice().public)


def test_any_flipped_byte_of_the_sealed_manifest_is_refused():
    sealed = sample()[1]
    length = int.from_bytes(sealed[9:11], "big")
    stanza_end = 11 + length
    positions = {*range(stanza_end + 50), *range(stanza_end, len(sealed), 97), len(sealed) - 1}
    for position in sorted(positions):
        data = bytearray(sealed)
        data[position] ^= 0x01
        # A flipped fingerprint character may name someone else: "not for you" is right then.
        with pytest.raises((FormatError, NotForIdentityError)):
            sharing.open_manifest(bytes(data), bob(), alice().public)


def test_envelope_stanza_is_bound_to_its_payload():
    first = sample()[1]
    second = sharing.seal(sample()[0], alice(), bob().public)
    cut = 11 + int.from_bytes(first[9:11], "big")
    spliced = first[:cut] + second[11 + int.from_bytes(second[9:11], "big") :]
    refused_as_format_error(spliced)


def test_file_wrap_cannot_pass_as_the_envelope_wrap():
    # A stanza wrapping a file key for Bob, put in front of an object under that key.
    sealed_payload = format.encrypt_bytes(KEY_A, sharing._sign(signed_parts()[0], alice()))
    salt = format.Header.parse(sealed_payload[:42]).salt
    stanza = recipients.wrap(
        KEY_A, bob().public.recipient(), recipients.entry_context(b"e" * 16, salt)
    ).to_bytes()
    data = b"MEDFSSHR\x01" + len(stanza).to_bytes(2, "big") + stanza + sealed_payload
    refused_as_format_error(data)


# --- strict structure ---------------------------------------------------------------------------


def test_truncated_and_extended_envelopes_are_refused():
    sealed = sample()[1]
    for length in (
        0,
        5,
        8,
        9,
        10,
        11,
        50,
        200,
        len(sealed) - 17,
        len(sealed) - 16,
        len(sealed) - 1,
    ):
        refused_as_format_error(sealed[:length])
    refused_as_format_error(sealed + b"\x00")
    refused_as_format_error(sealed + sealed)


def test_bad_magic_version_and_stanza_length_are_refused():
    sealed = sample()[1]
    refused_as_format_error(b"MEDFSOBJ" + sealed[8:])
    refused_as_format_error(sealed[:8] + b"\x02" + sealed[9:])
    length = int.from_bytes(sealed[9:11], "big")
    for wrong in (length - 1, length + 1, 0, 0xFFFF):
        refused_as_format_error(sealed[:9] + wrong.to_bytes(2, "big") + sealed[11:])


def test_signed_blob_length_must_match():
    body, signature = signed_parts()
    good = len(body).to_bytes(4, "big") + body + signature
    for blob in (
        good + b"\x00",  # trailing byte after the signature
        good[:-1],
        (len(body) + 1).to_bytes(4, "big") + body + signature,
        (len(body) - 1).to_bytes(4, "big") + body + signature,
        b"\x00" * 67,
        b"",
    ):
        refused_as_format_error(sharing._encrypt_envelope(blob, bob().public))


def test_oversized_input_is_refused_before_any_work(monkeypatch):
    sealed = sample()[1]
    monkeypatch.setattr(sharing, "MAX_MANIFEST_SIZE", len(sealed) - 1)
    with pytest.raises(FormatError, match="larger than"):
        sharing.open_manifest(sealed, bob(), alice().public)


def _respell(body: bytes, old: bytes, new: bytes) -> bytes:
    assert old in body
    return body.replace(old, new, 1)


def _without(tree, key):
    return {k: v for k, v in tree.items() if k != key}


def _entry_extra(tree):
    tree = json.loads(json.dumps(tree))
    tree["entries"][0]["x"] = 1
    return canonical(tree)


def _padded_id(body, tree):
    return _respell(body, tree["entries"][0]["entry_id"].encode(), b"AAAAAAAAAAAAAAAAAAAAAA==")


SEQ = b'"sequence":3'
# Each builder takes the canonical body and its parsed tree and spells the manifest another way.
NON_CANONICAL = {
    "indented": lambda body, tree: json.dumps(tree, sort_keys=True, indent=1).encode(),
    "spaces": lambda body, tree: json.dumps(tree, sort_keys=True).encode(),
    "trailing newline": lambda body, tree: body + b"\n",
    "leading space": lambda body, tree: b" " + body,
    "reversed keys": lambda body, tree: json.dumps(dict(reversed(tree.items()))).encode(),
    "extra key": lambda body, tree: canonical(dict(tree, comment="hi")),
    "missing key": lambda body, tree: canonical(_without(tree, "name")),
    "extra entry key": lambda body, tree: _entry_extra(tree),
    "duplicate key": lambda body, tree: _respell(
        body, b'{"created_ns"', b'{"name":"x","created_ns"'
    ),
    "escaped slash": lambda body, tree: _respell(body, b"labs/imaging", b"labs\\/imaging"),
    "escaped letter": lambda body, tree: _respell(body, b'"records"', b'"\\u0072ecords"'),
    "upper-case escape": lambda body, tree: _respell(body, b"\\u00e9", b"\\u00E9"),
    "raw UTF-8": lambda body, tree: _respell(body, b"\\u00e9", "é".encode()),
    "float": lambda body, tree: _respell(body, SEQ, b'"sequence":3.0'),
    "exponent": lambda body, tree: _respell(body, SEQ, b'"sequence":3e0'),
    "bool": lambda body, tree: _respell(body, SEQ, b'"sequence":true'),
    "string int": lambda body, tree: _respell(body, SEQ, b'"sequence":"3"'),
    "leading zero": lambda body, tree: _respell(body, SEQ, b'"sequence":03'),
    "NaN": lambda body, tree: _respell(body, SEQ, b'"sequence":NaN'),
    "negative zero": lambda body, tree: _respell(body, b'"size":0', b'"size":-0'),
    "padded base64": _padded_id,
    "huge int": lambda body, tree: _respell(body, SEQ, b'"sequence":' + b"9" * 5000),
    "deep nesting": lambda body, tree: _respell(
        body, b'"providers":[', b'"providers":[' + b"[" * 100_000
    ),
    "not an object": lambda body, tree: b"[]",
    "empty": lambda body, tree: b"",
    "bad format": lambda body, tree: canonical(dict(tree, format="medfs-share-v0")),
    "bad issuer": lambda body, tree: canonical(
        dict(tree, issuer=recipients.b64encode(b"medfs-id"))
    ),
}


@pytest.mark.parametrize("label", list(NON_CANONICAL))
def test_non_canonical_body_is_refused_even_when_signed(label):
    body, _ = signed_parts()
    respelled = NON_CANONICAL[label](body, json.loads(body))
    assert respelled != body
    with pytest.raises(FormatError) as info:
        sharing.parse_body(respelled)
    assert not isinstance(info.value, SignatureError)
    # Signed by the real issuer, so it is the parser, not the signature, that refuses it.
    refused_as_format_error(signed_by(alice(), respelled))


# --- invalid values, at seal and at open --------------------------------------------------------

BAD_PATHS = [
    "..",
    ".",
    "labs/..",
    "labs/../x",
    "labs/./x",
    "/abs",
    "labs//x",
    "labs/",
    "",
    "labs/a\x00b",
    "labs/" + "x" * 256,
    "labs/\udcff",  # a lone surrogate (an undecodable byte from os.fsdecode)
]


@pytest.mark.parametrize("path", BAD_PATHS)
def test_invalid_path_is_refused_at_seal_and_at_open(path):
    with pytest.raises(FormatError):
        file_entry(path, bob().public)
    body, _ = signed_parts()
    tree = json.loads(body)
    tree["entries"][1]["path"] = path
    # Keep the order valid where that is possible, so the path itself is what is refused.
    tree["entries"].sort(key=lambda entry: entry["path"])
    refused_as_format_error(signed_by(alice(), canonical(tree)))


def _tree_edit(edit):
    body, _ = signed_parts()
    tree = json.loads(body)
    edit(tree["entries"])
    return canonical(tree)


def _duplicate(entries):
    entries.insert(2, dict(entries[1], entry_id=recipients.b64encode(b"d" * 16)))


def _child_first(entries):
    entries[0], entries[1] = entries[1], entries[0]


def _missing_parent(entries):
    del entries[2]  # labs/imaging, parent of labs/imaging/knee-mri.dcm


def _parent_is_a_file(entries):
    entries.insert(2, dict(entries[1], path="labs/2024 blood panel.pdf/x", entry_id="eA"))
    entries[2]["entry_id"] = recipients.b64encode(b"f" * 16)


def _same_entry_id(entries):
    entries[5]["entry_id"] = entries[1]["entry_id"]


TREE_EDITS = [_duplicate, _child_first, _missing_parent, _parent_is_a_file, _same_entry_id]


@pytest.mark.parametrize("edit", TREE_EDITS, ids=lambda edit: edit.__name__[1:])
def test_invalid_entry_list_is_refused_at_seal_and_at_open(edit):
    entries = [dataclasses.asdict(entry) for entry in sample()[0].entries]
    # The same edits on the Python values (base64 only matters in JSON).
    for item in entries:
        item["entry_id"] = recipients.b64encode(item["entry_id"])
    edit(entries)
    for item in entries:
        item["entry_id"] = recipients.b64decode(item["entry_id"])
    with pytest.raises(FormatError):
        sharing.seal(
            make_manifest(entries=tuple(SharedEntry(**item) for item in entries)),
            alice(),
            bob().public,
        )
    refused_as_format_error(signed_by(alice(), _tree_edit(edit)))


def test_entry_order_is_by_code_point():
    # "a-b" < "a/c" by code point: a parent still comes before its children.
    a = dir_entry("a")
    manifest = make_manifest(entries=(a, dir_entry("a-b"), dir_entry("a/c")))
    assert sharing.parse_body(sharing.encode_body(manifest)) == manifest
    with pytest.raises(FormatError):
        make_manifest(entries=(a, dir_entry("a/c"), dir_entry("a-b")))


def _entry(**changes):
    base = {
        "path": "x",
        "kind": "file",
        "mode": 0o600,
        "mtime_ns": 0,
        "size": 1,
        "entry_id": b"i" * 16,
        "cid": CID_A,
        "salt": SALT_A,
        "stanza": file_entry("x", bob().public).stanza,
        "target": None,
    }
    base.update(changes)
    return SharedEntry(**base)


@pytest.mark.parametrize(
    "changes",
    [
        {"cid": None},  # a file without a committed version cannot be shared
        {"salt": None},
        {"stanza": None},
        {"cid": None, "salt": None, "stanza": None},
        {"cid": "bafy/../x"},
        {"cid": ""},
        {"salt": b"s" * 31},
        {"entry_id": b"i" * 15},
        {"mode": 0o10000},
        {"mode": -1},
        {"mode": True},
        {"size": -1},
        {"size": 1.0},
        {"mtime_ns": 2**63},
        {"kind": "fifo"},
        {"stanza": b"x25519 not-a-fingerprint AAAA"},
        {"target": b"t"},
        {"kind": "dir", "cid": None, "salt": None, "stanza": None, "size": 0, "target": b"t"},
        {"kind": "dir", "cid": None, "salt": None, "stanza": None, "size": 1},
        {"kind": "dir"},
        {"kind": "symlink", "cid": None, "salt": None, "stanza": None, "target": None},
        {"kind": "symlink", "cid": None, "salt": None, "stanza": None, "target": b"ab"},
        {"kind": "symlink", "cid": None, "salt": None, "stanza": None, "target": b"", "size": 0},
        {"kind": "symlink", "cid": None, "salt": None, "stanza": None, "target": b"a\0"},
    ],
)
def test_invalid_entry_values_are_refused(changes):
    _entry()  # the base is valid
    with pytest.raises(FormatError):
        _entry(**changes)


@pytest.mark.parametrize(
    "changes",
    [
        {"sequence": 0},
        {"sequence": 2**63},
        {"created_ns": -1},
        {"recipient": "medfs1short"},
        {"name": "a/b"},
        {"name": ".."},
        {"name": "a\x00"},
        {"providers": (Provider(PEER, ()), Provider(PEER, ()))},
        {"providers": tuple(Provider(f"p{i}", ()) for i in range(65))},
        {"entries": [dir_entry("a")]},  # a list, not a tuple
    ],
)
def test_invalid_manifest_values_are_refused(changes):
    with pytest.raises(FormatError):
        make_manifest(**changes)


@pytest.mark.parametrize(
    ("peer_id", "addresses"),
    [
        ("", ()),
        ("12D3 Koo", ()),
        ("p" * 129, ()),
        (PEER, ("ip4/1.2.3.4",)),
        (PEER, ("/ip4/1.2.3.4 /tcp/1",)),
        (PEER, ("/a", "/a")),
        (PEER, tuple(f"/a{i}" for i in range(65))),
        (PEER, ("/" + "a" * 1024,)),
        (PEER, ["/a"]),
    ],
)
def test_invalid_providers_are_refused(peer_id, addresses):
    with pytest.raises(FormatError):
        Provider(peer_id, addresses)


def test_wrap_for_someone_else_is_refused():
    entry = file_entry("x", carol().public)
    with pytest.raises(FormatError, match="another recipient"):
        make_manifest(entries=(entry,))


def test_wrap_of_the_wrong_kind_is_refused_at_seal():
    stanza = Stanza(Kind.MLKEM768_X25519, bob().fingerprint, b"\0" * 1168).to_bytes()
    manifest = make_manifest(entries=(_entry(stanza=stanza),))
    with pytest.raises(FormatError, match="kind"):
        sharing.seal(manifest, alice(), bob().public)


def test_seal_checks_the_issuer_and_recipient_it_is_given():
    manifest = sample()[0]
    with pytest.raises(ValueError, match="issuer"):
        sharing.seal(manifest, mallory(), bob().public)
    with pytest.raises(ValueError, match="recipient"):
        sharing.seal(manifest, alice(), carol().public)


def test_errors_never_name_a_path():
    body, _ = signed_parts()
    tree = json.loads(body)
    tree["entries"][1]["path"] = "labs/secret diagnosis/.."
    with pytest.raises(FormatError) as info:
        sharing.parse_body(canonical(tree))
    assert "secret" not in info.value.message


# --- arbitrary valid trees ----------------------------------------------------------------------

_names = st.text(
    alphabet=st.characters(codec="utf-8", exclude_characters="/\x00"), min_size=1, max_size=8
).filter(lambda name: name not in (".", ".."))


@st.composite
def entry_lists(draw):
    paths = draw(st.sets(st.lists(_names, min_size=1, max_size=3).map("/".join), max_size=12))
    # Every proper prefix is a directory; the rest of the kinds are drawn.
    dirs = {path.rsplit("/", 1)[0] for path in paths if "/" in path}
    for path in list(dirs):
        parts = path.split("/")
        dirs.update("/".join(parts[:i]) for i in range(1, len(parts)))
    stanza = _sample_stanza()
    entries = []
    for path in sorted(paths | dirs):
        kind = "dir" if path in dirs else draw(st.sampled_from(["file", "dir", "symlink"]))
        common = {
            "path": path,
            "kind": kind,
            "mode": draw(st.integers(0, 0o7777)),
            "mtime_ns": draw(st.integers(-(2**63), 2**63 - 1)),
            "entry_id": draw(st.binary(min_size=16, max_size=16)),
        }
        if kind == "file":
            entry = SharedEntry(
                **common,
                size=draw(st.integers(0, 2**63 - 1)),
                cid=draw(st.from_regex(r"[A-Za-z0-9]{1,60}", fullmatch=True)),
                salt=draw(st.binary(min_size=32, max_size=32)),
                stanza=stanza,
            )
        elif kind == "symlink":
            target = draw(st.binary(min_size=1, max_size=40).filter(lambda t: b"\0" not in t))
            entry = SharedEntry(**common, size=len(target), target=target)
        else:
            entry = SharedEntry(**common, size=0)
        entries.append(entry)
    ids = [entry.entry_id for entry in entries]
    if len(set(ids)) != len(ids):
        return ()
    return tuple(entries)


@functools.cache
def _sample_stanza() -> bytes:
    return file_entry("x", bob().public).stanza


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    entries=entry_lists(), name=st.one_of(st.just(""), _names), sequence=st.integers(1, 2**63 - 1)
)
def test_arbitrary_valid_manifests_round_trip(entries, name, sequence):
    manifest = make_manifest(entries=entries, name=name, sequence=sequence)
    body = sharing.encode_body(manifest)
    assert body.isascii()
    assert sharing.parse_body(body) == manifest
    sealed = sharing.seal(manifest, alice(), bob().public)
    assert sharing.open_manifest(sealed, bob(), alice().public) == manifest
