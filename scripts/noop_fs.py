#!/usr/bin/env python3
"""A filesystem that does nothing, on the same stack as medfs (pyfuse3 + trio): the ceiling.

It holds one file, `zero`: writes to it are discarded, reads return zeros of the size asked
for (up to its nominal size of 1 TiB). What `dd` measures through it is what FUSE and pyfuse3
alone cost on this machine, so scripts/bench reports medfs's throughput as a fraction of it.

Directories and files can also be made in it, so that `cp -r` of a tree runs through it as
through medfs: their names and sizes are kept in memory, their data is discarded. The time
that takes is what the kernel's requests for a tree (lookup, create, getxattr, write, flush,
release, a getattr of the directory) cost on this stack with no work behind them.

Usage: scripts/noop_fs.py MOUNTPOINT   (serves until unmounted: fusermount3 -u MOUNTPOINT)
"""

from __future__ import annotations

import errno
import itertools
import os
import stat
import sys
from typing import Any

import pyfuse3
import trio

FILE_INODE = pyfuse3.ROOT_INODE + 1
NAME = b"zero"
SIZE = 1 << 40
ZEROS = bytes(4 << 20)  # one buffer sliced for every read: reads allocate only their result


class NoopFS(pyfuse3.Operations):
    def __init__(self) -> None:
        super().__init__()
        # What `cp -r` made: directory -> {name: inode}, and each made inode's mode and size.
        self._entries: dict[int, dict[bytes, int]] = {pyfuse3.ROOT_INODE: {}}
        self._made: dict[int, tuple[int, int]] = {}
        self._next = itertools.count(FILE_INODE + 1)

    def _attrs(self, inode: int) -> pyfuse3.EntryAttributes:
        attrs = pyfuse3.EntryAttributes()
        attrs.st_ino = inode
        if inode == pyfuse3.ROOT_INODE:
            attrs.st_mode = stat.S_IFDIR | 0o755
            attrs.st_nlink = 2
        elif inode == FILE_INODE:
            attrs.st_mode = stat.S_IFREG | 0o644
            attrs.st_nlink = 1
            attrs.st_size = SIZE
        else:
            attrs.st_mode, attrs.st_size = self._made[inode]
            attrs.st_nlink = 2 if stat.S_ISDIR(attrs.st_mode) else 1
            # As medfs answers: the kernel may keep what it was told for a second.
            attrs.entry_timeout = attrs.attr_timeout = 1.0
        attrs.st_uid, attrs.st_gid = os.getuid(), os.getgid()
        attrs.st_blksize = 1 << 20
        return attrs

    def _make(self, parent: int, name: bytes, mode: int) -> int:
        entries = self._entries.get(parent)
        if entries is None:
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        if name in entries or (parent == pyfuse3.ROOT_INODE and name == NAME):
            raise pyfuse3.FUSEError(errno.EEXIST)
        inode = entries[name] = next(self._next)
        self._made[inode] = (mode, 0)
        if stat.S_ISDIR(mode):
            self._entries[inode] = {}
        return inode

    async def getattr(self, inode: int, ctx: Any = None) -> pyfuse3.EntryAttributes:
        if inode not in (pyfuse3.ROOT_INODE, FILE_INODE) and inode not in self._made:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return self._attrs(inode)

    async def lookup(self, parent_inode: int, name: bytes, ctx: Any = None) -> Any:
        if parent_inode == pyfuse3.ROOT_INODE and name == NAME:
            return self._attrs(FILE_INODE)
        inode = self._entries.get(parent_inode, {}).get(name)
        if inode is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return self._attrs(inode)

    async def mkdir(self, parent_inode: int, name: bytes, mode: int, ctx: Any) -> Any:
        return self._attrs(self._make(parent_inode, name, stat.S_IFDIR | (mode & 0o7777)))

    async def create(
        self, parent_inode: int, name: bytes, mode: int, flags: int, ctx: Any
    ) -> tuple[pyfuse3.FileInfo, pyfuse3.EntryAttributes]:
        inode = self._make(parent_inode, name, stat.S_IFREG | (mode & 0o7777))
        return pyfuse3.FileInfo(fh=inode), self._attrs(inode)

    async def getxattr(self, inode: int, name: bytes, ctx: Any) -> bytes:
        # Not ENOSYS, which would stop the kernel asking: medfs has extended attributes, so
        # the kernel's `security.capability` check before each write reaches it too.
        raise pyfuse3.FUSEError(errno.ENODATA)

    async def setattr(
        self, inode: int, attr: Any, fields: Any, fh: Any, ctx: Any
    ) -> pyfuse3.EntryAttributes:
        return self._attrs(inode)  # truncation (dd without conv=notrunc) is ignored too

    async def opendir(self, inode: int, ctx: Any) -> int:
        if inode not in self._entries:
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        return inode

    async def readdir(self, fh: int, start_id: int, token: Any) -> None:
        listed = [(NAME, FILE_INODE)] if fh == pyfuse3.ROOT_INODE else []
        listed += self._entries[fh].items()  # in the order they were made
        for n, (name, inode) in enumerate(listed[start_id:], start_id + 1):
            if not pyfuse3.readdir_reply(token, name, self._attrs(inode), n):
                break

    async def open(self, inode: int, flags: int, ctx: Any) -> pyfuse3.FileInfo:
        if inode in self._entries:
            raise pyfuse3.FUSEError(errno.EISDIR)
        if inode != FILE_INODE and inode not in self._made:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return pyfuse3.FileInfo(fh=inode)  # no keep_cache: every open reads through FUSE

    async def read(self, fh: int, off: int, size: int) -> bytes:
        size = max(0, min(size, SIZE - off))
        if size <= len(ZEROS):
            return ZEROS[:size]
        return bytes(size)

    async def write(self, fh: int, off: int, buf: bytes) -> int:
        if fh != FILE_INODE:
            mode, size = self._made[fh]
            self._made[fh] = (mode, max(size, off + len(buf)))
        return len(buf)

    async def flush(self, fh: int) -> None:
        pass

    async def release(self, fh: int) -> None:
        pass


def main() -> int:
    if len(sys.argv) != 2:
        print(__doc__.strip().splitlines()[-1], file=sys.stderr)
        return 2
    options = set(pyfuse3.default_options)
    options |= {"fsname=medfs-noop", "subtype=noop"}
    pyfuse3.init(NoopFS(), sys.argv[1], options)
    try:
        trio.run(pyfuse3.main)
    except BaseException:
        pyfuse3.close(unmount=False)
        raise
    pyfuse3.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
