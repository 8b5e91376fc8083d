"""Small files committed in groups, for real: one upload and one pin for many closes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
from pathlib import Path

import pytest

from medfs.ipfs import IPFS
from medfs.kubo import EmbeddedNode
from tests.conftest import run_medfs
from tests.mounting import Mounted, fsync_dir, init_state, mounted
from tests.test_reliability import kill

pytestmark = pytest.mark.skipif(not os.path.exists("/dev/fuse"), reason="needs /dev/fuse")


def stats(m: Mounted) -> dict[str, int]:
    return dict(json.loads(os.getxattr(m.mnt, "user.medfs.stats")))


def info(path: Path) -> dict[str, object]:
    return dict(json.loads(os.getxattr(path, "user.medfs.info")))


def make_tree(root: Path, count: int) -> dict[str, bytes]:
    files = {f"d{i % 3}/r{i:03d}.txt": os.urandom(100 + 997 * i) for i in range(count)}
    for name, data in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    return files


def test_a_copied_tree_is_committed_in_groups_and_each_group_pinned_once(
    tmp_path: Path, kubo_api: str
) -> None:
    src = tmp_path / "src"
    files = make_tree(src, 40)
    ipfs = IPFS(kubo_api)
    pins_before = ipfs.pins()
    with mounted(tmp_path, kubo_api) as m:
        subprocess.run(["cp", "-r", str(src), str(m.mnt / "tree")], check=True)
        fsync_dir(m.mnt / "tree")  # `sync DIR`: returns once every version is committed
        assert stats(m)["pending"] == 0
        cids = {name: info(m.mnt / "tree" / name)["cid"] for name in files}
        assert all(info(m.mnt / "tree" / name)["pending"] is False for name in files)
        new_pins = ipfs.pins() - pins_before
        # Fewer pins than files (groups), and no file pinned on its own...
        assert 1 <= len(new_pins) < len(files)
        assert not new_pins & set(cids.values())
        # ... yet each file is kept: verify counts a version in a pinned group as pinned.
        out = m.medfs("verify", "--json")
        assert out.returncode == 0, out.stdout + out.stderr
        assert json.loads(out.stdout)["problems"] == []
        for name, data in files.items():
            assert (m.mnt / "tree" / name).read_bytes() == data
        # Replacing or deleting files frees a group's pin only once it keeps none of them.
        first = sorted(files)[0]
        (m.mnt / "tree" / first).write_bytes(b"a new version")
        for name in sorted(files)[1:]:
            (m.mnt / "tree" / name).unlink()
        fsync_dir(m.mnt / "tree")
    left = ipfs.pins() - pins_before
    assert not left & new_pins, "a group that keeps no version is still pinned"
    with mounted(tmp_path, kubo_api) as m:
        assert (m.mnt / "tree" / first).read_bytes() == b"a new version"
        assert m.medfs("verify").returncode == 0


def test_a_tree_copied_over_an_existing_one_is_committed_in_groups_too(
    tmp_path: Path, kubo_api: str
) -> None:
    src = tmp_path / "src"
    files = make_tree(src, 30)
    ipfs = IPFS(kubo_api)
    with mounted(tmp_path, kubo_api) as m:
        subprocess.run(["cp", "-r", str(src), str(m.mnt / "tree")], check=True)
        fsync_dir(m.mnt / "tree")
        for name in files:  # new content, the same names: cp opens each with O_TRUNC
            files[name] = os.urandom(len(files[name]) // 2 + 10)
            (src / name).write_bytes(files[name])
        pins_before = ipfs.pins()
        subprocess.run(["cp", "-r", f"{src}/.", str(m.mnt / "tree")], check=True)
        fsync_dir(m.mnt / "tree")
        cids = {info(m.mnt / "tree" / name)["cid"] for name in files}
        new_pins = ipfs.pins() - pins_before
        assert 1 <= len(new_pins) < len(files)
        assert not new_pins & cids, "a rewritten small file was uploaded and pinned on its own"
        for name, data in files.items():
            assert (m.mnt / "tree" / name).read_bytes() == data
        # A truncation to nothing, then a write past a hole: zeros, then the data.
        path = m.mnt / "tree" / sorted(files)[0]
        with open(path, "r+b") as fh:
            fh.truncate(0)
            assert fh.read() == b""
            fh.seek(70_000)
            fh.write(b"tail")
        assert path.read_bytes() == bytes(70_000) + b"tail"
    with mounted(tmp_path, kubo_api) as m:
        assert (m.mnt / "tree" / sorted(files)[0]).read_bytes() == bytes(70_000) + b"tail"
        assert (m.mnt / "tree" / sorted(files)[1]).read_bytes() == files[sorted(files)[1]]


def test_fsync_of_a_small_file_returns_once_it_is_committed(tmp_path: Path, kubo_api: str) -> None:
    with mounted(tmp_path, kubo_api) as m:
        fd = os.open(m.mnt / "note.txt", os.O_WRONLY | os.O_CREAT, 0o600)
        try:
            os.write(fd, b"blood pressure 120/80")
            os.fsync(fd)
            assert info(m.mnt / "note.txt")["pending"] is False
            assert info(m.mnt / "note.txt")["cid"]
        finally:
            os.close(fd)
        assert stats(m)["pending"] == 0


def test_closed_small_files_survive_a_killed_daemon_while_the_node_hangs(tmp_path: Path) -> None:
    """close() returns before the group upload; what it sealed is uploaded by the next mount."""
    node = EmbeddedNode(tmp_path / "state")
    try:
        m = Mounted(tmp_path / "state", tmp_path / "mnt", "")
        m.mnt.mkdir()
        init_state(m.state)
        out = run_medfs("mount", str(m.mnt), "--timeout", "30", env=m.env)
        assert out.returncode == 0, out.stderr
        node_pid = node.pid()
        assert node_pid is not None
        os.kill(node_pid, signal.SIGSTOP)  # every upload now hangs
        try:
            for i in range(5):
                (m.mnt / f"f{i}.txt").write_bytes(b"record %d" % i)
            # Not a timing assertion: with the node frozen, a close that waited for its
            # upload would never have returned before the daemon is killed below.
            assert stats(m)["pending"] == 5
            daemon = m.daemon_pid()
            assert daemon is not None
            kill(daemon)  # SIGKILL, and waits until it is gone
        finally:
            os.kill(node_pid, signal.SIGCONT)
        out = m.medfs("umount", str(m.mnt))
        assert out.returncode == 9, out.stderr  # cleans up the dead mount, says so
        out = run_medfs("mount", str(m.mnt), env=m.env)
        assert out.returncode == 0, out.stderr
        for i in range(5):
            assert (m.mnt / f"f{i}.txt").read_bytes() == b"record %d" % i
        fsync_dir(m.mnt)
        assert stats(m)["pending"] == 0
        assert all(info(m.mnt / f"f{i}.txt")["cid"] for i in range(5))
        m.umount()
    finally:
        if os.path.ismount(tmp_path / "mnt"):
            subprocess.run(["fusermount3", "-u", "-z", str(tmp_path / "mnt")], check=False)
        node.stop()
