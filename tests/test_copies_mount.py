"""Local copies through a real mount and a real Kubo node: an uploaded version's spool stays
on disk as ciphertext, and reads come from it before they go to the node."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from medfs.errors import UsageError
from medfs.ipfs import IPFS
from medfs.kubo import EmbeddedNode
from tests.conftest import run_medfs
from tests.mounting import MARKER, Mounted, files_containing, fsync_dir, mounted

pytestmark = pytest.mark.skipif(not os.path.exists("/dev/fuse"), reason="needs /dev/fuse")

MiB = 1 << 20


def stats(m: Mounted) -> dict[str, int]:
    return dict(json.loads(os.getxattr(m.mnt, "user.medfs.stats")))


def cid_of(path: Path) -> str:
    return os.getxattr(path, "user.medfs.cid").decode()


def copies(m: Mounted) -> set[str]:
    return {p.name for p in (m.state / "copies").iterdir()}


def written_then_unmounted(m: Mounted, name: str, data: bytes) -> str:
    """Write `name` and unmount: the CID of its version, whose copy is copies/CID."""
    (m.mnt / name).write_bytes(data)
    cid = cid_of(m.mnt / name)
    m.umount()
    return cid


def mount_with(m: Mounted, **env: str) -> None:
    out = run_medfs("mount", str(m.mnt), "--api", m.api, env={**m.env, **env})
    assert out.returncode == 0, out.stderr
    assert os.path.ismount(m.mnt)


def eventually(check: object, seconds: float = 20) -> None:
    """Copies of replaced versions go on a worker after the commit returns."""
    deadline = time.monotonic() + seconds
    while not check():  # type: ignore[operator]
        assert time.monotonic() < deadline, "still not so after 20 s"
        time.sleep(0.05)


def test_reads_come_from_the_local_copies_which_hold_the_nodes_ciphertext(
    tmp_path: Path, kubo_api: str
) -> None:
    scan = os.urandom(3 * MiB) + MARKER  # streamed into its upload
    note = MARKER + os.urandom(5000)  # sealed at close, uploaded in a group
    with mounted(tmp_path / "m", kubo_api) as m:
        (m.mnt / "scan.bin").write_bytes(scan)
        (m.mnt / "note.txt").write_bytes(note)
        fsync_dir(m.mnt)
        cids = {cid_of(m.mnt / "scan.bin"), cid_of(m.mnt / "note.txt")}
        assert copies(m) == cids
        m.umount()
        ipfs = IPFS(kubo_api)
        try:
            for cid in cids:  # byte for byte the object on the node: no staging record
                assert (m.state / "copies" / cid).read_bytes() == ipfs.cat(cid)
        finally:
            ipfs.close()
        assert files_containing(m.state, MARKER) == []
        m.mount()  # a fresh segment cache
        assert (m.mnt / "scan.bin").read_bytes() == scan
        assert (m.mnt / "note.txt").read_bytes() == note
        got = stats(m)
        assert got["fetches"] > 0 and got["copy_reads"] == got["fetches"]  # none from the node
        assert got["copies_failed"] == 0
        assert got["copies_bytes"] == sum((m.state / "copies" / c).stat().st_size for c in cids)


def test_a_damaged_copy_is_read_from_the_node_instead_and_dropped(
    tmp_path: Path, kubo_api: str
) -> None:
    data = os.urandom(3 * MiB)
    with mounted(tmp_path / "m", kubo_api) as m:
        path = m.state / "copies" / written_then_unmounted(m, "scan.bin", data)
        with open(path, "r+b") as fh:  # as a crash or a bad disk might leave it
            fh.seek(MiB + 12345)
            byte = fh.read(1)
            fh.seek(MiB + 12345)
            fh.write(bytes([byte[0] ^ 0x40]))
        m.mount()
        assert (m.mnt / "scan.bin").read_bytes() == data
        got = stats(m)
        assert got["copies_failed"] == 1
        assert got["copy_reads"] < got["fetches"]  # the rest came from the node
        assert not path.exists()


def test_replaced_and_deleted_versions_lose_their_copies(tmp_path: Path, kubo_api: str) -> None:
    with mounted(tmp_path / "m", kubo_api) as m:
        big, small = m.mnt / "a.bin", m.mnt / "s.txt"
        big.write_bytes(os.urandom(2 * MiB))
        small.write_bytes(b"first")
        fsync_dir(m.mnt)
        old_big, old_small = cid_of(big), cid_of(small)
        assert {old_big, old_small} <= copies(m)
        big.write_bytes(os.urandom(2 * MiB))  # cp over it: a new version
        small.write_bytes(b"second")  # a new group member; its group keeps the old pinned
        fsync_dir(m.mnt)
        new_big, new_small = cid_of(big), cid_of(small)
        eventually(lambda: copies(m) == {new_big, new_small})
        big.unlink()
        eventually(lambda: copies(m) == {new_small})
        assert small.read_bytes() == b"second"


def test_the_limit_keeps_the_most_recent_copies(tmp_path: Path, kubo_api: str) -> None:
    with mounted(tmp_path / "m", kubo_api) as m:
        m.umount()
        mount_with(m, MEDFS_COPIES_LIMIT=str(3 * MiB))  # room for one of the two
        first, second = os.urandom(2 * MiB), os.urandom(2 * MiB)
        (m.mnt / "one").write_bytes(first)
        (m.mnt / "two").write_bytes(second)
        eventually(lambda: copies(m) == {cid_of(m.mnt / "two")})
        assert stats(m)["copies_bytes"] <= 3 * MiB
        assert (m.mnt / "one").read_bytes() == first  # from the node
        assert (m.mnt / "two").read_bytes() == second


def test_a_limit_of_zero_keeps_none_and_removes_what_is_there(
    tmp_path: Path, kubo_api: str
) -> None:
    data = os.urandom(2 * MiB)
    with mounted(tmp_path / "m", kubo_api) as m:
        (m.mnt / "kept").write_bytes(data)
        assert copies(m) == {cid_of(m.mnt / "kept")}
        m.umount()
        mount_with(m, MEDFS_COPIES_LIMIT="0")
        assert copies(m) == set()
        (m.mnt / "new").write_bytes(data)
        (m.mnt / "small").write_bytes(b"a note")
        fsync_dir(m.mnt)
        assert copies(m) == set()
        # Nor left in the staging area (which keeps empty files ready for the next closes).
        assert [p for p in (m.state / "staging").iterdir() if p.stat().st_size] == []
        assert (m.mnt / "kept").read_bytes() == data
        assert stats(m)["copy_reads"] == 0
        m.umount()
        assert os.listdir(m.state / "staging") == []  # the empty ones go with the mount


def test_a_bad_limit_is_refused_before_mounting(tmp_path: Path, kubo_api: str) -> None:
    with mounted(tmp_path / "m", kubo_api) as m:
        (m.mnt / "kept").write_bytes(b"stored before")
        m.umount()
        bad = [("MEDFS_COPIES_LIMIT", v) for v in ("-1", "lots", "1.5", "")]
        bad += [("MEDFS_STAGING_LIMIT", v) for v in ("0", "-5", "8G")]
        for name, value in bad:
            out = run_medfs("mount", str(m.mnt), "--api", m.api, env={**m.env, name: value})
            assert out.returncode == UsageError.exit_code, (name, value, out.stderr)
            assert out.stderr.startswith(f"medfs: error: {name} must be"), out.stderr
            assert "Traceback" not in out.stderr
            assert not os.path.ismount(m.mnt)
        m.mount()
        assert (m.mnt / "kept").read_bytes() == b"stored before"


def test_a_mount_keeps_only_copies_of_versions_the_manifest_still_has(
    tmp_path: Path, kubo_api: str
) -> None:
    data = os.urandom(2 * MiB)
    with mounted(tmp_path / "m", kubo_api) as m:
        cid = written_then_unmounted(m, "f", data)
        stale = m.state / "copies" / "bafkreistalestalestalestalestalestalestalestalestalestaleq"
        stale.write_bytes(b"a version replaced while no mount ran")
        (m.state / "copies" / "half-written.tmp").write_bytes(b"junk")
        m.mount()
        assert copies(m) == {cid}
        assert (m.mnt / "f").read_bytes() == data
        assert stats(m)["copy_reads"] > 0


def test_a_revoke_reads_old_versions_from_their_copies_and_deletes_them(tmp_path: Path) -> None:
    node = EmbeddedNode(tmp_path / "node")  # its own node: the test collects its garbage
    api = node.ensure_running()
    out = run_medfs("keygen", "--out", str(tmp_path / "bob"), env={"MEDFS_PASSPHRASE": "x"})
    assert out.returncode == 0, out.stderr
    gone, torn = os.urandom(3 * MiB), os.urandom(3 * MiB)
    try:
        with mounted(tmp_path / "alice", api) as m:
            (m.mnt / "d").mkdir()
            (m.mnt / "d/gone.bin").write_bytes(gone)
            (m.mnt / "d/torn.bin").write_bytes(torn)
            out = m.medfs("share", str(m.mnt / "d"), "--to", str(tmp_path / "bob.pub"),
                          "--out", str(tmp_path / "for-bob"), "--api", api)  # fmt: skip
            assert out.returncode == 0, out.stderr
            old = {name: cid_of(m.mnt / "d" / name) for name in ("gone.bin", "torn.bin")}
            assert set(old.values()) <= copies(m)
            ipfs = IPFS(api)
            try:  # the node loses one old version: only its local copy still has it
                ipfs.unpin(old["gone.bin"])
                assert ipfs.gc() > 0
            finally:
                ipfs.close()
            with open(m.state / "copies" / old["torn.bin"], "r+b") as fh:  # the other's
                fh.seek(2 * MiB)  # copy is damaged, and the node has it intact
                byte = fh.read(1)
                fh.seek(2 * MiB)
                fh.write(bytes([byte[0] ^ 1]))
            out = m.medfs("revoke", str(m.mnt / "d"), "--from", str(tmp_path / "bob.pub"),
                          "--api", api)  # fmt: skip
            assert out.returncode == 0, out.stderr
            assert "re-encrypted 2 files" in out.stdout
            for name, data in (("gone.bin", gone), ("torn.bin", torn)):
                assert cid_of(m.mnt / "d" / name) != old[name]
                assert (m.mnt / "d" / name).read_bytes() == data
            assert not set(old.values()) & copies(m)  # what the revoked key opens is gone
    finally:
        node.stop()
