#!/usr/bin/env python3
"""Generate the negative (and a few positive) test vectors in tests/vectors/.

Each vector file is a few `name: value` header lines, a blank line, then the raw object bytes:

    expect: success | format error | not for identity
    payload: SHA-256 of the plaintext (success only)
    key: content key, hex (object-format vectors)
    identity: secret identity encoding, base64 (recipient vectors)
    context: wrap binding context, hex (recipient vectors)
    stanza: one wrapped key in its text form (recipient vectors; may repeat)
    comment: what the vector exercises

All randomness is derived from labels, so rerunning gives the same bytes. The one exception is
key wrapping: HPKE and RSA-OAEP draw their own randomness inside `cryptography`, which offers no
way to inject it. So wraps are recorded: a wrap found in the previous vector files is reused when
it still opens to the same content key for the same recipient and context, and a fresh one is made
otherwise. Regenerating over the checked-in files must therefore reproduce them byte for byte
(tests/test_vectors.py checks it); a changed generator shows up as a diff.

Usage: scripts/gen_vectors.py [OUT_DIR]   (default tests/vectors, reusing wraps found there)
"""

from __future__ import annotations

import contextlib
import hashlib
import sys
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from medfs import format as fmt
from medfs import layout, recipients
from medfs.errors import MedfsError
from medfs.identity import Identity
from medfs.recipients import Kind, Stanza

SEG = layout.SEGMENT_SIZE
STRIDE = SEG + layout.TAG_SIZE
H = layout.HEADER_SIZE
DEFAULT_DIR = Path(__file__).resolve().parent.parent / "tests" / "vectors"

