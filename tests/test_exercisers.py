"""Exercisers through a real mount: fio with verification, concurrent writers and readers, a git
clone with fsck, a tarball of thousands of files. Every test remounts to prove what it wrote
persisted (a remount starts a new daemon with empty caches, so reads come back from IPFS).

What the concurrency tests rely on is what POSIX promises and medfs should keep: writes by one
process are visible to reads by another at once (one kernel inode, one draft per file); writers
of disjoint byte ranges of one file never disturb each other; O_APPEND writes land whole at the
end; a reader that opened a file keeps reading that file after `rename` replaces it; a file
closed by its writer reads back exactly as written, also after a remount.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
import subprocess
import tarfile
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.mounting import Mounted, mounted

pytestmark = [
    pytest.mark.skipif(not os.path.exists("/dev/fuse"), reason="needs /dev/fuse"),
    pytest.mark.fuse,
    pytest.mark.kubo,
]

MiB = 1 << 20
SEG = 1 << 16  # medfs's segment size: several tests put boundaries just off it
CACHE = 64 * MiB  # medfs.mount.CACHE_BYTES: fio files are bigger, so reads must go to IPFS
NONZERO = bytes([1]) + bytes(range(1, 256))  # maps byte 0 to 1, keeps the rest


def pattern(seed: object, size: int) -> bytes:
    """Deterministic, incompressible bytes without any zero byte (a zero then means a hole)."""
    return random.Random(repr(seed)).randbytes(size).translate(NONZERO)


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(MiB):
            h.update(chunk)
    return h.hexdigest()


def walk(root: Path) -> dict[str, tuple[str, int, int, str]]:
    """Every entry below root: kind, permission bits, whole-second mtime, and content hash,
    link target or nothing."""
    out = {}
    for path in sorted(root.rglob("*")):
        st = path.lstat()
        rel = str(path.relative_to(root))
        if path.is_symlink():
            out[rel] = ("link", 0, int(st.st_mtime), os.readlink(path))
        elif path.is_dir():
            out[rel] = ("dir", st.st_mode & 0o7777, 0, "")  # a dir's mtime moves as it fills
        else:
            out[rel] = ("file", st.st_mode & 0o7777, int(st.st_mtime), sha256(path))
    return out


def in_threads(*workers: Callable[[], Any]) -> list[Any]:
    """Run every worker in its own thread at once; re-raise the first failure."""
    with ThreadPoolExecutor(len(workers)) as pool:
        futures = [pool.submit(w) for w in workers]
        return [f.result() for f in futures]


def remount(m: Mounted) -> None:
    m.umount()
    m.mount()


# -- fio ------------------------------------------------------------------------------------------

needs_fio = pytest.mark.skipif(shutil.which("fio") is None, reason="fio is not installed")


@dataclass(frozen=True)
class FioJob:
    """One fio job section: `numjobs` jobs, each writing `size` bytes with crc32c verification
    headers, to a file of its own or (`shared`) to its own region of one common file."""

    name: str
    options: dict[str, str]
    numjobs: int
    size: int
    shared: bool = False

    def section(self) -> str:
        lines = [f"[{self.name}]", f"numjobs={self.numjobs}", f"size={self.size}"]
        if self.shared:
            lines += [f"filename={self.name}.bin", f"offset_increment={self.size}"]
        lines += [f"{k}={v}" for k, v in self.options.items()]
        return "\n".join(lines)

    def files(self) -> dict[str, int]:
        if self.shared:
            return {f"{self.name}.bin": self.numjobs * self.size}
        return {f"{self.name}.{i}.0": self.size for i in range(self.numjobs)}


SEQUENTIAL = FioJob("seq", {"rw": "write", "bs": "1M"}, 1, 128 * MiB)
RANDOM = FioJob("rand", {"rw": "randwrite", "bsrange": "4k-64k"}, 1, 80 * MiB)
PARALLEL = FioJob("par", {"rw": "randwrite", "bsrange": "4k-64k"}, 4, 16 * MiB)
SAME_FILE = FioJob("same", {"rw": "randwrite", "bsrange": "4k-64k"}, 4, 8 * MiB, shared=True)
MIXED = FioJob("mix", {"rw": "randrw", "rwmixread": "50", "bsrange": "4k-64k"}, 1, 72 * MiB)

# Each case: its jobs, and whether they use O_DIRECT. Buffered reads may be answered from the
# page cache, so buffered cases verify once more with O_DIRECT after close; O_DIRECT cases
# already had every read (the mix's reads while writing, the verify pass) answered by medfs.
FIO_CASES: dict[str, tuple[list[FioJob], bool]] = {
    "sequential-write": ([SEQUENTIAL], False),
    "random-write": ([RANDOM], True),
    # eight fio jobs at once: four on files of their own, four on disjoint regions of one file
    "parallel-jobs": ([PARALLEL, SAME_FILE], False),
    "random-read-write-mix": ([MIXED], True),
}


def run_fio(
    directory: Path, scratch: Path, jobs: list[FioJob], **extra: str
) -> tuple[subprocess.CompletedProcess[str], dict[str, Any]]:
    options = {"directory": str(directory), "verify": "crc32c", "verify_state_save": "0"}
    options |= extra
    text = "[global]\n" + "".join(f"{k}={v}\n" for k, v in options.items())
    text += "".join("\n" + job.section() + "\n" for job in jobs)
    jobfile = scratch / "job.fio"
    jobfile.write_text(text)
    out = subprocess.run(
        ["fio", "--output-format=json", str(jobfile)],
        cwd=scratch,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    # fio prints warnings (and the errors of failed jobs) on stdout ahead of the JSON.
    start = out.stdout.find("{")
    report = json.loads(out.stdout[start:]) if start >= 0 else {}
    return out, report


def fio_ok(
    directory: Path, scratch: Path, jobs: list[FioJob], **extra: str
) -> list[dict[str, Any]]:
    """Run fio; insist on exit status 0, no job error and no verify complaint at all."""
    out, report = run_fio(directory, scratch, jobs, **extra)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    complaints = re.findall(
        r".*(?:verify failed|verify: |bad magic|bad header).*", out.stdout + out.stderr
    )
    assert complaints == []
    results: list[dict[str, Any]] = report["jobs"]
    assert len(results) == sum(job.numjobs for job in jobs)
    assert [r["error"] for r in results] == [0] * len(results)
    return results


@needs_fio
@pytest.mark.parametrize("case", list(FIO_CASES))
def test_fio_verifies(case: str, tmp_path: Path, kubo_api: str) -> None:
    jobs, direct = FIO_CASES[case]
    scratch = tmp_path / "fio"
    scratch.mkdir()
    with mounted(tmp_path / "m", kubo_api) as m:
        directory = m.mnt / "fio"
        directory.mkdir()

        # 1. Write with verification headers, then fio reads everything back and checks it.
        results = fio_ok(directory, scratch, jobs, do_verify="1", direct=str(int(direct)))
        by_name = {job.name: job for job in jobs}
        for r in results:
            job = by_name[r["jobname"]]
            if job.options["rw"] != "randrw":
                assert r["write"]["io_bytes"] == job.size
                assert r["read"]["io_bytes"] == job.size  # the verify pass covered it all
            else:
                assert r["write"]["io_bytes"] > 0 and r["read"]["io_bytes"] > 0
        sizes = {name: (directory / name).stat().st_size for name in os.listdir(directory)}
        assert sizes == {n: s for job in jobs for n, s in job.files().items()}
        assert sum(sizes.values()) > CACHE or max(sizes.values()) > CACHE

        # 2. After close (every file committed): verify again with O_DIRECT, so the reads reach
        # medfs and not the page cache.
        if not direct:
            fio_ok(directory, scratch, jobs, verify_only="1", direct="1")

        # 3. A new daemon, cold caches: every byte comes back from IPFS and still verifies.
        remount(m)
        fio_ok(directory, scratch, jobs, verify_only="1")

        if case == "sequential-write":
            # The oracle is real: one flipped byte in 128 MiB makes the same check fail.
            target = directory / SEQUENTIAL.files().popitem()[0]
            fd = os.open(target, os.O_WRONLY)
            try:
                os.pwrite(fd, b"\xff", 77 * MiB + 12345)
            finally:
                os.close(fd)
            out, report = run_fio(directory, scratch, jobs, verify_only="1", direct="1")
            assert out.returncode != 0
            assert [r["error"] for r in report["jobs"]] != [0]
        m.umount()


# -- concurrent writers and readers -----------------------------------------------------------


def test_eight_writers_and_eight_readers_on_different_files(tmp_path: Path, kubo_api: str) -> None:
    """Eight threads write, rewrite and edit their own files (streamed, random-order and
    in-place writes) and check each version after close, while eight threads read eight other
    committed files whole, over and over, and must always get them exactly."""
    with mounted(tmp_path, kubo_api) as m:
        root = m.mnt / "conc"
        root.mkdir()
        stable = {root / f"stable-{i}": pattern(("stable", i), 2 * MiB + 777 * i) for i in range(8)}
        for path, data in stable.items():
            path.write_bytes(data)
        final: dict[Path, bytes] = {}
        done = threading.Event()

        def writer(w: int) -> None:
            path = root / f"w{w}" / "record.bin"
            path.parent.mkdir()
            rng = random.Random(w)
            # Round 1: a new file written front to back in odd-sized chunks (streams).
            data = pattern((w, 1), 3 * MiB + 17 * w)
            with open(path, "wb") as fh:
                for pos in range(0, len(data), 100_003):
                    fh.write(data[pos : pos + 100_003])
            assert path.read_bytes() == data
            # Round 2: truncated, then rewritten in random order, chunks across segments.
            data = pattern((w, 2), 2 * MiB + 4099 * w)
            pieces = [(pos, data[pos : pos + 50_001]) for pos in range(0, len(data), 50_001)]
            rng.shuffle(pieces)
            fd = os.open(path, os.O_WRONLY | os.O_TRUNC)
            try:
                for pos, piece in pieces:
                    os.pwrite(fd, piece, pos)
            finally:
                os.close(fd)
            assert path.read_bytes() == data
            # Round 3: an in-place edit straddling a segment boundary, and an append.
            edit = pattern((w, 3), 10_000)
            with open(path, "r+b") as fh:
                fh.seek(5 * SEG - 5_000)
                fh.write(edit)
                fh.seek(0, os.SEEK_END)
                fh.write(b"appended\n")
            data = data[: 5 * SEG - 5_000] + edit + data[5 * SEG + 5_000 :] + b"appended\n"
            assert path.read_bytes() == data
            final[path] = data

        def reader(r: int) -> int:
            reads = 0
            paths = list(stable)
            while True:
                path = paths[(r + reads) % len(paths)]
                with open(path, "rb") as fh:
                    got = b"".join(iter(lambda: fh.read(200_000), b""))
                assert got == stable[path], f"reader {r}: {path.name} read back wrong"
                reads += 1
                if done.is_set() and reads >= len(paths):
                    return reads

        def writers() -> None:
            try:
                in_threads(*[lambda w=w: writer(w) for w in range(8)])
            finally:
                done.set()

        counts = in_threads(writers, *[lambda r=r: reader(r) for r in range(8)])[1:]
        assert min(counts) >= len(stable)

        expected = {**stable, **final}
        assert {p: p.read_bytes() for p in expected} == expected
        remount(m)
        assert {p: p.read_bytes() for p in expected} == expected
        m.umount()


def nonzero_runs_match(got: bytes, expected: bytes, offset: int) -> bool:
    """Whether every byte read is either still a hole (0) or exactly the byte written there."""
    return all(
        run.group() == expected[offset + run.start() : offset + run.end()]
        for run in re.finditer(rb"[^\x00]+", got)
    )


def test_eight_writers_one_file_disjoint_regions(tmp_path: Path, kubo_api: str) -> None:
    """Eight threads pwrite disjoint regions of one file through their own descriptors, in
    random order, each fsyncing half way (a commit while the others write); eight readers read
    the file meanwhile. Regions are 1 MiB + 1000 bytes, so neighbours share a segment."""
    region = MiB + 1000
    parts = [pattern(("region", i), region) for i in range(8)]
    expected = b"".join(parts)
    with mounted(tmp_path, kubo_api) as m:
        path = m.mnt / "shared.bin"
        path.write_bytes(b"")
        start = threading.Barrier(16, timeout=120)  # a guard against hanging, not a check
        done = threading.Event()

        def writer(i: int) -> None:
            rng = random.Random(i)
            pieces = []
            pos = 0
            while pos < region:
                size = rng.randint(1, 100_000)
                pieces.append((pos, parts[i][pos : pos + size]))
                pos += size
            rng.shuffle(pieces)
            fd = os.open(path, os.O_WRONLY)
            try:
                start.wait()
                for n, (pos, piece) in enumerate(pieces):
                    assert os.pwrite(fd, piece, i * region + pos) == len(piece)
                    if n == len(pieces) // 2:
                        os.fsync(fd)
            finally:
                os.close(fd)

        def reader(r: int) -> int:
            reads = 0
            fd = os.open(path, os.O_RDONLY)
            try:
                start.wait()
                while not done.is_set() or reads == 0:
                    offset = random.Random(r * 1000 + reads).randrange(0, len(expected))
                    got = os.pread(fd, 3 * SEG + 11, offset)
                    assert offset + len(got) <= len(expected)
                    assert nonzero_runs_match(got, expected, offset), (r, offset)
                    reads += 1
            finally:
                os.close(fd)
            return reads

        def writers() -> None:
            try:
                in_threads(*[lambda i=i: writer(i) for i in range(8)])
            finally:
                done.set()

        in_threads(writers, *[lambda r=r: reader(r) for r in range(8)])
        assert path.stat().st_size == len(expected)
        assert path.read_bytes() == expected
        remount(m)
        assert path.read_bytes() == expected
        m.umount()


def test_eight_appenders_one_file(tmp_path: Path, kubo_api: str) -> None:
    """Eight threads append fixed-size records to one file with O_APPEND: every record must
    land whole, none lost, each writer's records in its own order."""
    per_writer, size = 300, 64

    def record(w: int, n: int) -> bytes:
        head = f"writer {w} record {n:04d} ".encode()
        return head + hashlib.sha256(head).hexdigest().encode()[: size - len(head) - 1] + b"\n"

    with mounted(tmp_path, kubo_api) as m:
        path = m.mnt / "journal.log"
        path.write_bytes(b"")
        start = threading.Barrier(8, timeout=120)

        def appender(w: int) -> None:
            fd = os.open(path, os.O_WRONLY | os.O_APPEND)
            try:
                start.wait()
                for n in range(per_writer):
                    assert os.write(fd, record(w, n)) == size
                    if n == 100 + 20 * w:
                        os.fsync(fd)
            finally:
                os.close(fd)

        in_threads(*[lambda w=w: appender(w) for w in range(8)])

        def check() -> None:
            data = path.read_bytes()
            assert len(data) == 8 * per_writer * size
            records = [data[i : i + size] for i in range(0, len(data), size)]
            seen: dict[int, list[int]] = {w: [] for w in range(8)}
            for rec in records:
                found = re.fullmatch(rb"writer (\d) record (\d{4}) [0-9a-f]+\n", rec)
                assert found is not None, rec
                w, n = int(found[1]), int(found[2])
                assert rec == record(w, n)
                seen[w].append(n)
            assert seen == {w: list(range(per_writer)) for w in range(8)}

        check()
        remount(m)
        check()
        m.umount()


