"""Crash safety and IPFS outages, for real: killed daemons, stopped and hung Kubo nodes."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from medfs.kubo import EmbeddedNode
from tests.conftest import run_medfs
from tests.mounting import Mounted, init_state

pytestmark = pytest.mark.skipif(not os.path.exists("/dev/fuse"), reason="needs /dev/fuse")


def wait_for(predicate, timeout: float = 60, step: float = 0.1) -> bool:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(step)
    return False


def kill(pid: int, sig: int = signal.SIGKILL) -> None:
    os.kill(pid, sig)
    if sig == signal.SIGKILL:
        assert wait_for(lambda: not _alive(pid), 20)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with contextlib.suppress(OSError):
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    return True


def make_files(root: Path, count: int) -> dict[str, bytes]:
    sizes = [0, 10, 4096, 65536, 70_000, 300_000, 1_100_000]
    files = {}
    for i in range(count):
        name = f"d{i % 7}/f{i:04d}.bin"
        data = hashlib.sha256(b"%d" % i).digest() * (sizes[i % len(sizes)] // 32 + 1)
        files[name] = data[: sizes[i % len(sizes)]]
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(files[name])
    return files


def copy_loop(src: Path, dst: Path, names: list[str], log: Path) -> subprocess.Popen[bytes]:
    """cp each file, then record it: a name in the log is a file whose close() returned."""
    script = (
        'cd "$1"; dst="$2"; log="$3"; shift 3\n'
        'for f in "$@"; do\n'
        '  mkdir -p "$dst/$(dirname "$f")" && cp "$f" "$dst/$f" && echo "$f" >> "$log"\n'
        "done\n"
    )
    return subprocess.Popen(
        ["bash", "-c", script, "copy", str(src), str(dst), str(log), *names],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def done_names(log: Path) -> list[str]:
    return log.read_text().split() if log.exists() else []


def check_tree(mnt: Path, files: dict[str, bytes], closed: list[str]) -> None:
    """Every closed file present and identical; anything else absent or identical."""
    for name in closed:
        assert (mnt / name).read_bytes() == files[name], name
    for path in mnt.rglob("*"):
        if path.is_file():
            name = str(path.relative_to(mnt))
            assert path.read_bytes() == files[name], f"{name} holds something never written"


@pytest.fixture
def own_node(tmp_path: Path) -> Iterator[EmbeddedNode]:
    node = EmbeddedNode(tmp_path / "state")
    yield node
    node.stop()


def test_kill_the_mount_daemon_mid_copy(tmp_path: Path, kubo_api: str) -> None:
    src = tmp_path / "src"
    files = make_files(src, 500)
    m = Mounted(tmp_path / "state", tmp_path / "mnt", kubo_api)
    m.mnt.mkdir()
    init_state(m.state)
    m.mount()
    try:
        log = tmp_path / "done.log"
        proc = copy_loop(src, m.mnt, sorted(files), log)
        assert wait_for(lambda: len(done_names(log)) >= 150, 300)
        pid = m.daemon_pid()
        assert pid is not None
        kill(pid)
        proc.wait(timeout=120)
        closed = done_names(log)
        assert 150 <= len(closed) < 500
        out = m.medfs("umount", str(m.mnt))
        assert out.returncode == 9 and "had died" in out.stderr, out.stderr
        assert not os.path.ismount(m.mnt)
        m.mount()
        check_tree(m.mnt, files, closed)
        m.umount()
    finally:
        m.force_cleanup()


def test_a_restart_removes_what_a_killed_daemon_left_half_written(
    tmp_path: Path, kubo_api: str
) -> None:
    """A daemon killed inside a close can leave a sealed object without its record after it,
    or a staging file just created; the next mount deletes both, and nothing else."""
    m = Mounted(tmp_path / "state", tmp_path / "mnt", kubo_api)
    m.mnt.mkdir()
    init_state(m.state)
    m.mount()
    try:
        (m.mnt / "kept.txt").write_bytes(b"closed and committed")
        fd = os.open(m.mnt, os.O_RDONLY)
        try:
            os.fsync(fd)  # committed: the restart below has nothing of its own to recover
        finally:
            os.close(fd)
        pid = m.daemon_pid()
        assert pid is not None
        kill(pid)
        staging = m.state / "staging"
        orphan = staging / f"{os.urandom(12).hex()}.obj"
        orphan.write_bytes(os.urandom(4096))
        empty = staging / f"{os.urandom(12).hex()}.obj"
        empty.touch()
        assert m.medfs("umount", str(m.mnt)).returncode == 9  # the daemon had died
        m.mount()
        assert not orphan.exists() and not empty.exists()
        assert (m.mnt / "kept.txt").read_bytes() == b"closed and committed"
        # The empty one is told apart from those made ahead only by its name, in no log.
        assert "removed 1 unfinished files" in (m.state / "mount.log").read_text()
        m.umount()
    finally:
        m.force_cleanup()


def test_kill_kubo_mid_copy_nothing_closed_is_lost(tmp_path: Path, own_node: EmbeddedNode) -> None:
    """The embedded node dies mid-copy: closes still succeed (kept in the staging area), the
    daemon restarts the node and uploads them; after remount everything closed is there."""
    src = tmp_path / "src"
    files = make_files(src, 300)
    m = Mounted(own_node.state, tmp_path / "mnt", "")
    m.mnt.mkdir()
    init_state(m.state)
    out = run_medfs("mount", str(m.mnt), env=m.env)  # the embedded node
    assert out.returncode == 0, out.stderr
    try:
        log = tmp_path / "done.log"
        proc = copy_loop(src, m.mnt, sorted(files), log)
        assert wait_for(lambda: len(done_names(log)) >= 100, 300)
        node_pid = own_node.pid()
        assert node_pid is not None
        kill(node_pid)
        assert proc.wait(timeout=300) == 0  # no cp failed: closes were kept, not refused
        closed = done_names(log)
        assert len(closed) == 300
        # The daemon brings its node back and uploads what waited.
        assert wait_for(lambda: own_node.pid() not in (None, node_pid), 60)
        out = m.medfs("umount", str(m.mnt))
        assert out.returncode == 0, out.stderr
        out = run_medfs("mount", str(m.mnt), env=m.env)
        assert out.returncode == 0, out.stderr
        check_tree(m.mnt, files, closed)
        ls = json.loads(m.medfs("ls", str(m.mnt / "d0"), "--json").stdout)
        assert ls and all(row["cid"] for row in ls)
        m.umount()
    finally:
        m.force_cleanup()


def _fixed_port_node(state: Path) -> tuple[EmbeddedNode, str]:
    """A node whose API keeps its port across restarts (as an external node's would)."""
    node = EmbeddedNode(state)
    node.init()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    subprocess.run(
        [str(node.binary), "config", "Addresses.API", f"/ip4/127.0.0.1/tcp/{port}"],
        env={**os.environ, "IPFS_PATH": str(node.repo)},
        check=True,
        capture_output=True,
    )
    return node, node.ensure_running()


def test_writes_while_the_node_is_down_wait_and_survive_umount(tmp_path: Path) -> None:
    node, api = _fixed_port_node(tmp_path / "node")
    m = Mounted(tmp_path / "state", tmp_path / "mnt", api)
    m.mnt.mkdir()
    init_state(m.state)
    m.mount("--timeout", "2")
    try:
        (m.mnt / "before.txt").write_bytes(b"uploaded normally")
        node.stop()
        big = os.urandom(3 << 20)
        (m.mnt / "during.bin").write_bytes(big)  # close succeeds: kept in the staging area
        (m.mnt / "before.txt").write_bytes(b"rewritten while the node was down")
        assert (m.mnt / "during.bin").read_bytes() == big  # readable from the staging area
        info = json.loads(os.getxattr(m.mnt / "during.bin", "user.medfs.info"))
        assert info["pending"] is True
        out = m.medfs("umount", str(m.mnt))
        assert out.returncode == 10, out.stderr
        assert "not on IPFS yet" in out.stderr and "kept in the staging area" in out.stderr
        staged = list((m.state / "staging").glob("*.obj"))
        assert len(staged) == 2
        assert sorted((m.state / "staging").iterdir()) == sorted(staged)  # one file a version
        assert all(p.read_bytes().endswith(b"medfs-p1") for p in staged)  # each with its record
        assert all(looks_encrypted(p) for p in staged)
        node.ensure_running()
        m.mount()
        assert wait_for(lambda: not list((m.state / "staging").glob("*.obj")), 60)
        assert (m.mnt / "during.bin").read_bytes() == big
        assert (m.mnt / "before.txt").read_bytes() == b"rewritten while the node was down"
        m.umount()
        m.mount()  # and it is all on IPFS now, in the manifest
        assert (m.mnt / "during.bin").read_bytes() == big
        m.umount()
    finally:
        m.force_cleanup()
        node.stop()


def looks_encrypted(path: Path) -> bool:
    data = path.read_bytes()
    return data.startswith(b"MEDFSOBJ") and b"while the node was down" not in data


def test_a_hung_node_gives_eio_in_bounded_time_then_recovers(
    tmp_path: Path, own_node: EmbeddedNode
) -> None:
    m = Mounted(own_node.state, tmp_path / "mnt", "")
    m.mnt.mkdir()
    init_state(m.state)
    out = run_medfs("mount", str(m.mnt), "--timeout", "2", env=m.env)
    assert out.returncode == 0, out.stderr
    try:
        data = os.urandom(1 << 20)
        (m.mnt / "r.bin").write_bytes(data)
        m.umount()  # a fresh mount: nothing of r.bin is cached
        out = run_medfs("mount", str(m.mnt), "--timeout", "2", env=m.env)
        assert out.returncode == 0, out.stderr
        node_pid = own_node.pid()
        assert node_pid is not None
        os.kill(node_pid, signal.SIGSTOP)  # the node hangs: accepts, never answers
        try:  # what has a local copy reads without the node
            assert (m.mnt / "r.bin").read_bytes() == data
        finally:
            os.kill(node_pid, signal.SIGCONT)
        m.umount()
        # Without local copies (deleted at this mount's start), every read needs the node.
        out = run_medfs("mount", str(m.mnt), "--timeout", "2",
                        env={**m.env, "MEDFS_COPIES_LIMIT": "0"})  # fmt: skip
        assert out.returncode == 0, out.stderr
        os.kill(node_pid, signal.SIGSTOP)
        try:
            reader = subprocess.run(
                ["cat", str(m.mnt / "r.bin")], capture_output=True, timeout=120, check=False
            )
            assert reader.returncode != 0
            assert "Input/output error" in reader.stderr.decode()
        finally:
            os.kill(node_pid, signal.SIGCONT)
        log = (m.state / "mount.log").read_text()
        assert "did not answer within 2 s" in log or "cannot reach the IPFS API" in log

        def readable() -> bool:
            try:
                return (m.mnt / "r.bin").read_bytes() == data
            except OSError as err:
                assert err.errno == errno.EIO
                return False

        assert wait_for(readable, 90, 0.5)  # recovers by itself
        m.umount()
    finally:
        m.force_cleanup()
