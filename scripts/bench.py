#!/usr/bin/env python3
"""medfs benchmarks (issue #8). Every figure is reported next to a baseline measured in the same
run on the same embedded node, as a ratio, and checked against its target where there is one.

Sections (run in this order; --only picks some, and a section measures what it needs):
  adapter    add/cat of a stream through medfs's IPFS adapter against `ipfs add`/`ipfs cat`
             of the same bytes on the same node.
  mount      `cp` of a big file (1 GiB) into a medfs mount until it is durable (close returned:
             the version is added, pinned and committed), and `cat` of it back with the page
             cache dropped, from its local copy and from the node (the copy set aside),
             against `ipfs add` / `ipfs cat` of the same bytes. Each is timed three times in
             turn with its baseline, and the medians compared.
  random     1,000 random 4 KiB O_DIRECT preads in that file on a fresh mount (empty segment
             cache, page cache dropped), from the local copy and from the node: p50/p99 and
             segments fetched per read, against fetching the whole object per read (what
             whole-file encryption must do).
  tree       `cp -r` of 2,000 files of 16 KiB until durable against `ipfs add -r`; `ls -lR`
             and `find` over them (fresh mount, caches dropped) against the same on local disk.
  rss        peak RSS of the mount daemon while copying a 4 GiB file, next to a 1 GiB file.
  share      `medfs share` of 1,000 files with a new recipient: done by the running mount, and
             by the command alone (no mount).
  revoke     `medfs revoke` of one recipient from the big file against `cp` of it.
  gocryptfs  gocryptfs on local disk: the same big write (+ fsync), and its cold read in turn
             with medfs's, three times each.
  ceilings   raw AES-256-GCM, SHA-256, and a no-op pyfuse3 filesystem (scripts/noop_fs.py):
             each medfs throughput as a fraction of them, and the tree's `cp -r` through the
             no-op filesystem: medfs's copy as a fraction of that speed.

--quick scales every size down so that the whole run takes under two minutes.
Needs root for dropping the page cache (/proc/sys/vm/drop_caches) and for FUSE.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import platform
import random
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from medfs import layout
from medfs.ipfs import DEFAULT_CHUNKER, IPFS
from medfs.kubo import EmbeddedNode

KiB = 1 << 10
MiB = 1 << 20
GiB = 1 << 30
SEG = layout.SEGMENT_SIZE
PASSPHRASE = "bench"
FILES_PER_DIR = 100
XATTR_CID = "user.medfs.cid"
XATTR_STATS = "user.medfs.stats"
NOOP_FS = Path(__file__).resolve().parent / "noop_fs.py"


class BenchError(Exception):
    """Something went wrong: the run stops and says what, rather than report a wrong figure."""


@dataclass(frozen=True)
class Sizes:
    adapter: int
    big: int  # the "1 GiB file" of the mount, random, revoke and gocryptfs sections
    big_rounds: int  # its cp and ipfs add are timed this many times each, in turn
    read_rounds: int  # its cold reads (and each one's baseline) are timed this many times, in turn
    random_reads: int
    whole_fetches: int
    small_files: int
    small_size: int
    tree_rounds: int  # its cp -r and ipfs add -r are timed this many times each, in turn
    share_files: int
    share_rounds: int  # shares timed, each with a new recipient; and as many `medfs grants`
    rss_small: int
    rss_big: int
    noop: int
    crypto: int

    @classmethod
    def full(cls) -> Sizes:
        return cls(
            adapter=256 * MiB, big=GiB, big_rounds=3, read_rounds=3, random_reads=1000,
            whole_fetches=10,
            small_files=2000, small_size=16 * KiB, tree_rounds=3, share_files=1000, share_rounds=3,
            rss_small=GiB, rss_big=4 * GiB, noop=GiB, crypto=256 * MiB,
        )  # fmt: skip

    @classmethod
    def quick(cls) -> Sizes:
        return cls(
            adapter=32 * MiB, big=64 * MiB, big_rounds=1, read_rounds=1, random_reads=100,
            whole_fetches=3,
            small_files=200, small_size=16 * KiB, tree_rounds=1, share_files=100, share_rounds=1,
            rss_small=64 * MiB, rss_big=256 * MiB, noop=256 * MiB, crypto=64 * MiB,
        )  # fmt: skip


@dataclass
class Row:
    section: str
    measure: str
    value: float
    unit: str
    baseline: str = ""
    baseline_value: float | None = None
    # medfs against the baseline: "throughput" (medfs / baseline, > 1 is faster), "time" or
    # "memory" (medfs / baseline, < 1 is faster/smaller), "of ceiling" (medfs's speed as a
    # fraction of the ceiling's: medfs / ceiling for a throughput, ceiling / medfs for a time).
    ratio: float | None = None
    ratio_of: str = ""
    target: str = "reported"
    met: bool | None = None
    details: dict[str, object] = field(default_factory=dict)


def size_label(n: int) -> str:
    return f"{n // GiB} GiB" if n >= GiB and n % GiB == 0 else f"{n / MiB:.0f} MiB"


def timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def file_chunks(path: Path, size: int = MiB) -> Iterator[bytes]:
    with open(path, "rb") as fh:
        while chunk := fh.read(size):
            yield chunk


def say(message: str) -> None:
    print(f"bench: {message}", file=sys.stderr, flush=True)


class Bench:
    """One run: the node, a medfs state directory shared by the sections, and the figures
    that later sections compare against (the big file's cp and cat times)."""

    def __init__(self, node: EmbeddedNode, api: str, work: Path, sizes: Sizes) -> None:
        self.node, self.api, self.work, self.sizes = node, api, work, sizes
        self.binary = str(node.binary)
        self.state = work / "medfs-state"
        self.mnt = work / "mnt"
        self.mnt.mkdir(exist_ok=True)
        self.env = {
            **os.environ,
            "MEDFS_STATE": str(self.state),
            "MEDFS_PASSPHRASE": PASSPHRASE,
            "IPFS_PATH": str(node.repo),
        }
        # Every medfs command talks to the run's node; without this, share and revoke would
        # start the state directory's own embedded node, which has none of the data.
        self.env["MEDFS_IPFS_API"] = api
        self.figures: dict[str, float] = {}
        self.cat_stats: dict[str, dict[str, int]] = {}  # the mount's counters after each cat
        # Each round's time, medfs and baseline, of the big write and of the tree.
        self.big_rounds: dict[str, list[float]] = {}
        self.read_rounds: dict[str, list[float]] = {}  # the cold cats, medfs's and `ipfs cat`'s
        self.tree_rounds: dict[str, list[float]] = {}
        self.create_us: dict[str, float] = {}  # `create_cost_us` where the tree's files go
        self.caches_dropped = True

    # -- processes --------------------------------------------------------------------------

    def run(self, *argv: str, stdout: int | None = None, timeout: float = 7200) -> str:
        """Run a command; raise BenchError with its stderr if it fails."""
        try:
            done = subprocess.run(
                argv, env=self.env, stdout=stdout if stdout is not None else subprocess.PIPE,
                stderr=subprocess.PIPE, text=True, timeout=timeout, check=False,
            )  # fmt: skip
        except subprocess.TimeoutExpired as err:
            raise BenchError(f"{' '.join(argv)} did not finish in {timeout:.0f} s") from err
        if done.returncode != 0:
            raise BenchError(
                f"{' '.join(argv)} failed (exit {done.returncode}): {done.stderr.strip()[-2000:]}"
            )
        return done.stdout or ""

    def medfs(self, *args: str) -> str:
        return self.run(sys.executable, "-m", "medfs", *args)

    def ipfs(self, *args: str, stdout: int | None = None) -> str:
        return self.run(self.binary, *args, stdout=stdout)

    def ipfs_add(self, path: Path, *extra: str) -> str:
        out = self.ipfs("add", "-Q", "--cid-version=1", "--raw-leaves",
                        f"--chunker={DEFAULT_CHUNKER}", *extra, str(path))  # fmt: skip
        return out.strip()

    def unpin_gc(self, *cids: str) -> None:
        for cid in cids:
            self.ipfs("pin", "rm", cid)
        self.ipfs("repo", "gc", "-q", stdout=subprocess.DEVNULL)

    def drop_caches(self) -> None:
        subprocess.run(["sync"], check=True)
        try:
            Path("/proc/sys/vm/drop_caches").write_text("3\n")
        except OSError:
            if self.caches_dropped:
                say("cannot drop the page cache (not root?): cold figures include it")
            self.caches_dropped = False

    # -- the medfs mount --------------------------------------------------------------------

    def mount(self) -> None:
        if not (self.state / "config.json").exists():
            self.medfs("init")
        self.medfs("mount", str(self.mnt), "--api", self.api)
        if not os.path.ismount(self.mnt):
            raise BenchError(f"medfs mount returned but {self.mnt} is not a mount point")

    def umount(self) -> None:
        out = self.medfs("umount", str(self.mnt))
        if os.path.ismount(self.mnt):
            raise BenchError(f"medfs umount returned but {self.mnt} is still mounted: {out}")

    def daemon_pid(self) -> int:
        text = (self.state / "mount.lock").read_text()
        return int(json.loads(text)["pid"])

    def force_unmount(self) -> None:
        """After a failure: never leave a mount or a daemon behind."""
        if not os.path.ismount(self.mnt):
            return
        pid = None
        with contextlib.suppress(OSError, ValueError, KeyError):
            pid = self.daemon_pid()
        with contextlib.suppress(BenchError):
            self.umount()
        if os.path.ismount(self.mnt):
            subprocess.run(["fusermount3", "-u", "-z", str(self.mnt)], check=False)
        if pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)

    @contextlib.contextmanager
    def mounted(self, *, copies: bool = True) -> Iterator[Path]:
        """A fresh mount (empty segment cache), unmounted at the end, loudly if that fails.
        Without `copies`, the local copies are set aside while it runs: reads go to the node."""
        with contextlib.ExitStack() as stack:
            if not copies:
                stack.enter_context(self.copies_aside())
            self.mount()
            try:
                yield self.mnt
            except BaseException:
                self.force_unmount()
                raise
            self.umount()

    @contextlib.contextmanager
    def copies_aside(self) -> Iterator[None]:
        """Move the state's local copies out of the mount's sight (it must not be running)."""
        copies, aside = self.state / "copies", self.work / "copies-aside"
        if copies.exists():
            copies.rename(aside)
        try:
            yield
        finally:
            if aside.exists():
                shutil.rmtree(copies, ignore_errors=True)  # the empty one the mount made
                aside.rename(copies)

    def mount_stats(self) -> dict[str, int]:
        try:
            return dict(json.loads(os.getxattr(self.mnt, XATTR_STATS)))
        except OSError as err:
            raise BenchError(
                f"the mount has no {XATTR_STATS} counters ({err.strerror}): this medfs cannot "
                "say how many segments a read fetched"
            ) from err

    # -- inputs -----------------------------------------------------------------------------

    def payload(self, size: int) -> Path:
        """A local file of `size` random bytes (so nothing compresses or deduplicates)."""
        src = self.work / f"payload-{size}"
        if not src.exists():
            with open(src, "wb") as fh:
                for _ in range(size // MiB):
                    fh.write(os.urandom(MiB))
                # On disk now: written back later, it would slow whichever run came 30 s on.
                fh.flush()
                os.fsync(fh.fileno())
        return src

    def tree(self) -> Path:
        """small_files random files of small_size bytes, FILES_PER_DIR to a directory."""
        top = self.work / "tree"
        if not top.exists():
            n = self.sizes.small_files
            for i in range(n):
                d = top / f"d{i // FILES_PER_DIR:03d}"
                if i % FILES_PER_DIR == 0:
                    d.mkdir(parents=True)
                (d / f"f{i:05d}.dat").write_bytes(os.urandom(self.sizes.small_size))
        return top

    def key(self, name: str) -> Path:
        pub = self.work / f"{name}.pub"
        if not pub.exists():
            self.medfs("keygen", "--out", str(self.work / name))
        return pub

    # -- figures shared between sections ----------------------------------------------------

    def big_figures(self) -> dict[str, float]:
        """cp of the big file into the mount until durable, and medfs umount; `ipfs add` of
        the same bytes, the write's baseline."""
        size = self.sizes.big
        if "cp_s" not in self.figures:
            src = self.payload(size)
            adds, cps, umounts = [], [], []
            # Rounds of the baseline and medfs in turn, and the median of each: on two cores
            # one figure moves 10-20% from run to run, and both see the machine alike.
            for n in range(self.sizes.big_rounds):
                # New blocks for the node, the source in the page cache: as for cp. Nothing
                # of the round before (the node's blocks, medfs's local copy) left for the
                # disk to write while either is timed.
                os.sync()
                start = time.perf_counter()
                cid = self.ipfs_add(src)
                adds.append(time.perf_counter() - start)
                self.unpin_gc(cid)
                target = self.mnt / ("big" if n == 0 else f"big-{n}")
                self.mount()
                try:
                    os.sync()
                    start = time.perf_counter()
                    self.run("cp", str(src), str(target))
                    cps.append(time.perf_counter() - start)
                    got = target.stat().st_size
                    if got != size:
                        raise BenchError(f"the copy in the mount has {got} bytes, not {size}")
                    if n:
                        target.unlink()  # the other sections use the first copy
                except BaseException:
                    self.force_unmount()
                    raise
                umounts.append(timed(self.umount))
            self.figures["add_s"] = statistics.median(adds)
            self.figures["cp_s"] = statistics.median(cps)
            self.figures["umount_s"] = statistics.median(umounts)
            self.big_rounds = {"cp_s": cps, "add_s": adds}
        self.figures["cp_MiBps"] = size / MiB / self.figures["cp_s"]
        return self.figures

    def read_figures(self) -> dict[str, float]:
        """Cold cats of the big file, from its local copy and from the node, and `ipfs cat`
        of the same bytes; with `big_figures`. Taken before the revoke section re-keys the
        file, which leaves it without a local copy."""
        size = self.sizes.big
        self.big_figures()
        if "cat_s" not in self.figures:
            # Rounds in turn, as for the write: within minutes the same cold read here moved
            # from 476 to 708 MiB/s (gocryptfs) and `ipfs cat` from 284 to 347.
            plain = self.ipfs_add(self.payload(size))  # the same bytes, added plainly
            rounds: dict[str, list[float]] = {"ipfs_cat_s": [], "cat_s": [], "cat_node_s": []}
            for _ in range(self.sizes.read_rounds):
                self.drop_caches()
                rounds["ipfs_cat_s"].append(
                    timed(lambda: self.ipfs("cat", plain, stdout=subprocess.DEVNULL))
                )
                rounds["cat_s"].append(self.cold_cat(copies=True))
                rounds["cat_node_s"].append(self.cold_cat(copies=False))
            self.unpin_gc(plain)
            for key, times in rounds.items():
                self.figures[key] = statistics.median(times)
            self.read_rounds = rounds
        self.figures["cat_MiBps"] = size / MiB / self.figures["cat_s"]
        return self.figures

    def cold_cat(self, *, copies: bool, name: str = "big") -> float:
        """Seconds for `cat` of the big file through a fresh mount, the page cache dropped:
        from its local copy (checked: no read went to the node), or with the copies set aside."""
        key = "cat_s" if copies else "cat_node_s"
        with self.mounted(copies=copies) as mnt:
            self.drop_caches()
            seconds = timed(lambda: self.run("cat", str(mnt / name), stdout=subprocess.DEVNULL))
            got = self.mount_stats()
        self.cat_stats[key] = got
        if copies and got.get("copy_reads") != got["fetches"]:
            raise BenchError(f"the big file's cat did not come from its local copy alone: {got}")
        return seconds

    def tree_figures(self) -> dict[str, float]:
        """cp -r of the small-file tree into the mount, until durable: small files are
        committed in groups after their close, and `sync DIR` (fsync of the directory)
        returns once every one is pinned and committed. Timed `tree_rounds` times, in turn
        with `ipfs add -r` of the same tree, each into a fresh mount; the medians compare."""
        if "tree_cp_s" not in self.figures:
            tree = self.tree()
            adds: list[float] = []
            cps: list[float] = []
            syncs: list[float] = []  # of each cp's time, the wait in `sync DIR` after it
            for n in range(self.sizes.tree_rounds):
                start = time.perf_counter()
                cid = self.ipfs_add(tree, "-r")
                adds.append(time.perf_counter() - start)
                self.unpin_gc(cid)
                target = self.mnt / ("tree" if n == 0 else f"tree-{n}")
                with self.mounted():
                    start = time.perf_counter()
                    self.run("cp", "-r", str(tree), str(target))
                    copied = time.perf_counter()
                    self.run("sync", str(target))
                    cps.append(time.perf_counter() - start)
                    syncs.append(time.perf_counter() - copied)
                    stats = self.mount_stats()
                    if stats.get("pending") or stats.get("deferred"):
                        raise BenchError(f"cp -r left versions uncommitted: {stats}")
                    if n:
                        shutil.rmtree(target)  # the other sections use the first copy
            self.figures["tree_cp_s"] = statistics.median(cps)
            self.figures["tree_add_s"] = statistics.median(adds)
            self.tree_rounds = {"cp_s": cps, "sync_s": syncs, "add_s": adds}
            # Where each small file's new inode is made: medfs's staging copy, Kubo's block.
            self.create_us = {
                "medfs_staging": round(create_cost_us(self.state / "staging"), 1),
                "kubo_blocks": round(create_cost_us(self.node.repo / "blocks"), 1),
            }
        return self.figures


# -- sections ------------------------------------------------------------------------------------


def bench_adapter(b: Bench) -> list[Row]:
    size = b.sizes.adapter
    ipfs = IPFS(b.api, timeout=300)
    src = b.payload(size)
    cid_cli = ""

    def cli_add() -> None:
        nonlocal cid_cli
        cid_cli = b.ipfs_add(src)

    cid_adapter = ""

    def adapter_add() -> None:
        nonlocal cid_adapter
        cid_adapter = ipfs.add(file_chunks(src))

    def cli_cat() -> None:
        b.ipfs("cat", cid_cli, stdout=subprocess.DEVNULL)

    def adapter_cat() -> None:
        step = 8 * MiB
        for offset in range(0, size, step):
            if len(ipfs.cat(cid_adapter, offset, step)) != min(step, size - offset):
                raise BenchError("the adapter's cat returned a short range")

    try:
        # Baselines first, then the adapter, each after a warm-up of the same kind.
        t_cli_add = timed(cli_add)
        b.unpin_gc(cid_cli)
        t_cli_add = min(t_cli_add, timed(cli_add))
        t_add = timed(adapter_add)
        if cid_adapter != cid_cli:
            raise BenchError(f"adapter and CLI gave different CIDs: {cid_adapter} {cid_cli}")
        b.unpin_gc(cid_cli)
        t_add = min(t_add, timed(adapter_add))
        t_cli_cat = min(timed(cli_cat), timed(cli_cat))
        t_cat = min(timed(adapter_cat), timed(adapter_cat))
        b.unpin_gc(cid_adapter)
    finally:
        ipfs.close()
    mb = size / MiB
    return [
        Row("adapter", f"adapter add of a {size_label(size)} stream", mb / t_add, "MiB/s",
            "ipfs add", mb / t_cli_add, t_cli_add / t_add, "throughput"),
        Row("adapter", "adapter cat of it in 8 MiB ranges", mb / t_cat, "MiB/s",
            "ipfs cat", mb / t_cli_cat, t_cli_cat / t_cat, "throughput"),
    ]  # fmt: skip


def bench_mount(b: Bench) -> list[Row]:
    size = b.sizes.big
    f = b.read_figures()
    t_add, t_cat = f["add_s"], f["ipfs_cat_s"]
    reads = b.read_rounds
    of = f" (median of {b.sizes.read_rounds})" if b.sizes.read_rounds > 1 else ""
    mb, label = size / MiB, size_label(size)
    t_both = f["cp_s"] + f["umount_s"]
    return [
        Row("mount", f"cp of a {label} file into the mount, until durable", mb / f["cp_s"],
            "MiB/s", "ipfs add", mb / t_add, t_add / f["cp_s"], "throughput", ">= 0.8x",
            t_add / f["cp_s"] >= 0.8, details={"rounds": b.big_rounds}),
        Row("mount", f"... cp plus medfs umount ({f['umount_s']:.2f} s)", mb / t_both, "MiB/s",
            "ipfs add", mb / t_add, t_add / t_both, "throughput"),
        Row("mount", f"cat of it back, page cache dropped ({label}), from its local copy{of}",
            mb / f["cat_s"], "MiB/s", f"ipfs cat{of}", mb / t_cat, t_cat / f["cat_s"], "throughput",
            ">= 0.8x", t_cat / f["cat_s"] >= 0.8,
            details={"stats": b.cat_stats.get("cat_s"),
                     "rounds": {"cat_s": reads["cat_s"], "ipfs_cat_s": reads["ipfs_cat_s"]}}),
        Row("mount", f"... from the node (the local copy set aside){of}", mb / f["cat_node_s"],
            "MiB/s", f"ipfs cat{of}", mb / t_cat, t_cat / f["cat_node_s"], "throughput", ">= 0.8x",
            t_cat / f["cat_node_s"] >= 0.8,
            details={"rounds": {"cat_s": reads["cat_node_s"], "ipfs_cat_s": reads["ipfs_cat_s"]}}),
    ]  # fmt: skip


def _open_direct(path: Path) -> tuple[int, bool]:
    try:
        return os.open(path, os.O_RDONLY | os.O_DIRECT), True
    except OSError:
        say("O_DIRECT is refused on the mount: random reads go through the page cache")
        return os.open(path, os.O_RDONLY), False


def _random_reads(
    b: Bench, src: Path, offsets: list[int], *, copies: bool
) -> tuple[list[float], list[int], str, bool]:
    """Each read's latency and segments fetched, the big file's CID, and whether O_DIRECT."""
    latencies: list[float] = []
    segments: list[int] = []
    with b.mounted(copies=copies) as mnt:  # fresh: nothing of the file in the segment cache
        cid = os.getxattr(mnt / "big", XATTR_CID).decode()
        b.drop_caches()
        fd, direct = _open_direct(mnt / "big")
        try:
            before = b.mount_stats()
            for offset in offsets:
                start = time.perf_counter()
                data = os.pread(fd, 4 * KiB, offset)
                latencies.append(time.perf_counter() - start)
                if len(data) != 4 * KiB:
                    raise BenchError(f"a 4 KiB read at {offset} returned {len(data)} bytes")
                after = b.mount_stats()  # outside the timed read
                segments.append(after["segments_fetched"] - before["segments_fetched"])
                before = after
                with open(src, "rb") as fh:
                    if data != os.pread(fh.fileno(), 4 * KiB, offset):
                        raise BenchError(f"the read at {offset} returned the wrong bytes")
            served = b.mount_stats().get("copy_reads", 0)
            if bool(served) != copies:
                raise BenchError(f"{served} random reads came from a local copy, copies={copies}")
        finally:
            os.close(fd)
    return latencies, segments, cid, direct


def bench_random(b: Bench) -> list[Row]:
    size, n = b.sizes.big, b.sizes.random_reads
    src = b.payload(size)
    b.big_figures()  # the big file is in the mount
    rng = random.Random(8)
    # Any byte offset, as an application would: about one read in 16 crosses a segment edge.
    offsets = [rng.randrange(0, size - 4 * KiB) for _ in range(n)]
    latencies, segments, cid, direct = _random_reads(b, src, offsets, copies=True)
    node_latencies, node_segments, _, _ = _random_reads(b, src, offsets, copies=False)
    # The baseline: the whole object for every read, from a cold page cache each time.
    whole = []
    for _ in range(b.sizes.whole_fetches):
        b.drop_caches()
        whole.append(timed(lambda: b.ipfs("cat", cid, stdout=subprocess.DEVNULL)))

    def percentiles(seconds: list[float]) -> tuple[float, float]:
        ms = sorted(t * 1e3 for t in seconds)
        return statistics.median(ms), ms[min(len(ms) - 1, round(0.99 * len(ms)) - 1)]

    p50, p99 = percentiles(latencies)
    node_p50, node_p99 = percentiles(node_latencies)
    base = statistics.median(whole) * 1e3
    label = size_label(size)
    how = "O_DIRECT" if direct else "buffered"
    desc = f"{n:,} random 4 KiB {how} preads in the {label} file, cold, from its local copy"
    baseline = f"whole-object ipfs cat per read (median of {len(whole)})"
    most = max(segments + node_segments)
    return [
        Row("random", f"{desc}: p50", p50, "ms", baseline, base, p50 / base, "time",
            "p50 <= 5 ms", p50 <= 5.0),
        Row("random", f"{desc}: p99", p99, "ms", baseline, base, p99 / base, "time"),
        Row("random", "... from the node (the local copy set aside): p50", node_p50, "ms",
            baseline, base, node_p50 / base, "time", "p50 <= 5 ms", node_p50 <= 5.0),
        Row("random", "... from the node: p99", node_p99, "ms", baseline, base,
            node_p99 / base, "time"),
        Row("random", f"segments fetched per read, both passes, max (mean "
            f"{statistics.fmean(segments + node_segments):.2f})", most, "segments",
            target="<= 2", met=most <= 2,
            details={"histogram": {str(k): segments.count(k) for k in sorted(set(segments))},
                     "node_histogram": {str(k): node_segments.count(k)
                                        for k in sorted(set(node_segments))},
                     "ciphertext_segment_bytes": SEG + layout.TAG_SIZE,
                     # Which reads fetched more, and where the read before them ended: a read
                     # close to the previous one is taken for a sequential one (read-ahead).
                     "over_two": [{"read": i, "offset": offsets[i], "segments": k,
                                   "previous_end": offsets[i - 1] + 4 * KiB if i else None}
                                  for i, k in enumerate(segments) if k > 2]}),
    ]  # fmt: skip


def bench_tree(b: Bench) -> list[Row]:
    n, each = b.sizes.small_files, b.sizes.small_size
    tree = b.tree()
    f = b.tree_figures()
    t_add = f["tree_add_s"]

    def cold(*argv: str) -> float:
        b.drop_caches()
        return timed(lambda: b.run(*argv, stdout=subprocess.DEVNULL))

    with b.mounted() as mnt:
        found = b.run("find", str(mnt / "tree"), "-type", "f").split()
        if len(found) != n:
            raise BenchError(f"find sees {len(found)} files in the mount, not {n}")
        ls_m = cold("ls", "-lR", str(mnt / "tree"))
        find_m = cold("find", str(mnt / "tree"))
    ls_l = cold("ls", "-lR", str(tree))
    find_l = cold("find", str(tree))
    what = f"{n:,} files of {each // KiB} KiB"
    rounds = b.sizes.tree_rounds
    of = f" (median of {rounds})" if rounds > 1 else ""
    return [
        Row("tree", f"cp -r of {what}, until durable (cp -r + sync DIR){of}", f["tree_cp_s"],
            "s", f"ipfs add -r{of}", t_add, f["tree_cp_s"] / t_add, "time", "<= 1.5x the time",
            f["tree_cp_s"] / t_add <= 1.5,
            details={"rounds": b.tree_rounds, "create_us": b.create_us}),
        Row("tree", "ls -lR over them, cold (fresh mount, caches dropped)", ls_m, "s",
            "local disk", ls_l, ls_m / ls_l, "time"),
        Row("tree", "find over them, cold", find_m, "s", "local disk", find_l,
            find_m / find_l, "time"),
    ]  # fmt: skip


def create_cost_us(directory: Path, files: int = 200) -> float:
    """CPU microseconds to create, write (16 KiB) and close one new file in `directory`.

    On this machine's ext4 it depends on the block group the directory's inodes come from
    (35-320 us for six new directories side by side), and a small file costs medfs one new
    file (its staging copy) and Kubo one per block: the tree's figures move with it."""
    data = os.urandom(16 * KiB)
    names = [directory / f".bench-probe-{os.urandom(8).hex()}" for _ in range(files)]
    start = time.process_time()
    try:
        for name in names:
            fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            os.write(fd, data)
            os.close(fd)
        return (time.process_time() - start) / files * 1e6
    finally:
        for name in names:
            name.unlink(missing_ok=True)


def _status_kib(pid: int, field_name: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field_name + ":"):
            return int(line.split()[1])
    raise BenchError(f"no {field_name} in /proc/{pid}/status")


def _peak_rss_copying(b: Bench, size: int) -> tuple[float, float, float, float]:
    """(peak RSS MiB, RSS before the copy MiB, copy MiB/s, peak RSS of the mount's start-up
    MiB) of a fresh daemon copying `size`
    bytes in. The source is sparse (zeros cost no disk), copied densely (--sparse=never), so
    the mount sees the same sequential 1 MiB writes as for any other file."""
    src = b.work / f"zeros-{size}"
    with open(src, "wb") as fh:
        fh.truncate(size)
    peak = 0
    stop = threading.Event()
    try:
        with b.mounted() as mnt:
            pid = b.daemon_pid()
            before = _status_kib(pid, "VmRSS")
            # Unlocking the key at mount (scrypt, 256 MiB) set the high-water mark; start it
            # again from here ("5" resets VmHWM, Linux >= 4.0) so that it measures the copy.
            at_mount = _status_kib(pid, "VmHWM")
            try:
                Path(f"/proc/{pid}/clear_refs").write_text("5\n")
                reset = True
            except OSError:
                reset = False

            def sample() -> None:
                nonlocal peak
                while not stop.wait(0.05):
                    with contextlib.suppress(OSError, BenchError):
                        peak = max(peak, _status_kib(pid, "VmRSS"))

            sampler = threading.Thread(target=sample, daemon=True)
            sampler.start()
            target = mnt / f"zeros-{size}"
            t = timed(lambda: b.run("cp", "--sparse=never", str(src), str(target)))
            stop.set()
            sampler.join()
            if reset:  # VmHWM: the kernel's own high-water mark, which sampling can't miss
                peak = max(peak, _status_kib(pid, "VmHWM"))
            if target.stat().st_size != size:
                raise BenchError(f"the copy of {size} bytes has {target.stat().st_size}")
            target.unlink()
    finally:
        stop.set()
        src.unlink()
    b.ipfs("repo", "gc", "-q", stdout=subprocess.DEVNULL)  # give the disk back
    return peak / KiB, before / KiB, size / MiB / t, at_mount / KiB


def bench_rss(b: Bench) -> list[Row]:
    small, big = b.sizes.rss_small, b.sizes.rss_big
    p_small, idle_small, v_small, _ = _peak_rss_copying(b, small)
    p_big, idle_big, v_big, at_mount = _peak_rss_copying(b, big)
    flat = p_big <= p_small * 1.1 + 8  # within 10 % + 8 MiB of the smaller copy's peak
    return [
        Row("rss", f"peak RSS of the mount daemon copying a {size_label(big)} file in "
            f"({v_big:.0f} MiB/s; {idle_big:.0f} MiB before)", p_big, "MiB",
            f"the same for {size_label(small)} ({v_small:.0f} MiB/s; {idle_small:.0f} MiB "
            "before)", p_small, p_big / p_small, "memory",
            "<= 150 MiB, not growing with size", p_big <= 150 and flat,
            {"startup_peak_MiB": at_mount}),
        Row("rss", "peak RSS of the mount daemon while mounting (the key unlock's scrypt)",
            at_mount, "MiB"),
    ]  # fmt: skip


def bench_share(b: Bench) -> list[Row]:
    n, rounds = b.sizes.share_files, b.sizes.share_rounds
    dirs = -(-n // FILES_PER_DIR)
    b.tree_figures()  # the tree is in the mount
    # Identical shares vary by a quarter from one run to the next here: the median of a few,
    # each with a new recipient. While the owner's mount runs, it does the share for the
    # command (no scrypt); with no mount, the command unlocks the key and does it itself.
    by_mount, by_command, fixed = [], [], []
    tops = [f"/tree/d{i:03d}" for i in range(dirs)]

    def share(name: str, paths: list[str]) -> float:
        who, start = b.key(name), time.perf_counter()
        out = b.medfs("share", *paths, "--to", str(who), "--out", str(b.work / f"{name}.share"),
                      "--api", b.api)  # fmt: skip
        took = time.perf_counter() - start
        wrapped = re.search(r"\((\d+) files wrapped\)", out)
        if wrapped is None or int(wrapped.group(1)) != n:
            raise BenchError(f"medfs share did not wrap {n} files: {out.strip()}")
        return took

    with b.mounted() as mnt:
        for k in range(rounds):
            by_mount.append(share(f"bob{k}", [str(mnt) + top for top in tops]))
    for k in range(rounds):
        by_command.append(share(f"dan{k}", tops))
        # The fixed part of a command that unlocks the key: interpreter start and scrypt.
        fixed.append(timed(lambda: b.medfs("grants", "--json", "--api", b.api)))
    t_mount, t_command = statistics.median(by_mount), statistics.median(by_command)
    t_fixed = statistics.median(fixed)
    of = f" (median of {rounds})" if rounds > 1 else ""
    fixed_label = f"medfs grants (start + key unlock only){of}"
    return [
        Row("share", f"medfs share of {n:,} files with a new recipient, done by the running"
            f" mount{of}", t_mount, "s", fixed_label, t_fixed, t_mount / t_fixed, "time",
            "<= 2 s", t_mount <= 2.0),
        Row("share", f"... with no mount running (the command unlocks the key){of}",
            t_command, "s", fixed_label, t_fixed, t_command / t_fixed, "time", "reported",
            None),
    ]  # fmt: skip


def bench_revoke(b: Bench) -> list[Row]:
    # The big file is in the mount; its cp time is the baseline. Its cold reads come first:
    # they need its local copy, and the revoke re-keys it without one.
    f = b.read_figures()
    carol = b.key("carol")
    with b.mounted() as mnt:
        big = str(mnt / "big")
        b.medfs("share", big, "--to", str(carol), "--out", str(b.work / "carol.share"),
                "--api", b.api)  # fmt: skip
        old = os.getxattr(mnt / "big", XATTR_CID).decode()
        out = ""

        def revoke() -> None:
            nonlocal out
            out = b.medfs("revoke", big, "--from", str(carol), "--out", str(b.work / "revoked"),
                          "--api", b.api)  # fmt: skip

        t = timed(revoke)
        new = os.getxattr(mnt / "big", XATTR_CID).decode()
    if "re-encrypted 1 files" not in out:
        raise BenchError(f"medfs revoke did not re-encrypt the file: {out.strip()}")
    if new == old:
        raise BenchError("after medfs revoke the mount still shows the old version's CID")
    label = size_label(b.sizes.big)
    return [
        Row("revoke", f"medfs revoke of one recipient from the {label} file", t, "s",
            f"cp of {label} into the mount", f["cp_s"], t / f["cp_s"], "time"),
    ]  # fmt: skip


def bench_gocryptfs(b: Bench) -> list[Row]:
    if shutil.which("gocryptfs") is None:
        raise BenchError("gocryptfs is not installed: run scripts/setup (Debian package)")
    size = b.sizes.big
    src = b.payload(size)
    f = b.big_figures()
    cipher, plain = b.work / "gocryptfs-cipher", b.work / "gocryptfs-plain"
    cipher.mkdir()
    plain.mkdir()
    password = ["-extpass", f"echo {PASSPHRASE}"]
    b.run("gocryptfs", "-init", "-q", *password, str(cipher))
    # In the foreground, so that its exit can be awaited after unmounting.
    proc = subprocess.Popen(
        ["gocryptfs", "-fg", "-q", *password, str(cipher), str(plain)],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 30
        while not os.path.ismount(plain):
            if proc.poll() is not None or time.monotonic() > deadline:
                stderr = proc.stderr.read() if proc.stderr and proc.poll() is not None else ""
                raise BenchError(f"gocryptfs did not mount: {stderr.strip()}")
            time.sleep(0.05)
        target = plain / "big"
        # Durable like medfs's close: the data is on the disk under it when the clock stops.
        t_w = timed(lambda: (b.run("cp", str(src), str(target)), b.run("sync", str(target))))
        if target.stat().st_size != size:
            raise BenchError("gocryptfs's copy has the wrong size")
        # Its cold read and medfs's in turn, each round: both see the machine alike. The revoke
        # section re-keyed medfs's big file without a local copy: a new version has one.
        with b.mounted() as mnt:
            b.run("cp", str(src), str(mnt / "big-read"))
        reads: dict[str, list[float]] = {"medfs_cat_s": [], "gocryptfs_cat_s": []}
        for _ in range(b.sizes.read_rounds):
            b.drop_caches()
            reads["gocryptfs_cat_s"].append(
                timed(lambda: b.run("cat", str(target), stdout=subprocess.DEVNULL))
            )
            reads["medfs_cat_s"].append(b.cold_cat(copies=True, name="big-read"))
        with b.mounted() as mnt:
            (mnt / "big-read").unlink()
        t_r = statistics.median(reads["gocryptfs_cat_s"])
    finally:
        subprocess.run(["fusermount3", "-u", str(plain)], check=False, capture_output=True)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if proc.stderr:
            proc.stderr.close()
        shutil.rmtree(cipher, ignore_errors=True)
    mb, label = size / MiB, size_label(size)
    w, r = f["cp_MiBps"], mb / statistics.median(reads["medfs_cat_s"])
    of = f" (median of {b.sizes.read_rounds})" if b.sizes.read_rounds > 1 else ""
    return [
        Row("gocryptfs", f"{label} write: medfs cp until durable", w, "MiB/s",
            "gocryptfs on local disk, cp + fsync", mb / t_w, w / (mb / t_w), "throughput",
            "medfs >= gocryptfs", w >= mb / t_w),
        Row("gocryptfs", f"{label} read, page cache dropped: medfs cat{of}", r, "MiB/s",
            f"gocryptfs on local disk, cat{of}", mb / t_r, r / (mb / t_r), "throughput",
            "medfs >= gocryptfs", r >= mb / t_r, details={"rounds": reads}),
    ]  # fmt: skip


def _crypto_rate(total: int, buf: int, action: Callable[[bytes], object]) -> float:
    data = os.urandom(buf)
    rounds = max(1, total // buf)

    def run() -> None:
        for _ in range(rounds):
            action(data)  # the output is dropped at once, as a streaming consumer does

    best = min(timed(run) for _ in range(3))
    return rounds * buf / MiB / best


def _noop_rates(b: Bench) -> tuple[float, float, float]:
    """The no-op filesystem's dd write and read (MiB/s), and its `cp -r` of the tree (s)."""
    mnt = b.work / "noop-mnt"
    mnt.mkdir()
    log = open(b.work / "noop.log", "wb")  # noqa: SIM115 (closed in finally)
    proc = subprocess.Popen([sys.executable, str(NOOP_FS), str(mnt)], stdout=log, stderr=log)
    try:
        deadline = time.monotonic() + 30
        while not os.path.ismount(mnt):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise BenchError(f"the no-op filesystem did not mount; see {b.work}/noop.log")
            time.sleep(0.05)
        count = f"count={b.sizes.noop // MiB}"
        zero = str(mnt / "zero")
        t_w = timed(lambda: b.run("dd", "if=/dev/zero", f"of={zero}", "bs=1M", count))
        t_r = timed(lambda: b.run("dd", f"if={zero}", "of=/dev/null", "bs=1M", count))
        tree = b.tree()
        t_tree = timed(lambda: b.run("cp", "-r", str(tree), str(mnt / "tree")))
    finally:
        subprocess.run(["fusermount3", "-u", str(mnt)], check=False, capture_output=True)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
    mb = b.sizes.noop / MiB
    return mb / t_w, mb / t_r, t_tree


def bench_ceilings(b: Bench) -> list[Row]:
    f = b.read_figures()
    w, r = f["cp_MiBps"], f["cat_MiBps"]
    total = b.sizes.crypto
    aead, nonce = AESGCM(os.urandom(32)), bytes(12)
    sealed64 = aead.encrypt(nonce, os.urandom(SEG), None)
    rates = [
        ("raw AES-256-GCM seal, 64 KiB buffers", "medfs cp",
         _crypto_rate(total, SEG, lambda d: aead.encrypt(nonce, d, None)), w),
        ("raw AES-256-GCM seal, 1 MiB buffers", "medfs cp",
         _crypto_rate(total, MiB, lambda d: aead.encrypt(nonce, d, None)), w),
        ("raw AES-256-GCM open, 64 KiB buffers", "medfs cat",
         _crypto_rate(total, SEG, lambda d: aead.decrypt(nonce, sealed64, None)), r),
        ("SHA-256 (hashlib), 64 KiB buffers", "medfs cp",
         _crypto_rate(total, SEG, lambda d: hashlib.sha256(d).digest()), w),
        ("SHA-256 (hashlib), 1 MiB buffers", "medfs cp",
         _crypto_rate(total, MiB, lambda d: hashlib.sha256(d).digest()), w),
    ]  # fmt: skip
    noop_w, noop_r, noop_tree = _noop_rates(b)
    rates += [
        ("no-op pyfuse3 filesystem, dd bs=1M write", "medfs cp", noop_w, w),
        ("no-op pyfuse3 filesystem, dd bs=1M read", "medfs cat", noop_r, r),
    ]
    rows = [
        Row("ceilings", f"ceiling: {name}", ceiling, "MiB/s", what, medfs, medfs / ceiling,
            "of ceiling")
        for name, what, ceiling, medfs in rates
    ]  # fmt: skip
    # The tree's requests through FUSE and pyfuse3 with no work behind them: medfs's copy
    # as a fraction of that speed (the ceiling's time over medfs's).
    tree_s = b.tree_figures()["tree_cp_s"]
    rows.append(
        Row("ceilings", f"ceiling: no-op pyfuse3 filesystem, cp -r of the {b.sizes.small_files:,}"
            " files", noop_tree, "s", "medfs cp -r, until durable", tree_s, noop_tree / tree_s,
            "of ceiling")
    )  # fmt: skip
    return rows


SECTIONS: dict[str, Callable[[Bench], list[Row]]] = {
    "adapter": bench_adapter,
    "mount": bench_mount,
    "random": bench_random,
    "tree": bench_tree,
    "rss": bench_rss,
    "share": bench_share,
    "revoke": bench_revoke,
    "gocryptfs": bench_gocryptfs,
    "ceilings": bench_ceilings,
}


# -- report -------------------------------------------------------------------------------------


def machine() -> dict[str, object]:
    cpu = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem: dict[str, int] = {}
    with contextlib.suppress(OSError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            key, _, rest = line.partition(":")
            if key in ("MemTotal", "MemAvailable"):
                mem[key] = int(rest.split()[0]) // KiB
    return {
        "nproc": os.cpu_count(),
        "cpu": cpu,
        "kernel": platform.release(),
        "mem_total_MiB": mem.get("MemTotal"),
        "mem_available_MiB": mem.get("MemAvailable"),
        "loadavg": os.getloadavg()[0],
        "python": platform.python_version(),
    }


def _num(x: float) -> str:
    if x == int(x) and abs(x) < 1000:
        return str(int(x))
    return f"{x:,.0f}" if abs(x) >= 100 else f"{x:,.2f}" if abs(x) < 10 else f"{x:,.1f}"


def markdown(rows: list[Row]) -> str:
    lines = ["| measure | medfs | baseline | ratio | target | met |", "|---|---|---|---|---|---|"]
    for r in rows:
        base = r.baseline
        if r.baseline_value is not None:
            base = f"{base}: {_num(r.baseline_value)} {r.unit}"
        ratio = f"{r.ratio:.2f}x {r.ratio_of}" if r.ratio is not None else "—"
        met = {True: "yes", False: "**no**", None: "—"}[r.met]
        cells = (r.measure, f"{_num(r.value)} {r.unit}", base or "—", ratio, r.target, met)
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="small sizes, under two minutes")
    parser.add_argument("--json", default="bench-results/bench.json", help="where to write JSON")
    parser.add_argument(
        "--only", choices=list(SECTIONS), action="append", help="run only these sections"
    )
    args = parser.parse_args()
    sizes = Sizes.quick() if args.quick else Sizes.full()
    chosen = [name for name in SECTIONS if not args.only or name in args.only]
    info = machine()
    rows: list[Row] = []
    timings: dict[str, float] = {}
    started = time.perf_counter()
    try:
        with tempfile.TemporaryDirectory(prefix="medfs-bench-") as tmp:
            work = Path(tmp)
            node = EmbeddedNode(work / "node")
            bench: Bench | None = None
            try:
                api = node.ensure_running()
                info["kubo"] = node.status().version
                bench = Bench(node, api, work, sizes)
                for name in chosen:
                    # What an earlier section left for the disk to write (GiBs of spools and
                    # blocks) must not be written back while this one is timed.
                    os.sync()
                    say(f"{name} ...")
                    t0 = time.perf_counter()
                    got = SECTIONS[name](bench)
                    timings[name] = round(time.perf_counter() - t0, 1)
                    for row in got:
                        if not (row.value > 0 and (row.baseline_value is None
                                                   or row.baseline_value > 0)):  # fmt: skip
                            raise BenchError(f"{name}: a figure is not positive: {row}")
                    rows += got
                    say(f"{name} done in {timings[name]:.1f} s")
                info["caches_dropped"] = bench.caches_dropped
            finally:
                if bench is not None:
                    bench.force_unmount()
                    # A medfs command that ignored MEDFS_IPFS_API would have started this one.
                    EmbeddedNode(bench.state).stop()
                node.stop()
    except BenchError as err:
        print(f"bench: error: {err}", file=sys.stderr)
        return 1
    info["loadavg_end"] = os.getloadavg()[0]
    elapsed = time.perf_counter() - started
    m = info
    print(
        f"{m['nproc']} CPUs ({m['cpu']}), Linux {m['kernel']}, {m['mem_total_MiB']:,} MiB RAM "
        f"({m['mem_available_MiB']:,} MiB available), load average {m['loadavg']:.2f} at the "
        f"start and {m['loadavg_end']:.2f} at the end; Kubo {m.get('kubo')}; "
        f"{'--quick, ' if args.quick else ''}{elapsed:.0f} s\n"
    )
    print(markdown(rows))
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    result = {
        "quick": args.quick,
        "sections": chosen,
        "sizes": asdict(sizes),
        "machine": info,
        "elapsed_s": round(elapsed, 1),
        "section_s": timings,
        "rows": [asdict(r) for r in rows],
    }
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nJSON: {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
