"""The Kubo binary and the embedded private node medfs runs when no API is configured.

The embedded node's repository lives in `<state>/ipfs`. It is initialised like Kubo's `test`
profile (loopback-only API and swarm on OS-chosen ports, no bootstrap peers, no mDNS) and further
closed off (no DHT, no gateway, no autoconf fetches), so it never dials the public network. It
is started on first need, detached, and reused by every medfs command on the same state
directory; the API address is read back from `<repo>/api`.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from medfs.errors import IPFSError, SetupError, UsageError
from medfs.ipfs import IPFS
from medfs.paths import KUBO_VERSION, installed_kubo_binary

log = logging.getLogger(__name__)

START_TIMEOUT = 60.0
STOP_TIMEOUT = 20.0
SETUP_HINT = "run scripts/setup (it builds Kubo), or set MEDFS_IPFS_BIN to an ipfs binary"

# Applied after `ipfs init --profile=test`. Each closes a path by which a private node could
# reach beyond loopback: content routing (DHT), the gateway, AutoConf's HTTP fetch of defaults.
PRIVATE_CONFIG: tuple[tuple[str, str], ...] = (
    ("Bootstrap", "[]"),
    ("Routing.Type", '"none"'),
    ("Addresses.Gateway", "[]"),
    ("Addresses.API", '"/ip4/127.0.0.1/tcp/0"'),
    ("Addresses.Swarm", '["/ip4/127.0.0.1/tcp/0"]'),
    ("Addresses.Announce", "[]"),
    ("Discovery.MDNS.Enabled", "false"),
    ("Swarm.DisableNatPortMap", "true"),
    ("Swarm.RelayClient.Enabled", "false"),
    ("Swarm.RelayService.Enabled", "false"),
    ("AutoConf.Enabled", "false"),
    ("AutoTLS.Enabled", "false"),
    ("Provide.Enabled", "false"),
)


def find_binary() -> Path:
    """The Kubo binary: `$MEDFS_IPFS_BIN`, else `ipfs` on PATH, else where scripts/setup put it."""
    env = os.environ.get("MEDFS_IPFS_BIN")
    if env:
        path = Path(env)
        if not (path.is_file() and os.access(path, os.X_OK)):
            raise SetupError(
                f"MEDFS_IPFS_BIN points to {env}, which is not an executable file",
                hint="unset it to use the Kubo that scripts/setup builds",
            )
        return path
    on_path = shutil.which("ipfs")
    if on_path:
        return Path(on_path)
    installed = installed_kubo_binary()
    if installed.is_file() and os.access(installed, os.X_OK):
        return installed
    raise SetupError("the Kubo binary (ipfs) was not found", hint=SETUP_HINT)


def binary_version(binary: Path) -> str:
    out = subprocess.run(
        [str(binary), "version", "-n"], capture_output=True, text=True, check=False, timeout=30
    )
    if out.returncode != 0:
        raise SetupError(f"{binary} does not run: {out.stderr.strip()}", hint=SETUP_HINT)
    return out.stdout.strip()


def pid_alive(pid: int) -> bool:
    """Whether process `pid` runs (a zombie, exited but not yet reaped, does not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie (exited, not yet reaped by its parent) still answers signal 0.
    with contextlib.suppress(OSError):
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat.rsplit(")", 1)[1].split()[0] != "Z"
    return True


def _is_kubo_daemon(pid: int) -> bool:
    """Whether pid is a Kubo daemon, so that a reused pid number is never signalled."""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return len(argv) > 1 and b"daemon" in argv[1:] and Path(os.fsdecode(argv[0])).name == "ipfs"


@dataclass(frozen=True)
class NodeStatus:
    running: bool
    api: str | None
    repo: str
    binary: str
    version: str
    pid: int | None
    peer_id: str | None

    def as_json(self) -> dict[str, object]:
        return {
            "running": self.running,
            "api": self.api,
            "repo": self.repo,
            "binary": self.binary,
            "version": self.version,
            "pid": self.pid,
            "peer_id": self.peer_id,
        }


class EmbeddedNode:
    """The private Kubo daemon of one state directory."""

    def __init__(self, state: Path, binary: Path | None = None) -> None:
        self.state = state
        self.repo = state / "ipfs"
        self._binary = binary

    @property
    def binary(self) -> Path:
        if self._binary is None:
            self._binary = find_binary()
        return self._binary

    @property
    def _pid_file(self) -> Path:
        return self.repo / "medfs-daemon.pid"

    @property
    def log_file(self) -> Path:
        return self.repo / "daemon.log"

    def _env(self) -> dict[str, str]:
        env = dict(os.environ)
        env["IPFS_PATH"] = str(self.repo)
        # Telemetry and update checks would try the public network.
        env["IPFS_TELEMETRY"] = "off"
        env.pop("IPFS_SWARM_KEY", None)
        return env

    def _ipfs(self, *args: str, timeout: float = 60) -> str:
        out = subprocess.run(
            [str(self.binary), *args],
            env=self._env(),
            capture_output=True,
            text=True,
            check=False,
            timeout=timeout,
        )
        if out.returncode != 0:
            raise IPFSError(f"'ipfs {' '.join(args)}' failed: {out.stderr.strip()}")
        return out.stdout

    @contextlib.contextmanager
    def _lock(self) -> Iterator[None]:
        """Serialise start/stop between medfs processes sharing this state directory."""
        self.state.mkdir(parents=True, exist_ok=True, mode=0o700)
        with open(self.state / "node.lock", "a") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    # -- state -----------------------------------------------------------------------------

    def initialised(self) -> bool:
        return (self.repo / "config").is_file()

    def init(self) -> None:
        if self.initialised():
            return
        if self.repo.exists() and any(self.repo.iterdir()):
            raise UsageError(
                f"{self.repo} exists but is not an IPFS repository",
                hint="move it aside, or pass --state to use another state directory",
            )
        self.repo.mkdir(parents=True, exist_ok=True, mode=0o700)
        log.info("initialising the embedded IPFS repository at %s", self.repo)
        self._ipfs("init", "--profile=test", "--empty-repo")
        for key, value in PRIVATE_CONFIG:
            self._ipfs("config", "--json", key, value)
        # The test profile writes blocks without fsync. medfs commits a version only after its
        # blocks are added, so they must survive a power cut as well as the manifest does.
        spec = json.loads(self._ipfs("config", "Datastore.Spec"))
        for mount in spec.get("mounts", []):
            if mount.get("type") == "flatfs":
                mount["sync"] = True
        self._ipfs("config", "--json", "Datastore.Spec", json.dumps(spec))

    def pid(self) -> int | None:
        try:
            pid = int(self._pid_file.read_text().strip())
        except (OSError, ValueError):
            return None
        return pid if pid_alive(pid) and _is_kubo_daemon(pid) else None

    def api(self) -> str | None:
        """The API multiaddr of the running daemon, or None if nothing answers."""
        try:
            addr = (self.repo / "api").read_text().strip()
        except OSError:
            return None
        if not addr:
            return None
        client = IPFS(addr, timeout=5)
        try:
            client.version()
        except IPFSError:
            return None
        finally:
            client.close()
        return addr

    def status(self) -> NodeStatus:
        api = self.api() if self.initialised() else None
        peer_id = None
        if api:
            client = IPFS(api, timeout=5)
            with contextlib.suppress(IPFSError):
                peer_id = client.id().peer_id
            client.close()
        return NodeStatus(
            running=api is not None,
            api=api,
            repo=str(self.repo),
            binary=str(self.binary),
            version=binary_version(self.binary),
            pid=self.pid() if api else None,
            peer_id=peer_id,
        )

    # -- lifecycle -------------------------------------------------------------------------

    def ensure_running(self) -> str:
        """The API address of this state directory's daemon, starting it if needed."""
        api = self.api()
        if api:
            return api
        with self._lock():
            api = self.api()  # another medfs may have started it while we waited
            if api:
                return api
            return self._start()

    def _start(self) -> str:
        self.init()
        stale = self.pid()
        if stale is not None:
            # A daemon that holds the repo but does not answer would block a new one (repo
            # lock), so it is stopped rather than duplicated.
            log.warning("embedded IPFS daemon %d does not answer; restarting it", stale)
            self._terminate(stale)
        with contextlib.suppress(FileNotFoundError):
            (self.repo / "api").unlink()
        version = binary_version(self.binary)
        if version != KUBO_VERSION:
            log.warning(
                "Kubo %s at %s; medfs is tested with %s", version, self.binary, KUBO_VERSION
            )
        log.info("starting the embedded IPFS daemon (%s)", self.binary)
        # posix_spawn rather than Popen: the daemon must outlive this command (its own session),
        # and a Popen object dropped while its child runs is reported as a leak.
        log_fd = os.open(self.log_file, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            pid = os.posix_spawn(
                str(self.binary),
                [str(self.binary), "daemon", "--migrate=false"],
                self._env(),
                file_actions=[
                    (os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0),
                    (os.POSIX_SPAWN_DUP2, log_fd, 1),
                    (os.POSIX_SPAWN_DUP2, log_fd, 2),
                ],
                setsid=True,
            )
        finally:
            os.close(log_fd)
        self._pid_file.write_text(f"{pid}\n")
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                code = os.waitstatus_to_exitcode(status)
                raise IPFSError(
                    f"the embedded IPFS daemon exited with status {code} while starting:"
                    f" {self._log_tail()}",
                    hint=f"see {self.log_file}",
                )
            api = self.api()
            if api:
                return api
            time.sleep(0.1)
        self._terminate(pid)
        raise IPFSError(
            f"the embedded IPFS daemon did not become ready within {START_TIMEOUT:g} s",
            hint=f"see {self.log_file}",
        )

    def _log_tail(self) -> str:
        try:
            lines = self.log_file.read_text(errors="replace").strip().splitlines()
        except OSError:
            return "(no log)"
        return " / ".join(lines[-3:]) or "(empty log)"

    def _terminate(self, pid: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + STOP_TIMEOUT
        while time.monotonic() < deadline:
            if not pid_alive(pid):
                return
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, os.WNOHANG)
            time.sleep(0.05)
        log.warning("IPFS daemon %d ignored SIGTERM for %g s; killing it", pid, STOP_TIMEOUT)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)

    def stop(self) -> bool:
        """Stop the daemon; return whether one was running."""
        with self._lock():
            pid = self.pid()
            if pid is None:
                return False
            self._terminate(pid)
            with contextlib.suppress(FileNotFoundError):
                self._pid_file.unlink()
            return True


def resolve_api(state: Path, api: str | None) -> str:
    """The API to talk to: the one given (`--api`/`$MEDFS_IPFS_API`) or the embedded node's."""
    if api:
        return api
    return EmbeddedNode(state).ensure_running()
