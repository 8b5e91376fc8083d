"""The embedded node and Kubo discovery, through the real CLI and a real daemon."""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from medfs.errors import SetupError
from medfs.ipfs import IPFS
from medfs.kubo import EmbeddedNode, find_binary
from medfs.paths import installed_kubo_binary
from tests.conftest import run_medfs


@pytest.fixture
def state(tmp_path: Path) -> Iterator[Path]:
    state = tmp_path / "state"
    yield state
    EmbeddedNode(state).stop()


def node_status(state: Path) -> dict[str, object]:
    out = run_medfs("node", "status", "--json", "--state", str(state))
    assert out.returncode == 0, out.stderr
    status: dict[str, object] = json.loads(out.stdout)
    return status


def test_start_status_stop_restart_and_reuse(state: Path) -> None:
    before = node_status(state)
    assert before["running"] is False
    assert before["version"] == "0.43.1"
    assert before["repo"] == str(state / "ipfs")
    assert Path(str(before["binary"])).is_file()

    first = run_medfs("node", "start", "--state", str(state))
    assert first.returncode == 0, first.stderr
    running = node_status(state)
    assert running["running"] is True
    assert str(running["api"]).startswith("/ip4/127.0.0.1/tcp/")

    # A second command reuses the same daemon rather than starting another.
    again = run_medfs("node", "start", "--state", str(state))
    assert again.returncode == 0, again.stderr
    reused = node_status(state)
    assert (reused["pid"], reused["api"]) == (running["pid"], running["api"])

    stop = run_medfs("node", "stop", "--state", str(state))
    assert stop.returncode == 0 and "stopped" in stop.stdout
    assert node_status(state)["running"] is False
    assert not _alive(int(str(running["pid"])))

    restart = run_medfs("node", "start", "--state", str(state))
    assert restart.returncode == 0, restart.stderr
    after = node_status(state)
    assert after["running"] is True and after["pid"] != running["pid"]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"


def test_state_env_var_selects_the_node(state: Path) -> None:
    out = run_medfs("node", "start", env={"MEDFS_STATE": str(state)})
    assert out.returncode == 0, out.stderr
    assert node_status(state)["running"] is True


def test_crashed_daemon_is_detected_and_replaced_not_duplicated(state: Path) -> None:
    node = EmbeddedNode(state)
    node.ensure_running()
    pid = node.pid()
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    # The api file and pid file are left behind, as after any crash.
    assert (state / "ipfs" / "api").exists()
    assert node_status(state)["running"] is False
    api = EmbeddedNode(state).ensure_running()
    new_pid = EmbeddedNode(state).pid()
    assert new_pid not in (None, pid)
    assert IPFS(api).version() == "0.43.1"


def test_node_is_private_and_loopback_only(state: Path) -> None:
    node = EmbeddedNode(state)
    api = node.ensure_running()
    config = json.loads((state / "ipfs" / "config").read_text())
    assert config["Bootstrap"] == []
    assert config["Routing"]["Type"] == "none"
    assert config["Discovery"]["MDNS"]["Enabled"] is False
    assert config["AutoConf"]["Enabled"] is False
    assert all(a.startswith("/ip4/127.0.0.1/") for a in config["Addresses"]["Swarm"])
    assert config["Addresses"]["Gateway"] == []
    blocks = [m for m in config["Datastore"]["Spec"]["mounts"] if m["type"] == "flatfs"]
    assert blocks and all(m["sync"] is True for m in blocks)  # blocks are fsynced
    addresses = IPFS(api).id().addresses
    assert addresses and all(a.startswith("/ip4/127.0.0.1/") for a in addresses)
    assert IPFS(api).swarm_peers() == []


def test_two_nodes_connect_and_fetch_over_loopback(state: Path, tmp_path: Path) -> None:
    other = EmbeddedNode(tmp_path / "other")
    try:
        a = IPFS(EmbeddedNode(state).ensure_running())
        b = IPFS(other.ensure_running())
        data = os.urandom(3 << 20)
        cid = a.add(data)
        b.swarm_connect(a.id().addresses[0])
        assert a.id().peer_id in b.swarm_peers()
        assert b.cat(cid, 1 << 20, 1000) == data[1 << 20 : (1 << 20) + 1000]
    finally:
        other.stop()


def test_node_commands_refuse_an_external_api(tmp_path: Path) -> None:
    out = run_medfs("node", "status", "--api", "/ip4/127.0.0.1/tcp/1", "--state", str(tmp_path))
    assert out.returncode == 2
    assert out.stderr.startswith("medfs: error: ")
    assert "Traceback" not in out.stderr


def test_find_binary_order(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    fake = tmp_path / "ipfs"
    fake.write_text("#!/bin/sh\n")
    fake.chmod(0o755)
    monkeypatch.setenv("MEDFS_IPFS_BIN", str(fake))
    assert find_binary() == fake

    monkeypatch.setenv("MEDFS_IPFS_BIN", str(tmp_path / "missing"))
    with pytest.raises(SetupError, match="MEDFS_IPFS_BIN"):
        find_binary()

    monkeypatch.delenv("MEDFS_IPFS_BIN")
    monkeypatch.setenv("PATH", str(tmp_path))
    assert find_binary() == fake

    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    monkeypatch.setenv("MEDFS_TOOLS_DIR", str(tmp_path / "tools"))
    with pytest.raises(SetupError, match="not found") as info:
        find_binary()
    assert "scripts/setup" in (info.value.hint or "")
    installed = installed_kubo_binary()
    installed.parent.mkdir(parents=True)
    installed.write_bytes(fake.read_bytes())
    installed.chmod(0o755)
    assert find_binary() == installed


def test_missing_binary_through_the_cli(tmp_path: Path) -> None:
    out = run_medfs(
        "node",
        "start",
        "--state",
        str(tmp_path / "s"),
        env={"PATH": "/usr/bin:/bin", "MEDFS_TOOLS_DIR": str(tmp_path / "none")},
    )
    assert out.returncode == 4
    assert "medfs: error: the Kubo binary (ipfs) was not found" in out.stderr
    assert "medfs: hint: run scripts/setup" in out.stderr
    assert not (tmp_path / "s" / "ipfs" / "config").exists()


@pytest.mark.skipif(not os.path.exists("/dev/fuse"), reason="needs /dev/fuse")
def test_gc_frees_what_deleted_versions_held_and_keeps_every_current_one(
    state: Path, tmp_path: Path
) -> None:
    from tests.mounting import Mounted, fsync_dir, init_state

    m = Mounted(state, tmp_path / "mnt", "")
    m.mnt.mkdir()
    init_state(state)
    out = run_medfs("mount", str(m.mnt), env=m.env)  # on the embedded node
    assert out.returncode == 0, out.stderr
    try:
        kept, gone = os.urandom(3 << 20), os.urandom(6 << 20)
        (m.mnt / "kept.bin").write_bytes(kept)
        (m.mnt / "small.txt").write_bytes(b"a record")
        (m.mnt / "gone.bin").write_bytes(gone)
        (m.mnt / "gone.bin").unlink()
        fsync_dir(m.mnt)
        out = m.medfs("node", "gc")
        assert out.returncode == 0, out.stderr
        freed = float(out.stdout.split(": ")[-1].split(" MiB")[0].replace(",", ""))
        assert freed >= 5, out.stdout  # the deleted 6 MiB version's blocks
        m.umount()
        out = m.medfs("verify", "--deep")  # every current version whole on the node
        assert out.returncode == 0, out.stdout + out.stderr
    finally:
        m.force_cleanup()
