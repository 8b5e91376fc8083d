"""The IPFS adapter: the only module that speaks to a Kubo node (and imports ipfshttpclient).

`IPFS` is synchronous and thread-safe; `AsyncIPFS` runs each call in a worker thread so that
nothing here ever blocks the trio thread that serves FUSE. Every transport or RPC failure comes
out as an `IPFSError` whose message names the node and the cause.
"""

from __future__ import annotations

import contextlib
import io
import os
import threading
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, BinaryIO, ParamSpec, TypeVar

import requests
import trio

from medfs.errors import IPFSError

with warnings.catch_warnings():
    # ipfshttpclient 0.7.0 predates urllib3 2 and warns on import and on each connection.
    warnings.simplefilter("ignore")
    import ipfshttpclient
    import ipfshttpclient.exceptions as ipfs_exc
    import ipfshttpclient.multipart

# 1 MiB leaves: a GiB is 1,024 blocks instead of the default 4,096, which makes adds faster and
# DAGs smaller, while a random read still touches at most two leaves (a ciphertext segment is
# about 64 KiB). It stays well under the 2 MiB block limit that bitswap enforces between peers.
DEFAULT_CHUNKER = "size-1048576"
# How much of a stream the multipart encoder hands to the socket at once.
UPLOAD_CHUNK = 1 << 20
DEFAULT_TIMEOUT = 30.0
MAX_IDLE_SESSIONS = 16
NODE_HINT = "start the embedded node with 'medfs node start', or pass --api MULTIADDR"

P = ParamSpec("P")
T = TypeVar("T")


@dataclass(frozen=True)
class NodeId:
    peer_id: str
    addresses: tuple[str, ...]
    agent: str


@dataclass(frozen=True)
class ObjectStat:
    cid: str
    size: int  # bytes of file content
    cumulative_size: int  # content plus DAG overhead


class IteratorReader(io.RawIOBase):
    """A read-only file over an iterator of byte chunks, so a stream can be added lazily."""

    def __init__(self, chunks: Iterable[bytes]) -> None:
        self._chunks: Iterator[bytes] = iter(chunks)
        self._pending = b""

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        while not self._pending:
            try:
                self._pending = bytes(next(self._chunks))
            except StopIteration:
                return 0
        n = min(len(view), len(self._pending))
        view[:n] = self._pending[:n]
        self._pending = self._pending[n:]
        return n


def _cause(err: BaseException) -> str:
    """The most specific human reason inside a requests/urllib3 exception chain."""
    text = str(err).lower()
    for needle, reason in (
        ("connection refused", "connection refused"),
        ("name or service not known", "unknown host"),
        ("timed out", "timed out"),
        ("connection reset", "connection reset"),
        ("remote end closed", "connection closed by the node"),
    ):
        if needle in text:
            return reason
    return str(err).splitlines()[0] if str(err) else type(err).__name__


