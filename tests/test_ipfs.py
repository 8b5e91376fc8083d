"""The IPFS adapter against a real Kubo daemon (no fakes)."""

from __future__ import annotations

import hashlib
import random
import socket
import threading
import time
from collections.abc import Iterator

import pytest

from medfs.errors import IPFSError
from medfs.ipfs import IPFS, IteratorReader, _cid_codec

MiB = 1 << 20


def pseudo_random(n: int, seed: bytes = b"medfs") -> bytes:
    out = bytearray()
    counter = 0
    while len(out) < n:
        out += hashlib.sha256(seed + counter.to_bytes(8, "big")).digest() * 64
        counter += 1
    return bytes(out[:n])


def odd_chunks(data: bytes) -> Iterator[bytes]:
    """Chunks of uneven sizes, so nothing lines up with the node's 1 MiB leaves by accident."""
    sizes = [1, 4095, 65537, 999_983, 3]
    i = k = 0
    while i < len(data):
        n = sizes[k % len(sizes)]
        yield data[i : i + n]
        i += n
        k += 1


def test_round_trip_of_multi_mib_stream(ipfs: IPFS) -> None:
    data = pseudo_random(7 * MiB + 12345)
    cid = ipfs.add(odd_chunks(data))
    assert cid.startswith("bafy")  # CIDv1
    assert ipfs.cat(cid) == data
    assert ipfs.stat(cid).size == len(data)
    assert cid in ipfs.pins()


def test_add_is_deterministic_across_input_shapes(ipfs: IPFS) -> None:
    data = pseudo_random(3 * MiB + 7, seed=b"shape")
    assert ipfs.add(data) == ipfs.add(odd_chunks(data))


@pytest.mark.parametrize(
    ("offset", "length"),
    [
        (0, 1),
        (1, 1),
        (MiB - 1, 2),  # across the first leaf boundary
        (MiB - 3, MiB + 6),  # spans three leaves
        (2 * MiB + 17, 65552),
        (5 * MiB - 1, 1),  # the last byte
        (5 * MiB - 10, 100),  # runs past the end: only what exists
        (5 * MiB, 10),  # at the end: nothing
        (12345, None),  # to the end
    ],
)
def test_range_cat_equals_slice(ipfs: IPFS, offset: int, length: int | None) -> None:
    data = pseudo_random(5 * MiB, seed=b"range")
    cid = ipfs.add(data)
    end = None if length is None else offset + length
    assert ipfs.cat(cid, offset, length) == data[offset:end]


def test_empty_object(ipfs: IPFS) -> None:
    cid = ipfs.add(b"")
    assert ipfs.cat(cid) == b""
    assert ipfs.stat(cid).size == 0


def test_unpin_then_gc_removes_blocks_and_keeps_pinned(ipfs: IPFS) -> None:
    kept = ipfs.add(pseudo_random(2 * MiB, seed=b"kept"))
    dropped = ipfs.add(pseudo_random(2 * MiB, seed=b"dropped"))
    assert ipfs.has_local(dropped)
    ipfs.unpin(dropped)
    assert dropped not in ipfs.pins()
    assert ipfs.gc() > 0
    assert not ipfs.has_local(dropped)
    assert ipfs.has_local(kept)
    assert ipfs.cat(kept, 0, 4) == pseudo_random(4, seed=b"kept")


def test_errors_from_the_node_are_medfs_errors(ipfs: IPFS) -> None:
    with pytest.raises(IPFSError, match="refused to unpin"):
        ipfs.unpin("bafkqaaa")  # the empty identity CID: never pinned
    with pytest.raises(IPFSError, match="refused"):
        ipfs.cat("not-a-cid")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_api_down_is_a_clear_error_not_a_hang() -> None:
    port = free_port()
    client = IPFS(f"/ip4/127.0.0.1/tcp/{port}", timeout=5)
    started = time.monotonic()
    with pytest.raises(IPFSError) as info:
        client.cat("bafkqaaa")
    assert (
        str(info.value)
        == f"cannot reach the IPFS API at /ip4/127.0.0.1/tcp/{port}: connection refused"
    )
    assert "medfs node start" in (info.value.hint or "")
    assert time.monotonic() - started < 5


