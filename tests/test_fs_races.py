"""Interleavings a real mount cannot produce on demand, forced by calling the Filesystem's
handlers in this process: a real Kubo node and a real staging area, no FUSE in between.

What they pin down: a read that was sent to a version's staging copy just as that version was
uploaded (and its copy removed) still gets the version's bytes, and a read-ahead that meets the
same removal in the background does not take the filesystem down; and a grant or revocation
that lands while a version is being wrapped reaches that version."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import threading
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pyfuse3
import pytest
import trio
import trio.testing

from medfs import access, content, layout, recipients, state
from medfs.content import (
    ContentError,
    PendingStore,
    Reader,
    SegmentCache,
    StagedCopyGone,
    Staging,
    Version,
    pending_key,
    seal_small,
)
from medfs.errors import UsageError
from medfs.fs import XATTR_CID, XATTR_INFO, Filesystem
from medfs.identity import Identity
from medfs.ipfs import IPFS
from medfs.kubo import EmbeddedNode
from medfs.layout import SEGMENT_SIZE as SEG
from medfs.manifest import RECIPIENT_TRIES, Manifest, RecipientsChanged
from medfs.recipients import Stanza
from tests.mounting import PASSPHRASE, init_state
from tests.test_reliability import _fixed_port_node

CTX = pyfuse3.RequestContext()


def run_with_filesystem(
    tmp_path: Path, api: str, scenario: Callable[[Filesystem], Awaitable[None]]
) -> None:
    """Build the Filesystem as `medfs mount` does (without FUSE and the audit log), start it,
    run `scenario`, then shut it down."""
    root = tmp_path / "state"
    init_state(root)
    layout = state.Layout(root)
    session = state.unlock(layout, PASSPHRASE)
    ipfs = IPFS(api, timeout=5)
    fs = Filesystem(
        session.manifest,
        session.owner,
        Reader(ipfs, SegmentCache(16 << 20)),
        Staging(layout.staging, 64 << 20),
        pending=PendingStore(layout.staging, pending_key(session.manifest_key)),
        retry_interval=0.2,
    )

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            fs.start(nursery)
            await scenario(fs)
            assert await fs.shutdown() == []
            nursery.cancel_scope.cancel()

    try:
        trio.run(main)
    finally:
        session.manifest.close()
        ipfs.close()


async def closed_while_the_node_is_down(fs: Filesystem, node: EmbeddedNode, data: bytes) -> int:
    """A new file closed while the node is stopped: its version waits in the staging area,
    the upload round has failed, and opens for reading are served from the staging copy."""
    await trio.to_thread.run_sync(node.stop)
    info, attrs = await fs.create(pyfuse3.ROOT_INODE, b"note.txt", 0o600, os.O_WRONLY, CTX)
    await fs.write(info.fh, 0, data)
    await fs.flush(info.fh)
    await fs.release(info.fh)
    await fs.settle()  # returns once the round failed
    assert fs._round_error is not None and attrs.st_ino in fs._pending
    return attrs.st_ino


def test_a_read_sent_to_a_staging_copy_as_its_version_is_uploaded_gets_its_bytes(
    tmp_path: Path,
) -> None:
    node, api = _fixed_port_node(tmp_path / "node")
    data = os.urandom(200_000)  # four segments, all in one range

    async def scenario(fs: Filesystem) -> None:
        ino = await closed_while_the_node_is_down(fs, node, data)
        reading = await fs.open(ino, os.O_RDONLY, CTX)
        await trio.to_thread.run_sync(node.ensure_running)
        real_read = fs.reader.read
        sent_to: list[Version] = []

        async def upload_lands_first(v: Version, off: int, size: int, ahead: int = 0) -> bytes:
            # The version is chosen; before its staging copy is opened, the node is back,
            # the retry uploads and commits the version, and its copy goes.
            sent_to.append(v)
            if len(sent_to) == 1:
                await fs.settle()
                assert v.local is not None and not v.local.exists()
            return await real_read(v, off, size, ahead)

        fs.reader.read = upload_lands_first  # type: ignore[method-assign]
        assert await fs.read(reading.fh, 0, 1 << 20) == data
        committed = fs.manifest.get(ino)
        assert committed is not None and committed.cid is not None
        assert sent_to[0].local is not None  # the race did happen: the first try went local
        assert sent_to[1].local is None and sent_to[1].cid == committed.cid
        await fs.release(reading.fh)

    try:
        run_with_filesystem(tmp_path, api, scenario)
    finally:
        node.stop()


def test_a_version_whose_staging_file_is_lost_is_dropped_and_holds_no_fsync(
    tmp_path: Path,
) -> None:
    node, api = _fixed_port_node(tmp_path / "node")

    async def scenario(fs: Filesystem) -> None:
        ino = await closed_while_the_node_is_down(fs, node, os.urandom(3 << 20))
        fs._pending[ino].spool.unlink()  # removed by something other than the mount
        await trio.to_thread.run_sync(node.ensure_running)
        with trio.fail_after(60):
            await fs.settle()
        assert fs._round_error is None and ino not in fs._pending
        inode = fs.manifest.get(ino)
        assert inode is not None and inode.cid is None  # it keeps what it had: nothing

    try:
        run_with_filesystem(tmp_path, api, scenario)
    finally:
        node.stop()


def test_the_facts_of_a_file_just_closed_are_those_of_the_version_it_closed(
    tmp_path: Path,
) -> None:
    node, api = _fixed_port_node(tmp_path / "node")
    data = os.urandom(150_000)

    async def scenario(fs: Filesystem) -> None:
        info, attrs = await fs.create(pyfuse3.ROOT_INODE, b"r.txt", 0o600, os.O_WRONLY, CTX)
        await fs.write(info.fh, 0, data)
        await fs.flush(info.fh)
        await fs.release(info.fh)
        assert attrs.st_ino in fs._pending  # its group upload has not started yet
        facts = json.loads(await fs.getxattr(attrs.st_ino, XATTR_INFO, CTX))
        assert facts["size"] == len(data) and facts["cid"] is not None
        assert not facts["pending"]
        assert (await fs.getxattr(attrs.st_ino, XATTR_CID, CTX)).decode() == facts["cid"]

    try:
        run_with_filesystem(tmp_path, api, scenario)
    finally:
        node.stop()


def test_a_read_whose_staging_copy_is_gone_for_good_fails_with_eio(tmp_path: Path) -> None:
    node, api = _fixed_port_node(tmp_path / "node")

    async def scenario(fs: Filesystem) -> None:
        ino = await closed_while_the_node_is_down(fs, node, b"x" * 3000)
        record = fs._pending[ino]
        # Removed behind the daemon's back: the version stays the current one, and asking
        # again would find the same version. The read fails instead of looping.
        record.spool.unlink()
        reading = await fs.open(ino, os.O_RDONLY, CTX)
        with pytest.raises(pyfuse3.FUSEError) as failed:
            await fs.read(reading.fh, 0, 4096)
        assert failed.value.errno == errno.EIO
        assert fs._pending.get(ino) is record
        await fs.release(reading.fh)
        await fs.unlink(pyfuse3.ROOT_INODE, b"note.txt", CTX)
        await fs.forget([(ino, 1)])  # the kernel's reference from the create: now it is freed
        assert ino not in fs._pending  # and nothing is left that would wait for the node

    try:
        run_with_filesystem(tmp_path, api, scenario)
    finally:
        node.stop()


def test_a_read_ahead_that_finds_its_staging_copy_gone_is_dropped_quietly(
    tmp_path: Path, ipfs: IPFS
) -> None:
    sealed = seal_small(Staging(tmp_path, 1 << 30), os.urandom(300_000))
    local = Version("spool:x", sealed.key, sealed.salt, sealed.size, local=sealed.spool)
    reader = Reader(ipfs, SegmentCache(16 << 20))
    sealed.spool.unlink()  # uploaded meanwhile

    async def main() -> None:
        window = reader.claim_ahead(local, 0, 3)
        assert window is not None
        await reader.fetch_ahead(window)  # in a mount, an error here ended the nursery
        # The window is released: a read does not wait for it, it meets the error itself.
        with trio.fail_after(10), pytest.raises(StagedCopyGone):
            await reader.read(local, 0, 100)

    trio.run(main)
    assert reader.cache.get("spool:x", 0) is None


def test_a_read_waits_for_segments_another_read_is_fetching(
    tmp_path: Path, ipfs: IPFS, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The kernel sends a sequential reader's read-ahead as several requests at once: a read
    # whose segments are on their way in another read's fetch must not fetch them again.
    gate = threading.Event()
    read_staged = content._read_staged

    def slow_read_staged(path: Path, offset: int, length: int) -> bytes:
        gate.wait(10)  # the first fetch is still running when the second read comes
        return read_staged(path, offset, length)

    monkeypatch.setattr(content, "_read_staged", slow_read_staged)
    plaintext = os.urandom(16 * SEG)
    sealed = seal_small(Staging(tmp_path, 1 << 30), plaintext)
    local = Version("spool:x", sealed.key, sealed.salt, sealed.size, local=sealed.spool)
    reader = Reader(ipfs, SegmentCache(16 << 20))
    got: dict[str, bytes] = {}

    async def read(name: str, offset: int, ahead: int) -> None:
        got[name] = await reader.read(local, offset, SEG, ahead)

    async def main() -> None:
        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(read, "first", 0, 15)  # with read-ahead: all 16 segments
                await trio.testing.wait_all_tasks_blocked()  # it has claimed them
                nursery.start_soon(read, "ninth", 8 * SEG, 0)
                await trio.testing.wait_all_tasks_blocked()
                gate.set()

    trio.run(main)
    assert got == {"first": plaintext[:SEG], "ninth": plaintext[8 * SEG : 9 * SEG]}
    assert (reader.fetches, reader.segments_fetched) == (1, 16)


def test_a_segment_read_ahead_is_authenticated_when_it_is_read(tmp_path: Path, ipfs: IPFS) -> None:
    # Read-ahead leaves ciphertext in the cache, opened by the read that uses it: a damaged
    # segment fails that read alone, is not kept, and never reaches the reader as plaintext.
    plaintext = os.urandom(8 * SEG)
    sealed = seal_small(Staging(tmp_path, 1 << 30), plaintext)
    with open(sealed.spool, "r+b") as fh:
        at = layout.segment_offset(5) + 700
        fh.seek(at)
        byte = fh.read(1)
        fh.seek(at)
        fh.write(bytes([byte[0] ^ 0x10]))
    local = Version("spool:x", sealed.key, sealed.salt, sealed.size, local=sealed.spool)
    reader = Reader(ipfs, SegmentCache(16 << 20))

    async def main() -> None:
        window = reader.claim_ahead(local, 0, 7)
        assert window is not None
        await reader.fetch_ahead(window)
        assert all(reader.cache.get("spool:x", i) is not None for i in range(8))
        assert (
            bytes(await reader.read(local, 3 * SEG + 10, SEG))
            == plaintext[3 * SEG + 10 : 4 * SEG + 10]
        )
        with pytest.raises(ContentError, match=r"segment 5 .* fails authentication"):
            await reader.read(local, 5 * SEG, 4096)
        assert reader.cache.get("spool:x", 5) is None  # not served again
        assert bytes(await reader.read(local, 6 * SEG, 2 * SEG)) == plaintext[6 * SEG :]

    trio.run(main)
    assert reader.fetches == 1  # all of it came from the one read-ahead


def on_a_node(tmp_path: Path, scenario: Callable[[Filesystem], Awaitable[None]]) -> None:
    """`scenario` on a Filesystem with its own node, as `run_with_filesystem`."""
    node, api = _fixed_port_node(tmp_path / "node")
    try:
        run_with_filesystem(tmp_path, api, scenario)
    finally:
        node.stop()


@contextlib.contextmanager
def written_then_unlocked(
    tmp_path: Path, scenario: Callable[[Filesystem], Awaitable[None]]
) -> Iterator[tuple[state.Session, IPFS]]:
    """`scenario` on a Filesystem, which then shuts down; the state unlocked as a command
    does, and the node, for what comes after."""
    node, api = _fixed_port_node(tmp_path / "node")
    try:
        run_with_filesystem(tmp_path, api, scenario)
        session = state.unlock(state.Layout(tmp_path / "state"), PASSPHRASE)
        ipfs = IPFS(api, timeout=5)
        try:
            yield session, ipfs
        finally:
            session.manifest.close()
            ipfs.close()
    finally:
        node.stop()


async def saved(fs: Filesystem, parent: int, name: bytes, data: bytes) -> int:
    """A new file written, fsynced (its version committed) and closed; its inode."""
    info, attrs = await fs.create(parent, name, 0o600, os.O_WRONLY, CTX)
    await fs.write(info.fh, 0, data)
    await fs.fsync(info.fh, False)
    await fs.release(info.fh)
    return attrs.st_ino


@pytest.mark.parametrize(
    ("size", "grant"),
    [
        pytest.param(1000, True, id="small-file-granted"),
        pytest.param(1000, False, id="small-file-revoked"),
        pytest.param(SEG * 20, True, id="big-file-granted"),
    ],
)
def test_a_grant_or_revocation_during_the_wraps_reaches_the_version(
    tmp_path: Path, size: int, grant: bool
) -> None:
    """`medfs share` adds its grant, then wraps only the versions committed before it: a
    version whose wraps were made before the grant landed must be wrapped again at commit,
    or the new recipient could never open it (and a revoked one could open it)."""
    friend = Identity.generate()
    data = os.urandom(size)

    async def scenario(fs: Filesystem) -> None:
        shared = await fs.mkdir(pyfuse3.ROOT_INODE, b"shared", 0o700, CTX)
        if not grant:
            fs.manifest.add_grant(
                shared.st_ino, friend.fingerprint, friend.public.to_text().encode(), now_ns=1
            )
        real_wrap = Filesystem._wrap_all
        landed = threading.Event()

        def share_lands_meanwhile(*args: Any) -> dict[str, bytes]:
            wrapped = real_wrap(*args)  # for the recipients read before this call
            if not landed.is_set():
                landed.set()
                other = Manifest.open(fs.manifest.path)  # as the share agent: its own connection
                try:
                    if grant:
                        other.add_grant(shared.st_ino, friend.fingerprint,
                                        friend.public.to_text().encode(), now_ns=2)  # fmt: skip
                    else:
                        other.remove_grant(shared.st_ino, friend.fingerprint)
                finally:
                    other.close()
            return wrapped

        Filesystem._wrap_all = staticmethod(share_lands_meanwhile)  # type: ignore[method-assign]
        try:
            ino = await saved(fs, shared.st_ino, b"scan.dcm", data)
        finally:
            Filesystem._wrap_all = staticmethod(real_wrap)  # type: ignore[method-assign]
        assert landed.is_set()  # the grant did land between the wraps and the commit
        inode = fs.manifest.get(ino)
        assert inode is not None and inode.cid is not None and inode.salt is not None
        wraps = fs.manifest.wraps(ino)
        assert set(wraps) == {fs.owner.fingerprint} | ({friend.fingerprint} if grant else set())
        if grant:  # and the friend's stanza opens this version
            context = recipients.entry_context(inode.entry_id, inode.salt)
            key = friend.unwrap(Stanza.from_bytes(wraps[friend.fingerprint]), context)
            assert key == fs._versions[ino].key

    on_a_node(tmp_path, scenario)


def test_a_share_landing_during_a_revoke_is_wrapped_into_the_new_version(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A revoke re-encrypts, then reads the grantees and wraps: a grant for someone else that
    lands just before its commit must be in the new version's wraps."""
    bob, carol = Identity.generate(), Identity.generate()

    async def write(fs: Filesystem) -> None:
        await saved(fs, pyfuse3.ROOT_INODE, b"scan.dcm", os.urandom(5000))

    with written_then_unlocked(tmp_path, write) as (session, ipfs):
        access.grant(session, ["/scan.dcm"], bob.public, workers=1)
        scan = session.manifest.resolve(b"/scan.dcm")
        assert scan is not None
        ino = scan.ino
        real_wrap = recipients.wrap
        landed = []

        def carol_is_granted_meanwhile(*args: Any) -> Stanza:
            if not landed:
                landed.append(True)
                other = Manifest.open(session.manifest.path)
                try:
                    other.add_grant(ino, carol.fingerprint, carol.public.to_text().encode(),
                                    now_ns=1)  # fmt: skip
                finally:
                    other.close()
            return real_wrap(*args)

        monkeypatch.setattr(recipients, "wrap", carol_is_granted_meanwhile)
        done, _others = access.revoke(session, ["/scan.dcm"], bob.fingerprint, ipfs)
        assert landed and len(done) == 1
        wraps = session.manifest.wraps(ino)
        assert set(wraps) == {session.owner.fingerprint, carol.fingerprint}


