#!/usr/bin/env python3
"""A filesystem that does nothing, on the same stack as medfs (pyfuse3 + trio): the ceiling.

It holds one file, `zero`: writes to it are discarded, reads return zeros of the size asked
for (up to its nominal size of 1 TiB). What `dd` measures through it is what FUSE and pyfuse3
alone cost on this machine, so scripts/bench reports medfs's throughput as a fraction of it.

Usage: scripts/noop_fs.py MOUNTPOINT   (serves until unmounted: fusermount3 -u MOUNTPOINT)
"""

from __future__ import annotations

import errno
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
    def _attrs(self, inode: int) -> pyfuse3.EntryAttributes:
        attrs = pyfuse3.EntryAttributes()
        attrs.st_ino = inode
        if inode == pyfuse3.ROOT_INODE:
            attrs.st_mode = stat.S_IFDIR | 0o755
            attrs.st_nlink = 2
        else:
            attrs.st_mode = stat.S_IFREG | 0o644
            attrs.st_nlink = 1
            attrs.st_size = SIZE
        attrs.st_uid, attrs.st_gid = os.getuid(), os.getgid()
        attrs.st_blksize = 1 << 20
        return attrs

    async def getattr(self, inode: int, ctx: Any = None) -> pyfuse3.EntryAttributes:
        if inode not in (pyfuse3.ROOT_INODE, FILE_INODE):
            raise pyfuse3.FUSEError(errno.ENOENT)
        return self._attrs(inode)

    async def lookup(self, parent_inode: int, name: bytes, ctx: Any = None) -> Any:
        if parent_inode != pyfuse3.ROOT_INODE or name != NAME:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return self._attrs(FILE_INODE)

    async def setattr(
        self, inode: int, attr: Any, fields: Any, fh: Any, ctx: Any
    ) -> pyfuse3.EntryAttributes:
        return self._attrs(inode)  # truncation (dd without conv=notrunc) is ignored too

    async def opendir(self, inode: int, ctx: Any) -> int:
        if inode != pyfuse3.ROOT_INODE:
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        return inode

    async def readdir(self, fh: int, start_id: int, token: Any) -> None:
        if start_id == 0:
            pyfuse3.readdir_reply(token, NAME, self._attrs(FILE_INODE), 1)

    async def open(self, inode: int, flags: int, ctx: Any) -> pyfuse3.FileInfo:
        if inode != FILE_INODE:
            raise pyfuse3.FUSEError(errno.EISDIR)
        return pyfuse3.FileInfo(fh=inode)  # no keep_cache: every open reads through FUSE

    async def read(self, fh: int, off: int, size: int) -> bytes:
        size = max(0, min(size, SIZE - off))
        if size <= len(ZEROS):
            return ZEROS[:size]
        return bytes(size)

    async def write(self, fh: int, off: int, buf: bytes) -> int:
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
