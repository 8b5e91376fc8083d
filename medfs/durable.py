"""Writing files that must survive a crash: written whole, synced, with their names synced too.

Key files, restored manifests, audit anchors and the staging area all go through here, so the
rules live in one place: a new file never replaces or follows what is already at its path, and
a replaced one is either the old or the new content after a power cut, never a mix.
"""

from __future__ import annotations

import contextlib
import fcntl
import glob
import os
from pathlib import Path

# <linux/fs.h>: the inode flags ioctls (an int, whatever the macros' "long" says) and the flag
# that makes ext4's Orlov allocator treat a directory as the top of a hierarchy.
_FS_IOC_GETFLAGS = 0x80086601
_FS_IOC_SETFLAGS = 0x40086602
_FS_TOPDIR_FL = 0x00020000


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


def renew_empty_directory(path: Path) -> bool:
    """Replace the empty directory `path` (mode 0700) by a new one made in a parent marked as
    the top of a hierarchy (ext4's `chattr +T`), so that ext4 places it, and the files made
    in it, in a block group of its own choosing instead of the old one's. False, changing
    nothing, if `path` is not an empty directory.

    ext4 without a journal skips every inode freed in the last minute when it allocates one,
    checking each in turn: in a group where thousands were (a Kubo garbage collection, a test
    run's clean-up), one new file costs 400-800 us of CPU against ~20 us in a fresh group
    (docs/PERFORMANCE.md). Elsewhere the flag is refused and nothing changes but the inode.

    The new directory's name is random: under a top directory, ext4 starts its search for a
    group at a hash of the name, so a fixed name would bring every mount's staging directory
    back to the group where the last one freed its files.
    """
    parent = path.parent
    _mark_top_directory(parent)
    for left in parent.glob(glob.escape(path.name) + ".new*"):
        # A crash's leftover: made empty, and renamed only when still empty.
        if left.is_dir() and not left.is_symlink():
            with contextlib.suppress(OSError):
                left.rmdir()
    new = parent / f"{path.name}.new-{os.urandom(8).hex()}"
    new.mkdir(mode=0o700)
    try:
        new.rename(path)  # replaces a directory only while it is empty
    except OSError:
        new.rmdir()
        return False
    fsync_path(parent, directory=True)
    return True


def _mark_top_directory(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        flags = bytearray(8)
        fcntl.ioctl(fd, _FS_IOC_GETFLAGS, flags)
        value = int.from_bytes(flags[:4], "little")
        if not value & _FS_TOPDIR_FL:
            marked = (value | _FS_TOPDIR_FL).to_bytes(4, "little") + bytes(4)
            fcntl.ioctl(fd, _FS_IOC_SETFLAGS, marked)
    except OSError:
        pass  # not ext4 (tmpfs, btrfs, xfs...): no such hint, and no such cost either
    finally:
        os.close(fd)
