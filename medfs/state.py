"""The state directory: which identity owns it, its manifest, and the one-mount-at-a-time lock.

    <state>/config.json    which key file is the owner's (and its public identity)
    <state>/owner.key/.pub the owner identity, when `medfs init` created it
    <state>/manifest.db    the sidecar manifest (names encrypted under the manifest key)
    <state>/ipfs/          the embedded Kubo node's repository
    <state>/staging/       encrypted scratch space of the running mount
    <state>/mount.lock     held by the running mount daemon; says its pid and mount point
    <state>/mount.log      the background daemon's log

The manifest key is random, wrapped for the owner's identity and kept in the manifest itself, so
opening the manifest's names needs the owner's passphrase.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from medfs import identity, recipients
from medfs.errors import KeyFileError, UsageError
from medfs.identity import Identity, PublicIdentity
from medfs.manifest import Manifest, NameCipher

CONFIG_VERSION = 1
MANIFEST_KEY_ENTRY = b"medfs manifest key"


@dataclass(frozen=True)
class Layout:
    root: Path

    @property
    def config(self) -> Path:
        return self.root / "config.json"

    @property
    def manifest(self) -> Path:
        return self.root / "manifest.db"

    @property
    def staging(self) -> Path:
        return self.root / "staging"

    @property
    def copies(self) -> Path:
        return self.root / "copies"

    @property
    def lock(self) -> Path:
        return self.root / "mount.lock"

    @property
    def log(self) -> Path:
        return self.root / "mount.log"


def _not_initialised(root: Path) -> UsageError:
    return UsageError(
        f"{root} is not an initialised medfs state directory",
        hint="run 'medfs init' first (or pass --state / set MEDFS_STATE)",
    )


def read_config(layout: Layout) -> dict[str, object]:
    try:
        config = json.loads(layout.config.read_text())
    except FileNotFoundError:
        raise _not_initialised(layout.root) from None
    except (OSError, ValueError) as err:
        raise UsageError(f"cannot read {layout.config}: {err}") from None
    if not isinstance(config, dict) or config.get("version") != CONFIG_VERSION:
        raise UsageError(f"{layout.config} is not a medfs {CONFIG_VERSION} configuration")
    return config


def key_path(layout: Layout) -> Path:
    return Path(str(read_config(layout)["key"]))


def owner_public(layout: Layout) -> PublicIdentity:
    return PublicIdentity.from_text(str(read_config(layout)["public"]))


def manifest_context(manifest_id: bytes) -> bytes:
    return recipients.entry_context(MANIFEST_KEY_ENTRY, manifest_id)


def init(layout: Layout, passphrase: str, *, key: Path | None = None) -> Identity:
    """Create the state directory bound to `key` (or a new identity created in it)."""
    if layout.config.exists():
        raise UsageError(
            f"{layout.root} is already initialised",
            hint="use another --state directory to start afresh",
        )
    layout.root.mkdir(parents=True, exist_ok=True, mode=0o700)
    if key is None:
        owner = Identity.generate()
        key, _ = identity.write_identity_files(layout.root / "owner", owner, passphrase)
    else:
        owner = identity.read_key_file(key, passphrase)
    key = key.absolute()
    manifest_key = os.urandom(32)
    manifest_id = os.urandom(16)
    stanza = recipients.wrap(manifest_key, owner.public.recipient(), manifest_context(manifest_id))
    manifest = Manifest.initialize(
        layout.manifest,
        owner=owner.fingerprint,
        wrapped_key=stanza.to_bytes(),
        names=NameCipher(manifest_key),
        uid=os.getuid(),
        gid=os.getgid(),
        now_ns=time.time_ns(),
        root_mode=0o755,
    )
    manifest.set_meta("manifest_id", manifest_id)
    manifest.close()
    config = {"version": CONFIG_VERSION, "key": str(key), "public": owner.public.to_text()}
    tmp = layout.config.with_suffix(".tmp")
    tmp.write_text(json.dumps(config, indent=2) + "\n")
    tmp.replace(layout.config)  # the config appears last: a half-made state is not "initialised"
    return owner


@dataclass
class Session:
    """An unlocked state directory. `manifest_key` also keys the audit log: memory only."""

    owner: Identity
    manifest: Manifest
    manifest_key: bytes


# How long a command waits for a running mount to commit the small files it holds.
SETTLE_TIMEOUT = 60.0


def settle(layout: Layout, timeout: float = SETTLE_TIMEOUT) -> None:
    """If this state is mounted (by another process), wait until the daemon has committed
    every file closed so far: it commits small files in groups shortly after their close,
    and a command reading the manifest must see them (a share must wrap the newest version).
    An fsync of the mount's root asks exactly that of the daemon."""
    info = holder(layout)
    if not info or info.get("pid") == os.getpid() or not info.get("mountpoint"):
        return

    def sync() -> None:
        with contextlib.suppress(OSError):  # not mounted (yet, or any more): nothing to wait for
            fd = os.open(str(info["mountpoint"]), os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)

    # A daemon that hangs must not hang every command with it.
    worker = threading.Thread(target=sync, name="medfs-settle", daemon=True)
    worker.start()
    worker.join(timeout)
    if worker.is_alive():
        print(
            f"medfs: warning: the mount at {info['mountpoint']} did not commit its newest files"
            f" within {timeout:g} s; they are not included",
            file=sys.stderr,
        )


