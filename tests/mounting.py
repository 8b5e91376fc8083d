"""Helpers for tests that mount for real: the CLI in a subprocess, unmounted in `finally`."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from tests.conftest import run_medfs

PASSPHRASE = "correct horse battery staple"
MARKER = b"MEDFS-PLAINTEXT-MARKER-5f1c9a"


@dataclass
class Mounted:
    state: Path
    mnt: Path
    api: str

    @property
    def env(self) -> dict[str, str]:
        return {"MEDFS_STATE": str(self.state), "MEDFS_PASSPHRASE": PASSPHRASE}

    def medfs(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        return run_medfs(*args, env=self.env, timeout=timeout)

    def mount(self, *extra: str) -> None:
        out = self.medfs("mount", str(self.mnt), "--api", self.api, *extra)
        assert out.returncode == 0, out.stderr
        assert os.path.ismount(self.mnt)

    def umount(self) -> subprocess.CompletedProcess[str]:
        out = self.medfs("umount", str(self.mnt))
        assert out.returncode == 0, out.stderr
        assert not os.path.ismount(self.mnt)
        return out

    def daemon_pid(self) -> int | None:
        try:
            text = (self.state / "mount.lock").read_text().strip()
        except OSError:
            return None
        return int(json.loads(text)["pid"]) if text else None

    def force_cleanup(self) -> None:
        """After a failed test: never leave a mount or a daemon behind."""
        pid = self.daemon_pid()
        if os.path.ismount(self.mnt):
            out = self.medfs("umount", str(self.mnt), timeout=120)
            if out.returncode != 0 and os.path.ismount(self.mnt):
                subprocess.run(["fusermount3", "-u", "-z", str(self.mnt)], check=False)
        if pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                try:
                    os.kill(pid, 0)
                except ProcessLookupError:
                    break
                time.sleep(0.05)
            else:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)


def init_state(state: Path) -> None:
    out = run_medfs("init", env={"MEDFS_STATE": str(state), "MEDFS_PASSPHRASE": PASSPHRASE})
    assert out.returncode == 0, out.stderr


@contextlib.contextmanager
def mounted(root: Path, api: str, *extra: str) -> Iterator[Mounted]:
    state = root / "state"
    mnt = root / "mnt"
    mnt.mkdir(parents=True, exist_ok=True)
    if not (state / "config.json").exists():
        init_state(state)
    m = Mounted(state, mnt, api)
    m.mount(*extra)
    try:
        yield m
    finally:
        m.force_cleanup()


def fsync_dir(path: Path) -> None:
    """fsync a directory: in a mount, it returns once every version closed before it is
    committed."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def files_containing(root: Path, needle: bytes) -> list[Path]:
    hits = []
    for path in root.rglob("*"):
        if path.is_file() and not path.is_symlink():
            with contextlib.suppress(OSError):
                if needle in path.read_bytes():
                    hits.append(path)
    return hits