def test_a_damaged_grant_fails_the_close_after_a_few_tries_instead_of_looping(
    tmp_path: Path,
) -> None:
    """A grant whose fingerprint is not its public file's can never be matched by wraps made
    from that file: the commit gives up after RECIPIENT_TRIES refusals, and the close says so."""
    friend, stranger = Identity.generate(), Identity.generate()

    async def scenario(fs: Filesystem) -> None:
        shared = await fs.mkdir(pyfuse3.ROOT_INODE, b"shared", 0o700, CTX)
        fs.manifest.add_grant(
            shared.st_ino, stranger.fingerprint, friend.public.to_text().encode(), now_ns=1
        )
        real_commit = fs.manifest.commit_version
        refused = 0

        def counted(*args: Any, **kwargs: Any) -> str | None:
            nonlocal refused
            try:
                return real_commit(*args, **kwargs)
            except RecipientsChanged:
                refused += 1
                raise

        fs.manifest.commit_version = counted  # type: ignore[method-assign]
        info, _ = await fs.create(shared.st_ino, b"scan.dcm", 0o600, os.O_WRONLY, CTX)
        await fs.write(info.fh, 0, os.urandom(SEG * 20))  # big: committed at its close
        with pytest.raises(pyfuse3.FUSEError) as failed:
            await fs.flush(info.fh)
        assert failed.value.errno == errno.EIO
        assert refused == RECIPIENT_TRIES
        fs.manifest.remove_grant(shared.st_ino, stranger.fingerprint)
        await fs.write(info.fh, 0, b"again")
        await fs.flush(info.fh)  # with the damage gone, the next save commits
        await fs.release(info.fh)

    on_a_node(tmp_path, scenario)