# A fixed RSA-3072 key: cryptography cannot generate RSA keys from a seed. Test use only.
RSA_TEST_KEY = b"""\
-----BEGIN PRIVATE KEY-----
MIIG/QIBADANBgkqhkiG9w0BAQEFAASCBucwggbjAgEAAoIBgQC9AG+62zEc9NjJ
ZdU7M5zJefkkbFhc14odF4COzTEhquBeFhC57pgc2lCgH6F4QYYHSF8xKBm00kPK
sbptKB5Expyes7Iz1zv1W13MKf4D//c7BzjRJRZoUABKU/B5liZWyCzpi/dAI/q3
ykpHFBczsqdhHTiL3B66pbIQkSt5HiKUj7IA2f99fEn9gCSzwG+STNLDXPDHtGqn
XnbRBP80CMUSEGXo3nxmrFmfQu9D38jcS5nOBMo9uGJPH8P/x+7vlrZAIKD66t8c
FDvx8OptND3RM+uDBkXuqfoGZr9pX7LjgTbxN6kuSQHa+pOFh+8WdatHFAPXintI
v/elp4R4IC7n9vhvtdryOSICWf38KCHLiujW5JADZSaijMcW8YQzDA+XCnfXTux0
uOI5h5R0SXwJDT3uhnhbLaBc/4hpqSJ0XvFyEpjJh1fCiilyXj6q6ry9ABQcEHLS
ErTn5klu4EG97pCne81sa1fA+7ohYf273L3rQgrrTaW5MxolLrMCAwEAAQKCAYAE
EnJV0EsqmIvjKvKBKAeEv8ACbOMqfOpY3hzC9uDMHOZgoJETsHROitWZ3ZSZBrBg
j8qdQIPtRWp4f4PIvkiIqs7NDIoWW9jK3IEU2QLEC0vEVc9/khD9hlu7Pju8IuQI
kp+FGKLnGt9X/l/DUEd/saWxjfOd78wpsVA40yfgoCmWkdH/+rJqfbcKYyxnQwok
WMthsirt4pE5setVbYoiEN5OGVRYxBJiE+yKZeLJz5SASpCxw6Cn28Uid0i9xgzy
RJ2GV/+tY7nzq0dNNnDc4P5RevudGY0M6xK4aJxQ6fTiUMqZJbFTwt+23BBJ1UNb
jqZ9WS4YtPXpuEQ6YF/LlsSkmBPLASlhr9ZJ86Q/WJp3nAXjRNEWNuNxqRP49qRh
9Jdpso9QoDPanggmUIzIh/8jLYx9nDHUfLmIYEifOWeLR4G1C/l2vVHHeA3xJA+/
fFicVeMnfh7DERHyvNF2TGjC4Wt70qZ8CWQhYIIEOM5AW8/j0cn69KQV1Ez4ZaEC
gcEA+zW3D0q/dI9tbR+jaMTPXNqAACsA1WPsyJ3QGnZg6Bt/eC4flu9GMGmTPNRl
+xb32f49Ts+dpeidfRK3wSLGLq3bYwlCY4qF31Eqzgse6cQcxAgcoreRTePkZCNV
iNAqGO9yc9hf51dARy9z9qX7vJabg9CeB/AW0TeEkdvPXWPhM+Zj6B0/MdZXiBAC
2P4W29QvUFwZSdczQMGF3wVNtGpv628W4OsPUPVE+FtR9xXzgaPc8RnQCu3PuhKu
ltp/AoHBAMCbDSiU+HrcprvJRQwerPR0uEqidqEYKwM3BE32w8IfnUA7t/+UFdsG
sEw9igYr2s3ew4uLkhb4arngYvLp4RqRd+VAUK8rQyb9ufZQpfatqZ0trSXoCQmi
UV+tUUaV3ft56wuhl7jwVV3Iv2wXbQJBFCkCqu5wxX6et4O9SXRVbtD11fW1zSJt
dkuMwCCgictx6WccdSHEFJCfUprexX9g9XyHBj3Wq31jMAP6cXXuw6u02FdnuO2t
m4gfL/ZJzQKBwDP2JGtxVrDRihzsUmy1aP8X4yoluwJorO3CVu1iVyErru44/CfI
TohtDhujA4UwdwwMXroSj9VljE32tTOp8bxuEdcmbykP2ikbLPN5sWdBPYH++41c
0x19ahycgnDOPibyQIZd11iO36jZ0+7M3olfzcMyP738l3unNDDHetkic868dSXq
BsxUPb7TMQOZazkFZtQEeOahMOTQItTC0BPlgEj+rYjQllZ0pVOJ8CZf0AKc1nK4
mCPqlPE0NBDYGQKBwQCC8Sap/1VK2fX01um9SqGU9EFSZE84SCD954piorAFqs6S
m8cE151gMZTr0C6k8W2o5piUp0ejnDGauuUqdjyWfm0/i1EPNd9Kg9bIkZ2zLe+R
Lzt2+OAkD5k47bDCxyKKVCGq36oxjhrLTq5tAyQWEz5sfybMQhjSc38Z7jchAu/6
2hcjG/0hOb/hrwfzZpEnogLnGd68HP1KMTbMmUU1yyo6BeYFZotiDGvZWIuIfNHE
S4eFLLv5wjxp96H408UCgcBzH5thzZpx9RgZNpsz3H8CIO8OT2QkLBhnAl+a91mv
ToXgjnP+Fl2/a1rf1JxHoGyTJElD0vJ1QoekPLW64zVjjjXi5MKYcMaluzBIwPlf
00fvzwoSWKkdY5f0UiH29PtsEW4C2PWOxSsO1MIAZlrVCwjfeJafSAE3aNzzAqhX
vo/HcXInFI59iWU7l7WWtFoS5OVOogzYy6LvOshocuZBG/Bs51vMjlkg/QbCH9C1
jx0KpdD6GnEUZjkfprsS/Qg=
-----END PRIVATE KEY-----
"""


def det(label: str, size: int) -> bytes:
    """Deterministic bytes named by `label` (independent of the order of calls)."""
    return hashlib.shake_256(b"medfs test vectors\x00" + label.encode()).digest(size)


