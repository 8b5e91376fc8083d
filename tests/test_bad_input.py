"""One test per row of docs/ERRORS.md: a clear message, a distinct code or errno, nothing lost."""

from __future__ import annotations

import errno
import json
import os
import re
import subprocess
from pathlib import Path

import pytest

from medfs.kubo import EmbeddedNode
from tests.conftest import run_medfs
from tests.mounting import PASSPHRASE, Mounted, init_state, mounted

FUSE = pytest.mark.skipif(not os.path.exists("/dev/fuse"), reason="needs /dev/fuse")


def env_for(state: Path, **extra: str) -> dict[str, str]:
    return {"MEDFS_STATE": str(state), "MEDFS_PASSPHRASE": PASSPHRASE, **extra}


def assert_clean_error(out: subprocess.CompletedProcess[str], code: int, text: str) -> None:
    assert out.returncode == code, (out.returncode, out.stderr)
    assert out.stderr.startswith("medfs: error: "), out.stderr
    assert text in out.stderr, out.stderr
    assert "Traceback" not in out.stderr


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("keys")
    out = run_medfs("keygen", "--out", str(root / "alice"), env={"MEDFS_PASSPHRASE": PASSPHRASE})
    assert out.returncode == 0, out.stderr
    return root


def test_wrong_passphrase(tmp_path: Path, keys: Path) -> None:
    out = run_medfs("init", "--key", str(keys / "alice.key"),
                    env=env_for(tmp_path / "s", MEDFS_PASSPHRASE="not it"))  # fmt: skip
    assert_clean_error(out, 6, "wrong passphrase")
    assert not (tmp_path / "s" / "config.json").exists()


def test_wrong_passphrase_for_a_command_that_unlocks_in_the_background(tmp_path: Path) -> None:
    # share, revoke and grants decrypt the key in a worker thread: its errors still come out
    # as the one clean message and exit code.
    init_state(tmp_path / "s")
    out = run_medfs("grants", env=env_for(tmp_path / "s", MEDFS_PASSPHRASE="not it"))
    assert_clean_error(out, 6, "wrong passphrase")
    assert run_medfs("grants", env=env_for(tmp_path / "s")).stdout.strip() == "nothing is shared"


def test_key_file_readable_by_others(tmp_path: Path, keys: Path) -> None:
    loose = tmp_path / "loose.key"
    loose.write_bytes((keys / "alice.key").read_bytes())
    loose.chmod(0o644)
    out = run_medfs("init", "--key", str(loose), env=env_for(tmp_path / "s"))
    assert_clean_error(out, 5, "accessible by group or others")
    assert "chmod 600" in out.stderr


@pytest.mark.parametrize(
    "content",
    [
        "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIB user@host\n",  # foreign
        "medfs public identity v1\nfingerprint: medfs1xxxx\n",  # malformed
        "",
    ],
)
def test_malformed_or_foreign_public_file(tmp_path: Path, content: str) -> None:
    pub = tmp_path / "x.pub"
    pub.write_text(content)
    out = run_medfs("id", str(pub))
    assert out.returncode == 5, out.stderr
    assert out.stderr.startswith("medfs: error: ") and "Traceback" not in out.stderr


def test_truncated_identity_file(tmp_path: Path, keys: Path) -> None:
    cut = tmp_path / "cut.key"
    cut.write_bytes((keys / "alice.key").read_bytes()[:150])
    cut.chmod(0o600)
    out = run_medfs("init", "--key", str(cut), env=env_for(tmp_path / "s"))
    assert_clean_error(out, 5, "malformed key file")


@FUSE
def test_corrupt_manifest_database(tmp_path: Path, kubo_api: str) -> None:
    state = tmp_path / "state"
    init_state(state)
    db = state / "manifest.db"
    db.write_bytes(b"this is not SQLite" * 100)
    before = db.read_bytes()
    (tmp_path / "mnt").mkdir()
    out = run_medfs("mount", str(tmp_path / "mnt"), "--api", kubo_api, env=env_for(state))
    assert_clean_error(out, 7, "not a medfs manifest")
    assert db.read_bytes() == before  # refused, not "repaired" into an empty one
    assert not os.path.ismount(tmp_path / "mnt")


