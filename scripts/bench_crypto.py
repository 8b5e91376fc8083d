#!/usr/bin/env python3
"""Micro-benchmark of the security core; prints a markdown table. Not a test: numbers vary.

Compares the STREAM format's throughput with raw AES-256-GCM on 64 KiB segments (the ceiling),
and times wrap/unwrap per recipient kind and the key-file unlock at the default scrypt cost.

Usage: scripts/bench_crypto.py [--mib N]
"""

from __future__ import annotations

import argparse
import os
import random
import time
from collections.abc import Callable, Iterator

from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from medfs import format as fmt
from medfs import identity, layout, recipients
from medfs.recipients import Kind

SEG = layout.SEGMENT_SIZE


def best_of(runs: int, action: Callable[[], object]) -> float:
    """The fastest of `runs` timings: the least disturbed by the rest of the machine."""
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        action()
        times.append(time.perf_counter() - start)
    return min(times)


def _repeat(runs: int, function: Callable[..., object], *args: object) -> Callable[[], None]:
    def action() -> None:
        for _ in range(runs):
            function(*args)

    return action


def chunks(data: bytes, size: int) -> Iterator[bytes]:
    view = memoryview(data)
    for i in range(0, len(data), size):
        yield bytes(view[i : i + size])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--mib", type=int, default=64, help="payload size (default 64 MiB)")
    args = parser.parse_args()
    size = args.mib * 1024 * 1024
    data = os.urandom(size)
    key = fmt.new_content_key()
    obj = fmt.encrypt_bytes(key, data)
    mib = size / (1024 * 1024)
    rows: list[tuple[str, str]] = []

    def rate(seconds: float) -> str:
        return f"{mib / seconds:,.0f} MiB/s"

    aead = AESGCM(os.urandom(32))
    nonce = bytes(12)
    segments = [data[i : i + SEG] for i in range(0, size, SEG)]
    sealed = [aead.encrypt(nonce, s, None) for s in segments]

    # Outputs are dropped at once, as the streaming APIs' consumers do, so both sides pay the
    # same allocation costs.
    def raw_seal() -> None:
        for segment in segments:
            aead.encrypt(nonce, segment, None)

    def raw_open() -> None:
        for segment in sealed:
            aead.decrypt(nonce, segment, None)

    def stream_encrypt() -> int:
        return sum(map(len, fmt.encrypt(key, chunks(data, 1 << 20))))

    def stream_decrypt(chunk: int) -> int:
        return sum(map(len, fmt.decrypt(key, chunks(obj, chunk))))

    rows.append(("raw AES-256-GCM seal, 64 KiB segments", rate(best_of(3, raw_seal))))
    rows.append(("raw AES-256-GCM open, 64 KiB segments", rate(best_of(3, raw_open))))
    rows.append(("format.encrypt, 1 MiB chunks in", rate(best_of(3, stream_encrypt))))
    rows.append(
        ("format.decrypt, 1 MiB chunks in", rate(best_of(3, lambda: stream_decrypt(1 << 20))))
    )
    rows.append(("format.decrypt, 4 KiB chunks in", rate(best_of(3, lambda: stream_decrypt(4096)))))

    def fetch(offset: int, length: int) -> bytes:
        return obj[offset : offset + length]

    reader = fmt.ObjectReader(key, fetch, len(obj))
    rng = random.Random(1)
    offsets = [rng.randrange(0, size - (1 << 20)) for _ in range(int(mib))]
    rows.append(
        (
            "ObjectReader.read, random 1 MiB ranges",
            rate(best_of(3, lambda: [reader.read(o, 1 << 20) for o in offsets])),
        )
    )
    small = [rng.randrange(0, size - 4096) for _ in range(2000)]
    per_read = best_of(3, lambda: [reader.read(o, 4096) for o in small]) / len(small)
    rows.append(("ObjectReader.read, random 4 KiB (latency)", f"{per_read * 1e6:,.0f} µs/read"))
    overhead = f"{layout.TAG_SIZE} B ({layout.TAG_SIZE / SEG:.3%})"
    rows.append(("overhead", f"{overhead} per segment, {layout.HEADER_SIZE} B header per object"))

    context = recipients.entry_context(b"bench", os.urandom(32))
    content_key = os.urandom(32)
    for kind in Kind:
        me = identity.Identity.generate(kind)
        runs = 50 if kind is Kind.RSA_OAEP else 200
        stanza = recipients.wrap(content_key, me.public.recipient(), context)
        wrap_s = best_of(
            5, _repeat(runs, recipients.wrap, content_key, me.public.recipient(), context)
        )
        unwrap_s = best_of(5, _repeat(runs, me.unwrap, stanza, context))
        size = len(stanza.to_text())
        rows.append((f"wrap {kind.value}", f"{wrap_s / runs * 1e3:.3f} ms ({size} B stanza text)"))
        rows.append((f"unwrap {kind.value}", f"{unwrap_s / runs * 1e3:.3f} ms"))

    me = identity.Identity.generate(Kind.X25519)
    text = identity.encrypt_identity(me, "bench passphrase")
    unlock = best_of(2, lambda: identity.decrypt_identity(text, "bench passphrase"))
    rows.append(
        (f"key file unlock, scrypt 2^{identity.DEFAULT_SCRYPT_LOG2_N}", f"{unlock * 1e3:,.0f} ms")
    )

    print(f"payload {mib:.0f} MiB, best of several runs, one core\n")
    print("| measurement | result |")
    print("| --- | --- |")
    for name, value in rows:
        print(f"| {name} | {value} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
