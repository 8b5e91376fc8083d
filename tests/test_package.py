"""Interop packages, both directions, on a real Kubo node and through a real mount.

The reader and writer of the package format below are independent of medfs.package: written
here from the issue's description with `cryptography` alone (RSA-OAEP-SHA256, AES-256-GCM), and
the IPFS adapter only to add and cat bytes.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import os
import sqlite3
import subprocess
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, padding, rsa
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from medfs import package
from medfs.errors import FormatError, KeyFileError, UsageError
from medfs.ipfs import IPFS
from tests.conftest import run_medfs
from tests.mounting import PASSPHRASE, init_state, mounted

FUSE = pytest.mark.skipif(not os.path.exists("/dev/fuse"), reason="needs /dev/fuse")

# -- an independent implementation of the format (the description, nothing more) --------

OAEP = padding.OAEP(mgf=padding.MGF1(hashes.SHA256()), algorithm=hashes.SHA256(), label=None)


def script_write(
    plaintext: bytes, to: Mapping[str, rsa.RSAPublicKey], ipfs: IPFS
) -> dict[str, Any]:
    key = os.urandom(32)
    nonce = os.urandom(12)
    cid = ipfs.add(AESGCM(key).encrypt(nonce, plaintext, None))
    return {
        "cid": cid,
        "nonce": base64.b64encode(nonce).decode(),
        "enc_keys": {
            rid: base64.b64encode(pub.encrypt(key, OAEP)).decode() for rid, pub in to.items()
        },
    }


def script_read(doc: Mapping[str, Any], rid: str, private: rsa.RSAPrivateKey, ipfs: IPFS) -> bytes:
    key = private.decrypt(base64.b64decode(doc["enc_keys"][rid]), OAEP)
    return AESGCM(key).decrypt(base64.b64decode(doc["nonce"]), ipfs.cat(doc["cid"]), None)


# -- helpers --------------------------------------------------------------------------------------


@dataclass
class RSAKey:
    private: rsa.RSAPrivateKey
    pem: Path  # public key, SubjectPublicKeyInfo PEM
    key: Path  # private key, unencrypted PKCS#8 PEM, mode 0600

    @property
    def public(self) -> rsa.RSAPublicKey:
        return self.private.public_key()


def make_key(root: Path, name: str, bits: int = 2048) -> RSAKey:
    private = rsa.generate_private_key(public_exponent=65537, key_size=bits)
    pem = root / f"{name}.pem"
    pem.write_bytes(
        private.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    key = root / f"{name}-private.pem"
    key.write_bytes(
        private.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    key.chmod(0o600)
    return RSAKey(private, pem, key)


@pytest.fixture(scope="module")
def people(tmp_path_factory: pytest.TempPathFactory) -> dict[str, RSAKey]:
    root = tmp_path_factory.mktemp("rsa")
    return {
        "bob": make_key(root, "bob"),
        "carol": make_key(root, "carol", 3072),
        "clinic": make_key(root, "clinic"),
        "stranger": make_key(root, "stranger"),
    }


def env_for(state: Path) -> dict[str, str]:
    return {"MEDFS_STATE": str(state), "MEDFS_PASSPHRASE": PASSPHRASE}


def medfs(state: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return run_medfs(*args, env=env_for(state))


def ok(out: subprocess.CompletedProcess[str]) -> subprocess.CompletedProcess[str]:
    assert out.returncode == 0, out.stderr
    return out


def audit_events(state: Path, name: str) -> list[dict[str, Any]]:
    events = json.loads(ok(medfs(state, "audit", "show", "--json")).stdout)
    return [e for e in events if e["event"] == name]


def listing(state: Path) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = json.loads(ok(medfs(state, "ls", "/", "--json")).stdout)
    return rows


def unknown_cid() -> str:
    """A well-formed CIDv1 (raw, sha2-256) of random bytes that no node has."""
    digest = hashlib.sha256(os.urandom(32)).digest()
    return "b" + base64.b32encode(b"\x01\x55\x12\x20" + digest).decode().lower().rstrip("=")


# -- unit tests: no node needed -------------------------------------------------------------------


def test_the_size_limit_is_one_aes_gcm_call() -> None:
    package.check_size(package.MAX_PLAINTEXT, "/big")  # exactly the limit is fine
    with pytest.raises(UsageError) as caught:
        package.check_size(package.MAX_PLAINTEXT + 1, "/big")
    assert caught.value.exit_code == 2
    assert "2,147,483,647" in caught.value.message
    assert package.MAX_PLAINTEXT == 2**31 - 1


@pytest.mark.parametrize(
    ("doc", "why"),
    [
        (b"not json", "not valid JSON"),
        (b"[]", "JSON object"),
        (b'{"cid": "bafy", "nonce": "AAAAAAAAAAAAAAAA"}', "no 'enc_keys'"),
        (b'{"cid": 7, "nonce": "AAAAAAAAAAAAAAAA", "enc_keys": {"a": "AA=="}}', "not a CID"),
        (b'{"cid": "b", "cid": "b", "nonce": "", "enc_keys": {}}', "not valid JSON"),
        (b'{"cid": "bafy", "nonce": "A A", "enc_keys": {"a": "AA=="}}', "not base64"),
        (
            b'{"cid": "bafy", "nonce": "AAAAAAAAAAAAAAAAAAAAAA==", "enc_keys": {"a": "AA=="}}',
            "16 bytes",
        ),
        (b'{"cid": "bafy", "nonce": "AAAAAAAAAAAAAAAA", "enc_keys": {}}', "empty"),
        (b'{"cid": "bafy", "nonce": "AAAAAAAAAAAAAAAA", "enc_keys": []}', "object"),
        (b'{"cid": "bafy", "nonce": "AAAAAAAAAAAAAAAA", "enc_keys": {"a": "AA=="}}', "no RSA key"),
    ],
)
def test_malformed_packages_are_format_errors(doc: bytes, why: str) -> None:
    with pytest.raises(FormatError) as caught:
        package.Package.parse(doc)
    assert why in caught.value.message
    assert caught.value.exit_code == 7


def test_public_keys_must_be_rsa_of_2048_bits_or_more(tmp_path: Path) -> None:
    small = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    pem = small.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    with pytest.raises(KeyFileError, match="at least 2048 bits"):
        package.load_public_pem(pem, "small.pem")
    edwards = (
        ed25519.Ed25519PrivateKey.generate()
        .public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    with pytest.raises(KeyFileError, match="not an RSA key"):
        package.load_public_pem(edwards, "ed.pem")
    private = small.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    with pytest.raises(KeyFileError, match="holds a private key"):
        package.load_public_pem(private, "key.pem")
    with pytest.raises(KeyFileError, match="not a PEM public key"):
        package.load_public_pem(b"garbage", "x.pem")
    pkcs1 = rsa.generate_private_key(public_exponent=65537, key_size=2048).public_key()
    loaded = package.load_public_pem(
        pkcs1.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.PKCS1), "p.pem"
    )
    assert loaded.public_numbers() == pkcs1.public_numbers()


# -- both directions on a real node ---------------------------------------------------------------


@FUSE
def test_export_opens_with_an_independent_reader(
    tmp_path: Path, kubo_api: str, ipfs: IPFS, people: dict[str, RSAKey]
) -> None:
    record = os.urandom(3 * 65536 + 1234)  # several medfs segments
    bob, carol = people["bob"], people["carol"]
    out = tmp_path / "pkg.json"
    with mounted(tmp_path, kubo_api) as m:
        (m.mnt / "labs").mkdir()
        (m.mnt / "labs" / "cbc.bin").write_bytes(record)
        # A path inside the running mount; ids default to the PEM files' names.
        run = ok(m.medfs("export-package", str(m.mnt / "labs" / "cbc.bin"), "--to", str(bob.pem),
                         "--to", str(carol.pem), "--out", str(out), "--api", kubo_api))  # fmt: skip
        assert "medfs: warning: the package format holds the whole file in memory" in run.stderr
        m.umount()
    doc = json.loads(out.read_text())
    assert set(doc) == {"cid", "nonce", "enc_keys"}
    assert set(doc["enc_keys"]) == {"bob", "carol"}
    assert len(base64.b64decode(doc["nonce"])) == 12
    for rid in ("bob", "carol"):
        assert script_read(doc, rid, people[rid].private, ipfs) == record
    assert doc["cid"] in ipfs.pins()
    ciphertext = ipfs.cat(doc["cid"])
    assert len(ciphertext) == len(record) + 16 and record[:64] not in ciphertext

    # Unmounted, by manifest path, with explicit ids: a fresh key and nonce every time.
    again = tmp_path / "again.json"
    ok(medfs(m.state, "export-package", "/labs/cbc.bin", "--to", str(bob.pem), "--id",
             "dr-bob@clinic", "--out", str(again), "--api", kubo_api))  # fmt: skip
    doc2 = json.loads(again.read_text())
    assert list(doc2["enc_keys"]) == ["dr-bob@clinic"]
    assert doc2["cid"] != doc["cid"] and doc2["nonce"] != doc["nonce"]
    assert script_read(doc2, "dr-bob@clinic", bob.private, ipfs) == record

    exports = audit_events(m.state, "export-package")
    assert [e["cid"] for e in exports] == [doc["cid"], doc2["cid"]]
    assert exports[0]["details"]["path"] == "/labs/cbc.bin"
    assert exports[0]["details"]["size"] == len(record)
    assert [r["id"] for r in exports[0]["details"]["recipients"]] == ["bob", "carol"]
    spki = bob.public.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    assert exports[0]["details"]["recipients"][0]["key_sha256"] == hashlib.sha256(spki).hexdigest()


@FUSE
def test_import_from_an_independent_writer_unmounted_and_mounted(
    tmp_path: Path, kubo_api: str, ipfs: IPFS, people: dict[str, RSAKey]
) -> None:
    clinic = people["clinic"]
    first = os.urandom(200_000)
    second = b"discharge summary\n" * 5000
    state = tmp_path / "state"
    init_state(state)
    doc = script_write(first, {"bob": people["bob"].public, "clinic": clinic.public}, ipfs)
    (tmp_path / "first.json").write_text(json.dumps(doc))
    pins_before = ipfs.pins()
    run = ok(medfs(state, "import-package", str(tmp_path / "first.json"), "--key",
                   str(clinic.key), "--as", "/first.bin", "--api", kubo_api))  # fmt: skip
    assert "imported 200,000 bytes as /first.bin" in run.stdout
    (row,) = listing(state)
    assert row["path"] == "/first.bin" and row["size"] == len(first)
    assert row["cid"] != doc["cid"] and row["cid"] in ipfs.pins()
    assert ipfs.pins() - pins_before == {row["cid"]}  # the package's ciphertext is not pinned

    with mounted(tmp_path, kubo_api) as m:
        assert (m.mnt / "first.bin").read_bytes() == first
        # While mounted: into a directory made through the mount, named by its mount path.
        (m.mnt / "inbox").mkdir()
        doc2 = script_write(second, {"clinic": clinic.public}, ipfs)
        (tmp_path / "second.json").write_text(json.dumps(doc2))
        ok(m.medfs("import-package", str(tmp_path / "second.json"), "--key", str(clinic.key),
                   "--as", str(m.mnt / "inbox" / "summary.txt"), "--id", "clinic",
                   "--api", kubo_api))  # fmt: skip
        target = m.mnt / "inbox" / "summary.txt"
        assert wait_for(lambda: target.exists())
        assert target.read_bytes() == second
        assert "summary.txt" in os.listdir(m.mnt / "inbox")
        # The imported file is an ordinary medfs file: it can be rewritten in place.
        with open(target, "r+b") as fh:
            fh.seek(5)
            fh.write(b"XXXX")
        m.umount()
        m.mount()
        assert (m.mnt / "first.bin").read_bytes() == first
        assert target.read_bytes() == second[:5] + b"XXXX" + second[9:]

    imports = audit_events(state, "import-package")
    assert [e["details"]["path"] for e in imports] == ["/first.bin", "/inbox/summary.txt"]
    assert imports[0]["details"]["package_cid"] == doc["cid"]
    assert imports[0]["details"]["opened_as"] == "clinic"
    assert imports[0]["cid"] == row["cid"]


def wait_for(check: Callable[[], bool], seconds: float = 5.0) -> bool:
    deadline = time.monotonic() + seconds
    while not check():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


@dataclass
class Store:
    state: Path
    rows: list[dict[str, Any]]

    def inodes(self) -> tuple[int, int]:
        """(inodes, highest inode number ever given): an inode made and removed shows too."""
        uri = f"file:{self.state / 'manifest.db'}?mode=ro"
        with contextlib.closing(sqlite3.connect(uri, uri=True)) as db:
            (count,) = db.execute("SELECT count(*) FROM inodes").fetchone()
            (seq,) = db.execute("SELECT seq FROM sqlite_sequence WHERE name = 'inodes'").fetchone()
        return int(count), int(seq)


@pytest.fixture(scope="module")
def store(
    tmp_path_factory: pytest.TempPathFactory, kubo_api: str, people: dict[str, RSAKey]
) -> Store:
    """A state directory holding one imported file, for the failure cases."""
    root = tmp_path_factory.mktemp("store")
    state = root / "state"
    init_state(state)
    with contextlib.closing(IPFS(kubo_api)) as ipfs:
        doc = script_write(b"kept\n", {"clinic": people["clinic"].public}, ipfs)
    (root / "kept.json").write_text(json.dumps(doc))
    ok(medfs(state, "import-package", str(root / "kept.json"), "--key",
             str(people["clinic"].key), "--as", "/kept.txt", "--api", kubo_api))  # fmt: skip
    return Store(state, listing(state))


def _bad(
    name: str, root: Path, ipfs: IPFS, people: dict[str, RSAKey]
) -> tuple[bytes, RSAKey, int, str]:
    """(package bytes, key to open it with, exit code, message) for one bad package."""
    clinic = people["clinic"]
    plain = b"lab result 42\n" * 100
    good = script_write(plain, {"clinic": clinic.public}, ipfs)

    def with_(**changes: Any) -> bytes:
        return json.dumps({**good, **changes}).encode()

    def without(field: str) -> bytes:
        return json.dumps({k: v for k, v in good.items() if k != field}).encode()

    key = base64.b64decode(good["enc_keys"]["clinic"])
    file_key = clinic.private.decrypt(key, OAEP)
    nonce = base64.b64decode(good["nonce"])
    if name == "missing-cid":
        return without("cid"), clinic, 7, "no 'cid' field"
    if name == "missing-nonce":
        return without("nonce"), clinic, 7, "no 'nonce' field"
    if name == "missing-enc-keys":
        return without("enc_keys"), clinic, 7, "no 'enc_keys' field"
    if name == "wrong-type":
        return with_(enc_keys=["clinic", good["enc_keys"]["clinic"]]), clinic, 7, "'enc_keys'"
    if name == "bad-base64":
        return with_(nonce="not base64!"), clinic, 7, "not base64"
    if name == "short-nonce":
        return with_(nonce=base64.b64encode(nonce[:8]).decode()), clinic, 7, "nonce is 8 bytes"
    if name == "not-json":
        return b"{cid: ", clinic, 7, "not valid JSON"
    if name == "wrong-key":
        return with_(), people["stranger"], 8, "no entry of the package opens"
    if name == "wrong-nonce":
        other = base64.b64encode(os.urandom(12)).decode()
        return with_(nonce=other), clinic, 7, "fails authentication"
    if name == "tampered":
        flipped = bytearray(ipfs.cat(good["cid"]))
        flipped[10] ^= 1
        return with_(cid=ipfs.add(bytes(flipped))), clinic, 7, "fails authentication"
    if name == "truncated":
        cut = ipfs.cat(good["cid"])[:-16]
        return with_(cid=ipfs.add(cut)), clinic, 7, "fails authentication"
    if name == "short-key":
        short = base64.b64encode(clinic.public.encrypt(file_key[:16], OAEP)).decode()
        return with_(enc_keys={"clinic": short}), clinic, 7, "holds a 16-byte key"
    if name == "unknown-cid":
        return with_(cid=unknown_cid()), clinic, 3, "cannot find the package's ciphertext"
    raise AssertionError(name)


BAD = [
    "missing-cid", "missing-nonce", "missing-enc-keys", "wrong-type", "bad-base64",
    "short-nonce", "not-json", "wrong-key", "wrong-nonce", "tampered", "truncated",
    "short-key", "unknown-cid",
]  # fmt: skip


@pytest.mark.parametrize("case", BAD)
def test_a_bad_package_fails_clearly_and_stores_nothing(
    case: str, store: Store, tmp_path: Path, kubo_api: str, ipfs: IPFS, people: dict[str, RSAKey]
) -> None:
    data, key, code, message = _bad(case, tmp_path, ipfs, people)
    (tmp_path / "bad.json").write_bytes(data)
    pins, inodes = ipfs.pins(), store.inodes()
    audit_log = (store.state / "audit.log").read_bytes()
    out = medfs(store.state, "import-package", str(tmp_path / "bad.json"), "--key", str(key.key),
                "--as", "/bad.bin", "--api", kubo_api, "--timeout", "2")  # fmt: skip
    assert out.returncode == code, out.stderr
    assert out.stderr.startswith("medfs: error: ") and message in out.stderr, out.stderr
    assert "Traceback" not in out.stderr
    assert store.inodes() == inodes
    assert ipfs.pins() == pins
    assert (store.state / "audit.log").read_bytes() == audit_log
    assert listing(store.state) == store.rows


def test_bad_targets_and_keys_store_nothing(
    tmp_path: Path, kubo_api: str, ipfs: IPFS, people: dict[str, RSAKey]
) -> None:
    clinic = people["clinic"]
    state = tmp_path / "state"
    init_state(state)
    doc = script_write(b"x" * 1000, {"clinic": clinic.public}, ipfs)
    pkg = tmp_path / "pkg.json"
    pkg.write_text(json.dumps(doc))

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return medfs(state, "import-package", str(pkg), "--api", kubo_api, *args)

    ok(run("--key", str(clinic.key), "--as", "/x.bin"))
    rows = listing(state)
    out = run("--key", str(clinic.key), "--as", "/x.bin")
    assert out.returncode == 2 and "already exists" in out.stderr, out.stderr
    out = run("--key", str(clinic.key), "--as", "/no/such/dir/x.bin")
    assert out.returncode == 2 and "no such directory" in out.stderr, out.stderr
    assert "hint: create it first" in out.stderr
    out = run("--key", str(clinic.key), "--as", "/" + "n" * 300)
    assert out.returncode == 2 and "at most 255 bytes" in out.stderr, out.stderr
    loose = tmp_path / "loose.pem"
    loose.write_bytes(clinic.key.read_bytes())
    loose.chmod(0o644)
    out = run("--key", str(loose), "--as", "/y.bin")
    assert out.returncode == 5 and "chmod 600" in out.stderr, out.stderr
    public = tmp_path / "public.pem"
    public.write_bytes(clinic.pem.read_bytes())
    public.chmod(0o600)
    out = run("--key", str(public), "--as", "/y.bin")  # a public key
    assert out.returncode == 5 and "no PEM private key" in out.stderr, out.stderr
    assert listing(state) == rows


def test_export_refusals(tmp_path: Path, kubo_api: str, ipfs: IPFS, people: dict[str, RSAKey],
                         monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
                         ) -> None:  # fmt: skip
    clinic, bob = people["clinic"], people["bob"]
    state = tmp_path / "state"
    init_state(state)
    pkg = tmp_path / "in.json"
    pkg.write_text(json.dumps(script_write(b"y" * 100, {"clinic": clinic.public}, ipfs)))
    ok(medfs(state, "import-package", str(pkg), "--key", str(clinic.key), "--as", "/y.bin",
             "--api", kubo_api))  # fmt: skip
    out_path = tmp_path / "out.json"

    def export(*args: str) -> subprocess.CompletedProcess[str]:
        return medfs(state, "export-package", *args, "--out", str(out_path), "--api", kubo_api)

    out = export("/y.bin", "--to", str(bob.pem), "--id", "a", "--id", "b")
    assert out.returncode == 2 and "2 --id for 1 --to" in out.stderr, out.stderr
    out = export("/y.bin", "--to", str(bob.pem), "--to", str(bob.pem))
    assert out.returncode == 2 and "distinct" in out.stderr, out.stderr
    out = export("/nope.bin", "--to", str(bob.pem))
    assert out.returncode == 2 and "no such file" in out.stderr, out.stderr
    out = export("/", "--to", str(bob.pem))
    assert out.returncode == 2 and "not a regular file" in out.stderr, out.stderr
    out = export("/y.bin", "--to", str(bob.key))
    assert out.returncode == 5 and "holds a private key" in out.stderr, out.stderr
    assert not out_path.exists()

    # Over the one-shot AES-GCM limit: refused before a byte is read (a 2 GiB file is too
    # heavy for a test, so the limit is lowered below this file's 100 bytes).
    from medfs.cli import main

    monkeypatch.setattr(package, "MAX_PLAINTEXT", 99)
    monkeypatch.setenv("MEDFS_STATE", str(state))
    monkeypatch.setenv("MEDFS_PASSPHRASE", PASSPHRASE)
    code = main.main(["export-package", "/y.bin", "--to", str(bob.pem), "--out", str(out_path),
                      "--api", "/ip4/127.0.0.1/tcp/1"])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2, err
    assert "/y.bin is 100 bytes; a package encrypts the whole file in one AES-GCM call" in err
    assert "warning" not in err
    assert not out_path.exists()
    assert audit_events(state, "export-package") == []