def unlock(layout: Layout, passphrase: str) -> Session:
    """Load the owner's identity and open the manifest with its names readable (after a
    running mount has committed what it holds)."""
    return open_session(layout, _load_owner(layout, passphrase))


def _load_owner(layout: Layout, passphrase: str) -> Identity:
    settle(layout)
    return identity.read_key_file(key_path(layout), passphrase)


def open_session(layout: Layout, owner: Identity) -> Session:
    """The owner's session on the manifest, for a key unlocked already (a new connection)."""
    if not layout.manifest.exists():
        raise UsageError(f"the manifest {layout.manifest} is missing")
    manifest = Manifest.open(layout.manifest)
    if (belongs_to := manifest.owner) != owner.fingerprint:
        manifest.close()
        raise KeyFileError(
            f"{key_path(layout)} is identity {owner.fingerprint}, but this state directory"
            f" belongs to {belongs_to}"
        )
    manifest_id = manifest.get_meta("manifest_id") or b""
    stanza = recipients.Stanza.from_bytes(manifest.wrapped_key)
    manifest_key = owner.unwrap(stanza, manifest_context(manifest_id))
    manifest.unlock(NameCipher(manifest_key))
    return Session(owner, manifest, manifest_key)


class Unlocking:
    """`unlock` with the key file decrypted in a worker thread. scrypt takes about a second
    and releases the GIL, so the command that waits for the key can load the rest of its code
    meanwhile. The manifest is opened by `wait`, in the caller's thread (SQLite connections
    belong to the thread that made them)."""

    def __init__(self, layout: Layout, passphrase: str) -> None:
        self._layout = layout
        self._owner: Identity | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(
            target=self._run, args=(passphrase,), name="medfs-unlock", daemon=True
        )
        self._thread.start()

    def _run(self, passphrase: str) -> None:
        try:
            self._owner = _load_owner(self._layout, passphrase)
        except BaseException as err:  # raised again in the waiting thread
            self._error = err

    def wait(self) -> Session:
        self._thread.join()
        if self._error is not None:
            raise self._error
        assert self._owner is not None
        return open_session(self._layout, self._owner)


class MountLock:
    """One mount per state directory: an flock held for the daemon's lifetime."""

    def __init__(self, layout: Layout) -> None:
        self.layout = layout
        self._fh: IO[str] | None = None

    def acquire(self, mountpoint: Path, *, api: str | None = None) -> None:
        """Hold the lock; record who holds it, and the external IPFS API it uses, if any
        (commands run while mounted must talk to the node that has the mount's data)."""
        fh = open(self.layout.lock, "a+")  # noqa: SIM115 (held until release)
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.seek(0)
            holder = fh.read().strip() or "another process"
            fh.close()
            raise UsageError(
                f"{self.layout.root} is already mounted ({holder})",
                hint="unmount it first with 'medfs umount MOUNTPOINT'",
            ) from None
        fh.truncate(0)
        info = {"pid": os.getpid(), "mountpoint": str(mountpoint), "api": api}
        fh.write(json.dumps(info) + "\n")
        fh.flush()
        self._fh = fh

    def release(self) -> None:
        if self._fh is not None:
            with contextlib.suppress(OSError):
                self._fh.truncate(0)
            self._fh.close()
            self._fh = None


def holder(layout: Layout) -> dict[str, object] | None:
    """The running mount daemon of this state directory, if any (pid, mountpoint)."""
    try:
        with open(layout.lock) as fh:
            try:
                fcntl.flock(fh, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                text = fh.read().strip()
                info = json.loads(text) if text else {}
                return info if isinstance(info, dict) else {}
            fcntl.flock(fh, fcntl.LOCK_UN)
            return None
    except FileNotFoundError:
        return None
