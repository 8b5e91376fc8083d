"""The IPFS adapter: the only module that speaks to a Kubo node (and imports ipfshttpclient).

`IPFS` is synchronous and thread-safe; `AsyncIPFS` runs each call in a worker thread so that
nothing here ever blocks the trio thread that serves FUSE. Every transport or RPC failure comes
out as an `IPFSError` whose message names the node and the cause.
"""

from __future__ import annotations

import base64
import contextlib
import io
import json
import os
import socket
import threading
import urllib.parse
import warnings
import weakref
from collections import OrderedDict
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, BinaryIO

import requests

from medfs.errors import IPFSError

with warnings.catch_warnings():
    # ipfshttpclient 0.7.0 predates urllib3 2 and warns on import and on each connection.
    warnings.simplefilter("ignore")
    import ipfshttpclient
    import ipfshttpclient.exceptions as ipfs_exc
    import ipfshttpclient.http_common
    import ipfshttpclient.multipart

# 1 MiB leaves: a GiB is 1,024 blocks instead of the default 4,096, which makes adds faster and
# DAGs smaller, while a random read still touches at most two leaves (a ciphertext segment is
# about 64 KiB). It stays well under the 2 MiB block limit that bitswap enforces between peers.
DEFAULT_CHUNKER = "size-1048576"
# How much of a stream the multipart encoder hands to the socket at once.
UPLOAD_CHUNK = 1 << 20
DEFAULT_TIMEOUT = 30.0
MAX_IDLE_SESSIONS = 16
# Ranges up to this size are read from the one leaf that holds them (see `_locate`).
LEAF_RANGE_MAX = 256 << 10
MAX_DAG_DEPTH = 8
DAG_CACHE_NODES = 4096
CODEC_DAG_PB = 0x70
UNIXFS_RAW, UNIXFS_FILE = 0, 2
# How much the read path asks of the socket at once, and the most header it accepts.
RECV_CHUNK = 1 << 20
MAX_HEADER_BYTES = 1 << 16
NODE_HINT = "start the embedded node with 'medfs node start', or pass --api MULTIADDR"


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

    def _fill(self) -> bool:
        while not self._pending:
            try:
                self._pending = bytes(next(self._chunks))
            except StopIteration:
                return False
        return True

    def read(self, size: int | None = -1) -> bytes:
        """The next chunk, or its first `size` bytes: as it came, without a copy, when it fits
        (an upload passes every byte of a file through here). No `size`: everything left."""
        if size is None or size < 0:
            return self.readall()
        if not self._fill():
            return b""
        if size >= len(self._pending):
            piece, self._pending = self._pending, b""
        else:
            piece, self._pending = self._pending[:size], self._pending[size:]
        return piece

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        if not self._fill():
            return 0
        n = min(len(view), len(self._pending))
        view[:n] = self._pending[:n]
        self._pending = self._pending[n:]
        return n


