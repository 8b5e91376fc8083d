"""Identities (medfs/identity.py): key and public files, passphrases, fingerprints, signatures."""

from __future__ import annotations

import functools
import os
import stat
import unicodedata

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

from medfs import identity as idm
from medfs import recipients
from medfs.errors import FormatError, KeyFileError, NotForIdentityError, PassphraseError, UsageError
from medfs.identity import Identity, PublicIdentity
from medfs.recipients import Kind

CHEAP = 10  # scrypt log2 N for tests; the default (18) is checked in test_cli_keys.py
KEY = bytes(range(32))
CONTEXT = b"entry context"


@functools.cache
def rsa_key(bits: int = 3072) -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=bits)


@functools.cache
def ident(kind: Kind) -> Identity:
    if kind is Kind.RSA_OAEP:
        return Identity.from_rsa_key(rsa_key())
    return Identity.generate(kind)


@pytest.mark.parametrize("kind", list(Kind))
def test_files_round_trip_for_every_kind(tmp_path, kind):
    me = ident(kind)
    key_path, pub_path = idm.write_identity_files(tmp_path / "me", me, "pass", log2_n=CHEAP)
    assert (key_path.name, pub_path.name) == ("me.key", "me.pub")
    assert stat.S_IMODE(key_path.stat().st_mode) == 0o600
    assert stat.S_IMODE(pub_path.stat().st_mode) == 0o644
    loaded = idm.read_key_file(key_path, "pass")
    public = idm.read_public_file(pub_path)
    assert loaded.fingerprint == public.fingerprint == me.fingerprint
    assert loaded.to_secret_bytes() == me.to_secret_bytes()
    assert public == me.public
    # What a sender does with the public file, what the owner does with the key file.
    stanza = recipients.wrap(KEY, public.recipient(), CONTEXT)
    assert loaded.unwrap(stanza, CONTEXT) == KEY
    assert loaded.unwrap_any([stanza], CONTEXT) == KEY


def test_key_file_hides_the_secret(tmp_path):
    me = ident(Kind.X25519)
    key_path, _ = idm.write_identity_files(tmp_path / "me", me, "pass", log2_n=CHEAP)
    text = key_path.read_text()
    secret = me.to_secret_bytes()
    assert recipients.b64encode(secret)[:20] not in text.replace("\n", "")
    assert secret not in key_path.read_bytes()
    assert f"fingerprint: {me.fingerprint}" in text
    assert repr(me) == f"Identity(x25519, {me.fingerprint})"


def test_wrong_passphrase(tmp_path):
    key_path, _ = idm.write_identity_files(
        tmp_path / "me", ident(Kind.X25519), "right", log2_n=CHEAP
    )
    with pytest.raises(PassphraseError, match="wrong passphrase"):
        idm.read_key_file(key_path, "wrong")


def test_passphrases_are_unicode_normalised(tmp_path):
    composed = unicodedata.normalize("NFC", "café")
    decomposed = unicodedata.normalize("NFD", "café")
    assert composed != decomposed
    key_path, _ = idm.write_identity_files(
        tmp_path / "me", ident(Kind.X25519), decomposed, log2_n=CHEAP
    )
    assert idm.read_key_file(key_path, composed).fingerprint == ident(Kind.X25519).fingerprint


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o660, 0o644, 0o610])
def test_key_file_readable_by_others_is_refused(tmp_path, mode):
    key_path, _ = idm.write_identity_files(tmp_path / "me", ident(Kind.X25519), "p", log2_n=CHEAP)
    key_path.chmod(mode)
    with pytest.raises(KeyFileError) as info:
        idm.read_key_file(key_path, "p")
    assert "group or others" in info.value.message
    assert info.value.hint == f"make it private with: chmod 600 {key_path}"
    assert not isinstance(info.value, PassphraseError)
    key_path.chmod(0o400)
    assert idm.read_key_file(key_path, "p").kind is Kind.X25519


def test_refuses_to_overwrite(tmp_path):
    me = ident(Kind.X25519)
    idm.write_identity_files(tmp_path / "me", me, "p", log2_n=CHEAP)
    with pytest.raises(KeyFileError, match="already exists"):
        idm.write_identity_files(tmp_path / "me", me, "p", log2_n=CHEAP)
    (tmp_path / "other.pub").write_text("someone's public file")
    with pytest.raises(KeyFileError, match="already exists"):
        idm.write_identity_files(tmp_path / "other", me, "p", log2_n=CHEAP)
    assert not (tmp_path / "other.key").exists()
    assert (tmp_path / "other.pub").read_text() == "someone's public file"


def test_refuses_to_write_through_a_symlink(tmp_path):
    target = tmp_path / "target"
    (tmp_path / "me.key").symlink_to(target)
    with pytest.raises(KeyFileError, match="already exists"):
        idm.write_identity_files(tmp_path / "me", ident(Kind.X25519), "p", log2_n=CHEAP)
    assert not target.exists()


