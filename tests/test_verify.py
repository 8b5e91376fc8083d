"""`medfs verify` on a real Kubo node and a real mount, each kind of problem made for real."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from medfs import format, layout, recipients, state
from medfs.ipfs import IPFS
from medfs.kubo import EmbeddedNode
from tests.conftest import run_medfs
from tests.mounting import PASSPHRASE, Mounted, init_state, mounted

pytestmark = pytest.mark.skipif(not os.path.exists("/dev/fuse"), reason="needs /dev/fuse")

EXIT_PROBLEMS = 14


def verify(m: Mounted, *args: str) -> tuple[subprocess.CompletedProcess[str], dict[str, object]]:
    out = m.medfs("verify", "--json", *args)
    assert out.returncode in (0, EXIT_PROBLEMS), out.stderr
    report: dict[str, object] = json.loads(out.stdout)
    return out, report


def problems(report: dict[str, object]) -> list[tuple[str, str | None]]:
    found = report["problems"]
    assert isinstance(found, list)
    return [(p["kind"], p["path"]) for p in found]


def cid_of(m: Mounted, path: str) -> str:
    out = m.medfs("stat", "--json", path)
    assert out.returncode == 0, out.stderr
    return str(json.loads(out.stdout)["cid"])


def write_alone(ipfs: IPFS, path: Path, data: bytes) -> str:
    """Write a small file and fsync it, so it is committed in a group of its own: the pin
    that keeps it (small files are kept by the pin of the group they were uploaded in)."""
    before = ipfs.pins()
    with open(path, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    (group,) = ipfs.pins() - before
    return group


def wait_unpinned(ipfs: IPFS, cid: str) -> None:
    deadline = time.monotonic() + 20
    while cid in ipfs.pins():
        assert time.monotonic() < deadline, f"{cid} stayed pinned"
        time.sleep(0.1)


def test_clean_state_verifies_while_mounted_and_after(tmp_path: Path, kubo_api: str) -> None:
    with mounted(tmp_path, kubo_api) as m:
        (m.mnt / "dir").mkdir()
        (m.mnt / "dir" / "a.txt").write_bytes(b"a record")
        (m.mnt / "b.bin").write_bytes(os.urandom(300_000))
        (m.mnt / "empty").write_bytes(b"")
        # The mount holds the manifest; verify reads it alongside (SQLite WAL).
        out, report = verify(m, "--api", kubo_api, "--deep")
        assert out.returncode == 0, out.stdout
        assert report["files"] == 3 and report["problems"] == []
        m.umount()
        out = m.medfs("verify", "--api", kubo_api, "--deep")
        assert out.returncode == 0, out.stderr
        assert "checked 3 files" in out.stdout and "all records verified" in out.stdout


def test_unpinned_behind_our_back_is_repinned(tmp_path: Path, kubo_api: str, ipfs: IPFS) -> None:
    with mounted(tmp_path, kubo_api) as m:
        kept_by = write_alone(ipfs, m.mnt / "keep.txt", b"a record that must stay")
        (m.mnt / "other.txt").write_bytes(b"another record")
        cid = cid_of(m, "/keep.txt")
        m.umount()
        ipfs.unpin(kept_by)
        out, report = verify(m, "--api", kubo_api)
        assert out.returncode == EXIT_PROBLEMS
        assert problems(report) == [("unpinned", "/keep.txt")]
        assert "1 problem(s) remain (unpinned)" in out.stderr

        out = m.medfs("verify", "--api", kubo_api, "--repair")
        assert out.returncode == 0, out.stdout + out.stderr
        assert f"repair: pinned {cid} (/keep.txt)" in out.stdout
        assert cid in ipfs.pins()  # on its own now: its group no longer keeps it
        assert m.medfs("verify", "--api", kubo_api).returncode == 0
        with mounted(tmp_path, kubo_api) as m:
            (m.mnt / "keep.txt").unlink()  # and so its own pin goes with it
        wait_unpinned(ipfs, cid)


def test_orphan_pins_are_reported_and_unpinned_only_when_ours(
    tmp_path: Path, kubo_api: str, ipfs: IPFS
) -> None:
    # Someone else's medfs object on the same (shared) node: never ours to unpin.
    foreign = ipfs.add(format.encrypt_bytes(format.new_content_key(), b"not ours"))
    try:
        with mounted(tmp_path, kubo_api) as m:
            (m.mnt / "f.txt").write_bytes(b"version one")
            old = cid_of(m, "/f.txt")
            (m.mnt / "f.txt").write_bytes(b"version two")
            assert cid_of(m, "/f.txt") != old
            wait_unpinned(ipfs, old)
            # As if the daemon's unpin of the old version had failed (node away, crash).
            ipfs.pin(old)
            m.umount()
            out, report = verify(m, "--api", kubo_api)
            assert out.returncode == EXIT_PROBLEMS
            assert problems(report) == [("orphan-pin", None)]
            assert report["problems"][0]["cid"] == old  # type: ignore[index]
            assert foreign in report["foreign_pins"]  # type: ignore[operator]

            out = m.medfs("verify", "--api", kubo_api, "--repair")
            assert out.returncode == 0, out.stdout + out.stderr
            assert f"repair: unpinned orphan {old}" in out.stdout
            pins = ipfs.pins()
            assert old not in pins
            assert foreign in pins  # left alone, and said so
            assert "left alone" in out.stdout
            assert (m.medfs("verify", "--api", kubo_api)).returncode == 0
    finally:
        with contextlib.suppress(Exception):
            ipfs.unpin(foreign)


def blockstore_file(repo: Path, data: bytes) -> Path:
    """The flatfs file holding `data` as one raw block (objects under 1 MiB are one leaf)."""
    for path in (repo / "blocks").rglob("*.data"):
        if path.stat().st_size == len(data) and path.read_bytes() == data:
            return path
    raise AssertionError("block not found in the blockstore")


def test_deep_finds_a_flipped_bit_on_disk(
    tmp_path: Path, kubo_api: str, kubo_node: EmbeddedNode, ipfs: IPFS
) -> None:
    """Disk corruption, for real: flip a bit in the block file in Kubo's blockstore. The CID
    still names the original bytes, but Kubo does not re-hash on read (HashOnRead is off), so
    only decrypting every segment finds it."""
    with mounted(tmp_path, kubo_api) as m:
        (m.mnt / "scan.bin").write_bytes(os.urandom(3 * format.SEGMENT_SIZE + 5))
        m.umount()
    cid = cid_of(m, "/scan.bin")
    block = blockstore_file(kubo_node.repo, ipfs.cat(cid))
    original = block.read_bytes()
    damaged = bytearray(original)
    damaged[layout.segment_offset(2) + 100] ^= 0x04
    block.write_bytes(bytes(damaged))
    try:
        assert ipfs.cat(cid) == bytes(damaged)
        assert m.medfs("verify", "--api", kubo_api).returncode == 0  # cheap checks can't tell
        out, report = verify(m, "--api", kubo_api, "--deep", "--repair")
        assert out.returncode == EXIT_PROBLEMS
        (problem,) = report["problems"]  # type: ignore[misc]
        assert problem["kind"] == "corrupt" and problem["path"] == "/scan.bin"
        assert problem["segment"] == 2 and not problem["repaired"]
        assert "segment 2" in problem["detail"]
    finally:
        block.write_bytes(original)
    assert m.medfs("verify", "--api", kubo_api, "--deep").returncode == 0


def test_a_wrap_that_does_not_open(tmp_path: Path, kubo_api: str) -> None:
    with mounted(tmp_path, kubo_api) as m:
        (m.mnt / "locked.txt").write_bytes(b"a record")
        (m.mnt / "fine.txt").write_bytes(b"another")
        m.umount()
    # With the mount stopped, replace the owner's wrap by one bound to another entry: it is a
    # well-formed stanza for the right identity that does not open here.
    session = state.unlock(state.Layout(m.state), PASSPHRASE)
    try:
        inode = session.manifest.resolve("/locked.txt")
        assert inode is not None and inode.salt is not None
        wrong = recipients.entry_context(os.urandom(16), inode.salt)
        stanza = recipients.wrap(os.urandom(32), session.owner.public.recipient(), wrong)
        session.manifest.add_wrap(inode.ino, session.owner.fingerprint, stanza.to_bytes())
    finally:
        session.manifest.close()
    out, report = verify(m, "--api", kubo_api, "--deep", "--repair")
    assert out.returncode == EXIT_PROBLEMS
    assert problems(report) == [("wrap", "/locked.txt")]
    assert report["actions"] == []  # nothing to repair it with


@pytest.fixture
def own_node(tmp_path: Path) -> Iterator[tuple[Path, str]]:
    """A state directory with its own embedded node (started here, stopped after)."""
    state_dir = tmp_path / "state"
    init_state(state_dir)
    env = {"MEDFS_STATE": str(state_dir)}
    try:
        out = run_medfs("node", "start", env=env)
        assert out.returncode == 0, out.stderr
        out = run_medfs("node", "status", "--json", env=env)
        assert out.returncode == 0, out.stderr
        yield state_dir, str(json.loads(out.stdout)["api"])
    finally:
        run_medfs("node", "stop", env=env)


def test_on_its_own_node_every_orphan_counts_and_missing_is_reported(
    tmp_path: Path, own_node: tuple[Path, str]
) -> None:
    _state_dir, api = own_node
    client = IPFS(api)
    try:
        with mounted(tmp_path, api) as m:
            gone_by = write_alone(client, m.mnt / "gone.txt", b"this record will be lost")
            (m.mnt / "kept.txt").write_bytes(b"this one stays")
            m.umount()
        gone = cid_of(m, "/gone.txt")
        client.unpin(gone_by)
        client.gc()  # now its blocks are gone from the node
        # A medfs object no record mentions, e.g. uploaded just before a crash, never committed.
        stray = client.add(format.encrypt_bytes(format.new_content_key(), b"never committed"))
        # Without --api: this state's embedded node, which nobody else pins on.
        out = m.medfs("verify", "--json")
        assert out.returncode == EXIT_PROBLEMS, out.stderr
        report = json.loads(out.stdout)
        assert sorted(problems(report), key=str) == [("missing", "/gone.txt"), ("orphan-pin", None)]
        orphan = next(p for p in report["problems"] if p["kind"] == "orphan-pin")
        assert orphan["cid"] == stray

        out = m.medfs("verify", "--repair")
        assert out.returncode == EXIT_PROBLEMS  # a missing record cannot be repaired
        assert f"repair: unpinned orphan {stray}" in out.stdout
        assert "1 problem(s) remain (missing)" in out.stderr
        assert stray not in client.pins()
        assert not client.has_local(gone)  # verify never fetched it
    finally:
        client.close()
