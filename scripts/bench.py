#!/usr/bin/env python3
"""medfs benchmarks. Every figure is reported next to a baseline measured in the same run.

Sections:
  adapter  add/cat of a stream through medfs's IPFS adapter against `ipfs add`/`ipfs cat`
           of the same bytes on the same node.
  mount    `cp` of a big file into a medfs mount until it is durable (close returned: the
           version is added, pinned and committed), and `cat` of it back with the page cache
           dropped, against `ipfs add` / `ipfs cat` of the same bytes on the same node.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
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


def _drop_caches() -> None:
    subprocess.run(["sync"], check=True)
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
    except OSError:
        print("bench: cannot drop the page cache (not root?): read figures include it")


def _payload(work: Path, size: int) -> Path:
    src = work / f"payload-{size}"
    if not src.exists():
        with open(src, "wb") as fh:
            for _ in range(size // MiB):
                fh.write(os.urandom(MiB))
    return src


def bench_mount(node: EmbeddedNode, api: str, size: int, work: Path) -> list[dict[str, object]]:
    src = _payload(work, size)
    state, mnt = work / "mount-state", work / "mnt"
    mnt.mkdir(exist_ok=True)
    env = {
        **os.environ,
        "MEDFS_STATE": str(state),
        "MEDFS_PASSPHRASE": "bench",
        "IPFS_PATH": str(node.repo),
    }
    medfs = [sys.executable, "-m", "medfs"]
    binary = str(node.binary)

    def run(*argv: str, out: int | None = None) -> str:
        done = subprocess.run(argv, env=env, check=True, stdout=out or subprocess.PIPE, text=True)
        return done.stdout or ""

    run(*medfs, "init")
    run(*medfs, "mount", str(mnt), "--api", api)
    try:
        t_cp = timed(lambda: run("cp", str(src), str(mnt / "big")))
        t_umount = timed(lambda: run(*medfs, "umount", str(mnt)))
        run(*medfs, "mount", str(mnt), "--api", api)
        _drop_caches()
        t_cat = timed(lambda: run("cat", str(mnt / "big"), out=subprocess.DEVNULL))
    finally:
        subprocess.run([*medfs, "umount", str(mnt)], env=env, check=False, capture_output=True)
    cid = ""

    def cli_add() -> None:
        nonlocal cid
        cid = run(binary, "add", "-Q", "--cid-version=1", "--raw-leaves",
                  f"--chunker={DEFAULT_CHUNKER}", str(src)).strip()  # fmt: skip

    t_add = timed(cli_add)
    _drop_caches()
    t_ipfs_cat = timed(lambda: run(binary, "cat", cid, out=subprocess.DEVNULL))
    mb = size / MiB
    return [
        {"measure": f"cp of a {mb:.0f} MiB file into the mount, until durable",
         "MiB/s": round(mb / t_cp, 1), "baseline": "ipfs add",
         "baseline MiB/s": round(mb / t_add, 1), "ratio": round(t_add / t_cp, 2)},
        {"measure": f"... and cp plus medfs umount ({t_umount:.2f} s)",
         "MiB/s": round(mb / (t_cp + t_umount), 1), "baseline": "ipfs add",
         "baseline MiB/s": round(mb / t_add, 1), "ratio": round(t_add / (t_cp + t_umount), 2)},
        {"measure": f"cat of it back, page cache dropped ({mb:.0f} MiB)",
         "MiB/s": round(mb / t_cat, 1), "baseline": "ipfs cat",
         "baseline MiB/s": round(mb / t_ipfs_cat, 1), "ratio": round(t_ipfs_cat / t_cat, 2)},
    ]  # fmt: skip


SECTIONS = {"adapter": bench_adapter, "mount": bench_mount}


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="small sizes, under two minutes")
    parser.add_argument("--json", default="bench-results/bench.json", help="where to write JSON")
    parser.add_argument(
        "--only", choices=sorted(SECTIONS), action="append", help="run only these sections"
    )
    args = parser.parse_args()
    sizes = {"adapter": 256 * MiB, "mount": 1024 * MiB}
    if args.quick:
        sizes = {"adapter": 32 * MiB, "mount": 64 * MiB}
    rows: list[dict[str, object]] = []
    with tempfile.TemporaryDirectory(prefix="medfs-bench-") as tmp:
        work = Path(tmp)
        node = EmbeddedNode(work / "state")
        api = node.ensure_running()
        try:
            for name in args.only or list(SECTIONS):
                rows += SECTIONS[name](node, api, sizes[name], work)
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