def _netloc(target: tuple[str, int]) -> str:
    host, port = target
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class _Wire:
    """Reads one HTTP/1.1 response off a kept-alive socket (small bodies only)."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = bytearray()
        self.pos = 0

    def _fill(self) -> None:
        more = self.sock.recv(RECV_CHUNK)
        if not more:
            raise ConnectionResetError("remote end closed connection without a whole response")
        self.buf += more

    def line(self) -> bytes:
        while (end := self.buf.find(b"\r\n", self.pos)) < 0:
            if len(self.buf) - self.pos > MAX_HEADER_BYTES:
                raise ValueError("the node sent an oversized HTTP header")
            self._fill()
        out = bytes(self.buf[self.pos : end])
        self.pos = end + 2
        return out

    def headers(self) -> dict[str, str]:
        out = {}
        while line := self.line():
            name, _, value = line.decode("latin-1").partition(":")
            out[name.strip().lower()] = value.strip()
        return out

    def take(self, n: int) -> bytearray:
        while len(self.buf) - self.pos < n:
            self._fill()
        out = self.buf[self.pos : self.pos + n]
        self.pos += n
        return out

    def chunked(self) -> tuple[bytearray, dict[str, str]]:
        body = bytearray()
        while size := int(self.line().split(b";", 1)[0], 16):
            body += self.take(size)
            if self.take(2) != b"\r\n":
                raise ValueError("the node sent a malformed chunk")
        return body, self.headers()

    def rest(self) -> bytearray:
        out = self.buf[self.pos :] + _recv_all(self.sock)
        self.pos = len(self.buf)
        return out

    def drained(self) -> bool:
        return self.pos == len(self.buf)


def _close_sockets(kept: list[tuple[str, socket.socket]]) -> None:
    for _api, sock in kept:
        sock.close()
    kept.clear()


def _recv_all(sock: socket.socket) -> bytes:
    parts = []
    while chunk := sock.recv(RECV_CHUNK):
        parts.append(chunk)
    return b"".join(parts)


def _varint(data: bytes, at: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = data[at]
        at += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, at
        shift += 7
        if shift > 63:
            raise ValueError("varint too long")


def _cid_codec(cid: str) -> int | None:
    """The multicodec of a CIDv0 or base32 CIDv1 string; None for other spellings."""
    if len(cid) == 46 and cid.startswith("Qm"):
        return CODEC_DAG_PB
    if not cid.startswith("b"):
        return None
    text = cid[1:].upper()
    try:
        raw = base64.b32decode(text + "=" * (-len(text) % 8))
        version, at = _varint(raw, 0)
        codec, _ = _varint(raw, at)
    except (ValueError, IndexError):
        return None
    return codec if version == 1 else None


def _file_children(node: Any) -> tuple[tuple[str, int], ...] | None:
    """Links and their file sizes from `dag/get` of a dag-pb unixfs file node, or None when it
    is not one (a directory, inline data) and so is left to Kubo to read."""
    text = node["Data"]["/"]["bytes"]
    data = base64.b64decode(text + "=" * (-len(text) % 4))
    kind, sizes, at = None, [], 0
    while at < len(data):
        key, at = _varint(data, at)
        field, wire = key >> 3, key & 7
        if wire == 0:
            value, at = _varint(data, at)
            if field == 1:
                kind = value
            elif field == 4:
                sizes.append(value)
        elif wire == 2:
            n, at = _varint(data, at)
            if field == 2 and n:
                return None  # data inline in an inner node: offsets would not add up
            at += n
        else:
            return None
    links = node["Links"]
    if kind not in (UNIXFS_FILE, UNIXFS_RAW) or len(links) != len(sizes) or not links:
        return None
    return tuple((str(link["Hash"]["/"]), size) for link, size in zip(links, sizes, strict=True))


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
        self._targets: dict[str, tuple[str, int] | None] = {}
        # Kept-alive sockets for small cats (see `_cat_kept`), with the API they are open to.
        self._kept: list[tuple[str, socket.socket]] = []
        # A client dropped without close() must not leave its kept sockets open.
        weakref.finalize(self, _close_sockets, self._kept)
        # Inner nodes of file DAGs met by `cat` (see `_locate`), least recently used first.
        self._dag: OrderedDict[str, tuple[tuple[str, int], ...] | None] = OrderedDict()
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
        self._close_kept()

    def close(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, []
        for client in idle:
            client.close()
        self._close_kept()

    # -- the read path ---------------------------------------------------------------------
    #
    # `cat` is on the path of every FUSE read, so it does not go through ipfshttpclient and
    # requests, nor http.client: Kubo streams a cat as HTTP/1.1 chunks of 4 KiB, and decoding
    # them in Python cost ~4 CPU-seconds per GiB here (and a few ms per small range through
    # requests). Asked in HTTP/1.0, Kubo sends the body raw and closes the connection, so it
    # is read straight into one buffer: ~1 CPU-s per GiB, and a new loopback connection per
    # request costs less than the chunk decoding of a 64 KiB range. Errors met mid-stream are
    # seen as a body shorter than Kubo's X-Content-Length. This stays the only module that
    # speaks HTTP to Kubo; unix-socket and https API addresses keep the client.

    def _target(self, api: str) -> tuple[str, int] | None:
        """(host, port) of a plain-HTTP TCP API address, None for the others."""
        with self._lock:
            if api in self._targets:
                return self._targets[api]
        try:
            url, uds, _family, _numeric = ipfshttpclient.http_common.multiaddr_to_url_data(
                api, "/api/v0"
            )
        except ipfs_exc.AddressError as err:
            raise IPFSError(
                f"not a usable IPFS API address: {api}",
                hint="give a multiaddr such as /ip4/127.0.0.1/tcp/5001",
            ) from err
        parts = urllib.parse.urlsplit(url)
        target = None
        if uds is None and parts.scheme == "http" and parts.hostname and parts.port:
            target = (parts.hostname, parts.port)
        with self._lock:
            self._targets[api] = target
        return target

    def _post_raw(
        self, api: str, target: tuple[str, int], endpoint: str, query: str, cid: str
    ) -> bytes | bytearray:
        """One read-path RPC (`cat`, `dag/get`) about `cid`, its body read into one buffer."""
        request = (
            f"POST /api/v0/{endpoint}?{query} HTTP/1.0\r\nHost: {_netloc(target)}\r\n"
            "Content-Length: 0\r\n\r\n"
        ).encode("ascii")
        try:
            # The timeout bounds the connect and every receive: a node that hangs (SIGSTOP)
            # is given up on after `timeout` seconds without data, never waited on for ever.
            with socket.create_connection(target, timeout=self.timeout) as sock:
                sock.sendall(request)
                return self._cat_response(api, sock, cid)
        except IPFSError:
            raise
        except (OSError, ValueError) as err:
            raise self._transport_error(api, cid, err) from err

    # A small range (a random read's segment) is asked over a kept-alive HTTP/1.1 connection
    # instead: a new connection per request costs ~0.2 ms at the median here, more under load,
    # and the 4 KiB chunks of a small body are few enough to decode. Kubo then reports an
    # error met mid-stream in the X-Stream-Error trailer.

    def _cat_kept(self, api: str, target: tuple[str, int], query: str, cid: str) -> bytearray:
        request = (
            f"POST /api/v0/cat?{query} HTTP/1.1\r\nHost: {_netloc(target)}\r\n"
            "Content-Length: 0\r\n\r\n"
        ).encode("ascii")
        for attempt in range(2):
            sock, reused = self._borrow_kept(api, target)
            try:
                sock.sendall(request)
                data, reusable = self._kept_response(api, _Wire(sock), cid)
            except ConnectionError as err:
                sock.close()
                # The node closed a connection that sat idle: once more on a new one (cat is
                # idempotent). A timeout is never retried: a hung node costs one `timeout`.
                if reused and attempt == 0:
                    continue
                raise self._transport_error(api, cid, err) from err
            except IPFSError:
                sock.close()
                raise
            except (OSError, ValueError) as err:
                sock.close()
                raise self._transport_error(api, cid, err) from err
            if reusable:
                self._return_kept(api, sock)
            else:
                sock.close()
            return data
        raise AssertionError("unreachable")  # pragma: no cover

    def _kept_response(self, api: str, wire: _Wire, cid: str) -> tuple[bytearray, bool]:
        """The body of one HTTP/1.1 response, and whether the connection can carry another."""
        status = wire.line().decode("latin-1").split(" ", 2)
        if len(status) < 2 or not status[0].startswith("HTTP/") or not status[1].isdigit():
            raise ValueError(f"not an HTTP response from the node: {' '.join(status)[:80]!r}")
        headers = wire.headers()
        reusable = status[0] == "HTTP/1.1" and headers.get("connection", "") != "close"
        if headers.get("transfer-encoding", "").lower() == "chunked":
            body, trailers = wire.chunked()
        elif headers.get("content-length", "").isdigit():
            body, trailers = wire.take(int(headers["content-length"])), {}
        else:
            body, trailers, reusable = wire.rest(), {}, False
        reusable = reusable and wire.drained()
        if status[1] != "200":
            try:
                message = str(json.loads(body)["Message"])
            except (ValueError, KeyError, TypeError):
                message = f"HTTP {status[1]}"
            raise IPFSError(f"the IPFS node at {api} refused to read {cid}: {message}")
        announced = headers.get("x-content-length", "")
        if "x-stream-error" in trailers or (announced.isdigit() and len(body) < int(announced)):
            raise IPFSError(
                f"the IPFS node at {api} stopped sending {cid} after {len(body)} bytes"
                + (f": {trailers['x-stream-error']}" if "x-stream-error" in trailers else ""),
                hint="check the node's log ('medfs node status')",
            )
        return body, reusable

    def _transport_error(self, api: str, cid: str, err: BaseException) -> IPFSError:
        if isinstance(err, TimeoutError):
            return IPFSError(
                f"the IPFS API at {api} did not answer within {self.timeout:g} s"
                f" (while trying to read {cid})",
                hint="check that the node is running and not overloaded ('medfs node status')",
            )
        return IPFSError(f"cannot reach the IPFS API at {api}: {_cause(err)}", hint=NODE_HINT)

    def _borrow_kept(self, api: str, target: tuple[str, int]) -> tuple[socket.socket, bool]:
        with self._lock:
            while self._kept:
                owner, sock = self._kept.pop()
                if owner == api:
                    return sock, True
                sock.close()
        # The timeout bounds the connect and every receive: a node that hangs (SIGSTOP) is
        # given up on after `timeout` seconds without data, never waited on for ever.
        return socket.create_connection(target, timeout=self.timeout), False

    def _return_kept(self, api: str, sock: socket.socket) -> None:
        with self._lock:
            if len(self._kept) < MAX_IDLE_SESSIONS and api == self.api:
                self._kept.append((api, sock))
                return
        sock.close()

    def _close_kept(self) -> None:
        with self._lock:
            kept = self._kept[:]
            self._kept.clear()  # the same list: the finalizer holds it
        for _api, sock in kept:
            sock.close()

    # A ranged cat of a big file costs Kubo a walk from the root and a read-ahead of several
    # sibling leaves (4 ms to first byte here for 64 KiB of a 64 MiB file, 0.6 ms for the same
    # from a one-block file). A small range inside one leaf is asked of that leaf instead; the
    # DAG nodes on the way are immutable, so they are fetched once and remembered.

    def _locate(
        self, api: str, target: tuple[str, int], cid: str, offset: int, length: int
    ) -> tuple[str, int] | None:
        """The leaf block holding all of [offset, offset+length) of file `cid`, and the offset
        in it; None to read from the root (a big range, a range across leaves, not unixfs)."""
        if length > LEAF_RANGE_MAX:
            return None
        node, at = cid, offset
        for _depth in range(MAX_DAG_DEPTH):
            children = self._children(api, target, node)
            if children is None:
                return (node, at) if node != cid else None
            for child, size in children:
                if at < size:
                    if at + length > size:
                        return None
                    node = child
                    break
                at -= size
            else:
                return None  # at or past the end: the root answers that
        return None

    def _children(
        self, api: str, target: tuple[str, int], cid: str
    ) -> tuple[tuple[str, int], ...] | None:
        """(child CID, bytes of file under it) of a unixfs file node; None for a raw leaf or
        anything this does not understand."""
        codec = _cid_codec(cid)
        if codec != CODEC_DAG_PB:
            return None
        with self._lock:
            if cid in self._dag:
                self._dag.move_to_end(cid)
                return self._dag[cid]
        body = self._post_raw(api, target, "dag/get", urllib.parse.urlencode({"arg": cid}), cid)
        try:
            children = _file_children(json.loads(body))
        except (ValueError, KeyError, TypeError, IndexError):
            children = None
        with self._lock:
            self._dag[cid] = children
            while len(self._dag) > DAG_CACHE_NODES:
                self._dag.popitem(last=False)
        return children

    def _cat_response(self, api: str, sock: socket.socket, cid: str) -> bytes | bytearray:
        head = bytearray()
        while (end := head.find(b"\r\n\r\n")) < 0:
            if len(head) > MAX_HEADER_BYTES:
                raise ValueError("the node sent an oversized HTTP header")
            more = sock.recv(RECV_CHUNK)
            if not more:
                raise ConnectionResetError("remote end closed connection without response")
            head += more
        body = memoryview(head)[end + 4 :]
        lines = bytes(head[:end]).decode("latin-1").split("\r\n")
        status = lines[0].split(" ", 2)
        if len(status) < 2 or not status[0].startswith("HTTP/") or not status[1].isdigit():
            raise ValueError(f"not an HTTP response from the node: {lines[0][:80]!r}")
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        announced = headers.get("x-content-length", "")
        if status[1] != "200" or not announced.isdigit():
            data = bytes(body) + _recv_all(sock)
            if status[1] != "200":
                try:
                    message = str(json.loads(data)["Message"])
                except (ValueError, KeyError, TypeError):
                    message = " ".join(status[1:])
                raise IPFSError(f"the IPFS node at {api} refused to read {cid}: {message}")
            return data
        expected = int(announced)
        buffer = bytearray(expected)
        view = memoryview(buffer)
        got = min(len(body), expected)
        view[:got] = body[:got]
        while got < expected:
            n = sock.recv_into(view[got:])
            if n == 0:
                break
            got += n
        view.release()
        if got < expected:
            raise IPFSError(
                f"the IPFS node at {api} stopped sending {cid} after {got} of {expected} bytes",
                hint="check the node's log ('medfs node status')",
            )
        return buffer

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
            stream: BinaryIO | IteratorReader = io.BytesIO(bytes(data))
        elif hasattr(data, "read"):
            stream = data  # type: ignore[assignment]
        else:
            stream = IteratorReader(data)
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
        data = self.cat_buffer(cid, offset, length)
        return data if isinstance(data, bytes) else bytes(data)

    def cat_buffer(self, cid: str, offset: int = 0, length: int | None = None) -> bytes | bytearray:
        """`cat` without the copy into `bytes`: the read path decrypts straight from the
        buffer the response was received into."""
        if offset < 0 or (length is not None and length < 0):
            raise ValueError("offset and length must not be negative")
        if length == 0:
            return b""
        opts = {"offset": str(offset)}
        if length is not None:
            opts["length"] = str(length)
        api = self.api
        target = self._target(api)
        if target is not None:
            query = urllib.parse.urlencode({"arg": cid, **opts})
            leaf = None if length is None else self._locate(api, target, cid, offset, length)
            if leaf is not None and length is not None:
                cid_read, offset = leaf
                query = urllib.parse.urlencode(
                    {"arg": cid_read, "offset": str(offset), "length": str(length)}
                )
                return self._cat_kept(api, target, query, cid)
            return self._post_raw(api, target, "cat", query, cid)
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