def test_readers_see_whole_versions_across_atomic_replace(tmp_path: Path, kubo_api: str) -> None:
    """Two writers save a document editor-style (write a temporary file, close, rename over
    the document) again and again; eight readers open and read it whole meanwhile. Each read
    must be one complete version: a reader keeps the file it opened even when it is replaced
    (and so unlinked) halfway through its read."""

    def version(v: int) -> bytes:
        size = 300_000 + 7919 * v  # sizes differ, so a mix of two versions shows
        return f"version {v:06d} size {size:08d}\n".encode() + pattern(("doc", v), size)

    with mounted(tmp_path, kubo_api) as m:
        doc = m.mnt / "doc.txt"
        doc.write_bytes(version(0))
        rename_lock = threading.Lock()
        last = [0]
        done = threading.Event()

        def writer(w: int) -> None:
            for n in range(12):
                v = 1 + n * 2 + w
                tmp = m.mnt / f".doc.txt.tmp-{w}"
                with open(tmp, "wb") as fh:
                    data = version(v)
                    for pos in range(0, len(data), 64_000):
                        fh.write(data[pos : pos + 64_000])
                with rename_lock:
                    os.rename(tmp, doc)
                    last[0] = v

        def reader(r: int) -> set[int]:
            seen: set[int] = set()
            while not done.is_set() or not seen:
                with open(doc, "rb") as fh:
                    head = fh.read(29)
                    found = re.fullmatch(rb"version (\d{6}) size (\d{8})\n", head)
                    assert found is not None, head
                    body = b"".join(iter(lambda: fh.read(40_000), b""))
                v = int(found[1])
                assert head + body == version(v), f"reader {r}: version {v} came back torn"
                seen.add(v)
            return seen

        def writers() -> None:
            try:
                in_threads(lambda: writer(0), lambda: writer(1))
            finally:
                done.set()

        seen = in_threads(writers, *[lambda r=r: reader(r) for r in range(8)])[1:]
        assert all(s <= set(range(25)) for s in seen)
        assert doc.read_bytes() == version(last[0])
        assert sorted(os.listdir(m.mnt)) == ["doc.txt"]

        # By contrast an in-place rewrite is no snapshot: a reader that opened the old content
        # reads the new bytes from the next read on, as on any POSIX filesystem.
        with open(doc, "rb", buffering=0) as fh:
            first = fh.read(100_000)
            doc.write_bytes(version(99))  # O_TRUNC, write, close: committed
            rest = fh.readall()
        assert first == version(last[0])[:100_000]
        assert rest == version(99)[100_000:]

        remount(m)
        assert doc.read_bytes() == version(99)
        m.umount()