class IPFS:
    """A Kubo RPC client. Safe to share between threads: each call borrows a pooled session."""

    def __init__(
        self, api: str, *, timeout: float = DEFAULT_TIMEOUT, chunker: str = DEFAULT_CHUNKER
    ) -> None:
        self.api = api
        self.timeout = timeout
        self.chunker = chunker
        self._idle: list[Any] = []  # keep-alive sessions not in use by any thread
        self._lock = threading.Lock()

    # -- plumbing --------------------------------------------------------------------------

    def _new_client(self) -> Any:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                # Client() rather than connect(): connect() refuses every Kubo after 0.8.
                return ipfshttpclient.Client(
                    self.api, session=True, chunk_size=UPLOAD_CHUNK, timeout=self.timeout
                )
        except ipfs_exc.AddressError as err:
            raise IPFSError(
                f"not a usable IPFS API address: {self.api}",
                hint="give a multiaddr such as /ip4/127.0.0.1/tcp/5001",
            ) from err

    @contextlib.contextmanager
    def _call(self, what: str) -> Iterator[Any]:
        """Borrow a session for one request; failures come out as IPFSError."""
        with self._lock:
            client = self._idle.pop() if self._idle else None
            api = self.api
        if client is None:
            client = self._new_client()
        ok = False
        try:
            with self._translate(what):
                yield client
            ok = True
        finally:
            # A session whose request failed may hold a broken connection: drop it.
            if ok:
                with self._lock:
                    if len(self._idle) < MAX_IDLE_SESSIONS and api == self.api:
                        self._idle.append(client)
                        client = None
            if client is not None:
                client.close()

    @contextlib.contextmanager
    def _translate(self, what: str) -> Iterator[None]:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)
                yield
        except ipfs_exc.ErrorResponse as err:
            raise IPFSError(f"the IPFS node at {self.api} refused to {what}: {err}") from err
        except ipfs_exc.TimeoutError as err:
            raise IPFSError(
                f"the IPFS API at {self.api} did not answer within {self.timeout:g} s"
                f" (while trying to {what})",
                hint="check that the node is running and not overloaded ('medfs node status')",
            ) from err
        except (ipfs_exc.CommunicationError, requests.RequestException, OSError) as err:
            original = getattr(err, "original", None) or err
            raise IPFSError(
                f"cannot reach the IPFS API at {self.api}: {_cause(original)}", hint=NODE_HINT
            ) from err

    def _request(self, what: str, path: str, *args: str, **opts: str) -> Any:
        with self._call(what) as client:
            return client._client.request(
                path, args, opts=opts, decoder="json", timeout=self.timeout
            )

    def retarget(self, api: str) -> None:
        """Talk to `api` from now on (the embedded node came back on another port)."""
        with self._lock:
            self.api = api
            idle, self._idle = self._idle, []
        for client in idle:
            client.close()

    def close(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, []
        for client in idle:
            client.close()

    # -- operations ------------------------------------------------------------------------

    def version(self) -> str:
        with self._call("report its version") as client:
            return str(client.version()["Version"])

    def id(self) -> NodeId:
        with self._call("report its identity") as client:
            info = client.id()
        return NodeId(
            peer_id=info["ID"],
            addresses=tuple(info.get("Addresses") or ()),
            agent=info.get("AgentVersion", ""),
        )

    def add(self, data: bytes | BinaryIO | Iterable[bytes], *, pin: bool = True) -> str:
        """Add one file's bytes (CIDv1, raw leaves) and return its CID. Streams; never buffers."""
        if isinstance(data, bytes | bytearray | memoryview):
            stream: BinaryIO = io.BytesIO(bytes(data))
        elif hasattr(data, "read"):
            stream = data  # type: ignore[assignment]
        else:
            stream = io.BufferedReader(IteratorReader(data), UPLOAD_CHUNK)
        body, headers = ipfshttpclient.multipart.stream_files(stream, chunk_size=UPLOAD_CHUNK)
        opts = {
            "cid-version": "1",
            "raw-leaves": "true",
            "chunker": self.chunker,
            "pin": "true" if pin else "false",
            "quieter": "true",
        }
        with self._call("add data") as client:
            # A socket timeout, not a deadline: a long upload is fine while bytes flow. Kubo
            # answers shortly after the last byte, so a silent node is caught within it.
            result = client._client.request(
                "/add", decoder="json", data=body, headers=headers, opts=opts,
                timeout=max(self.timeout, 30.0),
            )  # fmt: skip
        return str(result[-1]["Hash"])

    def add_group(self, items: Sequence[bytes]) -> tuple[str, list[str]]:
        """Add several small files in one request, as the entries of one directory that alone
        is pinned; return (directory CID, each file's CID in order).

        Kubo pins every top-level file of a request one by one (a synced datastore write
        each, about 2 ms) but a directory tree with one pin; each file's CID is the same as if
        it were added alone, so the caller can track which group keeps which file.
        """
        if not items:
            raise ValueError("a group needs at least one file")
        boundary = os.urandom(16).hex().encode()
        parts = [
            b'--%s\r\nContent-Disposition: form-data; name="file"; filename="g"\r\n'
            b"Content-Type: application/x-directory\r\n\r\n\r\n" % boundary
        ]
        for i, data in enumerate(items):
            parts.append(
                b'--%s\r\nContent-Disposition: form-data; name="file"; filename="g%%2F%d"\r\n'
                b"Content-Type: application/octet-stream\r\n\r\n" % (boundary, i)
            )
            parts.append(bytes(data))
            parts.append(b"\r\n")
        parts.append(b"--%s--\r\n" % boundary)
        headers = {"Content-Type": "multipart/form-data; boundary=" + boundary.decode()}
        opts = {
            "cid-version": "1",
            "raw-leaves": "true",
            "chunker": self.chunker,
            "pin": "true",
        }
        with self._call("add data") as client:
            result = client._client.request(
                "/add", decoder="json", data=b"".join(parts), headers=headers, opts=opts,
                timeout=max(self.timeout, 30.0),
            )  # fmt: skip
        by_name = {str(r["Name"]): str(r["Hash"]) for r in result}
        try:
            return by_name["g"], [by_name[f"g/{i}"] for i in range(len(items))]
        except KeyError as err:
            raise IPFSError(
                f"the IPFS node at {self.api} did not report every file of a group add"
            ) from err

    def cat(self, cid: str, offset: int = 0, length: int | None = None) -> bytes:
        """Bytes [offset, offset+length) of a file; fewer only at the end of the file."""
        if offset < 0 or (length is not None and length < 0):
            raise ValueError("offset and length must not be negative")
        if length == 0:
            return b""
        opts = {"offset": str(offset)}
        if length is not None:
            opts["length"] = str(length)
        with self._call(f"read {cid}") as client:
            data = client._client.request("/cat", (cid,), opts=opts, timeout=self.timeout)
        return bytes(data)

    def pin(self, cid: str) -> None:
        self._request(f"pin {cid}", "/pin/add", cid)

    def unpin(self, cid: str) -> None:
        self._request(f"unpin {cid}", "/pin/rm", cid)

    def pins(self) -> set[str]:
        """CIDs pinned recursively (what `add` pins)."""
        result = self._request("list pins", "/pin/ls", type="recursive")
        keys: dict[str, Any] = {}
        for item in result:
            keys.update(item.get("Keys") or {})
        return set(keys)

    def gc(self) -> int:
        """Run the garbage collector; return how many blocks it removed."""
        result = self._request("collect garbage", "/repo/gc")
        return sum(1 for item in result if item.get("Key"))

    def stat(self, cid: str) -> ObjectStat:
        result = self._request(f"stat {cid}", "/files/stat", f"/ipfs/{cid}")[0]
        return ObjectStat(
            cid=str(result["Hash"]),
            size=int(result["Size"]),
            cumulative_size=int(result["CumulativeSize"]),
        )

    def has_local(self, cid: str) -> bool:
        """Whether the node holds the root block locally (without fetching it)."""
        with self._call(f"look up {cid}") as client:
            try:
                client._client.request(
                    "/block/stat", (cid,), decoder="json", offline=True, timeout=self.timeout
                )
            except ipfs_exc.ErrorResponse:
                return False
        return True

    def swarm_connect(self, address: str) -> None:
        # ipfshttpclient 0.7.0's swarm.connect sends each character as an argument.
        self._request(f"connect to {address}", "/swarm/connect", address)

    def swarm_peers(self) -> list[str]:
        result = self._request("list peers", "/swarm/peers")[0]
        return [str(p["Peer"]) for p in result.get("Peers") or ()]


class AsyncIPFS:
    """`IPFS` for trio code: every call runs in a worker thread, never on the trio thread."""

    def __init__(self, sync: IPFS, *, limiter: trio.CapacityLimiter | None = None) -> None:
        self.sync = sync
        self._limiter = limiter

    async def _run(self, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        def call() -> T:
            return fn(*args, **kwargs)

        return await trio.to_thread.run_sync(call, limiter=self._limiter)

    async def version(self) -> str:
        return await self._run(self.sync.version)

    async def id(self) -> NodeId:
        return await self._run(self.sync.id)

    async def add(self, data: bytes | BinaryIO | Iterable[bytes], *, pin: bool = True) -> str:
        return await self._run(self.sync.add, data, pin=pin)

    async def cat(self, cid: str, offset: int = 0, length: int | None = None) -> bytes:
        return await self._run(self.sync.cat, cid, offset, length)

    async def pin(self, cid: str) -> None:
        await self._run(self.sync.pin, cid)

    async def unpin(self, cid: str) -> None:
        await self._run(self.sync.unpin, cid)

    async def stat(self, cid: str) -> ObjectStat:
        return await self._run(self.sync.stat, cid)

    async def swarm_connect(self, address: str) -> None:
        await self._run(self.sync.swarm_connect, address)