class LoopbackServer:
    """A fake node on a loopback port: `handle` gets each accepted connection."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.port = self.sock.getsockname()[1]
        self.conns: list[socket.socket] = []
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.handle(conn)

    def handle(self, conn: socket.socket) -> None:
        raise NotImplementedError

    def close(self) -> None:
        self.sock.close()
        for c in self.conns:
            c.close()


class SilentServer(LoopbackServer):
    """Accepts connections and never answers: a node that hangs."""

    def handle(self, conn: socket.socket) -> None:
        self.conns.append(conn)


@pytest.fixture
def silent_server() -> Iterator[SilentServer]:
    server = SilentServer()
    yield server
    server.close()


def test_api_not_answering_times_out(silent_server: SilentServer) -> None:
    client = IPFS(f"/ip4/127.0.0.1/tcp/{silent_server.port}", timeout=1)
    with pytest.raises(IPFSError, match=r"did not answer within 1 s"):
        client.version()


def test_bad_api_address() -> None:
    with pytest.raises(IPFSError, match="not a usable IPFS API address"):
        IPFS("localhost:5001").version()


def test_a_group_add_pins_one_directory_that_keeps_every_file(ipfs: IPFS) -> None:
    items = [pseudo_random(n, seed=b"group%d" % n) for n in (0, 1, 16384, MiB + 5)]
    before = ipfs.pins()
    group, cids = ipfs.add_group(items)
    # Each file has the CID it would have added on its own, and reads back as itself...
    assert cids == [ipfs.add(data, pin=False) for data in items]
    assert [ipfs.cat(cid) for cid in cids] == items
    # ... but only the directory is pinned: one pin for the whole group.
    assert ipfs.pins() - before == {group}
    ipfs.unpin(group)
    assert group not in ipfs.pins()


def test_a_group_needs_a_file(ipfs: IPFS) -> None:
    with pytest.raises(ValueError):
        ipfs.add_group([])


def test_cat_from_a_silent_node_times_out(silent_server: SilentServer) -> None:
    client = IPFS(f"/ip4/127.0.0.1/tcp/{silent_server.port}", timeout=1)
    with pytest.raises(IPFSError, match=r"did not answer within 1 s \(while trying to read"):
        client.cat("bafkqaaa", 0, 10)


class OneShotServer(LoopbackServer):
    """Answers every connection with `reply` and closes it: a node that misbehaves."""

    def __init__(self, reply: bytes) -> None:
        self.reply = reply
        super().__init__()

    def handle(self, conn: socket.socket) -> None:
        with conn:
            conn.recv(65536)
            conn.sendall(self.reply)


@pytest.mark.parametrize(
    ("reply", "message"),
    [
        (
            b"HTTP/1.0 200 OK\r\nX-Content-Length: 100\r\n\r\n" + b"x" * 40,
            "stopped sending bafkqaaa after 40 of 100 bytes",
        ),
        (b"", "cannot reach the IPFS API at .*: connection closed by the node"),
        (
            b'HTTP/1.0 500 Internal Server Error\r\n\r\n{"Message": "block was not found"}',
            "refused to read bafkqaaa: block was not found",
        ),
        (b"SSH-2.0-OpenSSH\r\n\r\n", "cannot reach the IPFS API at .*: not an HTTP response"),
    ],
)
def test_cat_errors_are_ipfs_errors(reply: bytes, message: str) -> None:
    server = OneShotServer(reply)
    try:
        with pytest.raises(IPFSError, match=message):
            IPFS(f"/ip4/127.0.0.1/tcp/{server.port}", timeout=5).cat("bafkqaaa", 0, 100)
    finally:
        server.close()


@pytest.mark.parametrize("chunker", ["size-1048576", "size-100000"])
def test_small_ranges_come_from_the_leaf_that_holds_them(kubo_api: str, chunker: str) -> None:
    client = IPFS(kubo_api, chunker=chunker)
    try:
        data = pseudo_random(24 * 1024 * 1024 + 12345, seed=chunker.encode())
        cid = client.add(data)
        rng = random.Random(4)
        for _ in range(100):
            offset = rng.randrange(0, len(data))
            length = rng.choice([1, 4096, 65552, 300_000])
            assert client.cat(cid, offset, length) == data[offset : offset + length]
        # Across a leaf edge, at the end, past the end.
        edge = 1048576 if chunker == "size-1048576" else 100000
        assert client.cat(cid, edge - 10, 20) == data[edge - 10 : edge + 10]
        assert client.cat(cid, len(data) - 5, 4096) == data[-5:]
        assert client.cat(cid, len(data), 10) == b""
        assert client._dag  # the inner nodes were looked at, and kept
    finally:
        client.close()


def test_cid_codecs() -> None:
    assert _cid_codec("QmYwAPJzv5CZsnA625s3Xf2nemtYgPpHdWEz79ojWnPbdG") == 0x70
    assert _cid_codec("bafybeif4u2bfviit4tgq7i6qnjhazq7pnm4p5lw2rqirs6nxwgpy2rnz6m") == 0x70
    assert _cid_codec("bafkqaaa") == 0x55
    assert _cid_codec("zb2rhe5P4gXftAwvA4eXQ5HJwsER2owDyS9sKaQRRVQPn93bA") is None
    assert _cid_codec("b!!") is None


class KeepAliveServer:
    """Answers each request on a connection with the next of `replies`, then closes it."""

    def __init__(self, replies: list[bytes], per_connection: int) -> None:
        self.replies, self.per_connection = replies, per_connection
        self.connections = 0
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.port = self.sock.getsockname()[1]
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.connections += 1
            with conn:
                for _ in range(self.per_connection):
                    request = b""
                    while b"\r\n\r\n" not in request:
                        more = conn.recv(65536)
                        if not more:
                            break
                        request += more
                    if not request:
                        break
                    conn.sendall(self.replies.pop(0))

    def close(self) -> None:
        self.sock.close()


# A small range inside a leaf goes over a kept-alive connection: make the client believe
# that the (fake) file QmRoot… has one leaf, the identity CID, so no dag/get is needed.
FAKE_ROOT = "Qm" + "R" * 44


def leaf_client(port: int) -> IPFS:
    client = IPFS(f"/ip4/127.0.0.1/tcp/{port}", timeout=5)
    client._dag[FAKE_ROOT] = (("bafkqaaa", 1000),)
    return client


def chunked(body: bytes, trailer: bytes = b"") -> bytes:
    return (
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTrailer: X-Stream-Error\r\n"
        + b"X-Content-Length: %d\r\n\r\n" % len(body)
        + b"".join(b"%x\r\n%s\r\n" % (4, body[i : i + 4]) for i in range(0, len(body), 4))
        + b"0\r\n" + trailer + b"\r\n"
    )  # fmt: skip


def test_small_cats_reuse_a_connection_and_survive_its_close() -> None:
    # Two answers on the first connection, then it is closed: the third cat retries.
    server = KeepAliveServer([chunked(b"abcdefgh"), chunked(b"ijkl"), chunked(b"mnop")], 2)
    client = leaf_client(server.port)
    try:
        assert client.cat(FAKE_ROOT, 10, 8) == b"abcdefgh"
        assert client.cat(FAKE_ROOT, 20, 4) == b"ijkl"
        assert client.cat(FAKE_ROOT, 30, 4) == b"mnop"
        assert server.connections == 2
    finally:
        client.close()
        server.close()


@pytest.mark.parametrize(
    ("reply", "message"),
    [
        (chunked(b"abcd", b"X-Stream-Error: disk on fire\r\n"), "stopped sending .*disk on fire"),
        (chunked(b"abcd")[:-20], "cannot reach the IPFS API at .*: connection closed by"),
        (
            b"HTTP/1.1 500 Internal Server Error\r\nContent-Length: 28\r\n\r\n"
            b'{"Message": "no such block"}',
            "refused to read Qm.*: no such block",
        ),
    ],
)
def test_small_cat_errors_are_ipfs_errors(reply: bytes, message: str) -> None:
    server = KeepAliveServer([reply], 1)
    client = leaf_client(server.port)
    try:
        with pytest.raises(IPFSError, match=message):
            client.cat(FAKE_ROOT, 10, 8)
    finally:
        client.close()
        server.close()


def test_small_cat_from_a_silent_node_times_out(silent_server: SilentServer) -> None:
    client = IPFS(f"/ip4/127.0.0.1/tcp/{silent_server.port}", timeout=1)
    client._dag[FAKE_ROOT] = (("bafkqaaa", 1000),)
    with pytest.raises(IPFSError, match=r"did not answer within 1 s \(while trying to read"):
        client.cat(FAKE_ROOT, 0, 10)


def test_iterator_reader_hands_chunks_on_whole_and_reads_all_without_a_size() -> None:
    first, second = b"a" * 10, b"b" * 5
    reader = IteratorReader([first, second, b"tail"])
    assert reader.read(100) is first  # the chunk itself: no copy on the upload path
    assert reader.read(3) == b"bbb" and reader.read(100) == b"bb"
    assert IteratorReader([first, second, b"tail"]).read() == first + second + b"tail"
    assert IteratorReader([first, second]).read(-1) == first + second
    assert reader.read(100) == b"tail" and reader.read(100) == b""