def test_encrypt_identity_guards():
    me = ident(Kind.X25519)
    with pytest.raises(UsageError, match="empty passphrase"):
        idm.encrypt_identity(me, "", log2_n=CHEAP)
    with pytest.raises(ValueError, match="log2 N"):
        idm.encrypt_identity(me, "p", log2_n=9)
    assert idm.DEFAULT_SCRYPT_LOG2_N == 18


def _key_text(kind: Kind = Kind.X25519) -> str:
    return idm.encrypt_identity(ident(kind), "p", log2_n=CHEAP)


@pytest.mark.parametrize(
    ("mutate", "error"),
    [
        (lambda t: t.replace("log2n=10", "log2n=11"), PassphraseError),  # header is AAD
        (lambda t: t.replace("log2n=10", "log2n=9"), KeyFileError),
        (lambda t: t.replace("log2n=10", "log2n=30"), KeyFileError),
        (lambda t: t.replace("r=8", "r=1"), KeyFileError),
        (lambda t: t.replace("kind: x25519", "kind: rsa-oaep"), PassphraseError),
        (lambda t: t.replace("medfs secret identity v1", "medfs secret identity v2"), KeyFileError),
        (lambda t: t.replace("\n", "\r\n"), KeyFileError),
        (lambda t: t + "\n", KeyFileError),
        (lambda t: t.rstrip("\n"), KeyFileError),
        (lambda t: t.replace("salt: ", "salt: A"), KeyFileError),
    ],
)
def test_key_file_parse_is_strict(mutate, error):
    text = _key_text()
    assert idm.decrypt_identity(text, "p").kind is Kind.X25519
    with pytest.raises(error):
        idm.decrypt_identity(mutate(text), "p")


def test_key_file_body_tamper_is_detected():
    text = _key_text()
    lines = text.split("\n")
    body = lines[6]
    lines[6] = ("B" if body[0] != "B" else "C") + body[1:]
    with pytest.raises(PassphraseError):
        idm.decrypt_identity("\n".join(lines), "p")


@pytest.mark.parametrize("kind", list(Kind))
def test_public_file_round_trip(kind):
    public = ident(kind).public
    text = public.to_text()
    assert text.startswith(f"medfs public identity v1\nfingerprint: {public.fingerprint}\n")
    assert all(len(line) <= 64 for line in text.split("\n")[4:])
    assert text.isascii()
    assert PublicIdentity.from_text(text) == public
    assert PublicIdentity.from_bytes(public.to_bytes()) == public


@pytest.mark.parametrize(
    "mutate",
    [
        lambda t: t.replace("fingerprint: medfs1", "fingerprint: medfs1a", 1),
        lambda t: t.replace("kind: x25519", "kind: mlkem768-x25519"),
        lambda t: t.replace("medfs public identity v1", "medfs public identity v9"),
        lambda t: t.replace("\n", "\r\n"),
        lambda t: t + "trailing\n",
        lambda t: t + "\n",
        lambda t: t[:-1],
        lambda t: t.replace("\n\n", "\n"),
        lambda t: t.replace("\n\n", "\n\n\n"),
        lambda t: "\n".join(line[:-1] if i == 4 else line for i, line in enumerate(t.split("\n"))),
        lambda t: t[:-3] + "!\n",
        lambda t: "",
    ],
)
def test_malformed_public_file_is_a_key_file_error(mutate):
    text = ident(Kind.X25519).public.to_text()
    with pytest.raises(KeyFileError):
        PublicIdentity.from_text(mutate(text))


def test_public_file_with_swapped_signing_key_does_not_keep_its_fingerprint():
    mine, theirs = ident(Kind.X25519).public, Identity.generate(Kind.X25519).public
    forged = PublicIdentity(mine.kind, mine.encryption_key, theirs.signing_key)
    assert forged.fingerprint != mine.fingerprint
    header = forged.to_text().split("\n")
    header[1] = f"fingerprint: {mine.fingerprint}"
    with pytest.raises(KeyFileError, match="does not match"):
        PublicIdentity.from_text("\n".join(header))


def test_identity_encodings_are_strict():
    public = ident(Kind.X25519).public.to_bytes()
    secret = ident(Kind.X25519).to_secret_bytes()
    assert Identity.from_secret_bytes(secret).fingerprint == ident(Kind.X25519).fingerprint
    for bad in (
        public + b"\x00",
        public[:-1],
        b"medfs-xx" + public[8:],
        public[:8] + b"\x02" + public[9:],
    ):
        with pytest.raises(KeyFileError):
            PublicIdentity.from_bytes(bad)
    for bad in (secret + b"\x00", secret[:-1], public):
        with pytest.raises(KeyFileError):
            Identity.from_secret_bytes(bad)
    unknown_kind = public[:9] + b"\x07" + public[10:]
    with pytest.raises(KeyFileError, match="unknown key kind"):
        PublicIdentity.from_bytes(unknown_kind)


def test_fingerprint_covers_both_keys():
    a = ident(Kind.X25519).public
    other = Identity.generate(Kind.X25519).public
    assert PublicIdentity(a.kind, a.encryption_key, other.signing_key).fingerprint != a.fingerprint
    assert PublicIdentity(a.kind, other.encryption_key, a.signing_key).fingerprint != a.fingerprint
    assert recipients.is_fingerprint(a.fingerprint)


