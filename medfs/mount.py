"""The mount lifecycle: start the daemon, serve FUSE, unmount, and report what was not saved.

`medfs mount` (without --foreground) checks everything it can in the foreground, then starts
the daemon as a detached child that reads the passphrase from a pipe and reports on a second
pipe whether the mount came up, so the command returns only once the mount is ready or has
failed. `medfs umount` asks the kernel to unmount (fusermount3 -u), which makes the daemon
commit what is left and exit, then reads the daemon's report.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import select
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import pyfuse3
import trio

from medfs import access, audit, backup, control, state
from medfs.audit import AuditLog
from medfs.content import PendingStore, Reader, SegmentCache, Staging, pending_key
from medfs.copies import LocalCopies
from medfs.errors import MedfsError, PassphraseError, UsageError
from medfs.fs import Filesystem, Pending
from medfs.identity import Identity, PublicIdentity
from medfs.ipfs import IPFS
from medfs.kubo import EmbeddedNode, pid_alive

log = logging.getLogger(__name__)

CACHE_BYTES = 64 << 20
STAGING_LIMIT = 8 << 30
# Empty staging files kept ready for small closes (content.Staging.fresh_object).
STAGING_AHEAD = 256
COPIES_LIMIT = 4 << 30
READY_TIMEOUT = 120.0
DEFAULT_READ_TIMEOUT = 10.0


class MountError(MedfsError):
    exit_code = 9


@dataclass(frozen=True)
class MountOptions:
    mountpoint: Path
    api: str
    read_only: bool = False
    allow_other: bool = False
    # A read of data the node cannot deliver fails with EIO after this many seconds.
    timeout: float = DEFAULT_READ_TIMEOUT
    # The state directory of the embedded node in use, if any: the daemon restarts that node
    # when it stops answering (its API port changes, which the daemon then follows).
    node_state: Path | None = None


def check_mountpoint(path: Path) -> Path:
    path = path.absolute()
    if not path.is_dir():
        raise UsageError(f"mount point {path} is not a directory")
    if os.path.ismount(path):
        raise MountError(f"{path} is already a mount point", hint=f"medfs umount {path}")
    if any(path.iterdir()):
        raise UsageError(
            f"mount point {path} is not empty: mounting would hide its files",
            hint="use an empty directory",
        )
    return path


def staging_limit() -> int:
    """The staging area's size limit: $MEDFS_STAGING_LIMIT bytes, else STAGING_LIMIT."""
    return _bytes_setting(
        "MEDFS_STAGING_LIMIT", STAGING_LIMIT, least=1, what="a positive number of bytes"
    )


def copies_limit() -> int:
    """How many bytes of local copies to keep: $MEDFS_COPIES_LIMIT (0: none), else
    COPIES_LIMIT."""
    return _bytes_setting(
        "MEDFS_COPIES_LIMIT", COPIES_LIMIT, least=0,
        what="a number of bytes (0 keeps no local copies)",
    )  # fmt: skip


