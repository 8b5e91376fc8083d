"""The audit log of a real mount session, and of a daemon killed mid-session."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest

from tests.conftest import run_medfs
from tests.mounting import PASSPHRASE, Mounted, mounted

pytestmark = pytest.mark.skipif(not os.path.exists("/dev/fuse"), reason="needs /dev/fuse")


def events(m: Mounted) -> list[tuple[str, str | None]]:
    out = m.medfs("audit", "show", "--json")
    assert out.returncode == 0, out.stderr
    return [(e["event"], e["details"].get("path")) for e in json.loads(out.stdout)]


def test_a_mount_session_is_logged_event_by_event(tmp_path: Path, kubo_api: str) -> None:
    out = run_medfs("keygen", "--out", str(tmp_path / "bob"), env={"MEDFS_PASSPHRASE": "b"})
    assert out.returncode == 0, out.stderr
    with mounted(tmp_path, kubo_api) as m:
        (m.mnt / "f.txt").write_bytes(b"record")
        assert (m.mnt / "f.txt").read_bytes() == b"record"
        os.rename(m.mnt / "f.txt", m.mnt / "g.txt")
        (m.mnt / "g.txt").unlink()
        (m.mnt / "h.txt").write_bytes(b"shared record")
        (m.mnt / "scans" / "2026").mkdir(parents=True)
        (m.mnt / "scans" / "2026" / "ct.dcm").write_bytes(b"a file two levels down")
        for args in (("share", "--to"), ("revoke", "--from")):
            verb, flag = args
            out = m.medfs(verb, str(m.mnt / "h.txt"), flag, str(tmp_path / "bob.pub"),
                          "--out", str(tmp_path / verb), "--api", kubo_api)  # fmt: skip
            assert out.returncode == 0, out.stderr
        m.umount()
        got = events(m)
        share_details = json.loads(m.medfs("audit", "show", "--json").stdout)
    # A file two levels down is named by its whole path (its commit may come before or after
    # h.txt's, in the same group or the next).
    nested = [e for e in got if (e[1] or "").startswith("/scans/")]
    assert nested == [("create", "/scans/2026/ct.dcm"), ("version", "/scans/2026/ct.dcm")]
    assert [e for e in got if e not in nested] == [
        ("mount", None),
        ("create", "/f.txt"),
        ("version", "/f.txt"),
        ("open", "/f.txt"),
        ("rename", "/f.txt"),
        ("delete", "/g.txt"),
        ("create", "/h.txt"),
        ("version", "/h.txt"),
        ("share", None),
        ("revoke", None),
        ("unmount", None),
        ("anchor", None),
    ]
    by_event = {e["event"]: e for e in share_details}
    assert by_event["rename"]["details"]["new_path"] == "/g.txt"
    assert by_event["share"]["details"]["paths"] == ["/h.txt"]
    assert by_event["open"]["details"]["command"]  # the reading process's name
    assert by_event["version"]["cid"]
    assert m.medfs("audit", "verify").returncode == 0
    # Paths are sealed: the log file itself never shows them.
    assert b"h.txt" not in (m.state / "audit.log").read_bytes()


def test_log_survives_a_killed_daemon(tmp_path: Path, kubo_api: str) -> None:
    with mounted(tmp_path, kubo_api) as m:
        (m.mnt / "before.txt").write_bytes(b"saved before the crash")
        pid = m.daemon_pid()
        assert pid is not None
        os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.05)
        out = m.medfs("umount", str(m.mnt))  # cleans up the dead mount, says so
        assert out.returncode == 9 and "had died" in out.stderr
        assert not os.path.ismount(m.mnt)
        assert m.medfs("audit", "verify").returncode == 0
        m.mount()
        assert (m.mnt / "before.txt").read_bytes() == b"saved before the crash"
        m.umount()
    got = events(m)
    assert ("version", "/before.txt") in got
    assert got.count(("mount", None)) == 2
    out = m.medfs("audit", "verify")
    assert out.returncode == 0, out.stderr
    assert PASSPHRASE not in (m.state / "audit.log").read_text(errors="replace")
