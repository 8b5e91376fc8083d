"""The owner's mount as the key's agent: `medfs share` asks the running mount to share.

A share is mostly scrypt: unlocking the key file takes about a second, every time. The owner's
mount has the key unlocked already, so while it runs, `medfs share` sends it the request over a
Unix socket in the state directory and the mount does the work. The command still has to give
the passphrase: the mount keeps a keyed hash of it (a random key and the HMAC, in memory only,
never the passphrase) and refuses any request without it, one wrong guess a second at most.
Anything that may open the socket (the owner's account: the state directory is 0700, the socket
0600 and the peer's uid is checked) could read the daemon's memory anyway.

The protocol, one request per connection: a frame is a 4-byte big-endian length and that many
bytes of UTF-8 JSON. The request is `{"v": 1, "op": "share", "passphrase": str, "paths": [str],
"to": str}` (manifest paths, the recipient's public identity text); the answer `{"ok": true,
"wrapped": int, "sequence": int, "entries": int, "sealed": base64}` or `{"ok": false, "code":
int, "message": str, "hint": str | null}`. docs/FORMAT.md §7.6 has the same.

This module holds the parts that need no event loop (framing, checks, the client); the mount
serves the socket (medfs/mount.py).
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import hmac
import json
import os
import socket
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from medfs.errors import MedfsError

SOCKET_NAME = "control.sock"
VERSION = 1
MAX_REQUEST = 1 << 20  # paths and a public identity; a share manifest can be far larger
MAX_ANSWER = 1 << 30
FRAME = struct.Struct(">I")
# Every wrong passphrase costs the asker this long before the next attempt is heard.
FAILED_DELAY = 1.0


class ControlError(MedfsError):
    """The mount's refusal (its message, hint and exit code), or no usable answer from it
    (a mount problem: exit code 9, as in medfs.mount)."""

    def __init__(self, message: str, *, hint: str | None = None, code: int = 9) -> None:
        super().__init__(message, hint=hint)
        self.exit_code = code


class BadRequest(MedfsError):
    """A request that is not one of this protocol's."""

    exit_code = 2


@dataclass(frozen=True)
class ShareRequest:
    passphrase: str
    paths: list[str]
    to: str  # the recipient's public identity text


@dataclass(frozen=True)
class Shared:
    """What a share did, wherever it was done: files wrapped, the share manifest's sequence
    number and entries, and the manifest sealed for the recipient."""

    wrapped: int
    sequence: int
    entries: int
    sealed: bytes


class Passphrase:
    """Checks a passphrase against the one the mount was unlocked with, without keeping it."""

    def __init__(self, passphrase: str) -> None:
        self._key = os.urandom(32)
        self._tag = self._mac(passphrase)

    def _mac(self, passphrase: str) -> bytes:
        return hmac.new(self._key, passphrase.encode("utf-8"), hashlib.sha256).digest()

    def matches(self, passphrase: str) -> bool:
        return hmac.compare_digest(self._mac(passphrase), self._tag)


# -- framing -------------------------------------------------------------------------------------


def frame(message: dict[str, Any]) -> bytes:
    body = json.dumps(message, separators=(",", ":")).encode("utf-8")
    return FRAME.pack(len(body)) + body


def frame_length(prefix: bytes, limit: int) -> int:
    length: int = FRAME.unpack(prefix)[0]
    if length > limit:
        raise BadRequest(f"a control message of {length} bytes (at most {limit})")
    return length


def parse(body: bytes) -> dict[str, Any]:
    try:
        message = json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise BadRequest("a control message that is not JSON") from None
    if not isinstance(message, dict):
        raise BadRequest("a control message that is not a JSON object")
    return message


def share_request(message: dict[str, Any]) -> ShareRequest:
    """The request in `message`, checked field by field."""
    if message.get("v") != VERSION or message.get("op") != "share":
        raise BadRequest(f"not a version {VERSION} share request")
    passphrase, paths, to = message.get("passphrase"), message.get("paths"), message.get("to")
    if not isinstance(passphrase, str) or not isinstance(to, str):
        raise BadRequest("a share request needs a passphrase and a recipient")
    if not isinstance(paths, list) or not paths or not all(isinstance(p, str) for p in paths):
        raise BadRequest("a share request needs a list of paths")
    return ShareRequest(passphrase, paths, to)


def answer(result: Shared) -> dict[str, Any]:
    sealed = base64.b64encode(result.sealed).decode("ascii")
    return {"ok": True, "wrapped": result.wrapped, "sequence": result.sequence,
            "entries": result.entries, "sealed": sealed}  # fmt: skip


def refusal(err: MedfsError) -> dict[str, Any]:
    return {"ok": False, "code": err.exit_code, "message": err.message, "hint": err.hint}


def _share_answer(message: dict[str, Any]) -> Shared:
    if message.get("ok") is not True:
        code = message.get("code")
        raise ControlError(
            str(message.get("message") or "the mount refused the request"),
            hint=message.get("hint") if isinstance(message.get("hint"), str) else None,
            code=code if isinstance(code, int) and 1 < code < 126 else 9,
        )
    try:
        return Shared(
            int(message["wrapped"]),
            int(message["sequence"]),
            int(message["entries"]),
            base64.b64decode(message["sealed"], validate=True),
        )
    except (KeyError, TypeError, ValueError):
        raise ControlError("the mount's answer is malformed") from None


# -- the socket ----------------------------------------------------------------------------------


@contextlib.contextmanager
def socket_address(root: Path) -> Iterator[str]:
    """An address of the state directory's socket that fits a Unix socket's 108 bytes, however
    long the directory's path: through /proc/self/fd, while the directory stays open."""
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        yield f"/proc/self/fd/{fd}/{SOCKET_NAME}"
    finally:
        os.close(fd)


class _Socket(Protocol):
    def getsockopt(self, level: int, optname: int, buflen: int, /) -> bytes: ...


def peer_uid(sock: _Socket) -> int:
    """The uid of the process at the other end of a connected Unix socket (stdlib or trio)."""
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    _pid, uid, _gid = struct.unpack("3i", creds)
    return int(uid)


def ask_share(root: Path, request: ShareRequest, timeout: float) -> Shared | None:
    """Have the mount of `root` do the share; None if no mount listens there."""
    message = {"v": VERSION, "op": "share", "passphrase": request.passphrase,
               "paths": request.paths, "to": request.to}  # fmt: skip
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        try:
            with socket_address(root) as address:
                sock.connect(address)
        except (FileNotFoundError, ConnectionRefusedError):
            return None  # no mount, or one that died: the command does the share itself
        try:
            sock.sendall(frame(message))
            length = frame_length(_recv_exact(sock, FRAME.size), MAX_ANSWER)
            return _share_answer(parse(_recv_exact(sock, length)))
        except TimeoutError:
            raise ControlError(
                f"the mount did not answer within {timeout:g} s", hint="see its log, mount.log"
            ) from None
        except (BadRequest, ConnectionError, EOFError) as err:
            raise ControlError(f"the mount's answer is unreadable: {err}") from None


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    data = bytearray()
    while len(data) < n:
        got = sock.recv(min(n - len(data), 1 << 20))
        if not got:
            raise EOFError("the connection closed early")
        data += got
    return bytes(data)