def _bytes_setting(name: str, default: int, *, least: int, what: str) -> int:
    raw = os.environ.get(name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        value = least - 1
    if value < least:
        raise UsageError(f"{name} must be {what}, not {raw!r}")
    return value


def fsname(layout: state.Layout) -> str:
    # The source column of /proc/mounts: lets `medfs umount MNT` find the state directory.
    return "medfs:" + str(layout.root).replace(",", "_")


def report_path(layout: state.Layout) -> Path:
    return layout.root / "umount-report.json"


def serve(
    layout: state.Layout,
    options: MountOptions,
    passphrase: str,
    ready: Callable[[], None],
) -> list[Pending]:
    """Mount and serve until unmounted; return what could not be committed."""
    lock = state.MountLock(layout)
    lock.acquire(options.mountpoint, api=options.api if options.node_state is None else None)
    with contextlib.ExitStack() as stack:
        stack.callback(lock.release)
        session = state.unlock(layout, passphrase)
        owner, manifest = session.owner, session.manifest
        stack.callback(manifest.close)
        ipfs = IPFS(options.api, timeout=options.timeout)
        stack.callback(ipfs.close)
        ipfs.version()  # fail now, with the node's address in the message, not at first read
        journal = AuditLog(
            audit.log_path(layout.root), owner, audit.audit_key(session.manifest_key)
        )
        stack.callback(journal.close)
        staging = Staging(layout.staging, staging_limit(), ahead=STAGING_AHEAD)
        stack.callback(staging.close)
        copies = LocalCopies(layout.copies, copies_limit())
        copies.retain(manifest.cids())  # versions replaced while no mount ran
        fs = Filesystem(
            manifest,
            owner,
            Reader(ipfs, SegmentCache(CACHE_BYTES), copies),
            staging,
            read_only=options.read_only,
            statfs_path=str(layout.root),
            journal=journal,
            pending=PendingStore(layout.staging, pending_key(session.manifest_key)),
            renew_api=_renewer(options.node_state),
        )
        fuse_options = set(pyfuse3.default_options)
        fuse_options |= {f"fsname={fsname(layout)}", "subtype=medfs"}
        if options.read_only:
            fuse_options.add("ro")
        if options.allow_other:
            fuse_options.add("allow_other")
        with contextlib.suppress(FileNotFoundError):
            report_path(layout).unlink()
        # -- manifest backups (issue #7): a bad $MEDFS_BACKUP_MINUTES fails before mounting --
        interval = None if options.read_only else backup.interval_seconds()
        periodic = _periodic_backups(session, layout, ipfs, interval)
        agent = None
        if not options.read_only:
            sharer = functools.partial(_share, layout, owner, ipfs, journal)
            try:
                listener = _listen(layout, stack)
            except OSError as err:
                log.warning("no control socket (%s): medfs share will unlock the key itself", err)
            else:
                verifier = control.Passphrase(passphrase)
                agent = _Agent(listener, verifier, sharer, journal)
        pyfuse3.init(fs, str(options.mountpoint), fuse_options)
        log.info("mounted %s (api %s)", options.mountpoint, options.api)
        journal.append("mount", mountpoint=str(options.mountpoint), read_only=options.read_only)
        try:
            ready()
            pending = trio.run(_main, fs, periodic, agent)
        except BaseException:
            pyfuse3.close(unmount=False)
            raise
        pyfuse3.close()
        log.info("unmounted %s: %d versions committed", options.mountpoint, fs.stats.commits)
        journal.append(
            "unmount", mountpoint=str(options.mountpoint), pending=[p.ino for p in pending]
        )
        if not options.read_only:
            _back_up(session, layout, ipfs)  # manifest backups (issue #7)
        try:
            # Anchoring the head on IPFS makes cutting entries off the log's end detectable.
            anchor = journal.anchor(ipfs)
            log.info("audit log anchored at %s (%d entries)", anchor.cid, anchor.count)
        except MedfsError as err:
            log.warning("could not anchor the audit log: %s", err.message)
        report = {"pending": [{"inode": p.ino, "error": p.error} for p in pending]}
        report_path(layout).write_text(json.dumps(report))
        return pending


def _renewer(node_state: Path | None) -> Callable[[], str] | None:
    if node_state is None:
        return None
    return EmbeddedNode(node_state).ensure_running


# -- manifest backups (issue #7; see medfs/backup.py) ------------------------------------------


def _back_up(session: state.Session, layout: state.Layout, ipfs: IPFS) -> None:
    """The umount snapshot. A failure is logged and never fails the umount: the records are
    committed already, and the next umount (or 'medfs backup') tries again."""
    try:
        taken = backup.upload(session, layout, ipfs, force=False)
    except MedfsError as err:
        log.warning("could not back up the manifest: %s", err.message)
        return
    except Exception:
        log.exception("could not back up the manifest")
        return
    if taken is None:
        log.info("manifest unchanged since its last snapshot")
    else:
        log.info("manifest snapshot %s (%d entries)", taken.cid, taken.entries)


def _periodic_backups(
    session: state.Session,
    layout: state.Layout,
    ipfs: IPFS,
    interval: float | None,
) -> Callable[[], Awaitable[None]] | None:
    """A trio task that snapshots the manifest every `interval` seconds while mounted."""
    if interval is None:
        return None

    async def run() -> None:
        while True:
            await trio.sleep(interval)
            # The copy is taken here, on the trio thread, because the manifest's SQLite
            # connection belongs to it (and a local copy is quick); only sealing and the upload
            # go to a worker thread, so FUSE requests are never stalled by them.
            copy = backup.copy_manifest(session.manifest)
            publish = functools.partial(
                backup.publish, copy, session.owner, layout, ipfs, force=False
            )
            try:
                taken = await trio.to_thread.run_sync(publish)
            except MedfsError as err:
                log.warning("could not back up the manifest: %s", err.message)
                continue
            except Exception:
                # A failed backup must never bring the mount down with it.
                log.exception("could not back up the manifest")
                continue
            if taken is not None:
                log.info("manifest snapshot %s (%d entries)", taken.cid, taken.entries)

    return run


# -- end of manifest backups ---------------------------------------------------------------------


# -- shares done for `medfs share` (medfs/control.py) --------------------------------------------

# A request must have arrived whole within this long (the share itself may take longer).
REQUEST_TIMEOUT = 10.0


def _listen(layout: state.Layout, stack: contextlib.ExitStack) -> socket.socket:
    """The state directory's control socket, listening, owner-only; removed at exit."""
    path = layout.root / control.SOCKET_NAME
    with contextlib.suppress(FileNotFoundError):
        path.unlink()  # left by a daemon that died: this one holds the mount lock now
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stack.callback(sock.close)
    with control.socket_address(layout.root) as address:
        sock.bind(address)
    stack.callback(path.unlink, missing_ok=True)
    path.chmod(0o600)
    sock.listen(8)
    return sock


def _share(
    layout: state.Layout,
    owner: Identity,
    ipfs: IPFS,
    journal: AuditLog,
    request: control.ShareRequest,
) -> control.Shared:
    """The share a command asked for, in a worker thread on a manifest connection of its own
    (SQLite connections belong to their thread); never forked (medfs.forked), since a fork of
    this threaded daemon could inherit a lock held by another thread."""
    to = PublicIdentity.from_text(request.to)
    session = state.open_session(layout, owner)
    try:
        providers = access.providers_of(ipfs)
        return access.share(session, request.paths, to, providers, journal, workers=1)
    finally:
        session.manifest.close()


@dataclass
class _Agent:
    listener: socket.socket
    passphrase: control.Passphrase
    share: Callable[[control.ShareRequest], control.Shared]
    journal: AuditLog

    async def serve(self, fs: Filesystem) -> None:
        listener = trio.socket.from_stdlib_socket(self.listener)
        guesses = trio.Lock()  # one passphrase check at a time, each wrong one slowed down
        async with trio.open_nursery() as nursery:
            while True:
                try:
                    conn, _ = await listener.accept()
                except OSError as err:  # out of descriptors, say: never a reason to unmount
                    log.warning("the control socket cannot accept: %s", err)
                    await trio.sleep(1)
                    continue
                nursery.start_soon(self._answer, conn, fs, guesses)

    async def _answer(
        self, conn: trio.socket.SocketType, fs: Filesystem, guesses: trio.Lock
    ) -> None:
        with conn:
            try:
                reply = await self._reply(conn, fs, guesses)
            except trio.TooSlowError:
                return  # a request that never came whole: nothing to answer
            with contextlib.suppress(OSError):
                data = memoryview(control.frame(reply))
                while data:
                    data = data[await conn.send(data) :]

    async def _reply(
        self, conn: trio.socket.SocketType, fs: Filesystem, guesses: trio.Lock
    ) -> dict[str, object]:
        try:
            with trio.fail_after(REQUEST_TIMEOUT):
                request = await _read_request(conn)
        except MedfsError as err:
            return control.refusal(err)
        except (OSError, EOFError) as err:
            log.warning("a control connection failed: %s", err)
            return control.refusal(MountError(f"the request could not be read: {err}"))
        try:
            async with guesses:
                if not self.passphrase.matches(request.passphrase):
                    refused = functools.partial(
                        self.journal.append, "share-refused", paths=request.paths,
                        reason="wrong passphrase",
                    )  # fmt: skip
                    await trio.to_thread.run_sync(refused)
                    await trio.sleep(control.FAILED_DELAY)
                    raise PassphraseError(
                        "wrong passphrase",
                        hint="the passphrase comes from --passphrase-file, $MEDFS_PASSPHRASE, "
                        "or the prompt",
                    )
            await fs.settle()  # what was closed before the command ran is in the share
            result = await trio.to_thread.run_sync(self.share, request)
        except MedfsError as err:
            return control.refusal(err)
        except Exception:
            log.exception("a share asked for by a command failed")
            return control.refusal(MountError("the mount could not do the share: see mount.log"))
        # No paths: mount.log is plaintext on disk, and file names never are.
        log.info("a share for a command: %d files wrapped", result.wrapped)
        return control.answer(result)


async def _read_request(conn: trio.socket.SocketType) -> control.ShareRequest:
    if control.peer_uid(conn) != os.getuid():
        raise control.BadRequest("only the mount's owner may ask it to share")
    prefix = await _recv_exact(conn, control.FRAME.size)
    body = await _recv_exact(conn, control.frame_length(prefix, control.MAX_REQUEST))
    return control.share_request(control.parse(body))


async def _recv_exact(conn: trio.socket.SocketType, n: int) -> bytes:
    data = bytearray()
    while len(data) < n:
        got = await conn.recv(n - len(data))
        if not got:
            raise EOFError("the connection closed early")
        data += got
    return bytes(data)


# -- serving -------------------------------------------------------------------------------------


async def _main(
    fs: Filesystem,
    periodic: Callable[[], Awaitable[None]] | None = None,
    agent: _Agent | None = None,
) -> list[Pending]:
    async with trio.open_nursery() as nursery:
        fs.start(nursery)
        nursery.start_soon(_terminate_on_signals)
        if periodic is not None:
            nursery.start_soon(periodic)
        if agent is not None:
            nursery.start_soon(agent.serve, fs)
        await pyfuse3.main()
        pending = await fs.shutdown()
        nursery.cancel_scope.cancel()
    return pending


async def _terminate_on_signals() -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async for signum in signals:
            log.info("signal %d: unmounting", signum)
            pyfuse3.terminate()
            return


# -- the background daemon ---------------------------------------------------------------------


def spawn_daemon(layout: state.Layout, options: MountOptions, passphrase: str) -> None:
    """Start the daemon detached; return once it reports the mount ready, or raise its error."""
    layout.root.mkdir(parents=True, exist_ok=True, mode=0o700)
    ready_r, ready_w = os.pipe()
    argv = [
        sys.executable, "-m", "medfs", "mount", str(options.mountpoint), "--foreground",
        "--state", str(layout.root), "--api", options.api, "--daemon-ready-fd", str(ready_w),
    ]  # fmt: skip
    argv += ["--timeout", str(options.timeout)]
    if options.node_state is not None:
        argv += ["--node-state", str(options.node_state)]
    if options.read_only:
        argv += ["-o", "ro"]
    if options.allow_other:
        argv += ["-o", "allow_other"]
    env = dict(os.environ)
    env.pop("MEDFS_PASSPHRASE", None)  # it travels through the pipe, not the environment
    with open(layout.log, "ab") as log_file:
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.PIPE,
            stdout=log_file,
            stderr=log_file,
            pass_fds=(ready_w,),
            start_new_session=True,
            env=env,
        )
    os.close(ready_w)
    assert proc.stdin is not None
    proc.stdin.write(passphrase.encode() + b"\n")
    proc.stdin.close()
    with os.fdopen(ready_r, "rb") as ready:
        message = _read_ready(ready, proc)
    if message.get("ok"):
        proc.returncode = 0  # detached on purpose: it outlives this command
        return
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=10)
    error = MountError(
        str(message.get("error") or f"the mount daemon failed; see {layout.log}"),
        hint=str(message["hint"]) if message.get("hint") else None,
    )
    code = message.get("code")
    if isinstance(code, int) and code > 0:
        error.exit_code = code  # the daemon's own reason, e.g. a wrong passphrase
    raise error


