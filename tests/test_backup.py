"""Manifest snapshots: taken at umount and while mounted, and restored on "another machine"."""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import pytest

from medfs import backup, identity, state
from medfs.identity import Identity
from medfs.ipfs import IPFS
from medfs.manifest import Manifest
from tests.conftest import run_medfs
from tests.mounting import MARKER, PASSPHRASE, Mounted, files_containing, init_state, mounted

pytestmark = pytest.mark.skipif(not os.path.exists("/dev/fuse"), reason="needs /dev/fuse")

FILES = {
    "visit.txt": MARKER + b" first visit\n",
    "labs/2026-01.csv": os.urandom(200_003),
    "labs/empty": b"",
    "imaging/scan.bin": os.urandom(1_100_000),
}


def write_tree(root: Path) -> None:
    for rel, data in FILES.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    os.symlink("labs/2026-01.csv", root / "latest-labs")


def check_tree(root: Path) -> None:
    for rel, data in FILES.items():
        assert (root / rel).read_bytes() == data, rel
    assert os.readlink(root / "latest-labs") == "labs/2026-01.csv"
    assert (root / "latest-labs").read_bytes() == FILES["labs/2026-01.csv"]


def status(env: dict[str, str], *args: str) -> dict[str, object]:
    out = run_medfs("status", "--json", *args, env=env)
    assert out.returncode == 0, out.stderr
    info: dict[str, object] = json.loads(out.stdout)
    return info


def keep_key(m: Mounted, where: Path) -> Path:
    """The owner's key, copied off "the laptop" before it is lost."""
    where.mkdir()
    key = where / "owner.key"
    shutil.copy2(m.state / "owner.key", key)
    os.chmod(key, 0o600)
    return key


def restore(cid: str, key: Path, new_state: Path, api: str) -> object:
    return run_medfs(
        "restore", "--from-cid", cid, "--key", str(key), "--state", str(new_state), "--api", api,
        env={"MEDFS_PASSPHRASE": PASSPHRASE},
    )  # fmt: skip


def test_lose_the_laptop_restore_and_read_everything_back(tmp_path: Path, kubo_api: str) -> None:
    with mounted(tmp_path, kubo_api) as m:
        write_tree(m.mnt)
        m.umount()
        first = status(m.env, "--api", kubo_api)["last_backup"]
        assert isinstance(first, dict) and first["cid"]
        # A second session: its snapshot also carries the audit anchor the first umount took.
        m.mount()
        (m.mnt / "labs" / "2026-02.csv").write_bytes(b"second session")
        m.umount()
    info = status(m.env, "--api", kubo_api)
    last = info["last_backup"]
    assert isinstance(last, dict) and last["cid"] != first["cid"]
    assert last["entries"] == 7  # 5 files and 2 directories besides the root; links not counted
    assert last["files"] == 5
    assert info["mounted"] is False
    assert info["umount_report"] == {"pending": []}
    # The snapshot is encrypted: neither a name nor a byte of a record is readable on IPFS.
    client = IPFS(kubo_api)
    try:
        sealed = client.cat(str(last["cid"]))
    finally:
        client.close()
    assert sealed.startswith(backup.MAGIC)
    assert MARKER not in sealed and b"visit.txt" not in sealed and b"SQLite" not in sealed

    key = keep_key(m, tmp_path / "usb-stick")
    shutil.rmtree(m.state)
    new_state = tmp_path / "new-laptop"
    out = restore(str(last["cid"]), key, new_state, kubo_api)
    assert out.returncode == 0, out.stderr
    assert "restored" in out.stdout

    again = Mounted(new_state, tmp_path / "mnt2", kubo_api)
    again.mnt.mkdir()
    again.mount()
    try:
        check_tree(again.mnt)
        assert (again.mnt / "labs" / "2026-02.csv").read_bytes() == b"second session"
        assert sorted(p.name for p in again.mnt.iterdir()) == [
            "imaging", "labs", "latest-labs", "visit.txt"
        ]  # fmt: skip
        (again.mnt / "after-restore.txt").write_bytes(b"new record")
        again.umount()
    finally:
        again.force_cleanup()
    # A fresh audit log, starting with where it came from; it verifies on its own.
    shown = again.medfs("audit", "show", "--json")
    assert shown.returncode == 0, shown.stderr
    entries = json.loads(shown.stdout)
    assert entries[0]["event"] == "restored" and entries[0]["cid"] == last["cid"]
    assert again.medfs("audit", "verify").returncode == 0
    # The lost machine's anchors are kept for reference, apart from the new log's own.
    restored = json.loads((new_state / backup.RESTORED_ANCHORS_NAME).read_text())
    assert len(restored) == 1 and restored[0]["cid"]  # the first session's umount anchor
    # The new state backs up too: its umount added a snapshot after the one restored from.
    backups = status(again.env, "--api", kubo_api)["backups"]
    assert isinstance(backups, list) and len(backups) == 2
    assert backups[0]["cid"] == last["cid"]
    assert files_containing(new_state, MARKER) == []