def test_a_revoke_reencrypts_a_file_moved_out_of_the_shared_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A file moved out of a shared directory keeps the grantee's wrap of its version: revoking
    the directory re-encrypts it too, or the revoked key would still open it; a revoke cut off
    before it got there finishes it when run again."""
    bob = Identity.generate()

    async def write(fs: Filesystem) -> None:
        shared = await fs.mkdir(pyfuse3.ROOT_INODE, b"shared", 0o700, CTX)
        for name in (b"kept.dcm", b"moved.dcm"):
            await saved(fs, shared.st_ino, name, os.urandom(5000))

    with written_then_unlocked(tmp_path, write) as (session, ipfs):
        manifest = session.manifest
        assert access.grant(session, ["/shared"], bob.public, workers=1) == 2
        shared, root = manifest.resolve(b"/shared"), manifest.resolve(b"/")
        assert shared is not None and root is not None
        manifest.rename(shared.ino, b"moved.dcm", root.ino, b"moved.dcm", now_ns=1)
        moved = manifest.resolve(b"/moved.dcm")
        assert moved is not None and bob.fingerprint in manifest.wraps(moved.ino)
        with pytest.raises(UsageError, match="owner's own"):
            access.revoke(session, ["/shared"], session.owner.fingerprint, ipfs)
        real_reencrypt = access._reencrypt
        done_before: list[str] = []

        def cut_off_after_one(session: state.Session, inode: Any, *args: Any) -> Any:
            if done_before:
                raise KeyboardInterrupt  # the user gave up half-way
            done_before.append(manifest.path_of(inode.ino))
            return real_reencrypt(session, inode, *args)

        monkeypatch.setattr(access, "_reencrypt", cut_off_after_one)
        with pytest.raises(KeyboardInterrupt):
            access.revoke(session, ["/shared"], bob.fingerprint, ipfs)
        assert done_before == [b"/shared/kept.dcm"]
        monkeypatch.setattr(access, "_reencrypt", real_reencrypt)
        done, _others = access.revoke(session, ["/shared"], bob.fingerprint, ipfs)
        assert [r.path for r in done] == ["/moved.dcm"]  # the grant was gone already
        for path in (b"/shared/kept.dcm", b"/moved.dcm"):
            inode = manifest.resolve(path)
            assert inode is not None
            assert set(manifest.wraps(inode.ino)) == {session.owner.fingerprint}
        again = manifest.resolve(b"/moved.dcm")
        assert again is not None and again.cid != moved.cid  # a new key, a new object