def _read_ready(ready: BinaryIO, proc: subprocess.Popen[bytes]) -> dict[str, object]:
    """The daemon's one message: {"ok": 1}, or {"error": ..., "hint": ..., "code": ...}."""
    deadline = time.monotonic() + READY_TIMEOUT
    data = b""
    while (left := deadline - time.monotonic()) > 0:
        if not select.select([ready], [], [], left)[0]:
            break
        chunk = os.read(ready.fileno(), 4096)
        if not chunk:
            break
        data += chunk
    try:
        message = json.loads(data)
    except ValueError:
        message = None
    if isinstance(message, dict):
        return message
    proc.poll()
    return {"error": f"the mount daemon exited (status {proc.returncode}) before mounting"}


# -- unmounting ------------------------------------------------------------------------------------


def _mount_source(mountpoint: Path) -> str | None:
    try:
        lines = Path("/proc/self/mountinfo").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        fields = line.split()
        sep = fields.index("-")
        where = fields[4].encode().decode("unicode_escape")
        if where == str(mountpoint):
            return fields[sep + 2]
    return None


def state_of_mount(mountpoint: Path) -> state.Layout | None:
    source = _mount_source(mountpoint)
    if source and source.startswith("medfs:"):
        return state.Layout(Path(source[len("medfs:") :]))
    return None


