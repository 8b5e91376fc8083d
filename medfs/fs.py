"""The FUSE operations: the filesystem tree from the manifest, contents from `medfs.content`.

Every handler answers either a result or `pyfuse3.FUSEError(errno)`; `_op` maps every other
exception to an errno (and logs the unexpected ones), so nothing else ever reaches pyfuse3.

Inode numbers are the manifest's. A file's content is committed as a new version when a
handle that wrote to it is flushed or fsynced (close(2) flushes); a path-based truncate commits
at once. A small file's version is sealed at close and committed with the others closed about
then, in a group (one upload, one pin, one manifest transaction, one audit fsync); close
returns once it is sealed in the staging area, where it survives the daemon being killed, and
fsync(2) of the file or of any directory returns once it is pinned and committed.

An unlinked file keeps its inode, and stays readable, until the kernel forgets it and its last
handle is released.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import itertools
import json
import logging
import os
import stat
import time
from collections.abc import Callable, Coroutine, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ParamSpec, TypeVar

import pyfuse3
import trio

from medfs import format, recipients
from medfs.audit import AuditLog
from medfs.content import (
    MAX_READAHEAD,
    SMALL_FILE,
    ContentError,
    Draft,
    PendingRecord,
    PendingStore,
    Reader,
    Sealed,
    StagedCopyGone,
    Staging,
    Version,
)
from medfs.errors import FormatError, IPFSError, MedfsError
from medfs.identity import Identity, readers
from medfs.layout import SEGMENT_SIZE, ciphertext_size
from medfs.manifest import (
    RECIPIENT_TRIES,
    Inode,
    Manifest,
    NewVersion,
    RecipientsChanged,
    recipients_never_match,
)

log = logging.getLogger(__name__)

SEG = SEGMENT_SIZE
# A reader this far into a sequential streak gets its next window fetched in the background.
PREFETCH_AFTER = 16
# The kernel's read-ahead keeps a few requests in flight, so a sequential read may start up to a
# few requests' length before or after where the last one ended; never more than this.
SEQUENTIAL_SLACK = 1 << 20
# The most small files one group upload carries: bounds the request (<= 512 MiB) and the time
# a large backlog holds up the fsync of any one file in it.
GROUP_FILES = 512
PREFERRED_IO = 1 << 20  # st_blksize: 16 segments; FUSE passes writes this large whole
# How long a sealed small file waits for others to join its group, unless an fsync waits on it:
# a group upload costs a request, a pin and three fsyncs whatever its size.
GROUP_DELAY = 0.05
# How many request lengths away from the last end still counts as sequential: the slack scales
# with the request, so a random 4 KiB reader must land within 16 KiB, not 1 MiB.
SEQUENTIAL_REQUESTS = 4
# Read-ahead starts only after this many near-sequential reads in a row: one random read that
# happens to land near the last one (about 1 in 500 in a 1 GiB file with 1 MiB slack) must not
# fetch a window it will never use.
SEQUENTIAL_STREAK = 2

# Metadata changes only through this daemon, which answers with fresh attributes each time; a
# short timeout still bounds how stale a view can be after a share or umount flush.
ATTR_TIMEOUT = 1.0
NAME_MAX = 255
XATTR_CID = b"user.medfs.cid"
XATTR_INFO = b"user.medfs.info"
XATTR_STATS = b"user.medfs.stats"  # on the root: counters of this mount, for benchmarks

KIND_BITS = {"file": stat.S_IFREG, "dir": stat.S_IFDIR, "symlink": stat.S_IFLNK}

P = ParamSpec("P")
R = TypeVar("R")


def _op(fn: Callable[P, Coroutine[Any, Any, R]]) -> Callable[P, Coroutine[Any, Any, R]]:
    """Turn every failure of a handler into a FUSEError with the right errno."""

    @functools.wraps(fn)
    async def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return await fn(*args, **kwargs)
        except pyfuse3.FUSEError:
            raise
        except ContentError as err:
            log.error("%s: %s", fn.__name__, err)
            raise pyfuse3.FUSEError(err.errno) from None
        except FileExistsError:
            raise pyfuse3.FUSEError(errno.EEXIST) from None
        except FileNotFoundError:
            raise pyfuse3.FUSEError(errno.ENOENT) from None
        except (IPFSError, FormatError, MedfsError) as err:
            log.error("%s: %s", fn.__name__, err.message)
            raise pyfuse3.FUSEError(errno.EIO) from None
        except OSError as err:
            log.error("%s: %s", fn.__name__, err)
            raise pyfuse3.FUSEError(err.errno or errno.EIO) from None
        except Exception:
            log.exception("unexpected error in %s", fn.__name__)
            raise pyfuse3.FUSEError(errno.EIO) from None

    return wrapper


def _fail(code: int) -> pyfuse3.FUSEError:
    return pyfuse3.FUSEError(code)


@dataclass
class Handle:
    ino: int
    writable: bool
    # Read-ahead state: where the last read ended, how many reads in a row were near it, and
    # the current window in segments.
    next_offset: int = 0
    streak: int = 0
    ahead: int = 0
    wrote: bool = False

    def plan_read(self, off: int, size: int) -> int:
        """Account for a read of `size` bytes at `off`; return how many segments to fetch
        ahead of it."""
        slack = min(SEQUENTIAL_SLACK, SEQUENTIAL_REQUESTS * size)
        if abs(off - self.next_offset) <= slack:
            self.streak += 1
        else:
            self.streak = 0
        if self.streak >= SEQUENTIAL_STREAK:
            self.ahead = min(MAX_READAHEAD, max(8, self.ahead * 2))
        else:
            self.ahead = 0
        return self.ahead

    def after_read(self, off: int, length: int) -> None:
        # While sequential, concurrent requests may complete out of order: keep the furthest end.
        end = off + length
        self.next_offset = max(self.next_offset, end) if self.streak else end


@dataclass
class Pending:
    """A draft whose commit failed: kept so umount can say what was not saved."""

    ino: int
    error: str


@dataclass
class Stats:
    commits: int = 0
    deferred: int = 0  # versions kept in the staging area because the upload failed
    failures: list[Pending] = field(default_factory=list)


class Filesystem(pyfuse3.Operations):
    enable_writeback_cache = False
    enable_acl = False

    def __init__(
        self,
        manifest: Manifest,
        owner: Identity,
        reader: Reader,
        staging: Staging,
        *,
        read_only: bool = False,
        statfs_path: str = "/",
        journal: AuditLog | None = None,
        pending: PendingStore | None = None,
        renew_api: Callable[[], str] | None = None,
        retry_interval: float = 5.0,
    ) -> None:
        super().__init__()
        if not read_only:
            # Commits then wait for no fsync on this thread; `_durable` syncs where it counts.
            manifest.defer_sync()
        self.journal = journal
        self.pending_store = pending
        self.renew_api = renew_api
        self.retry_interval = retry_interval
        self._pending: dict[int, PendingRecord] = {}
        # A time set (utime, `touch -d`, `rsync -a`) on a version waiting for upload, with the
        # record it was set on: the commit records it, not the time of the close.
        self._set_mtimes: dict[int, tuple[PendingRecord, int]] = {}
        # Wakes the committer: set when a small version waits; replaced after each round.
        self._wake = trio.Event()
        self._hurry = trio.Event()  # set when an fsync waits: no time for others to join
        self._round_done = trio.Event()  # set (and replaced) after each upload round
        self._round_error: str | None = None  # why the last round stopped, if it failed
        self._round_lock = trio.Lock()
        self._commit_locks: dict[int, trio.Lock] = {}
        self._last_trouble = 0.0
        self._suspect = False  # a read failed: check the node (and restart it if it is ours)
        self.manifest = manifest
        self.owner = owner
        self._owner_recipient = owner.public.recipient()  # parsing its key costs per commit
        self.reader = reader
        self.ipfs = reader.ipfs
        self.staging = staging
        self.read_only = read_only
        self.statfs_path = statfs_path
        self.stats = Stats()
        self._lookups: dict[int, int] = {}
        self._open: dict[int, int] = {}
        self._handles: dict[int, Handle] = {}
        self._next_fh = itertools.count(1)
        self._drafts: dict[int, Draft] = {}
        self._versions: dict[int, Version] = {}
        # Inodes whose `_versions` entry was checked against the manifest since another
        # process last committed to it (its data_version then).
        self._checked: set[int] = set()
        self._data_version = -1
        self._unlinked: set[int] = set()
        self._paths: dict[int, str] = {}  # see _path; cleared by every rename and unlink
        self._last_open_cid: dict[int, str | None] = {}
        self._garbage: list[str] = []
        self._stale_copies: list[str] = []  # CIDs no longer anyone's version here
        self._nursery: trio.Nursery | None = None

    # -- lifecycle (called by medfs.mount) ------------------------------------------------------

    def start(self, nursery: trio.Nursery) -> None:
        self._nursery = nursery
        if self.pending_store is not None:
            for record in self.pending_store.load():
                older = self._pending.get(record.ino)
                inode = self.manifest.get(record.ino)
                if inode is None or self._committed_since(record, inode):
                    # Its file was deleted meanwhile, or this version (or a newer one) was
                    # committed before a crash left the record behind: never roll back.
                    self.pending_store.remove(record)
                elif older is None or record.saved_ns > older.saved_ns:
                    if older is not None:
                        self.pending_store.remove(older)
                    self._pending[record.ino] = record
                else:
                    self.pending_store.remove(record)
            unfinished, empty = self.pending_store.sweep()
            if unfinished:
                log.info("removed %d unfinished files from the staging area", unfinished)
            if empty:
                log.debug("removed %d empty files made ahead in the staging area", empty)
            if self._pending:
                log.info("%d versions wait in the staging area for upload", len(self._pending))
                self._wake.set()
            elif not self.read_only:
                self.staging.renew()
        if not self.read_only:
            # A file without any version was still being written when a daemon died: it was
            # never closed, so it never existed for anyone (closed files always have one).
            for inode in self.manifest.uncommitted_files():
                if inode.ino not in self._pending:
                    self._drop_uncommitted(inode)
            for inode in self.manifest.orphans():  # unlinked while open when a daemon died
                self._free(inode.ino)
        nursery.start_soon(self._retry_loop)

    @staticmethod
    def _committed_since(record: PendingRecord, inode: Inode) -> bool:
        if inode.salt == record.salt:
            return True  # the salt is fresh for every version: this one is committed
        return inode.version_ns is not None and inode.version_ns >= record.saved_ns

    def _drop_uncommitted(self, inode: Inode) -> None:
        path = self.manifest.path_of(inode.ino)
        parent = self.manifest.parent_of(inode.ino)
        if path is None or parent is None:
            return
        self.manifest.unlink(parent, path.rsplit(b"/", 1)[1], now_ns=time.time_ns())
        self.manifest.delete_inode(inode.ino)
        self._paths.clear()

    async def shutdown(self) -> list[Pending]:
        """Commit every draft still dirty, try the pending uploads once more, unpin garbage;
        return what is not on IPFS yet (it stays in the staging area for the next mount)."""
        failed: list[Pending] = []
        for ino in list(self._drafts):
            try:
                await self._commit(ino)
            except (ContentError, MedfsError) as err:
                failed.append(Pending(ino, str(err)))
        error = await self._upload_round() if self._pending else None
        for ino in self._pending:
            failed.append(Pending(ino, f"not uploaded yet ({error}); kept in the staging area"))
        await trio.to_thread.run_sync(self._unpin_sync)
        for draft in self._drafts.values():
            draft.discard()
        return failed

    # -- uploads that wait for the node -----------------------------------------------------------

    async def _defer(self, ino: int, sealed: Sealed, mtime_ns: int) -> None:
        """A small version, sealed in the staging area, waits for the next group upload."""
        if self.pending_store is None:  # nowhere to wait: a group of one, now
            try:
                with open(sealed.spool, "rb") as fh:
                    cid = await trio.to_thread.run_sync(self.ipfs.add, fh)
            finally:
                sealed.spool.unlink()
            await self._publish(ino, cid, sealed.key, sealed.salt, sealed.size, mtime_ns)
            return
        # A record of a few hundred bytes, not synced: written here rather than in a worker,
        # whose hand-off would cost more than the write (this runs at every small close).
        record = self.pending_store.save(ino, sealed, mtime_ns, synced=False)
        older = self._pending.get(ino)
        self._pending[ino] = record
        if older is not None:
            self.pending_store.remove(older)
        self._wake.set()

    async def _keep_pending(self, ino: int, sealed: Sealed, mtime_ns: int) -> None:
        if self.pending_store is None:
            with contextlib.suppress(FileNotFoundError):
                sealed.spool.unlink()
            raise ContentError(f"cannot upload the new version: {sealed.error}")
        record = await trio.to_thread.run_sync(self.pending_store.save, ino, sealed, mtime_ns)
        older = self._pending.get(ino)
        self._pending[ino] = record
        if older is not None:
            self.pending_store.remove(older)
        self.stats.deferred += 1
        log.warning(
            "upload of a new version of inode %d failed (%s); it is kept encrypted in the"
            " staging area and will be uploaded when the node answers", ino, sealed.error,
        )  # fmt: skip

    async def _retry_loop(self) -> None:
        """Upload what waits: at once when a small version is sealed, every `retry_interval`
        while the node fails."""
        while True:
            with trio.move_on_after(self.retry_interval):
                await self._wake.wait()
            with trio.move_on_after(GROUP_DELAY):
                await self._hurry.wait()
            self._wake, self._hurry = trio.Event(), trio.Event()
            if self._pending:
                error = await self._upload_round()
                if error is not None:
                    await trio.sleep(self.retry_interval)  # the node is away: do not hammer it
            elif self._suspect:
                self._suspect = False
                try:
                    await trio.to_thread.run_sync(self.ipfs.version)
                except IPFSError as err:
                    await self._node_trouble(err)

    def _upload_spool(self, record: PendingRecord) -> str:
        record.spool.stat()  # FileNotFoundError before a request, not from inside its body
        return self.ipfs.add(record.chunks())

    def _upload_group(
        self, records: Sequence[PendingRecord]
    ) -> tuple[str | None, list[tuple[PendingRecord, str]]]:
        """Add the records' objects as one group: (its CID, each record added with its CID).

        A record whose staging file is gone was superseded or deleted on the trio thread while
        this ran (`cmd > file` in a shell closes a first, empty version, then the real one):
        it is left out, not an error that would hold every `fsync` up until the next round.
        """
        found, objects = [], []
        for record in records:
            try:
                objects.append(b"".join(record.chunks()))
            except FileNotFoundError:
                continue
            found.append(record)
        if not found:
            return None, []
        group, cids = self.ipfs.add_group(objects)
        return group, list(zip(found, cids, strict=True))

    async def _upload_round(self) -> str | None:
        """Upload and commit what waits in the staging area; the error that stopped it.

        Small versions go up in groups, larger ones (uploads that failed earlier) one by one.
        Whatever is still waiting when the node fails is synced to disk, since it may wait long.
        """
        try:
            async with self._round_lock:  # two rounds at once would upload the same records
                self._round_error = await self._retry_pending()
        except Exception:
            # A bug must not take the mount down, nor leave an fsync waiting for ever: what
            # waits stays in the staging area, readable, and umount names it.
            log.exception("uploading what waits in the staging area failed")
            self._round_error = "an internal error (see the mount log)"
        finally:
            done, self._round_done = self._round_done, trio.Event()
            done.set()
        if self._round_error is not None and self.pending_store is not None:
            waiting = list(self._pending.values())
            await trio.to_thread.run_sync(self.pending_store.sync, waiting)
        return self._round_error

    async def _retry_pending(self) -> str | None:
        assert self.pending_store is not None
        tried: set[PendingRecord] = set()  # each once a round, even if it was not committed
        while True:
            records = [r for r in self._pending.values() if r not in tried]
            small = [r for r in records if r.size <= SMALL_FILE][:GROUP_FILES]
            if not small:
                break
            tried.update(small)
            try:
                group, uploaded = await trio.to_thread.run_sync(self._upload_group, small)
            except (IPFSError, OSError) as err:
                await self._node_trouble_or_log(err)
                return err.message if isinstance(err, IPFSError) else str(err)
            sent = {record for record, _ in uploaded}
            self._lost_staging([r for r in small if r not in sent])
            if group is not None:
                await self._publish_group(group, uploaded)
        for ino, record in list(self._pending.items()):
            if record.size <= SMALL_FILE:
                continue  # sealed while the groups went up: the next round takes it
            if self._pending.get(ino) is not record:
                continue  # superseded or deleted while the ones before it went up
            try:
                cid = await trio.to_thread.run_sync(self._upload_spool, record)
            except FileNotFoundError:
                self._lost_staging([record])
                continue
            except IPFSError as err:
                await self._node_trouble(err)
                return err.message
            async with self._commit_locks.setdefault(ino, trio.Lock()):
                if self._pending.get(ino) is not record or self.manifest.get(ino) is None:
                    self._discard_later([cid])  # superseded or deleted while it was uploading
                    continue
                await self._publish(
                    ino, cid, record.key, record.salt, record.size, self._mtime_of(record)
                )
                await self._uploaded(record, cid)
            log.info("inode %d: the version kept in the staging area is now uploaded", ino)
        return None

    def _mtime_of(self, record: PendingRecord) -> int:
        """A waiting version's mtime: its close's, unless one was set on it since. (Kept in
        memory and in the manifest's attributes: a crash before the upload restores the
        close's time with the version, from its record.)"""
        set_on = self._set_mtimes.get(record.ino)
        return set_on[1] if set_on is not None and set_on[0] is record else record.mtime_ns

    def _lost_staging(self, missing: Sequence[PendingRecord]) -> None:
        """Records an upload found without their staging file. Superseded or deleted ones
        were removed on purpose; one still current lost its only copy to something outside
        this mount, and waiting for it would hold every `fsync` for ever."""
        for record in missing:
            if self._pending.get(record.ino) is record:
                del self._pending[record.ino]
                log.error(
                    "inode %d: the staging file of its last version (%s) is gone; the file "
                    "keeps its version before that", record.ino, record.spool.name,
                )  # fmt: skip

    async def _node_trouble_or_log(self, err: IPFSError | OSError) -> None:
        if isinstance(err, IPFSError):
            await self._node_trouble(err)
        else:  # a staging file could not be read: it stays, and is retried
            log.error("cannot read the staging area for an upload: %s", err)

    async def _publish_group(self, group: str, uploaded: list[tuple[PendingRecord, str]]) -> None:
        """Commit the versions one group upload carried, those still current, at once."""
        assert self.pending_store is not None
        live: list[tuple[PendingRecord, str, bytes]] = []  # with the entry id wraps bind to
        replaced: dict[int, str | None] = {}  # each file's CID before this commit
        for record, cid in uploaded:
            if not self._committable(record):
                continue
            inode = self.manifest.get(record.ino)
            if inode is None:  # cannot happen (freeing drops the record); never loop on it
                del self._pending[record.ino]
                self.pending_store.remove(record)
                continue
            live.append((record, cid, inode.entry_id))
            replaced[record.ino] = inode.cid
        wraps = await self._wrap_now(live)
        for tries in itertools.count(1):
            # Back on the trio thread: a save that superseded one of them meanwhile wins.
            current = [(r, cid) for r, cid, _ in live if self._committable(r)]
            if not current:
                self._discard_later([group])  # it keeps nothing anyone still needs
                return
            now = time.time_ns()
            versions = [NewVersion(r.ino, cid, r.salt, r.size, format.VERSION,
                                   self._mtime_of(r), now, wraps[r.ino])
                        for r, cid in current]  # fmt: skip
            try:
                unpin = self.manifest.commit_group(versions, group)
                break
            except RecipientsChanged as err:  # a share or a revoke landed during the wraps
                if tries == RECIPIENT_TRIES:
                    raise recipients_never_match(err) from None
                wraps |= await self._wrap_now([item for item in live if item[0].ino in err.inos])
        events = [
            ("version", v.cid, {"path": self._path(v.ino), "size": v.size,
                                "recipients": sorted(v.wraps)})
            for v in versions
        ]  # fmt: skip
        committed = {v.ino: v.cid for v in versions}
        self._drop_copies_later([c for ino in committed if (c := replaced[ino]) is not None])
        for record, cid, _ in live:
            if committed.get(record.ino) == cid:
                self._versions[record.ino] = Version(cid, record.key, record.salt, record.size)
        self.stats.commits += len(versions)
        await self._durable(events)  # before the staging copies go
        self._discard_later(unpin)
        for record, cid, _ in live:
            if committed.get(record.ino) == cid:
                await self._uploaded(record, cid)

    async def _wrap_now(
        self, items: Sequence[tuple[PendingRecord, str, bytes]]
    ) -> dict[int, dict[str, bytes]]:
        """Each record's key wrapped (on a worker thread) for everyone who may read its file
        now, bound to the entry id that comes with it."""
        jobs = [(self._recipients(r.ino), entry_id, r.key, r.salt) for r, _, entry_id in items]
        done = await trio.to_thread.run_sync(self._wrap_group, jobs)
        return {r.ino: wrapped for (r, _, _), wrapped in zip(items, done, strict=True)}

    def _committable(self, record: PendingRecord) -> bool:
        """Whether `record` may become its file's version now: not superseded, its file not
        deleted (freeing drops the record), and no save of that file under way, which would
        record its newer version first if this one were committed behind it (it is left
        for the next round, which finds it superseded or free to go)."""
        lock = self._commit_locks.get(record.ino)
        return self._pending.get(record.ino) is record and (lock is None or not lock.locked())

    @staticmethod
    def _wrap_group(
        jobs: list[tuple[list[recipients.Recipient], bytes, bytes, bytes]],
    ) -> list[dict[str, bytes]]:
        return [Filesystem._wrap_all(*job) for job in jobs]

    async def _uploaded(self, record: PendingRecord, cid: str) -> None:
        """`record` is committed as `cid`: drafts read it from IPFS now, its files can go."""
        assert self.pending_store is not None
        draft = self._drafts.get(record.ino)
        if draft is not None:
            async with draft.lock:
                draft.rebase(record.spool, Version(cid, record.key, record.salt, record.size))
        if self._pending.get(record.ino) is record:
            del self._pending[record.ino]
        set_on = self._set_mtimes.get(record.ino)
        if set_on is not None and set_on[0] is record:
            del self._set_mtimes[record.ino]
        # No await from the check to the keep: a commit that replaced this version since
        # has already listed its CID as stale, and its copy would never be dropped.
        current = self._versions.get(record.ino)
        copies = self.reader.copies
        still = current is not None and current.cid == cid
        if not (still and copies and copies.keep(record.spool, cid, ciphertext_size(record.size))):
            self.pending_store.remove(record)
        elif copies.over_limit and self._nursery is not None:
            self._nursery.start_soon(trio.to_thread.run_sync, copies.trim)

    async def _wait_committed(self, inos: set[int] | None) -> None:
        """Until the versions waiting for `inos` (None: all) are committed, or an upload
        round failed: then they are on disk in the staging area (synced), as after a close
        while the node is down."""

        def waiting() -> bool:
            return any(inos is None or ino in inos for ino in self._pending)

        while waiting():
            done = self._round_done
            self._wake.set()
            self._hurry.set()
            await done.wait()
            if self._round_error is not None:
                return

    async def _wait_if_closing(self, ino: int) -> None:
        """If `ino` was just closed and its version is about to be committed, until it is.
        While the node fails, not at all: the staging copy serves at once."""
        if ino in self._pending and self._round_error is None:
            await self._wait_committed({ino})

    async def settle(self) -> None:
        """Return once every version closed so far is committed (or staged, if the node is
        down): what `sync` on the mount waits for, before a share reads the manifest."""
        await self._wait_committed(None)

    async def _node_trouble(self, err: IPFSError) -> None:
        now = time.monotonic()
        if now - self._last_trouble > 60:
            log.warning("the IPFS node does not answer: %s", err.message)
            self._last_trouble = now
        if self.renew_api is None:
            return
        try:
            api = await trio.to_thread.run_sync(self.renew_api)
        except MedfsError as renew_err:
            log.warning("cannot restart the embedded IPFS node: %s", renew_err.message)
            return
        if api != self.ipfs.api:
            log.info("the embedded IPFS node is back at %s", api)
            self.ipfs.retarget(api)

    # -- helpers --------------------------------------------------------------------------------

    def _inode(self, ino: int) -> Inode:
        inode = self.manifest.get(ino)
        if inode is None:
            raise _fail(errno.ENOENT)
        return inode

    def _attrs(self, inode: Inode) -> pyfuse3.EntryAttributes:
        attrs = pyfuse3.EntryAttributes()
        attrs.st_ino = inode.ino
        attrs.generation = 0
        attrs.entry_timeout = ATTR_TIMEOUT
        attrs.attr_timeout = ATTR_TIMEOUT
        attrs.st_mode = KIND_BITS[inode.kind] | inode.mode
        attrs.st_nlink = 0 if inode.ino in self._unlinked else (2 if inode.kind == "dir" else 1)
        attrs.st_uid = inode.uid
        attrs.st_gid = inode.gid
        attrs.st_rdev = 0
        draft = self._drafts.get(inode.ino)
        if draft is not None:
            attrs.st_size = draft.size
            attrs.st_mtime_ns = draft.mtime_ns or inode.mtime_ns
        elif inode.ino in self._pending:
            attrs.st_size = self._pending[inode.ino].size
            attrs.st_mtime_ns = self._mtime_of(self._pending[inode.ino])
        else:
            attrs.st_size = inode.size
            attrs.st_mtime_ns = inode.mtime_ns
        # The preferred I/O size: cp, cat and rsync size their buffers from it, and every
        # request costs a round trip through FUSE and Python whatever its size.
        attrs.st_blksize = PREFERRED_IO
        attrs.st_blocks = -(-attrs.st_size // 512)
        attrs.st_atime_ns = inode.atime_ns
        attrs.st_ctime_ns = inode.ctime_ns
        return attrs

    def _entry(self, inode: Inode) -> pyfuse3.EntryAttributes:
        self._lookups[inode.ino] = self._lookups.get(inode.ino, 0) + 1
        return self._attrs(inode)

    def _writable(self) -> None:
        if self.read_only:
            raise _fail(errno.EROFS)

    @staticmethod
    def _check_name(name: bytes) -> None:
        if len(name) > NAME_MAX:
            raise _fail(errno.ENAMETOOLONG)
        if b"/" in name or name in (b"", b".", b".."):
            raise _fail(errno.EINVAL)

    def _version(self, inode: Inode) -> Version | None:
        """The current version with its content key, or None for no object yet."""
        record = self._pending.get(inode.ino)
        if record is not None:
            return record.version()
        if inode.cid is None or inode.salt is None:
            return None
        cached = self._versions.get(inode.ino)
        if cached is not None and cached.cid == inode.cid:
            return cached
        wraps = self.manifest.wraps(inode.ino)
        stanza_bytes = wraps.get(self.owner.fingerprint)
        if stanza_bytes is None:
            raise ContentError(f"inode {inode.ino}: no key wrapped for this identity", errno.EACCES)
        stanza = recipients.Stanza.from_bytes(stanza_bytes)
        key = self.owner.unwrap(stanza, recipients.entry_context(inode.entry_id, inode.salt))
        version = Version(inode.cid, key, inode.salt, inode.size)
        self._versions[inode.ino] = version
        return version

    def _read_version(self, ino: int) -> Version | None:
        """`_version` for the read path, which asks it for every request of every reader: the
        manifest is queried only after another process committed (a revoke re-keys files) or
        for a file not looked at since. This mount's own commits keep `_versions` current."""
        seen = self.manifest.data_version()
        if seen != self._data_version:
            self._data_version = seen
            self._checked.clear()
        if ino in self._checked and ino not in self._pending:
            cached = self._versions.get(ino)
            if cached is not None:
                return cached
        version = self._version(self._inode(ino))
        self._checked.add(ino)
        return version

    def _draft(self, inode: Inode) -> Draft:
        draft = self._drafts.get(inode.ino)
        if draft is None:
            # A version waiting in the staging area is newer than what the manifest says.
            version = self._version(inode)
            waiting = self._pending.get(inode.ino)
            size = version.size if version is not None else inode.size
            draft = Draft(self.reader, self.staging, version, size)
            draft.mtime_ns = self._mtime_of(waiting) if waiting is not None else inode.mtime_ns
            self._drafts[inode.ino] = draft
        return draft

    def _recipients(self, ino: int) -> list[recipients.Recipient]:
        """The owner, and everyone a grant on this file or a directory above it names."""
        return readers(self._owner_recipient, self.manifest.grantees(ino))

    @staticmethod
    def _wrap_all(
        to: list[recipients.Recipient], entry_id: bytes, key: bytes, salt: bytes
    ) -> dict[str, bytes]:
        return recipients.wrap_all(key, to, recipients.entry_context(entry_id, salt))

    async def _commit(self, ino: int) -> None:
        # One commit per file at a time, from upload to manifest: otherwise two saves racing
        # could record the older version last and unpin the newer one.
        async with self._commit_locks.setdefault(ino, trio.Lock()):
            await self._commit_locked(ino)

    async def _commit_locked(self, ino: int) -> None:
        draft = self._drafts.get(ino)
        if draft is None:
            return
        sealed = await draft.commit()
        if sealed is None:
            return
        mtime_ns = draft.mtime_ns or time.time_ns()
        if sealed.cid is None and sealed.error is None:
            self._discard_later(draft.take_garbage())  # superseded whatever becomes of it
            await self._defer(ino, sealed, mtime_ns)
            return
        if sealed.cid is None:
            await self._keep_pending(ino, sealed, mtime_ns)
            return
        garbage = draft.take_garbage()
        await self._publish(ino, sealed.cid, sealed.key, sealed.salt, sealed.size, mtime_ns)
        self._discard_later(garbage)
        older = self._pending.pop(ino, None)
        if older is not None and self.pending_store is not None:
            self.pending_store.remove(older)  # superseded by what was just committed

    async def _publish(
        self, ino: int, cid: str, key: bytes, salt: bytes, size: int, mtime_ns: int
    ) -> None:
        """Make an uploaded object the file's version: wraps, manifest, audit, old unpinned."""
        inode = self._inode(ino)
        previous = inode.cid
        for tries in itertools.count(1):
            to = self._recipients(ino)  # the manifest is read on this thread only
            wraps = await trio.to_thread.run_sync(self._wrap_all, to, inode.entry_id, key, salt)
            try:
                old = self.manifest.commit_version(
                    ino, cid=cid, salt=salt, size=size, format=format.VERSION,
                    mtime_ns=mtime_ns, version_ns=time.time_ns(), wraps=wraps,
                )  # fmt: skip
                break
            except RecipientsChanged as err:  # a share or a revoke landed during the wraps
                if tries == RECIPIENT_TRIES:
                    raise recipients_never_match(err) from None
        self._versions[ino] = Version(cid, key, salt, size)
        if previous is not None and previous != cid:
            self._drop_copies_later([previous])
        self.stats.commits += 1
        await self._record(
            "version", cid=cid, path=self._path(ino), size=size, recipients=sorted(wraps)
        )
        if old is not None and old != cid:
            self._discard_later([old])

    def _discard_later(self, cids: Sequence[str]) -> None:
        self._garbage.extend(cids)
        if self._garbage and self._nursery is not None:
            self._nursery.start_soon(trio.to_thread.run_sync, self._unpin_sync)

    def _drop_copies_later(self, cids: Sequence[str]) -> None:
        """Versions no longer current here: their local copies go (a group's member is
        not unpinned on its own, so this is not the same list as the unpins)."""
        if self.reader.copies is None:
            return
        self._stale_copies.extend(cids)
        if self._stale_copies and self._nursery is not None:
            self._nursery.start_soon(trio.to_thread.run_sync, self._unpin_sync)

    def _unpin_sync(self) -> None:
        while self._garbage:
            cid = self._garbage.pop()
            try:
                self.ipfs.unpin(cid)
            except IPFSError as err:
                # Already unpinned, or the node is away: `medfs verify` reports orphan pins.
                log.info("unpin %s: %s", cid, err.message)
        copies = self.reader.copies
        while copies is not None and self._stale_copies:
            copies.drop(self._stale_copies.pop())

    def _maybe_free(self, ino: int) -> None:
        if ino in self._unlinked and not self._lookups.get(ino) and not self._open.get(ino):
            self._free(ino)

    def _free(self, ino: int) -> None:
        self._unlinked.discard(ino)
        self._commit_locks.pop(ino, None)
        self._set_mtimes.pop(ino, None)
        record = self._pending.pop(ino, None)
        if record is not None and self.pending_store is not None:
            self.pending_store.remove(record)
        inode = self.manifest.get(ino)
        current = inode.cid if inode is not None else None
        # Released first: a crash in between can only leave a pin behind, never lose data.
        unpin = self.manifest.release(current) if current is not None else None
        self.manifest.delete_inode(ino)
        self._versions.pop(ino, None)
        self._checked.discard(ino)
        draft = self._drafts.pop(ino, None)
        garbage = draft.take_garbage() if draft else []
        if draft is not None:
            draft.discard()
        if unpin is not None:
            garbage.append(unpin)
        self._discard_later(garbage)
        if current is not None:
            self._drop_copies_later([current])

    def _detach(self, inode: Inode) -> None:
        """An inode lost its name: free it now, or when the kernel and handles let go."""
        self._unlinked.add(inode.ino)
        self._maybe_free(inode.ino)

    # -- the audit log ----------------------------------------------------------------------------

    def _path(self, ino: int) -> str:
        """The path the audit log names: remembered, since creating a file names it twice
        (create, version) and each look-up decrypts every name up to the root."""
        known = self._paths.get(ino)
        if known is None:
            path = self.manifest.path_of(ino)
            if path is None:
                return f"(unlinked inode {ino})"
            known = self._paths[ino] = os.fsdecode(path)
        return known

    def _child_path(self, parent: int, name: bytes, ino: int) -> str:
        """A new entry's path from its parent's (remembered for its siblings): no walk up to
        the root, decrypting every name on the way, for each file `cp -r` creates."""
        base = self._path(parent)
        path = self._paths[ino] = f"{base.rstrip('/')}/{os.fsdecode(name)}"
        return path

    async def _record(self, event: str, *, cid: str | None = None, **details: object) -> None:
        """Make the manifest durable and record an event, before the operation is
        acknowledged: the log never tells of a change a power cut could undo."""
        await self._durable([(event, cid, details)])

    async def _durable(
        self, events: Sequence[tuple[str, str | None, Mapping[str, object]]]
    ) -> None:
        def sync() -> None:
            self.manifest.sync_to_disk()
            if self.journal is not None and events:
                self.journal.append_many(events)

        await trio.to_thread.run_sync(sync)

    def _record_read(self, ino: int, cid: str | None, ctx: pyfuse3.RequestContext) -> None:
        """Record an open for reading: batched, written within a second (no wait here)."""
        if self.journal is None:
            return
        try:
            command = Path(f"/proc/{ctx.pid}/comm").read_text().strip()
        except OSError:
            command = None  # the process is gone already, or not ours to see
        self.journal.append_batched(
            "open", cid=cid, path=self._path(ino), pid=ctx.pid, uid=ctx.uid, command=command
        )

    # -- lookups and attributes ---------------------------------------------------------------

    @_op
    async def lookup(
        self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        if len(name) > NAME_MAX:
            raise _fail(errno.ENAMETOOLONG)
        if name == b".":
            return self._entry(self._inode(parent_inode))
        if name == b"..":
            up = self.manifest.parent_of(parent_inode) or pyfuse3.ROOT_INODE
            return self._entry(self._inode(up))
        inode = self.manifest.lookup(parent_inode, name)
        if inode is None:
            raise _fail(errno.ENOENT)
        return self._entry(inode)

    async def forget(self, inode_list: Sequence[tuple[int, int]]) -> None:
        for ino, count in inode_list:
            left = self._lookups.get(ino, 0) - count
            if left > 0:
                self._lookups[ino] = left
            else:
                self._lookups.pop(ino, None)
                try:
                    self._maybe_free(ino)
                except Exception:  # forget has no one to answer: log and go on
                    log.exception("freeing inode %d", ino)

    @_op
    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        return self._attrs(self._inode(inode))

    @_op
    async def setattr(
        self,
        inode: int,
        attr: pyfuse3.EntryAttributes,
        fields: pyfuse3.SetattrFields,
        fh: int | None,
        ctx: pyfuse3.RequestContext,
    ) -> pyfuse3.EntryAttributes:
        self._writable()
        node = self._inode(inode)
        now = time.time_ns()
        if fields.update_size:
            if node.kind == "dir":
                raise _fail(errno.EISDIR)
            if node.kind != "file":
                raise _fail(errno.EINVAL)
            draft = self._draft(node)
            if attr.st_size != draft.size:
                await draft.truncate(attr.st_size)
                draft.mtime_ns = now
                if fh is None:  # truncate(2) by path: no close will follow to commit it
                    await self._commit(inode)
        changes: dict[str, Any] = {"ctime_ns": now}
        # Who may chown was decided by the kernel (default_permissions: only root gives files
        # away); refusing root too would fail every `tar x`, `rsync -a` and `cp -a` run as root.
        if fields.update_uid:
            changes["uid"] = attr.st_uid
        if fields.update_gid:
            changes["gid"] = attr.st_gid
        if fields.update_mode:
            changes["mode"] = attr.st_mode & 0o7777
        if fields.update_atime:
            changes["atime_ns"] = attr.st_atime_ns
        if fields.update_mtime:
            changes["mtime_ns"] = attr.st_mtime_ns
            writing = self._drafts.get(inode)
            if writing is not None:
                writing.mtime_ns = attr.st_mtime_ns
            waiting = self._pending.get(inode)
            if waiting is not None:
                self._set_mtimes[inode] = (waiting, attr.st_mtime_ns)
        elif fields.update_size:
            changes["mtime_ns"] = now
        node = self.manifest.set_attrs(inode, **changes)
        return self._attrs(node)

    @_op
    async def readlink(self, inode: int, ctx: pyfuse3.RequestContext) -> bytes:
        node = self._inode(inode)
        if node.kind != "symlink":
            raise _fail(errno.EINVAL)
        return self.manifest.readlink(inode)

    # -- directories ----------------------------------------------------------------------------

    def _new(self, parent: int, name: bytes, kind: str, mode: int, ctx: pyfuse3.RequestContext,
             target: bytes | None = None) -> Inode:  # fmt: skip
        self._writable()
        self._check_name(name)
        mode, gid = mode & 0o7777, ctx.gid
        above = self.manifest.get(parent)
        if above is not None and above.mode & stat.S_ISGID:
            # A set-group-ID directory gives what is made in it its group (a team's shared
            # folder), and its subdirectories the bit, as every Unix filesystem does.
            gid = above.gid
            if kind == "dir":
                mode |= stat.S_ISGID
        # A missing or non-directory parent: ENOENT or ENOTDIR from the manifest.
        return self.manifest.create(
            parent, name, kind, mode, ctx.uid, gid, time.time_ns(), target=target
        )

    @_op
    async def mkdir(
        self, parent_inode: int, name: bytes, mode: int, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        return self._entry(self._new(parent_inode, name, "dir", mode, ctx))

    @_op
    async def symlink(
        self, parent_inode: int, name: bytes, target: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        return self._entry(self._new(parent_inode, name, "symlink", 0o777, ctx, target=target))

    @_op
    async def mknod(
        self, parent_inode: int, name: bytes, mode: int, rdev: int, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        # Device files, FIFOs and sockets have no place in a record store.
        raise _fail(errno.EPERM)

    @_op
    async def link(
        self, inode: int, new_parent_inode: int, new_name: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        raise _fail(errno.EPERM)

    @_op
    async def unlink(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        self._writable()
        node = self.manifest.lookup(parent_inode, name)
        if node is None:
            raise _fail(errno.ENOENT)
        if node.kind == "dir":
            raise _fail(errno.EISDIR)
        path = self._path(node.ino)
        self.manifest.unlink(parent_inode, name, now_ns=time.time_ns())
        self._paths.clear()
        await self._record("delete", cid=node.cid, path=path, pid=ctx.pid, uid=ctx.uid)
        self._detach(node)

    @_op
    async def rmdir(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        self._writable()
        node = self.manifest.lookup(parent_inode, name)
        if node is None:
            raise _fail(errno.ENOENT)
        if node.kind != "dir":
            raise _fail(errno.ENOTDIR)
        if self.manifest.has_children(node.ino):
            raise _fail(errno.ENOTEMPTY)
        path = self._path(node.ino)
        self.manifest.unlink(parent_inode, name, now_ns=time.time_ns())
        self._paths.clear()
        await self._record("delete", path=path, kind="dir", pid=ctx.pid, uid=ctx.uid)
        self._detach(node)

    @_op
    async def rename(
        self,
        parent_inode_old: int,
        name_old: bytes,
        parent_inode_new: int,
        name_new: bytes,
        flags: int,
        ctx: pyfuse3.RequestContext,
    ) -> None:
        self._writable()
        if flags & ~pyfuse3.RENAME_NOREPLACE:  # RENAME_EXCHANGE, RENAME_WHITEOUT: unsupported
            raise _fail(errno.EINVAL)
        self._check_name(name_new)
        moved = self.manifest.lookup(parent_inode_old, name_old)
        if moved is None:
            raise _fail(errno.ENOENT)
        if self._inode(parent_inode_new).kind != "dir":
            raise _fail(errno.ENOTDIR)
        target = self.manifest.lookup(parent_inode_new, name_new)
        if target is not None:
            if target.ino == moved.ino:
                return
            if flags & pyfuse3.RENAME_NOREPLACE:
                raise _fail(errno.EEXIST)
            if moved.kind == "dir" and target.kind != "dir":
                raise _fail(errno.ENOTDIR)
            if moved.kind != "dir" and target.kind == "dir":
                raise _fail(errno.EISDIR)
            if target.kind == "dir" and self.manifest.has_children(target.ino):
                raise _fail(errno.ENOTEMPTY)
        if moved.kind == "dir" and self._is_ancestor(moved.ino, parent_inode_new):
            raise _fail(errno.EINVAL)
        old_path = self._path(moved.ino)
        replaced = self.manifest.rename(
            parent_inode_old, name_old, parent_inode_new, name_new, now_ns=time.time_ns()
        )
        self._paths.clear()  # a directory's move renames everything below it
        await self._record(
            "rename", path=old_path, new_path=self._path(moved.ino), pid=ctx.pid, uid=ctx.uid,
            replaced=replaced is not None,
        )  # fmt: skip
        if replaced is not None:
            self._detach(replaced)

    def _is_ancestor(self, ancestor: int, ino: int) -> bool:
        current: int | None = ino
        while current is not None and current != pyfuse3.ROOT_INODE:
            if current == ancestor:
                return True
            current = self.manifest.parent_of(current)
        return False

    @_op
    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        if self._inode(inode).kind != "dir":
            raise _fail(errno.ENOTDIR)
        return inode

    @_op
    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        # Offsets are dirent ids: stable while entries come and go between calls.
        after = start_id
        while True:
            batch = self.manifest.children(fh, after=after, limit=256)
            if not batch:
                return
            for dirent_id, name, inode in batch:
                if not pyfuse3.readdir_reply(token, name, self._attrs(inode), dirent_id):
                    return
                self._lookups[inode.ino] = self._lookups.get(inode.ino, 0) + 1
                after = dirent_id

    @_op
    async def releasedir(self, fh: int) -> None:
        return None

    @_op
    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        local = os.statvfs(self.statfs_path)
        files, _dirs, _bytes = self.manifest.statistics()
        out = pyfuse3.StatvfsData()
        out.f_bsize = local.f_bsize
        out.f_frsize = local.f_frsize
        out.f_blocks = local.f_blocks
        out.f_bfree = local.f_bfree
        out.f_bavail = local.f_bavail
        out.f_files = files + local.f_ffree
        out.f_ffree = local.f_ffree
        out.f_favail = local.f_favail
        out.f_namemax = NAME_MAX
        return out

    # -- files ------------------------------------------------------------------------------------

    def _new_handle(self, ino: int, writable: bool) -> int:
        fh = next(self._next_fh)
        self._handles[fh] = Handle(ino, writable)
        self._open[ino] = self._open.get(ino, 0) + 1
        return fh

    @_op
    async def create(
        self, parent_inode: int, name: bytes, mode: int, flags: int, ctx: pyfuse3.RequestContext
    ) -> tuple[pyfuse3.FileInfo, pyfuse3.EntryAttributes]:
        node = self._new(parent_inode, name, "file", mode, ctx)
        if self.journal is not None:
            # Queued, not synced: it reaches the disk with the file's first version at the
            # latest (durable appends write the queue first), and a file is only created
            # for anyone once that version exists.
            self.journal.append_batched(
                "create", path=self._child_path(parent_inode, name, node.ino), pid=ctx.pid,
                uid=ctx.uid,
            )  # fmt: skip
        draft = self._draft(node)
        draft.dirty = True  # even an empty new file becomes a (tiny) encrypted object
        fh = self._new_handle(node.ino, writable=True)
        self._handles[fh].wrote = True
        self._last_open_cid[node.ino] = None
        return pyfuse3.FileInfo(fh=fh), self._entry(node)

    @_op
    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        reading = (flags & os.O_ACCMODE) != os.O_WRONLY
        if reading:  # a reader gets (and the audit log names) the committed version
            await self._wait_if_closing(inode)
        node = self._inode(inode)
        if node.kind != "file":
            raise _fail(errno.EISDIR if node.kind == "dir" else errno.ELOOP)
        writable = (flags & os.O_ACCMODE) != os.O_RDONLY
        if writable:
            self._writable()
        if writable and flags & os.O_TRUNC:
            # libfuse negotiates atomic O_TRUNC, so truncation arrives here, not as setattr.
            draft = self._draft(node)
            if draft.size:
                await draft.truncate(0)
                draft.mtime_ns = time.time_ns()
        # The kernel may keep cached pages only when the content is the one it cached before.
        unchanged = inode not in self._drafts and self._last_open_cid.get(inode, "") == node.cid
        self._last_open_cid[inode] = node.cid
        if reading:
            self._record_read(inode, node.cid, ctx)
        return pyfuse3.FileInfo(fh=self._new_handle(inode, writable), keep_cache=unchanged)

    # pyfuse3 replies with any contiguous buffer (PyObject_GetBuffer), though its stub says
    # bytes: a view of the buffer the segments were decrypted into saves a copy per request.
    @_op
    async def read(  # type: ignore[override]
        self, fh: int, off: int, size: int
    ) -> bytes | memoryview:
        handle = self._handles[fh]
        draft = self._drafts.get(handle.ino)
        if draft is not None:
            return await draft.read(off, size)
        version = self._read_version(handle.ino)
        ahead = handle.plan_read(off, size)
        while True:
            if version is None:
                return b""
            try:
                data = await self.reader.read(version, off, size, ahead)
                break
            except StagedCopyGone:
                # Uploaded while this read went to its staging copy: the version now
                # committed has the same bytes. Asked again only if it did change.
                current = self._read_version(handle.ino)
                if current == version:
                    raise
                version = current
            except ContentError:
                self._suspect = True
                raise
        handle.after_read(off, len(data))
        if handle.ahead >= PREFETCH_AFTER and self._nursery is not None and data:
            # Keep the next window coming while this one is read: fetch and decrypt overlap
            # with the reader instead of stalling it at every window boundary.
            at = (off + len(data)) // SEG
            window = self.reader.claim_ahead(version, at + 1, at + 2 * handle.ahead)
            if window is not None:
                self._nursery.start_soon(self.reader.fetch_ahead, window)
        return data

    @_op
    async def write(self, fh: int, off: int, buf: bytes) -> int:
        self._writable()
        handle = self._handles[fh]
        # The hot path of every copy: no manifest query once the file has a draft.
        draft = self._drafts.get(handle.ino) or self._draft(self._inode(handle.ino))
        await draft.write(off, buf)
        draft.mtime_ns = time.time_ns()
        handle.wrote = True
        return len(buf)

    async def _save(self, fh: int) -> None:
        handle = self._handles.get(fh)
        if handle is None or not handle.writable:
            return
        try:
            await self._commit(handle.ino)
        except (ContentError, MedfsError) as err:
            self.stats.failures.append(Pending(handle.ino, str(err)))
            raise

    @_op
    async def flush(self, fh: int) -> None:
        await self._save(fh)

    @_op
    async def fsync(self, fh: int, datasync: bool) -> None:
        await self._save(fh)
        handle = self._handles.get(fh)
        if handle is not None:
            await self._wait_committed({handle.ino})
        await self._durable([])

    @_op
    async def fsyncdir(self, fh: int, datasync: bool) -> None:
        # What a directory's entries are worth depends on the versions behind them: `sync DIR`
        # after a `cp -r` returns once every small file closed before it is committed.
        await self.settle()
        await self._durable([])

    @_op
    async def release(self, fh: int) -> None:
        handle = self._handles.pop(fh)
        ino = handle.ino
        self._open[ino] -= 1
        if not self._open[ino]:
            del self._open[ino]
            draft = self._drafts.get(ino)
            committing = ino in self._commit_locks and self._commit_locks[ino].locked()
            if draft is not None and not draft.dirty and not committing:
                # Clean: the manifest has everything; give back staging space and memory.
                self._discard_later(draft.take_garbage())
                draft.discard()
                del self._drafts[ino]
        self._maybe_free(ino)

    # -- extended attributes: read-only facts for `medfs ls/stat` ------------------------------

    @_op
    async def getxattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> bytes:
        if name not in (XATTR_CID, XATTR_INFO, XATTR_STATS):
            # The kernel asks for security.capability before every write: answer at once.
            raise _fail(pyfuse3.ENOATTR)
        if name != XATTR_STATS:  # `medfs stat` right after a `cp` shows the version it wrote
            await self._wait_if_closing(inode)
        node = self._inode(inode)
        if name == XATTR_CID:
            if node.cid is None:
                raise _fail(pyfuse3.ENOATTR)
            return node.cid.encode()
        if name == XATTR_INFO:
            info = {
                "cid": node.cid,
                "size": node.size,
                "kind": node.kind,
                "version_ns": node.version_ns,
                "mtime_ns": node.mtime_ns,
                "format": node.format,
                "recipients": sorted(self.manifest.wraps(inode)),
                "pending": inode in self._pending
                or (inode in self._drafts and self._drafts[inode].dirty),
            }
            return json.dumps(info).encode()
        if name == XATTR_STATS and inode == pyfuse3.ROOT_INODE:
            stats = {
                "commits": self.stats.commits,
                "deferred": self.stats.deferred,
                "pending": len(self._pending),
                "fetches": self.reader.fetches,
                "segments_fetched": self.reader.segments_fetched,
            }
            copies = self.reader.copies
            if copies is not None:  # how many of those fetches a local copy served
                stats |= {"copy_reads": self.reader.copy_reads, "copies_failed": copies.failed,
                          "copies_bytes": copies.total}  # fmt: skip
            return json.dumps(stats).encode()
        raise _fail(pyfuse3.ENOATTR)

    @_op
    async def listxattr(self, inode: int, ctx: pyfuse3.RequestContext) -> Sequence[bytes]:
        # Not listed, so cp -a and rsync -X do not copy medfs's facts onto other files.
        self._inode(inode)
        return []

    @_op
    async def setxattr(
        self, inode: int, name: bytes, value: bytes, ctx: pyfuse3.RequestContext
    ) -> None:
        raise _fail(errno.ENOTSUP)

    @_op
    async def removexattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        raise _fail(errno.ENOTSUP)