def test_identity(name: str, kind: Kind) -> Identity:
    if kind is Kind.MLKEM768_X25519:
        secret = det(f"{name} mlkem seed", 64) + det(f"{name} x25519", 32)
    elif kind is Kind.X25519:
        secret = det(f"{name} x25519", 32)
    else:
        key = serialization.load_pem_private_key(RSA_TEST_KEY, password=None)
        assert isinstance(key, rsa.RSAPrivateKey)
        secret = recipients.rsa_secret(key)
    return Identity(kind, secret, det(f"{name} ed25519", 32))


class Wraps:
    """Key wrapping that reuses recorded wraps (see the module docstring)."""

    def __init__(self, previous: Path | None) -> None:
        self.pool: list[Stanza] = []
        if previous is not None and previous.is_dir():
            for path in sorted(previous.iterdir()):
                header, _ = split_vector(path.read_bytes())
                for name, value in header:
                    if name == "stanza":
                        # Deliberately malformed stanzas are simply not reusable.
                        with contextlib.suppress(MedfsError):
                            self.pool.append(Stanza.from_text(value))

    def wrap(self, key: bytes, to: Identity, context: bytes) -> Stanza:
        for stanza in self.pool:
            if stanza.fingerprint != to.fingerprint or stanza.kind is not to.kind:
                continue
            try:
                if to.unwrap(stanza, context) == key:
                    return stanza
            except MedfsError:
                continue
        stanza = recipients.wrap(key, to.public.recipient(), context)
        self.pool.append(stanza)
        return stanza


def split_vector(data: bytes) -> tuple[list[tuple[str, str]], bytes]:
    head, sep, body = data.partition(b"\n\n")
    if not sep:
        raise ValueError("vector has no blank line after its header")
    header = []
    for line in head.decode("ascii").split("\n"):
        name, colon, value = line.partition(": ")
        if not colon:
            raise ValueError(f"bad vector header line {line!r}")
        header.append((name, value))
    return header, body


def render(header: list[tuple[str, str]], body: bytes) -> bytes:
    return "".join(f"{name}: {value}\n" for name, value in header).encode("ascii") + b"\n" + body


def plaintext(label: str, size: int) -> bytes:
    return det(f"plaintext {label}", size)


def segments(obj: bytes) -> list[bytes]:
    return [obj[i : i + STRIDE] for i in range(H, len(obj), STRIDE)]


def flip(data: bytes, index: int) -> bytes:
    out = bytearray(data)
    out[index] ^= 0x01
    return bytes(out)


def seal_raw(key: bytes, salt: bytes, parts: list[tuple[bytes, bool]]) -> bytes:
    """An object sealed segment by segment with chosen final flags (to build invalid ones)."""
    header = fmt.Header(salt)
    cipher = fmt._SegmentCipher(key, header)
    return header.to_bytes() + b"".join(
        cipher.seal(i, final, part) for i, (part, final) in enumerate(parts)
    )