# -- git --------------------------------------------------------------------------------------

needs_git = pytest.mark.skipif(shutil.which("git") is None, reason="git is not installed")


def git(cwd: Path, *args: str, env: dict[str, str]) -> str:
    out = subprocess.run(
        ["git", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300, check=False
    )
    assert out.returncode == 0, f"git {' '.join(args)}: {out.stderr}"
    return out.stdout


def make_repository(path: Path, env: dict[str, str]) -> None:
    """200 commits over 300 text files and three binary files (several MiB of pack), made in
    one `git fast-import` run rather than 200 `git commit`s."""
    git(path.parent, "init", "-q", "-b", "main", str(path), env=env)
    stream = bytearray()

    def blob(data: bytes) -> None:
        stream.extend(b"data %d\n" % len(data) + data + b"\n")

    for c in range(200):
        stream.extend(b"commit refs/heads/main\n")
        stream.extend(b"committer Test <test@example.org> %d +0000\n" % (1_700_000_000 + 60 * c))
        blob(b"commit %d\n" % c)
        changed = range(300) if c == 0 else [(7 * c + 13 * k) % 300 for k in range(5)]
        for f in changed:
            text = hashlib.sha256(b"%d-%d" % (f, c)).hexdigest().encode() * (1 + f % 40) + b"\n"
            stream.extend(b"M 100644 inline dir%d/sub%d/file%03d.txt\n" % (f % 7, f % 3, f))
            blob(text)
        if c % 100 == 0:
            for b in range(3):
                stream.extend(b"M 100755 inline bin/blob%d.bin\n" % b)
                blob(pattern(("blob", b, c), MiB + 333 * b))
    subprocess.run(
        ["git", "fast-import", "--quiet"], cwd=path, env=env, input=bytes(stream), check=True
    )
    git(path, "checkout", "-q", "main", env=env)


def worktree(root: Path) -> dict[str, str]:
    return {k: v[3] for k, v in walk(root).items() if not k.startswith(".git")}


@needs_git
def test_git_clone_fsck_commit_gc(tmp_path: Path, kubo_api: str) -> None:
    env = {
        **os.environ,
        "HOME": str(tmp_path),
        "GIT_CONFIG_NOSYSTEM": "1",
        "GIT_CONFIG_GLOBAL": os.devnull,
        "GIT_AUTHOR_NAME": "Test",
        "GIT_AUTHOR_EMAIL": "test@example.org",
        "GIT_COMMITTER_NAME": "Test",
        "GIT_COMMITTER_EMAIL": "test@example.org",
    }
    src = tmp_path / "src"
    make_repository(src, env)
    head = git(src, "rev-parse", "HEAD", env=env)
    with mounted(tmp_path / "m", kubo_api) as m:
        # file:// makes git send a pack (index-pack reads it back while writing it).
        git(m.mnt, "clone", "-q", f"file://{src}", "clone", env=env)
        clone = m.mnt / "clone"
        git(clone, "fsck", "--full", "--strict", env=env)
        assert git(clone, "status", "--porcelain", "--untracked-files=all", env=env) == ""
        assert git(clone, "rev-parse", "HEAD", env=env) == head
        assert git(clone, "rev-list", "--count", "HEAD", env=env).strip() == "200"
        assert worktree(clone) == worktree(src)
        # A plain path clone: git tries hard links (EPERM on medfs) and copies instead.
        git(m.mnt, "clone", "-q", str(src), "plain", env=env)
        git(m.mnt / "plain", "fsck", "--full", "--strict", env=env)

        # Work inside the mount: a commit (index.lock renames), then gc rewrites the packs.
        with open(clone / "dir0/sub0/file000.txt", "ab") as fh:
            fh.write(b"edited inside medfs\n")
        (clone / "new.txt").write_bytes(b"new file\n")
        git(clone, "add", "-A", env=env)
        git(clone, "commit", "-q", "-m", "edit in the mount", env=env)
        git(clone, "gc", "--quiet", "--prune=now", env=env)
        git(clone, "fsck", "--full", "--strict", env=env)
        new_head = git(clone, "rev-parse", "HEAD", env=env)
        assert new_head != head

        remount(m)
        git(clone, "fsck", "--full", "--strict", env=env)
        assert git(clone, "status", "--porcelain", "--untracked-files=all", env=env) == ""
        assert git(clone, "rev-parse", "HEAD", env=env) == new_head
        assert git(clone, "rev-list", "--count", "HEAD", env=env).strip() == "201"
        assert (clone / "new.txt").read_bytes() == b"new file\n"
        m.umount()


# -- tar --------------------------------------------------------------------------------------


def make_tarball_tree(root: Path, count: int) -> None:
    """`count` files of mixed small sizes in nested directories, with varied modes and mtimes,
    a few larger files, symlinks and empty directories."""
    rng = random.Random(2026)
    sizes = [0, 1, 100, 511, 4096, 5000, SEG - 1, SEG, SEG + 1, 20_000]
    for i in range(count):
        d = root / f"p{i % 12:02d}" / f"visit{(i // 12) % 10}" / ("notes" if i % 3 else "labs")
        d.mkdir(parents=True, exist_ok=True)
        size = rng.choice(sizes) if i % 200 else 300_000 + i
        f = d / f"r{i:05d}.dat"
        f.write_bytes(pattern(("tar", i), size))
        os.chmod(f, rng.choice([0o644, 0o600, 0o640, 0o755]))
        stamp = 1_600_000_000 + rng.randrange(10**8)
        os.utime(f, (stamp, stamp))
    for i in range(10):
        (root / f"p{i:02d}" / f"link{i}").symlink_to(f"visit0/notes/r{i + 1:05d}.dat")
        (root / f"p{i:02d}" / f"empty{i}").mkdir()


def tar_members(archive: Path) -> list[tuple[str, int, int, int, int, str, str]]:
    with tarfile.open(archive) as tar:
        rows = []
        for t in tar.getmembers():
            digest = ""
            if t.isfile():
                fh = tar.extractfile(t)
                assert fh is not None
                digest = hashlib.sha256(fh.read()).hexdigest()
            mtime = 0 if t.isdir() else int(t.mtime)
            rows.append((t.name, t.type[0], t.mode, t.size, mtime, t.linkname, digest))
        return sorted(rows)


def test_tarball_of_three_thousand_files(tmp_path: Path, kubo_api: str) -> None:
    count = 3000
    src = tmp_path / "src"
    make_tarball_tree(src / "tree", count)
    archive = tmp_path / "in.tar"
    subprocess.run(["tar", "-cf", str(archive), "-C", str(src), "tree"], check=True)
    expected = walk(src)
    assert sum(kind == "file" for kind, *_ in expected.values()) == count
    with mounted(tmp_path / "m", kubo_api) as m:
        dest = m.mnt / "x"
        dest.mkdir()
        subprocess.run(["tar", "-xf", str(archive), "-C", str(dest)], check=True)
        assert walk(dest) == expected  # names, kinds, modes, mtimes, contents, link targets

        # And back out: an archive of the mount holds the same members as the original one.
        back = tmp_path / "back.tar"
        subprocess.run(["tar", "-cf", str(back), "-C", str(dest), "tree"], check=True)
        assert tar_members(back) == tar_members(archive)  # with every member's sha256

        remount(m)
        listing = sorted(str(p.relative_to(dest)) for p in dest.rglob("*"))
        assert listing == sorted(expected)
        sample = [k for k, v in expected.items() if v[0] == "file"][::37]
        assert {k: sha256(dest / k) for k in sample} == {k: expected[k][3] for k in sample}
        m.umount()