@pytest.mark.parametrize("kind", list(Kind))
def test_sign_and_verify(kind):
    me = ident(kind)
    signature = me.sign("share-manifest", b"canonical bytes")
    assert len(signature) == 64
    me.public.verify("share-manifest", b"canonical bytes", signature)
    with pytest.raises(FormatError, match="does not verify"):
        me.public.verify("share-manifest", b"canonical bytez", signature)
    with pytest.raises(FormatError, match="does not verify"):
        me.public.verify("audit-entry", b"canonical bytes", signature)
    with pytest.raises(FormatError, match="does not verify"):
        Identity.generate(Kind.X25519).public.verify(
            "share-manifest", b"canonical bytes", signature
        )
    with pytest.raises(ValueError, match="purpose"):
        me.sign("", b"x")


def test_unwrap_for_another_identity():
    stanza = recipients.wrap(KEY, ident(Kind.X25519).public.recipient(), CONTEXT)
    with pytest.raises(NotForIdentityError):
        ident(Kind.MLKEM768_X25519).unwrap(stanza, CONTEXT)


# --- RSA PEM import ---


def _pem(
    key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey, password: bytes | None = None
) -> bytes:
    encryption = (
        serialization.BestAvailableEncryption(password)
        if password
        else serialization.NoEncryption()
    )
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption
    )


def _certificate(key: rsa.RSAPrivateKey) -> bytes:
    import datetime

    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "hospital")])
    now = datetime.datetime(2026, 1, 1, tzinfo=datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(now)
        .not_valid_after(now + datetime.timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.PEM)


def test_rsa_pem_import():
    key = rsa_key()
    loaded = idm.load_rsa_pem(_pem(key))
    assert loaded.private_numbers() == key.private_numbers()
    combined = _certificate(key) + _pem(key)
    assert idm.load_rsa_pem(combined).private_numbers() == key.private_numbers()
    me = Identity.from_rsa_key(loaded)
    assert me.kind is Kind.RSA_OAEP


def test_rsa_pem_import_errors():
    key = rsa_key()
    with pytest.raises(KeyFileError, match="encrypted"):
        idm.load_rsa_pem(_pem(key, b"pw"))
    with pytest.raises(KeyFileError, match="certificate but no private key"):
        idm.load_rsa_pem(_certificate(key))
    with pytest.raises(KeyFileError, match="not an RSA key"):
        idm.load_rsa_pem(_pem(ec.generate_private_key(ec.SECP256R1())))
    with pytest.raises(KeyFileError, match="no PEM private key"):
        idm.load_rsa_pem(b"hello")
    with pytest.raises(KeyFileError, match="at least 3072"):
        Identity.from_rsa_key(rsa_key(2048))


# --- passphrase sources ---


def test_passphrase_from_env():
    assert idm.get_passphrase(env={"MEDFS_PASSPHRASE": "from env"}) == "from env"


def test_passphrase_file_wins_and_loses_one_line_ending(tmp_path):
    path = tmp_path / "pw"
    path.write_bytes(b"  spaced secret \r\n")
    env = {"MEDFS_PASSPHRASE": "from env"}
    assert idm.get_passphrase(passphrase_file=path, env=env) == "  spaced secret "
    path.write_bytes(b"two\n\n")
    assert idm.get_passphrase(passphrase_file=path, env=env) == "two\n"


@pytest.mark.parametrize("content", [b"", b"\n", b"\xff\xfe"])
def test_bad_passphrase_files(tmp_path, content):
    path = tmp_path / "pw"
    path.write_bytes(content)
    with pytest.raises(UsageError):
        idm.get_passphrase(passphrase_file=path)


def test_missing_passphrase_file(tmp_path):
    with pytest.raises(UsageError, match="cannot read"):
        idm.get_passphrase(passphrase_file=tmp_path / "absent")


def test_read_any_file(tmp_path):
    key_path, pub_path = idm.write_identity_files(
        tmp_path / "me", ident(Kind.X25519), "p", log2_n=CHEAP
    )
    assert idm.read_any_file(pub_path)[0] == "public"
    assert idm.read_any_file(key_path)[0] == "key"
    key_path.chmod(0o644)
    with pytest.raises(KeyFileError, match="group or others"):
        idm.read_any_file(key_path)
    other = tmp_path / "other"
    other.write_text("hello\n")
    with pytest.raises(KeyFileError, match="not a medfs"):
        idm.read_any_file(other)
    with pytest.raises(KeyFileError, match="does not exist"):
        idm.read_any_file(tmp_path / "absent")
    with pytest.raises(KeyFileError, match="not a regular file"):
        idm.read_public_file(tmp_path)
    big = tmp_path / "big"
    big.write_bytes(b"a" * (idm.MAX_FILE_SIZE + 1))
    with pytest.raises(KeyFileError, match="too large"):
        idm.read_public_file(big)
    os.chmod(big, 0o600)