@FUSE
def test_share_manifest_cid_on_no_reachable_node(tmp_path: Path, kubo_api: str, keys: Path) -> None:
    state = tmp_path / "state"
    init_state(state)
    (tmp_path / "mnt").mkdir()
    missing = "bafkreihdwdcefgh4dqkjv67uzcmw7ojee6xedzdetojuzjevtenxquvyku"  # "hello" + nobody
    out = run_medfs(
        "mount", str(tmp_path / "mnt"), "--manifest", missing, "--from", str(keys / "alice.pub"),
        "--api", kubo_api, "--timeout", "2", env=env_for(state), timeout=120,
    )  # fmt: skip
    assert_clean_error(out, 3, "did not answer within 2 s")


@FUSE
def test_flipped_bits_on_the_node(tmp_path: Path) -> None:
    node = EmbeddedNode(tmp_path / "state")
    m = Mounted(node.state, tmp_path / "mnt", "")
    m.mnt.mkdir()
    init_state(m.state)
    out = run_medfs("mount", str(m.mnt), env=m.env)
    assert out.returncode == 0, out.stderr
    try:
        data = os.urandom(3 * 65536 + 100)
        (m.mnt / "scan.dcm").write_bytes(data)
        m.umount()
        block = next(
            p for p in (node.repo / "blocks").rglob("*.data")
            if p.read_bytes().startswith(b"MEDFSOBJ") and p.stat().st_size == 42 + len(data) + 64
        )  # fmt: skip
        raw = bytearray(block.read_bytes())
        raw[42 + 65552 + 1000] ^= 0x40  # inside segment 1
        block.write_bytes(bytes(raw))
        out = run_medfs("mount", str(m.mnt), env=m.env)
        assert out.returncode == 0, out.stderr
        assert (m.mnt / "scan.dcm").read_bytes() == data  # from the intact local copy
        out = run_medfs("verify", "--deep", "--json", env=m.env)
        assert out.returncode == 14, out.stderr  # which does not hide the node's damage
        assert "corrupt" in out.stdout
        m.umount()
        # Without local copies (deleted at this mount's start), reads meet the damage.
        out = run_medfs("mount", str(m.mnt), env={**m.env, "MEDFS_COPIES_LIMIT": "0"})
        assert out.returncode == 0, out.stderr
        with open(m.mnt / "scan.dcm", "rb") as fh:
            assert os.pread(fh.fileno(), 65536, 0) == data[:65536]  # segment 0 reads
            assert os.pread(fh.fileno(), 100, 3 * 65536) == data[3 * 65536 :]  # the last too
            with pytest.raises(OSError) as info:
                os.pread(fh.fileno(), 4096, 65536 + 500)
            assert info.value.errno == errno.EIO
        assert "fails authentication" in (m.state / "mount.log").read_text()
        out = run_medfs("verify", "--deep", "--json", env=m.env)
        assert out.returncode == 14, out.stderr
        assert "corrupt" in out.stdout
        m.umount()
    finally:
        m.force_cleanup()
        node.stop()


@FUSE
def test_mountpoint_missing_not_empty_or_mounted(tmp_path: Path, kubo_api: str) -> None:
    state = tmp_path / "state"
    init_state(state)
    env = env_for(state)
    out = run_medfs("mount", str(tmp_path / "missing"), "--api", kubo_api, env=env)
    assert_clean_error(out, 2, "is not a directory")
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "a-file").write_text("mine")
    out = run_medfs("mount", str(busy), "--api", kubo_api, env=env)
    assert_clean_error(out, 2, "is not empty")
    assert (busy / "a-file").read_text() == "mine"
    with mounted(tmp_path / "other", kubo_api) as m:
        out = run_medfs("mount", str(m.mnt), "--api", kubo_api, env=env)
        assert_clean_error(out, 9, "already a mount point")


