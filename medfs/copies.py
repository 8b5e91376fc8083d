"""Local copies of uploaded objects: reads come from the disk before they go to the node.

An object is written to the staging area on its way to the node (content.Spool); once it is
uploaded, that file is the same ciphertext the node holds. Fetching those bytes back over
the node's HTTP API is what bounds a read (a cold 1 GiB `cat` through a mount: 184-291 MiB/s
from the node, 304-493 MiB/s from the local disk, docs/PERFORMANCE.md), so the file is kept
here instead, as `<state>/copies/<cid>`, within a size limit, least recently used out
first (docs/FORMAT.md §8).

A copy is ciphertext only: no key, name or path. It is trusted no more than the node is:
every segment read from it is authenticated with the version's content key, and a copy that
is short, unreadable or fails authentication is dropped and the read goes to the node. Copies
are never fsynced: a crash may tear one, which the next read finds and drops.
"""

from __future__ import annotations

import logging
import os
import re
import threading
from collections import OrderedDict
from pathlib import Path

log = logging.getLogger(__name__)

# No copy is kept while less than this fraction of the state directory's disk is free: the
# copies must never be what fills a disk the manifest and the staging area also need.
RESERVE = 0.10
# What a CID may look like as a file name here: CIDv0 or CIDv1 in base32/base58, never a path.
_CID = re.compile(r"[A-Za-z0-9]{20,200}")


class LocalCopies:
    """The copies in one directory, at most `limit_bytes` of them (0: none kept or read).

    Safe to use from the trio thread and workers at once. `keep` and `read` do no more than
    metadata work and one pread; `trim` and `drop` unlink files, which for a big copy means
    dropping its pages: callers run those on a worker when it matters.
    """

    def __init__(self, directory: Path, limit_bytes: int, *, tidy: bool = True) -> None:
        if limit_bytes < 0:
            raise ValueError("the copies' limit must not be negative")
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.directory = directory
        self.limit = limit_bytes
        self._lock = threading.Lock()
        self._sizes: OrderedDict[str, int] = OrderedDict()  # least recently used first
        self._bytes = 0
        self._touched: set[str] = set()  # mtime moved up in this process (the LRU order)
        self.failed = 0  # copies found damaged, for `user.medfs.stats`
        self._index(tidy)
        if tidy:
            self.trim()

    @classmethod
    def view(cls, directory: Path) -> LocalCopies:
        """The copies as a command beside the mount sees them (the mount owns the directory,
        and a mount's start tidies it): read and dropped here, never kept, trimmed or swept."""
        return cls(directory, 0, tidy=False)

    @property
    def total(self) -> int:
        """Bytes of copies kept."""
        return self._bytes

    @property
    def over_limit(self) -> bool:
        return self._bytes > self.limit

    def _index(self, tidy: bool) -> None:
        found = []
        with os.scandir(self.directory) as entries:
            for entry in entries:
                try:
                    st = entry.stat(follow_symlinks=False)
                except FileNotFoundError:
                    continue
                if _CID.fullmatch(entry.name) and entry.is_file(follow_symlinks=False):
                    found.append((st.st_mtime_ns, entry.name, st.st_size))
                elif tidy and not entry.is_dir(follow_symlinks=False):  # nothing else belongs here
                    Path(entry.path).unlink(missing_ok=True)
        for _mtime, cid, size in sorted(found):
            self._sizes[cid] = size
            self._bytes += size

    def __contains__(self, cid: str) -> bool:
        return cid in self._sizes

    def keep(self, path: Path, cid: str, size: int) -> bool:
        """Make the first `size` bytes of `path` (an uploaded object, maybe with a staging
        record after it) the copy of `cid`. False when it is not kept: the caller still owns
        `path` and deletes it. The caller then runs `trim` if `over_limit`."""
        if size > self.limit or not _CID.fullmatch(cid) or cid in self._sizes:
            return False
        try:
            st = os.statvfs(self.directory)
            if st.f_bavail < RESERVE * st.f_blocks:
                return False
            if path.stat().st_size < size:
                return False  # not the whole object: never a copy
            os.truncate(path, size)  # a staging record after the object must not come along
            path.rename(self.directory / cid)
        except OSError as err:
            log.warning("cannot keep a local copy of %s: %s", cid, err.strerror)
            return False
        with self._lock:
            self._sizes[cid] = size
            self._bytes += size
            self._touched.add(cid)  # its mtime is now
        return True

    def read(self, cid: str, offset: int, length: int) -> bytes | None:
        """`length` bytes of the copy of `cid` at `offset`, or None (no such copy, or it is
        short or unreadable, and then it is dropped). The bytes are not authenticated here:
        the caller decrypts them and calls `drop(cid, failed=True)` if they are not right."""
        with self._lock:
            if cid not in self._sizes:
                return None
            self._sizes.move_to_end(cid)
            touch = cid not in self._touched
            self._touched.add(cid)
        path = self.directory / cid
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            self._forget(cid)
            return None
        try:
            data = os.pread(fd, length, offset)
            # Reads of a copy come in windows one after the other, two at a time: have the
            # disk bring the next two while this one is decrypted (the kernel's own
            # read-ahead is 128 KiB). Cold 1 GiB cat through a mount: 3.5-4.0 s -> 2.6-2.8 s
            # with one window ahead.
            os.posix_fadvise(fd, offset + length, 2 * length, os.POSIX_FADV_WILLNEED)
            if touch:  # the order survives a restart: copies read long ago go first
                os.utime(fd)
        except OSError as err:
            log.warning("cannot read the local copy of %s: %s", cid, err.strerror)
            data = b""
        finally:
            os.close(fd)
        if len(data) != length:
            self.drop(cid, failed=True)
            return None
        return data

    def drop(self, cid: str, *, failed: bool = False) -> None:
        """Delete the copy of `cid`, if there is one; `failed` counts it as damaged."""
        if self._forget(cid):
            (self.directory / cid).unlink(missing_ok=True)
            if failed:
                with self._lock:
                    self.failed += 1
                log.warning("the local copy of %s was damaged; it is deleted", cid)

    def retain(self, cids: set[str]) -> None:
        """Delete every copy whose CID is not in `cids` (what the manifest still refers to)."""
        for cid in [c for c in list(self._sizes) if c not in cids]:
            self.drop(cid)

    def trim(self) -> None:
        """Delete copies, least recently used first, until they are within the limit."""
        while True:
            with self._lock:
                if self._bytes <= self.limit or not self._sizes:
                    return
                cid = next(iter(self._sizes))
            self.drop(cid)

    def _forget(self, cid: str) -> bool:
        with self._lock:
            size = self._sizes.pop(cid, None)
            if size is None:
                return False
            self._bytes -= size
            self._touched.discard(cid)
            return True
