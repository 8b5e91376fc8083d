#!/usr/bin/env python3
"""medfs benchmarks. Every figure is reported next to a baseline measured in the same run.

Sections:
  adapter  add/cat of a stream through medfs's IPFS adapter against `ipfs add`/`ipfs cat`
           of the same bytes on the same node.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from medfs.ipfs import DEFAULT_CHUNKER, IPFS
from medfs.kubo import EmbeddedNode

MiB = 1 << 20


def timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def file_chunks(path: Path, size: int = MiB) -> Iterator[bytes]:
    with open(path, "rb") as fh:
        while chunk := fh.read(size):
            yield chunk


def bench_adapter(node: EmbeddedNode, api: str, size: int, work: Path) -> list[dict[str, object]]:
    ipfs = IPFS(api, timeout=300)
    src = work / "payload"
    with open(src, "wb") as fh:
        for _ in range(size // MiB):
            fh.write(os.urandom(MiB))
    env = {**os.environ, "IPFS_PATH": str(node.repo)}
    binary = str(node.binary)

    cid_cli = ""

    def cli_add() -> None:
        nonlocal cid_cli
        out = subprocess.run(
            [
                binary,
                "add",
                "-Q",
                "--cid-version=1",
                "--raw-leaves",
                f"--chunker={DEFAULT_CHUNKER}",
                str(src),
            ],
            env=env,
            capture_output=True,
            text=True,
            check=True,
        )
        cid_cli = out.stdout.strip()

    cid_adapter = ""

    def adapter_add() -> None:
        nonlocal cid_adapter
        cid_adapter = ipfs.add(file_chunks(src))

    def cli_cat() -> None:
        subprocess.run([binary, "cat", cid_cli], env=env, stdout=subprocess.DEVNULL, check=True)

    def adapter_cat() -> None:
        step = 8 * MiB
        for offset in range(0, size, step):
            ipfs.cat(cid_adapter, offset, step)

    rows = []
    # Baselines first, then the adapter, each after a warm-up of the same kind.
    t_cli_add = timed(cli_add)
    ipfs.unpin(cid_cli)
    ipfs.gc()
    t_cli_add = min(t_cli_add, timed(cli_add))
    t_add = timed(adapter_add)
    assert cid_adapter == cid_cli, "adapter and CLI must produce the same CID"
    ipfs.unpin(cid_cli)
    ipfs.gc()
    t_add = min(t_add, timed(adapter_add))
    t_cli_cat = min(timed(cli_cat), timed(cli_cat))
    t_cat = min(timed(adapter_cat), timed(adapter_cat))
    mb = size / MiB
    for name, t, base_name, base in (
        (f"adapter add of a {mb:.0f} MiB stream", t_add, "ipfs add", t_cli_add),
        ("adapter cat of it in 8 MiB ranges", t_cat, "ipfs cat", t_cli_cat),
    ):
        rows.append(
            {
                "measure": name,
                "MiB/s": round(mb / t, 1),
                "baseline": base_name,
                "baseline MiB/s": round(mb / base, 1),
                "ratio": round(base / t, 2),
            }
        )
    ipfs.unpin(cid_adapter)
    ipfs.gc()
    ipfs.close()
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="small sizes, under two minutes")
    parser.add_argument("--json", default="bench-results/bench.json", help="where to write JSON")
    args = parser.parse_args()
    size = (32 if args.quick else 256) * MiB
    with tempfile.TemporaryDirectory(prefix="medfs-bench-") as tmp:
        work = Path(tmp)
        node = EmbeddedNode(work / "state")
        api = node.ensure_running()
        try:
            rows = bench_adapter(node, api, size, work)
        finally:
            node.stop()
    print("| measure | MiB/s | baseline | baseline MiB/s | ratio |")
    print("|---|---|---|---|---|")
    for r in rows:
        cells = (r["measure"], r["MiB/s"], r["baseline"], r["baseline MiB/s"], f"{r['ratio']}x")
        print("| " + " | ".join(str(c) for c in cells) + " |")
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"quick": args.quick, "rows": rows}, indent=2))
    print(f"\nJSON: {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
