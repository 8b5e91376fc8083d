"""Writing files that must survive a crash: written whole, synced, with their names synced too.

Key files, restored manifests, audit anchors and the staging area all go through here, so the
rules live in one place: a new file never replaces or follows what is already at its path, and
a replaced one is either the old or the new content after a power cut, never a mix.
"""

from __future__ import annotations

import os
from pathlib import Path


def write_all(fd: int, data: bytes) -> None:
    """os.write until every byte is written (a write may take fewer)."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def fsync_path(path: Path, *, directory: bool = False) -> None:
    """fsync a file, or a directory: what makes the names in it survive a crash."""
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if directory else 0) | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_new(path: Path, data: bytes, mode: int = 0o600) -> None:
    """Create `path` with `data` and `mode` (whatever the umask), synced. FileExistsError if
    anything is there: O_EXCL never overwrites, and never follows a planted symlink."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode)
    try:
        os.fchmod(fd, mode)
        write_all(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)


def replace(path: Path, data: bytes) -> None:
    """Replace `path`'s content (mode 0600) atomically: a synced temporary file renamed over
    it, then the directory synced."""
    tmp = path.with_name(path.name + ".tmp")
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC
    fd = os.open(tmp, flags, 0o600)
    try:
        write_all(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    tmp.replace(path)
    fsync_path(path.parent, directory=True)