@FUSE
def test_state_directory_locked_by_another_mount(tmp_path: Path, kubo_api: str) -> None:
    with mounted(tmp_path, kubo_api) as m:
        second = tmp_path / "second"
        second.mkdir()
        out = m.medfs("mount", str(second), "--api", kubo_api)
        assert_clean_error(out, 9, "already mounted")
        assert f"pid {m.daemon_pid()}" in out.stderr


@FUSE
def test_staging_full(tmp_path: Path, kubo_api: str) -> None:
    state = tmp_path / "state"
    init_state(state)
    m = Mounted(state, tmp_path / "mnt", kubo_api)
    m.mnt.mkdir()
    out = run_medfs("mount", str(m.mnt), "--api", kubo_api,
                    env=env_for(state, MEDFS_STAGING_LIMIT=str(1 << 20)))  # fmt: skip
    assert out.returncode == 0, out.stderr
    try:
        (m.mnt / "kept.txt").write_bytes(b"stored before")
        fd = os.open(m.mnt / "sparse.bin", os.O_CREAT | os.O_WRONLY, 0o644)
        try:
            with pytest.raises(OSError) as info:
                for i in range(64):  # random writes go to the staging area: 64 KiB records
                    os.pwrite(fd, b"x" * 100, (63 - i) * 65536)
            assert info.value.errno == errno.ENOSPC
        finally:
            os.close(fd)
        assert (m.mnt / "kept.txt").read_bytes() == b"stored before"
        m.umount()
    finally:
        m.force_cleanup()


@FUSE
def test_name_too_long(tmp_path: Path, kubo_api: str) -> None:
    with mounted(tmp_path, kubo_api) as m:
        with pytest.raises(OSError) as info:
            (m.mnt / ("n" * 256)).write_bytes(b"")
        assert info.value.errno == errno.ENAMETOOLONG


@FUSE
def test_kubo_answering_with_errors(tmp_path: Path, kubo_api: str, keys: Path) -> None:
    state = tmp_path / "state"
    init_state(state)
    out = run_medfs(
        "share", "/nothing-here", "--to", str(keys / "alice.pub"), "--api", kubo_api,
        env=env_for(state),
    )  # fmt: skip
    assert_clean_error(out, 2, "no such file or directory in medfs")
    (tmp_path / "mnt").mkdir()
    out = run_medfs(
        "mount", str(tmp_path / "mnt"), "--manifest", "not-a-cid", "--from",
        str(keys / "alice.pub"), "--api", kubo_api, env=env_for(state),
    )  # fmt: skip
    assert_clean_error(out, 2, "not a CID")
    out = run_medfs(
        "mount", str(tmp_path / "mnt"), "--manifest", "bafyNOTAVALIDCID", "--from",
        str(keys / "alice.pub"), "--api", kubo_api, env=env_for(state),
    )  # fmt: skip
    assert_clean_error(out, 3, "refused to read bafyNOTAVALIDCID")
    assert not os.path.ismount(tmp_path / "mnt")


def test_a_config_naming_another_identitys_key(tmp_path: Path, keys: Path) -> None:
    state = tmp_path / "s"
    out = run_medfs("init", "--key", str(keys / "alice.key"), env=env_for(state))
    assert out.returncode == 0, out.stderr
    other = tmp_path / "other"
    out = run_medfs("keygen", "--out", str(other), env={"MEDFS_PASSPHRASE": PASSPHRASE})
    assert out.returncode == 0, out.stderr
    config = json.loads((state / "config.json").read_text())
    config["key"] = str(other.with_suffix(".key"))
    (state / "config.json").write_text(json.dumps(config))
    manifest = (state / "manifest.db").read_bytes()
    out = run_medfs("grants", env=env_for(state))
    assert_clean_error(out, 5, f"{other.with_suffix('.key')} is identity")
    assert "but this state directory belongs to" in out.stderr
    assert (state / "manifest.db").read_bytes() == manifest  # nothing touched