def test_snapshots_while_mounted_keep_the_newest_three(
    tmp_path: Path, kubo_api: str, ipfs: IPFS, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MEDFS_BACKUP_MINUTES", "0.01")  # every 0.6 s
    with mounted(tmp_path, kubo_api) as m:
        for i in range(5):
            (m.mnt / f"note-{i}.txt").write_bytes(b"note %d" % i)
            time.sleep(1.0)
        deadline = time.monotonic() + 30
        while True:
            info = status(m.env, "--api", kubo_api)
            last = info["last_backup"]
            if isinstance(last, dict) and last["files"] == 5:
                break
            assert time.monotonic() < deadline, "no snapshot of all five files while mounted"
            time.sleep(0.2)
        assert info["mounted"] is True
        time.sleep(1.0)  # let a snapshot of the last commit finish, if one was under way
        settled = backup.load_backups(state.Layout(m.state))
        time.sleep(2.0)  # an unchanged manifest is not uploaded again
        assert backup.load_backups(state.Layout(m.state)) == settled
        m.umount()
    layout = state.Layout(m.state)
    # Replaced snapshots stay listed as history, so `medfs verify` knows them for this state's.
    taken = [b.cid for b in backup.load_backups(layout, history=True)]
    assert len(taken) > backup.KEEP
    assert [b.pinned for b in backup.load_backups(layout, history=True)][-backup.KEEP - 1 :] == [
        False, True, True, True
    ]  # fmt: skip
    kept = [b.cid for b in backup.load_backups(layout)]
    assert kept == taken[-backup.KEEP :]
    pins = ipfs.pins()
    assert set(kept) <= pins
    assert not set(taken[: -backup.KEEP]) & pins  # older snapshots are unpinned
    # One whose unpin failed is an orphan of this state's: verify --repair unpins it.
    ipfs.pin(taken[0])
    out = m.medfs("verify", "--api", kubo_api, "--repair")
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"repair: unpinned orphan {taken[0]}" in out.stdout
    assert taken[0] not in ipfs.pins()


def test_a_bad_backup_interval_fails_the_mount(
    tmp_path: Path, kubo_api: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MEDFS_BACKUP_MINUTES", "soon")
    state_dir = tmp_path / "state"
    init_state(state_dir)
    (tmp_path / "mnt").mkdir()
    m = Mounted(state_dir, tmp_path / "mnt", kubo_api)
    try:
        out = m.medfs("mount", str(m.mnt), "--api", kubo_api)
        assert out.returncode == 2, out.stderr
        assert "MEDFS_BACKUP_MINUTES" in out.stderr
        assert not os.path.ismount(m.mnt)
    finally:
        m.force_cleanup()


@pytest.fixture
def backed_up(tmp_path: Path, kubo_api: str) -> tuple[Path, str]:
    """A state directory (no mount needed) with one snapshot taken by `medfs backup`."""
    state_dir = tmp_path / "state"
    init_state(state_dir)
    env = {"MEDFS_STATE": str(state_dir), "MEDFS_PASSPHRASE": PASSPHRASE}
    out = run_medfs("backup", "--api", kubo_api, env=env)
    assert out.returncode == 0, out.stderr
    cid = out.stdout.strip()
    assert backup.load_backups(state.Layout(state_dir))[-1].cid == cid
    return state_dir, cid


def test_restore_refuses_an_initialised_state_directory(
    backed_up: tuple[Path, str], kubo_api: str, tmp_path: Path
) -> None:
    state_dir, cid = backed_up
    before = (state_dir / "manifest.db").read_bytes()
    out = restore(cid, state_dir / "owner.key", state_dir, kubo_api)
    assert out.returncode == 2
    assert "already initialised" in out.stderr
    assert (state_dir / "manifest.db").read_bytes() == before


def test_restore_refuses_a_snapshot_signed_by_someone_else(
    backed_up: tuple[Path, str], kubo_api: str, ipfs: IPFS, tmp_path: Path
) -> None:
    state_dir, _cid = backed_up
    owner = identity.read_public_file(state_dir / "owner.pub")
    with Manifest.open(state_dir / "manifest.db") as manifest:
        copy = backup.copy_manifest(manifest)
    # Anyone with the owner's public file can encrypt to them; only the owner can sign.
    mallory = Identity.generate()
    forged = ipfs.add(backup.seal(copy, mallory, recipient=owner))
    out = restore(forged, state_dir / "owner.key", tmp_path / "new", kubo_api)
    assert out.returncode == 11, out.stderr
    assert "not signed by" in out.stderr
    assert not (tmp_path / "new" / "config.json").exists()
    assert not (tmp_path / "new" / "manifest.db").exists()


def test_restore_refuses_a_tampered_or_foreign_snapshot(
    backed_up: tuple[Path, str], kubo_api: str, ipfs: IPFS, tmp_path: Path
) -> None:
    state_dir, cid = backed_up
    data = bytearray(ipfs.cat(cid))
    data[len(data) // 2] ^= 0x01
    tampered = ipfs.add(bytes(data))
    out = restore(tampered, state_dir / "owner.key", tmp_path / "new", kubo_api)
    assert out.returncode == 7, out.stderr
    assert "fails authentication" in out.stderr
    assert not (tmp_path / "new" / "config.json").exists()

    # Someone else's own, genuine snapshot: not for this key at all.
    other = tmp_path / "other"
    init_state(other)
    taken = run_medfs(
        "backup", "--api", kubo_api, env={"MEDFS_STATE": str(other), "MEDFS_PASSPHRASE": PASSPHRASE}
    )
    assert taken.returncode == 0, taken.stderr
    out = restore(taken.stdout.strip(), state_dir / "owner.key", tmp_path / "new", kubo_api)
    assert out.returncode == 8, out.stderr
    assert "belongs to identity" in out.stderr

    # Not a snapshot at all.
    out = restore(ipfs.add(b"hello"), state_dir / "owner.key", tmp_path / "new", kubo_api)
    assert out.returncode == 7 and "not a medfs manifest snapshot" in out.stderr


def test_status_without_a_backup_or_a_passphrase(tmp_path: Path, kubo_api: str) -> None:
    state_dir = tmp_path / "state"
    init_state(state_dir)
    out = run_medfs("status", "--api", kubo_api, env={"MEDFS_STATE": str(state_dir)})
    assert out.returncode == 0, out.stderr
    assert "last backup: none yet" in out.stdout
    assert "mounted:     no" in out.stdout