def format_vectors() -> dict[str, bytes]:
    key = det("content key", 32)
    salt = det("salt", 32)
    vectors: dict[str, bytes] = {}

    def add(name: str, expect: str, obj: bytes, comment: str, payload: bytes | None = None) -> None:
        header = [("expect", expect)]
        if payload is not None:
            header.append(("payload", hashlib.sha256(payload).hexdigest()))
        # The wrong-key vector is sealed under `key` but names another one.
        shown = det("wrong content key", 32) if name == "wrong-key" else key
        header += [("key", shown.hex()), ("comment", comment)]
        vectors[f"format-{name}"] = render(header, obj)

    def enc(data: bytes, s: bytes = salt) -> bytes:
        return fmt.encrypt_bytes(key, data, salt=s)

    for name, size, comment in [
        ("empty", 0, "empty plaintext: one empty final segment"),
        ("one-byte", 1, "one byte"),
        ("one-segment", SEG, "exactly one full segment, which is final"),
        ("one-segment-minus-one", SEG - 1, "one byte short of a full segment"),
        ("segment-plus-one", SEG + 1, "a full segment and a one-byte final segment"),
        ("three-segments", 2 * SEG + 1000, "two full segments and a partial final one"),
    ]:
        data = plaintext(name, size)
        add(name, "success", enc(data), comment, data)

    three = plaintext("three-segments", 2 * SEG + 1000)
    obj3 = enc(three)
    s0, s1, s2 = segments(obj3)
    hdr = obj3[:H]
    two = plaintext("segment-plus-one", SEG + 1)
    obj2 = enc(two)
    small = plaintext("one-byte", 1)
    obj1 = enc(small)

    bad: list[tuple[str, bytes, str]] = [
        ("truncated-final-segment", obj3[:-5], "last 5 bytes of the final segment cut off"),
        ("final-segment-dropped", hdr + s0 + s1, "cut at a segment boundary: no final segment"),
        ("missing-middle-segment", hdr + s0 + s2, "segment 1 of 3 removed"),
        ("swapped-segments", hdr + s1 + s0 + s2, "segments 0 and 1 exchanged"),
        ("duplicated-segment", hdr + s0 + s0 + s1 + s2, "segment 0 repeated"),
        ("header-bitflip-salt", flip(obj3, 20), "one bit of the salt flipped"),
        ("header-bitflip-magic", flip(obj1, 0), "one bit of the magic flipped"),
        ("unknown-version", obj1[:8] + b"\x02" + obj1[9:], "format version 2"),
        ("bad-segment-size", obj1[:9] + b"\x0f" + obj1[10:], "segment size 2**15, not v1's"),
        ("segment-body-bitflip", flip(obj3, H + STRIDE + 100), "a ciphertext bit in segment 1"),
        ("tag-bitflip", flip(obj3, H + STRIDE - 1), "a bit of segment 0's tag"),
        ("trailing-byte", obj3 + b"\x00", "one extra byte after the final segment"),
        ("trailing-bytes-16", obj2 + bytes(16), "16 extra bytes: looks like an empty segment"),
        ("trailing-segment-copy", obj2 + segments(obj2)[-1], "the final segment appended again"),
        ("header-only", hdr, "a header and no segment"),
        ("short-header", hdr[:20], "20 bytes"),
        ("empty-object", b"", "zero bytes"),
        ("wrong-key", obj1, "decrypted with a key other than the one it was sealed with"),
    ]
    other = fmt.encrypt_bytes(key, plaintext("other", 2 * SEG + 1000), salt=det("salt 2", 32))
    bad.append(
        ("spliced-segment", hdr + s0 + segments(other)[1] + s2, "segment 1 from another object")
    )
    bad.append(
        (
            "empty-final-after-full",
            seal_raw(key, salt, [(plaintext("one-segment", SEG), False), (b"", True)]),
            "a full non-final segment then an empty final one (non-canonical)",
        )
    )
    bad.append(
        (
            "early-final-flag",
            seal_raw(key, salt, [(two[:SEG], True), (two[SEG:], True)]),
            "segment 0 sealed as final although segment 1 follows",
        )
    )
    bad.append(
        (
            "missing-final-flag",
            seal_raw(key, salt, [(small, False)]),
            "the only segment sealed as not final",
        )
    )
    for name, obj, comment in bad:
        add(name, "format error", obj, comment)
    return vectors