def unmount(mountpoint: Path, layout: state.Layout | None, timeout: float = 3600) -> list[str]:
    """Unmount and wait for the daemon; return descriptions of what it could not commit."""
    mountpoint = mountpoint.absolute()
    found = state_of_mount(mountpoint)
    if found is None:
        if _mount_source(mountpoint) is None:
            raise UsageError(f"{mountpoint} is not mounted")
        raise UsageError(f"{mountpoint} is not a medfs mount")
    layout = found
    holder = state.holder(layout)
    pid = int(str(holder["pid"])) if holder and "pid" in holder else None
    if pid is None or not pid_alive(pid):
        # The daemon died: the kernel still holds a dead mount ("transport endpoint is not
        # connected"). Detach it lazily; nothing unsaved survived the daemon anyway.
        _fusermount(mountpoint, lazy=True)
        raise MountError(
            f"the medfs daemon for {mountpoint} had died; the dead mount was removed",
            hint="files not closed before the daemon died were not saved; mount again",
        )
    _fusermount(mountpoint, lazy=False)
    deadline = time.monotonic() + timeout
    while pid_alive(pid):
        if time.monotonic() > deadline:
            raise MountError(f"the medfs daemon (pid {pid}) did not exit after unmounting")
        time.sleep(0.05)
    try:
        report = json.loads(report_path(layout).read_text())
    except (OSError, ValueError):
        raise MountError(
            f"the medfs daemon exited without a report; see {layout.log}",
        ) from None
    return [f"inode {p['inode']}: {p['error']}" for p in report.get("pending", [])]


def _fusermount(mountpoint: Path, *, lazy: bool) -> None:
    argv = ["fusermount3", "-u", *(["-z"] if lazy else []), str(mountpoint)]
    out = subprocess.run(argv, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        reason = out.stderr.strip().removeprefix("fusermount3: ")
        if "busy" in reason.lower():
            raise MountError(
                f"{mountpoint} is busy: files or directories in it are in use",
                hint="close them (see 'fuser -vm MOUNTPOINT') and try again",
            )
        raise MountError(f"cannot unmount {mountpoint}: {reason}")
