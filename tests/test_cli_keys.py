"""`medfs keygen` and `medfs id`, run as a user would: the real CLI in a subprocess."""

from __future__ import annotations

import functools
import json
import os
import stat
import subprocess
import sys
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from medfs import identity as idm
from medfs.recipients import is_fingerprint

ROOT = Path(__file__).resolve().parent.parent
PASSPHRASE = "correct horse battery staple"


def medfs(*args, cwd: Path, passphrase: str | None = PASSPHRASE, **kwargs):
    env = {k: v for k, v in os.environ.items() if not k.startswith("MEDFS_")}
    env["PYTHONPATH"] = str(ROOT)
    if passphrase is not None:
        env["MEDFS_PASSPHRASE"] = passphrase
    return subprocess.run(
        [sys.executable, "-m", "medfs", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        **kwargs,
    )


def assert_user_error(result, code: int, needle: str) -> None:
    assert result.returncode == code, result.stderr
    assert result.stderr.startswith("medfs: error: "), result.stderr
    assert "Traceback" not in result.stderr
    assert needle in result.stderr


@functools.cache
def pem(bits: int) -> bytes:
    key = rsa.generate_private_key(public_exponent=65537, key_size=bits)
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def test_keygen_then_id(tmp_path):
    result = medfs("keygen", "--out", "alice", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    key, pub = tmp_path / "alice.key", tmp_path / "alice.pub"
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    first = result.stdout.splitlines()[0]
    assert first.startswith("fingerprint: ")
    fingerprint = first.removeprefix("fingerprint: ")
    assert is_fingerprint(fingerprint)
    assert "kind: mlkem768-x25519" in result.stdout
    # The CLI writes the full default scrypt cost, never a lowered one.
    assert f"kdf: scrypt log2n={idm.DEFAULT_SCRYPT_LOG2_N} r=8 p=1" in key.read_text()
    assert PASSPHRASE not in key.read_text()

    shown = medfs("id", "alice.pub", cwd=tmp_path, passphrase=None)
    assert shown.returncode == 0, shown.stderr
    assert shown.stdout == pub.read_text()
    assert f"fingerprint: {fingerprint}" in shown.stdout

    from_key = medfs("id", "alice.key", "--json", cwd=tmp_path)
    assert from_key.returncode == 0, from_key.stderr
    data = json.loads(from_key.stdout)
    assert data["fingerprint"] == fingerprint
    assert data["kind"] == "mlkem768-x25519"
    assert data["source"] == "key"
    assert data["public_file"] == pub.read_text()

    again = medfs("keygen", "--out", "alice", cwd=tmp_path)
    assert_user_error(again, 5, "already exists")

    wrong = medfs("id", "alice.key", cwd=tmp_path, passphrase="not it")
    assert_user_error(wrong, 6, "wrong passphrase")

    key.chmod(0o640)
    loose = medfs("id", "alice.key", cwd=tmp_path)
    assert_user_error(loose, 5, "group or others")
    assert "medfs: hint: make it private with: chmod 600 alice.key" in loose.stderr


def test_keygen_classic_with_passphrase_file(tmp_path):
    (tmp_path / "pw").write_text("from a file\n")
    result = medfs(
        "keygen",
        "--classic",
        "--out",
        "bob",
        "--passphrase-file",
        "pw",
        cwd=tmp_path,
        passphrase=None,
    )
    assert result.returncode == 0, result.stderr
    assert "kind: x25519" in result.stdout
    identity = idm.read_key_file(tmp_path / "bob.key", "from a file")
    assert identity.public == idm.read_public_file(tmp_path / "bob.pub")


def test_keygen_rsa_from_pem(tmp_path):
    (tmp_path / "hospital.pem").write_bytes(pem(3072))
    result = medfs("keygen", "--rsa", "--from-pem", "hospital.pem", "--out", "h", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "kind: rsa-oaep" in result.stdout
    public = idm.read_public_file(tmp_path / "h.pub")
    expected = (
        serialization.load_pem_private_key(pem(3072), None)
        .public_key()
        .public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    assert public.encryption_key == expected


def test_keygen_refuses_small_rsa(tmp_path):
    (tmp_path / "small.pem").write_bytes(pem(2048))
    result = medfs("keygen", "--rsa", "--from-pem", "small.pem", "--out", "s", cwd=tmp_path)
    assert_user_error(result, 5, "at least 3072 bits")
    assert not (tmp_path / "s.key").exists()


def test_keygen_usage_errors(tmp_path):
    result = medfs("keygen", "--from-pem", "x.pem", "--out", "s", cwd=tmp_path)
    assert_user_error(result, 2, "--from-pem needs --rsa")
    both = medfs("keygen", "--rsa", "--classic", "--out", "s", cwd=tmp_path)
    assert both.returncode == 2
    assert "not allowed with" in both.stderr


def test_no_passphrase_source_and_no_terminal(tmp_path):
    result = medfs(
        "keygen",
        "--out",
        "c",
        cwd=tmp_path,
        passphrase=None,
        stdin=subprocess.DEVNULL,
        start_new_session=True,
    )
    assert_user_error(result, 2, "no terminal")
    assert "MEDFS_PASSPHRASE" in result.stderr
    assert not (tmp_path / "c.key").exists()


def test_id_errors(tmp_path):
    (tmp_path / "bad.pub").write_text("medfs public identity v1\nfingerprint: x\n")
    assert_user_error(medfs("id", "bad.pub", cwd=tmp_path), 5, "malformed")
    assert_user_error(medfs("id", "absent.pub", cwd=tmp_path), 5, "does not exist")
    assert_user_error(medfs("id", cwd=tmp_path), 2, "no identity file given")