def recipient_vectors(wraps: Wraps) -> dict[str, bytes]:
    vectors: dict[str, bytes] = {}
    alice = {kind: test_identity("alice", kind) for kind in Kind}
    bob = test_identity("bob", Kind.MLKEM768_X25519)
    bob_classic = test_identity("bob", Kind.X25519)
    key = det("recipient content key", 32)
    salt = det("recipient salt", 32)
    data = plaintext("recipient", 1000)
    obj = fmt.encrypt_bytes(key, data, salt=salt)
    context = recipients.entry_context(b"entry-1", salt)
    other_context = recipients.entry_context(b"entry-2", salt)

    def add(
        name: str,
        expect: str,
        ident: Identity,
        stanzas: list[str],
        comment: str,
        ctx: bytes = context,
    ) -> None:
        header = [("expect", expect)]
        if expect == "success":
            header.append(("payload", hashlib.sha256(data).hexdigest()))
        header.append(("identity", recipients.b64encode(ident.to_secret_bytes())))
        header.append(("context", ctx.hex()))
        header += [("stanza", text) for text in stanzas]
        header.append(("comment", comment))
        vectors[f"recipient-{name}"] = render(header, obj)

    for kind, ident in alice.items():
        stanza = wraps.wrap(key, ident, context)
        add(kind.value, "success", ident, [stanza.to_text()], f"one {kind.value} stanza")
        moved = wraps.wrap(key, ident, other_context)
        add(
            f"{kind.value}-moved-entry",
            "format error",
            ident,
            [moved.to_text()],
            "a stanza bound to another entry, copied here",
        )
        add(
            f"{kind.value}-body-bitflip",
            "format error",
            ident,
            [Stanza(kind, stanza.fingerprint, flip(stanza.body, len(stanza.body) - 1)).to_text()],
            "the last byte of the stanza body altered",
        )

    hybrid = alice[Kind.MLKEM768_X25519]
    mine = wraps.wrap(key, hybrid, context)
    for_bob = wraps.wrap(key, bob, context)
    for_bob_classic = wraps.wrap(key, bob_classic, context)
    fpr = hybrid.fingerprint
    text = mine.to_text()
    body_b64 = text.split(" ")[2]
    add(
        "several-stanzas",
        "success",
        hybrid,
        [for_bob.to_text(), for_bob_classic.to_text(), text],
        "stanzas for others first, then ours",
    )
    add("wrong-identity", "not for identity", hybrid, [for_bob.to_text()], "a stanza for bob only")
    malformed: list[tuple[str, str, str]] = [
        (
            "relabelled-fingerprint",
            Stanza(Kind.MLKEM768_X25519, fpr, for_bob.body).to_text(),
            "bob's stanza with alice's fingerprint written over his",
        ),
        (
            "kind-mismatch",
            Stanza(Kind.X25519, fpr, for_bob_classic.body).to_text(),
            "an x25519 stanza addressed to alice's hybrid identity",
        ),
        ("unknown-kind", f"mlkem1024-p384 {fpr} {body_b64}", "an unknown stanza kind"),
        (
            "short-body",
            f"mlkem768-x25519 {fpr} {recipients.b64encode(mine.body[:-3])}",
            "a body three bytes short",
        ),
        (
            "non-canonical-base64",
            f"mlkem768-x25519 {fpr} {body_b64[:-1]}{noncanonical_last(body_b64)}",
            "base64 whose unused bits are not zero",
        ),
        ("padded-base64", f"{text}==", "base64 with padding"),
        ("extra-field", f"{text} x", "a fourth field"),
        ("double-space", text.replace(" ", "  ", 1), "two spaces between fields"),
        ("bad-fingerprint", f"mlkem768-x25519 medfs1{'0' * 32} {body_b64}", "not base32"),
    ]
    for name, stanza_text, comment in malformed:
        add(f"stanza-{name}", "format error", hybrid, [stanza_text], comment)
    return vectors


def noncanonical_last(b64: str) -> str:
    """The last base64 character with one unused low bit set (same bytes, another spelling)."""
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
    assert len(b64) % 4 in (2, 3), "the body must leave unused bits"
    return alphabet[alphabet.index(b64[-1]) | 1]


def generate(out: Path, previous: Path | None) -> list[str]:
    """Write every vector to `out`; returns the file names written."""
    wraps = Wraps(previous)
    vectors = {**format_vectors(), **recipient_vectors(wraps)}
    out.mkdir(parents=True, exist_ok=True)
    for name, data in sorted(vectors.items()):
        (out / name).write_bytes(data)
    return sorted(vectors)


def main(argv: list[str]) -> int:
    out = Path(argv[1]) if len(argv) > 1 else DEFAULT_DIR
    previous = DEFAULT_DIR if len(argv) <= 2 else Path(argv[2])
    names = generate(out, previous)
    stale = sorted(set(p.name for p in out.iterdir()) - set(names))
    print(f"wrote {len(names)} vectors to {out}")
    if stale:
        print(f"not generated any more (delete them?): {', '.join(stale)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv))