@FUSE
def test_share_and_revoke_outputs_that_cannot_be_written(
    tmp_path: Path, kubo_api: str, keys: Path
) -> None:
    bob = keys / "alice.pub"  # any identity other than the mount's own
    with mounted(tmp_path / "owner", kubo_api) as m:
        (m.mnt / "r.txt").write_bytes(b"record")
        record = str(m.mnt / "r.txt")
        # Refused before anything is granted: the directory named for the manifest is missing.
        out = m.medfs("share", record, "--to", str(bob), "--out", str(tmp_path / "no" / "m"))
        assert_clean_error(out, 2, "no such directory")
        assert m.medfs("grants").stdout.strip() == "nothing is shared"
        # The grant is made and the manifest cannot be written (its temporary name is taken
        # by a directory): a clear error, the grant kept, and a hint that gets the manifest.
        (tmp_path / "m.tmp").mkdir()
        out = m.medfs("share", record, "--to", str(bob), "--out", str(tmp_path / "m"))
        assert_clean_error(out, 15, "cannot write the share manifest")
        assert "medfs: hint: " in out.stderr and "granted" in out.stdout
        assert "/r.txt" in m.medfs("grants").stdout
        out = m.medfs("share", record, "--to", str(bob), "--out", str(tmp_path / "m2"))
        assert out.returncode == 0, out.stderr
        assert (tmp_path / "m2").stat().st_size > 0
        assert (tmp_path / "m2").stat().st_mode & 0o777 == 0o600  # durable.replace's, synced
        # revoke's --out must be a directory it can make: refused before the revoke.
        (tmp_path / "plain").write_bytes(b"")
        out = m.medfs("revoke", record, "--from", str(bob), "--out", str(tmp_path / "plain"))
        assert_clean_error(out, 2, "not a directory")
        assert "/r.txt" in m.medfs("grants").stdout
        assert (m.mnt / "r.txt").read_bytes() == b"record"


@FUSE
def test_a_revoke_writes_every_other_manifest_it_can(tmp_path: Path, kubo_api: str) -> None:
    people = {}
    for name in ("bob", "carol", "dave"):
        out = run_medfs("keygen", "--out", str(tmp_path / name), env={"MEDFS_PASSPHRASE": "x"})
        assert out.returncode == 0, out.stderr
        out = run_medfs("id", str(tmp_path / f"{name}.pub"), "--json")
        people[name] = str(json.loads(out.stdout)["fingerprint"])
    with mounted(tmp_path / "owner", kubo_api) as m:
        (m.mnt / "d").mkdir()
        (m.mnt / "d" / "r.txt").write_bytes(b"record")
        sequence = {}
        for name in people:
            out = m.medfs("share", str(m.mnt / "d"), "--to", str(tmp_path / f"{name}.pub"),
                          "--out", str(tmp_path))  # fmt: skip
            assert out.returncode == 0, out.stderr
            sequence[name] = int(re.findall(r"share manifest #(\d+)", out.stdout)[-1])
        # Bob's fresh manifest cannot be written (its temporary name is a directory); Carol's can.
        sent = tmp_path / "sent"
        bob_next = f"share-{people['bob'][:16]}-{sequence['bob'] + 1}.medfs-share"
        (sent / f"{bob_next}.tmp").mkdir(parents=True)
        out = m.medfs("revoke", str(m.mnt / "d"), "--from", str(tmp_path / "dave.pub"),
                      "--out", str(sent))  # fmt: skip
        assert_clean_error(out, 15, "1 of 2 fresh share manifests were not written")
        assert out.stderr.count(people["bob"]) == 1 and "medfs: hint: " in out.stderr
        assert "re-encrypted 1 files" in out.stdout
        carol_next = f"share-{people['carol'][:16]}-{sequence['carol'] + 1}.medfs-share"
        assert (sent / carol_next).stat().st_size > 0
        assert not (sent / bob_next).exists()
        grants = m.medfs("grants").stdout
        assert people["dave"] not in grants and people["bob"] in grants
        # The hint's command gets Bob his manifest.
        out = m.medfs("share", str(m.mnt / "d"), "--to", str(tmp_path / "bob.pub"),
                      "--out", str(tmp_path / "for-bob"))  # fmt: skip
        assert out.returncode == 0, out.stderr
        assert (m.mnt / "d" / "r.txt").read_bytes() == b"record"
