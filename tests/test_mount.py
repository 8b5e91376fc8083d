"""The mount, for real: the CLI in a subprocess, a real Kubo node, real tools on a FUSE mount."""

from __future__ import annotations

import ctypes
import errno
import hashlib
import json
import mmap
import os
import shutil
import stat
import subprocess
import tarfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from medfs.kubo import EmbeddedNode
from tests.conftest import run_medfs
from tests.mounting import (
    MARKER,
    PASSPHRASE,
    Mounted,
    files_containing,
    fsync_dir,
    init_state,
    mounted,
)

pytestmark = pytest.mark.skipif(not os.path.exists("/dev/fuse"), reason="needs /dev/fuse")

MiB = 1 << 20


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(MiB):
            h.update(chunk)
    return h.hexdigest()


def tree_digest(root: Path) -> dict[str, str]:
    out = {}
    for path in sorted(root.rglob("*")):
        rel = str(path.relative_to(root))
        if path.is_symlink():
            out[rel] = "-> " + os.readlink(path)
        elif path.is_file():
            out[rel] = sha256(path)
        else:
            out[rel] = "dir"
    return out


def record(i: int, size: int) -> bytes:
    """A synthetic record carrying the plaintext marker, padded with varied bytes."""
    head = MARKER + f" patient={i:05d}\n".encode()
    body = hashlib.sha256(str(i).encode()).digest() * (size // 32 + 1)
    return (head + body)[:size] if size >= len(head) else head[:size]


def make_tree(root: Path) -> None:
    (root / "a" / "b" / "c").mkdir(parents=True)
    (root / "empty-dir").mkdir()
    for i, size in enumerate([0, 1, 100, 65535, 65536, 65537, 200_000, 1_000_003]):
        target = root / ("a" if i % 2 else "a/b") / f"rec-{i}.txt"
        target.write_bytes(record(i, size))
    (root / "a/b/c/deep.txt").write_bytes(record(99, 4096))
    (root / "a/link").symlink_to("b/rec-0.txt")
    os.chmod(root / "a/rec-1.txt", 0o600)


@pytest.fixture(scope="module")
def mnt(tmp_path_factory: pytest.TempPathFactory, kubo_api: str) -> Iterator[Mounted]:
    with mounted(tmp_path_factory.mktemp("mount"), kubo_api) as m:
        yield m


def test_cp_nested_tree_and_diff(mnt: Mounted, tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    make_tree(src)
    subprocess.run(["cp", "-r", str(src), str(mnt.mnt / "cp-tree")], check=True)
    assert subprocess.run(["diff", "-r", str(src), str(mnt.mnt / "cp-tree")]).returncode == 0
    assert tree_digest(src) == tree_digest(mnt.mnt / "cp-tree")


def test_cp_a_keeps_modes_times_and_links(mnt: Mounted, tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    make_tree(src)
    os.utime(src / "a/rec-1.txt", ns=(1_600_000_000_000_000_000, 1_600_000_000_123_456_789))
    subprocess.run(["cp", "-a", str(src), str(mnt.mnt / "cpa")], check=True)
    copied = mnt.mnt / "cpa/a/rec-1.txt"
    assert os.stat(copied).st_mode & 0o777 == 0o600
    assert os.stat(copied).st_mtime_ns == 1_600_000_000_123_456_789
    assert os.readlink(mnt.mnt / "cpa/a/link") == "b/rec-0.txt"
    assert tree_digest(src) == tree_digest(mnt.mnt / "cpa")


# Run as root, rsync -a, tar x and cp -a keep the files' owners, as from another machine.
OTHER_OWNER = (1000, 1000)


def owned_by_someone_else(tree: Path) -> tuple[int, int]:
    """Give `tree` to another user if we may (root), and return its owner."""
    if os.geteuid() == 0:
        for path in [tree, *tree.rglob("*")]:
            os.lchown(path, *OTHER_OWNER)
    st = tree.stat()
    return st.st_uid, st.st_gid


def owners(tree: Path) -> set[tuple[int, int]]:
    stats = [path.lstat() for path in [tree, *tree.rglob("*")]]
    return {(st.st_uid, st.st_gid) for st in stats}


def test_rsync_there_and_back(mnt: Mounted, tmp_path: Path) -> None:
    if shutil.which("rsync") is None:
        pytest.skip("rsync is not installed")
    src = tmp_path / "src"
    src.mkdir()
    make_tree(src)
    owner = owned_by_someone_else(src)
    subprocess.run(["rsync", "-a", f"{src}/", str(mnt.mnt / "rs")], check=True)
    assert owners(mnt.mnt / "rs") == {owner}
    # rsync sets each file's time by path just after its close, while a small file still
    # waits for its group upload: a second run finds every file the same, and sends none.
    again = subprocess.run(
        ["rsync", "-ai", f"{src}/", str(mnt.mnt / "rs")], check=True, capture_output=True
    )
    assert again.stdout == b""
    back = tmp_path / "back"
    subprocess.run(["rsync", "-a", f"{mnt.mnt / 'rs'}/", str(back)], check=True)
    assert subprocess.run(["diff", "-r", str(src), str(back)]).returncode == 0
    assert tree_digest(src) == tree_digest(back)


def test_a_time_set_just_after_a_close_is_the_one_committed(mnt: Mounted) -> None:
    path = mnt.mnt / "stamped.txt"
    when = 1_000_000_000_123_456_789
    for content in (b"small, waiting for its group upload", b""):
        path.write_bytes(content)
        os.utime(path, ns=(when, when))
        assert path.stat().st_mtime_ns == when
        fsync_dir(mnt.mnt)  # committed: what the manifest keeps, and a remount shows
        assert path.stat().st_mtime_ns == when
        assert path.read_bytes() == content
        when += 1


def test_a_shell_redirection_closes_twice_and_every_version_is_committed(mnt: Mounted) -> None:
    # `cmd > file`: the shell opens the file, dups it onto stdout and closes the original (a
    # flush: an empty first version), then the command writes and closes the real one. The
    # first may be in a group upload when the second supersedes it and removes its file.
    where = mnt.mnt / "redirected"
    where.mkdir()
    contents = {where / f"f{n}": os.urandom(3000 + n) for n in range(150)}
    for path, content in contents.items():
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        out = os.dup(fd)
        os.close(fd)
        os.write(out, content)
        os.close(out)
    fsync_dir(where)  # returns once every version closed before it is committed
    for path, content in contents.items():
        assert json.loads(os.getxattr(path, "user.medfs.info"))["pending"] is False, path
        assert path.read_bytes() == content
    assert "cannot read the staging area" not in (mnt.state / "mount.log").read_text()


def test_a_set_group_id_directory_gives_its_group(mnt: Mounted) -> None:
    shared = mnt.mnt / "team"
    shared.mkdir()
    group = 4321 if os.geteuid() == 0 else os.getgid()
    os.chown(shared, -1, group)
    os.chmod(shared, 0o2775)
    (shared / "note.txt").write_bytes(b"for the team")
    (shared / "sub").mkdir()
    (shared / "sub" / "deeper.txt").write_bytes(b"")
    for made in ("note.txt", "sub", "sub/deeper.txt"):
        assert (shared / made).stat().st_gid == group, made
    assert (shared / "sub").stat().st_mode & stat.S_ISGID
    assert not (shared / "note.txt").stat().st_mode & stat.S_ISGID
    os.chmod(shared, 0o775)  # without the bit, the creator's group again
    (shared / "plain").mkdir()
    assert (shared / "plain").stat().st_gid == os.getgid()
    assert not (shared / "plain").stat().st_mode & stat.S_ISGID


def test_tar_extract_into_mount(mnt: Mounted, tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    make_tree(src)
    owner = owned_by_someone_else(src)
    archive = tmp_path / "t.tar"
    with tarfile.open(archive, "w") as tar:
        tar.add(src, arcname="t")
    dest = mnt.mnt / "tarred"
    dest.mkdir()
    subprocess.run(["tar", "-xf", str(archive), "-C", str(dest)], check=True)
    assert tree_digest(src) == tree_digest(dest / "t")
    assert owners(dest / "t") == {owner}
    subprocess.run(["cp", "-a", str(src), str(mnt.mnt / "cp-a")], check=True)
    assert owners(mnt.mnt / "cp-a") == {owner}


def test_append_overwrite_truncate_sparse(mnt: Mounted) -> None:
    path = mnt.mnt / "edits.txt"
    path.write_bytes(record(1, 70_000))
    with open(path, "ab") as fh:
        fh.write(b"appended line\n")
    subprocess.run(["sh", "-c", f"echo more >> '{path}'"], check=True)
    expected = bytearray(record(1, 70_000) + b"appended line\nmore\n")
    assert path.read_bytes() == expected

    with open(path, "r+b") as fh:  # overwrite in place, across a segment boundary
        fh.seek(65530)
        fh.write(b"X" * 20)
    expected[65530:65550] = b"X" * 20
    assert path.read_bytes() == expected

    os.truncate(path, 100_000)  # up: zeros
    expected += bytes(100_000 - len(expected))
    assert path.read_bytes() == expected
    os.truncate(path, 10)  # down
    assert path.read_bytes() == expected[:10]
    os.truncate(path, 70_000)  # up again: the old tail must not come back
    assert path.read_bytes() == expected[:10] + bytes(69_990)

    sparse = mnt.mnt / "sparse.bin"
    fd = os.open(sparse, os.O_CREAT | os.O_WRONLY, 0o644)
    try:
        os.pwrite(fd, b"end", 5 * MiB)
        os.pwrite(fd, b"start", 0)
        os.pwrite(fd, b"middle", 2 * MiB + 7)
    finally:
        os.close(fd)
    data = sparse.read_bytes()
    assert len(data) == 5 * MiB + 3
    assert data[:5] == b"start" and data[2 * MiB + 7 : 2 * MiB + 13] == b"middle"
    assert data[-3:] == b"end" and data.count(0) == len(data) - 14


def test_big_versions_leave_no_copy_in_the_staging_area(mnt: Mounted) -> None:
    # A streamed file's copy goes once it is uploaded; so does the copy an in-place edit
    # kept as its overlay's base, once the edit is committed in turn.
    staging = mnt.state / "staging"
    data = os.urandom(3 * MiB)
    (mnt.mnt / "streamed.bin").write_bytes(data)
    with open(mnt.mnt / "edited.bin", "wb") as fh:
        fh.write(data)
        fh.flush()
        fh.seek(100)
        fh.write(b"edit")
    fsync_dir(mnt.mnt)  # returns once every version closed before it is committed
    assert [p for p in staging.glob("*.obj") if p.stat().st_size] == []  # empty: made ahead
    assert (mnt.mnt / "streamed.bin").read_bytes() == data
    assert (mnt.mnt / "edited.bin").read_bytes() == data[:100] + b"edit" + data[104:]


def test_editor_style_save_and_empty_files(mnt: Mounted) -> None:
    doc = mnt.mnt / "note.md"
    doc.write_bytes(b"version 1\n")
    tmp = mnt.mnt / ".note.md.swp"
    with open(tmp, "wb") as fh:
        fh.write(b"version 2\n")
        fh.flush()
        os.fsync(fh.fileno())
    os.rename(tmp, doc)
    assert doc.read_bytes() == b"version 2\n"
    assert not tmp.exists()
    empty = mnt.mnt / "empty"
    empty.touch()
    assert empty.read_bytes() == b"" and empty.stat().st_size == 0


def test_open_with_trunc_and_excl(mnt: Mounted) -> None:
    path = mnt.mnt / "flags.txt"
    path.write_bytes(b"0123456789")
    fd = os.open(path, os.O_WRONLY | os.O_TRUNC)
    os.write(fd, b"ab")
    os.close(fd)
    assert path.read_bytes() == b"ab"
    with pytest.raises(FileExistsError):
        os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL)


def test_names_unicode_and_length(mnt: Mounted) -> None:
    d = mnt.mnt / "names"
    d.mkdir()
    for name in ["patiënt-Åsa-日本語-🩺.txt", "x" * 255, "with space & 'quotes'"]:
        (d / name).write_bytes(name.encode())
        assert (d / name).read_bytes() == name.encode()
    assert sorted(os.listdir(d)) == sorted(
        ["patiënt-Åsa-日本語-🩺.txt", "x" * 255, "with space & 'quotes'"]
    )
    with pytest.raises(OSError) as info:
        (d / ("y" * 256)).write_bytes(b"")
    assert info.value.errno == errno.ENAMETOOLONG


def test_many_files_in_one_directory(mnt: Mounted) -> None:
    d = mnt.mnt / "many"
    d.mkdir()
    count = 5000
    for i in range(count):
        (d / f"f{i:05d}").write_bytes(b"%d" % i)
    names = os.listdir(d)
    assert len(names) == count and len(set(names)) == count
    assert (d / "f04321").read_bytes() == b"4321"


def test_unlink_while_open(mnt: Mounted) -> None:
    path = mnt.mnt / "open-then-unlinked"
    data = record(7, 300_000)
    path.write_bytes(data)
    with open(path, "rb") as fh:
        path.unlink()
        assert not path.exists()
        assert fh.read() == data


def test_rename_cases(mnt: Mounted) -> None:
    root = mnt.mnt / "ren"
    (root / "d1").mkdir(parents=True)
    (root / "d2").mkdir()
    (root / "d1/f").write_bytes(b"f")
    (root / "d2/g").write_bytes(b"g")
    os.rename(root / "d1/f", root / "d2/f")  # across directories
    assert (root / "d2/f").read_bytes() == b"f" and not (root / "d1/f").exists()
    os.rename(root / "d2/f", root / "d2/g")  # over a file
    assert (root / "d2/g").read_bytes() == b"f"
    os.rename(root / "d2", root / "d1/d2")  # a directory, into another
    assert (root / "d1/d2/g").read_bytes() == b"f"
    (root / "x").mkdir()
    (root / "x/inside").write_bytes(b"")
    with pytest.raises(OSError) as info:
        os.rename(root / "d1/d2", root / "x")
    assert info.value.errno in (errno.ENOTEMPTY, errno.EEXIST)
    (root / "a").write_bytes(b"a")
    (root / "b").write_bytes(b"b")
    assert renameat2(root / "a", root / "b", RENAME_NOREPLACE) == errno.EEXIST
    assert renameat2(root / "a", root / "b", RENAME_EXCHANGE) == errno.EINVAL
    # No whiteouts here (overlayfs's): refused, not a plain rename that leaves none behind.
    assert renameat2(root / "a", root / "c", RENAME_WHITEOUT) == errno.EINVAL
    assert (root / "a").read_bytes() == b"a" and (root / "b").read_bytes() == b"b"
    assert not (root / "c").exists()


RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2
RENAME_WHITEOUT = 4


def renameat2(old: Path, new: Path, flags: int) -> int:
    libc = ctypes.CDLL(None, use_errno=True)
    at_fdcwd = -100
    rc = libc.renameat2(at_fdcwd, os.fsencode(old), at_fdcwd, os.fsencode(new), flags)
    return 0 if rc == 0 else ctypes.get_errno()


def test_permissions_and_errnos(mnt: Mounted) -> None:
    root = mnt.mnt / "perm"
    root.mkdir()
    f = root / "f"
    f.write_bytes(b"x")
    os.chmod(f, 0o640)
    assert f.stat().st_mode & 0o777 == 0o640
    os.chown(f, os.getuid(), os.getgid())  # to the owner it already has: fine
    if os.geteuid() == 0:  # root gives files away, as `tar x`, `rsync -a` and `cp -a` do
        os.chown(f, 1234, 5678)
        assert (f.stat().st_uid, f.stat().st_gid) == (1234, 5678)
        os.chown(f, -1, 0)
        assert (f.stat().st_uid, f.stat().st_gid) == (1234, 0)
        os.chown(f, os.getuid(), os.getgid())
    else:  # anyone else may not (the kernel refuses it before medfs sees it)
        with pytest.raises(PermissionError):
            os.chown(f, os.getuid() + 1, -1)
    with pytest.raises(PermissionError):
        os.link(f, root / "hard")
    with pytest.raises(PermissionError):
        os.mkfifo(root / "fifo")
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(f, os.O_RDWR)
    try:
        assert libc.fallocate(fd, 0, ctypes.c_long(0), ctypes.c_long(1 << 20)) == -1
        assert ctypes.get_errno() == errno.EOPNOTSUPP
    finally:
        os.close(fd)
    with pytest.raises(OSError) as info:
        os.setxattr(f, "user.note", b"x")
    assert info.value.errno == errno.ENOTSUP
    assert json.loads(os.getxattr(f, "user.medfs.info"))["size"] == 1
    with pytest.raises(FileExistsError):
        root.mkdir()
    with pytest.raises(OSError) as info:
        root.rmdir()
    assert info.value.errno == errno.ENOTEMPTY
    with pytest.raises(FileNotFoundError):
        (root / "missing").read_bytes()
    with pytest.raises(NotADirectoryError):
        os.listdir(f)
    os.symlink("f", root / "s")
    assert os.readlink(root / "s") == "f" and (root / "s").read_bytes() == b"x"
    with pytest.raises(IsADirectoryError):
        (root).unlink()
    fs = os.statvfs(mnt.mnt)
    assert fs.f_namemax == 255 and fs.f_bavail > 0


def test_ls_stat_and_ciphertext_on_ipfs(mnt: Mounted, kubo_node: EmbeddedNode) -> None:
    d = mnt.mnt / "inspect"
    d.mkdir()
    data = record(3, 150_000)
    (d / "r.txt").write_bytes(data)
    out = mnt.medfs("stat", str(d / "r.txt"), "--json")
    assert out.returncode == 0, out.stderr
    info = json.loads(out.stdout)
    assert info["size"] == len(data) and info["cid"].startswith("baf")  # CIDv1
    assert len(info["recipients"]) == 1
    listing = json.loads(mnt.medfs("ls", str(d), "--json").stdout)
    assert [(row["path"], row["size"]) for row in listing] == [(str(d / "r.txt"), len(data))]
    out = subprocess.run(
        [str(kubo_node.binary), "cat", info["cid"]],
        env={**os.environ, "IPFS_PATH": str(kubo_node.repo)},
        capture_output=True,
        check=True,
    )
    assert out.stdout.startswith(b"MEDFSOBJ") and MARKER not in out.stdout
    assert len(out.stdout) > len(data)
    stats = json.loads(os.getxattr(mnt.mnt, "user.medfs.stats"))
    assert stats["commits"] >= 1 and stats["pending"] == 0
    # cp and friends size their writes by st_blksize: 1 MiB, 16 segments a request.
    assert (d / "r.txt").stat().st_blksize == 1 << 20
    # The kernel asks this before every write; no such attribute, whatever the name.
    for name in ("security.capability", "user.medfs.nosuch", "trusted.x"):
        with pytest.raises(OSError) as err:
            os.getxattr(d / "r.txt", name)
        assert err.value.errno == errno.ENODATA, name


def test_big_file(mnt: Mounted, tmp_path: Path) -> None:
    src = tmp_path / "big"
    with open(src, "wb") as fh:
        for i in range(300):
            fh.write(hashlib.sha256(b"%d" % i).digest() * (MiB // 32))
    subprocess.run(["cp", str(src), str(mnt.mnt / "big")], check=True)
    assert (mnt.mnt / "big").stat().st_size == 300 * MiB
    assert sha256(mnt.mnt / "big") == sha256(src)


def fetch_stats(mnt: Mounted) -> tuple[int, int]:
    stats = json.loads(os.getxattr(mnt.mnt, "user.medfs.stats"))
    return int(stats["fetches"]), int(stats["segments_fetched"])


def test_random_reads_never_read_ahead_but_sequential_ones_do(mnt: Mounted) -> None:
    seg = 64 * 1024
    data = hashlib.sha256(b"readahead").digest() * (4 * MiB // 32)
    (mnt.mnt / "ra.bin").write_bytes(data)  # a new version: none of it in the segment cache
    fd = os.open(mnt.mnt / "ra.bin", os.O_RDONLY | os.O_DIRECT)
    try:
        buf = mmap.mmap(-1, 128 * 1024)  # O_DIRECT wants an aligned buffer
        # The second read lands 600 KiB past where the first ended, as one random read in
        # about 500 does in a 1 GiB file: it must fetch its own segment, not a window.
        for off in (10 * seg + 100, 10 * seg + 100 + 4096 + 600 * 1024):
            before = fetch_stats(mnt)
            assert os.preadv(fd, [memoryview(buf)[:4096]], off) == 4096
            assert buf[:4096] == data[off : off + 4096]
            after = fetch_stats(mnt)
            assert after[1] - before[1] == 1
        # A sequential reader gets read-ahead: far fewer fetches than reads.
        before = fetch_stats(mnt)
        for off in range(0, len(data), 128 * 1024):
            assert os.preadv(fd, [buf], off) == 128 * 1024
            assert buf[:] == data[off : off + 128 * 1024]
        after = fetch_stats(mnt)
        assert after[0] - before[0] <= 6  # 32 reads
    finally:
        os.close(fd)


def test_remount_keeps_everything_and_no_plaintext_anywhere(
    tmp_path: Path, kubo_api: str, kubo_node: EmbeddedNode
) -> None:
    src = tmp_path / "src"
    src.mkdir()
    make_tree(src)
    (src / f"name-{MARKER.decode()}").write_bytes(record(5, 1000))
    with mounted(tmp_path / "m", kubo_api) as m:
        subprocess.run(["cp", "-a", f"{src}/.", str(m.mnt)], check=True)
        with open(m.mnt / "a/rec-1.txt", "r+b") as fh:  # an in-place edit goes via staging
            fh.seek(10)
            fh.write(MARKER)
        expected = tree_digest(m.mnt)
        m.umount()
        assert not os.listdir(m.mnt)
        m.mount()
        assert tree_digest(m.mnt) == expected
        m.umount()
    assert files_containing(m.state, MARKER) == []
    assert files_containing(kubo_node.repo, MARKER) == []


def test_mount_errors(tmp_path: Path, kubo_api: str) -> None:
    state = tmp_path / "state"
    env = {"MEDFS_STATE": str(state), "MEDFS_PASSPHRASE": PASSPHRASE}

    out = run_medfs("mount", str(tmp_path / "nowhere"), "--api", kubo_api, env=env)
    assert out.returncode == 2 and "not an initialised" in out.stderr
    init_state(state)
    out = run_medfs("mount", str(tmp_path / "nowhere"), "--api", kubo_api, env=env)
    assert out.returncode == 2 and "not a directory" in out.stderr
    (tmp_path / "mnt").mkdir()
    wrong = {**env, "MEDFS_PASSPHRASE": "wrong"}
    out = run_medfs("mount", str(tmp_path / "mnt"), "--api", kubo_api, env=wrong)
    assert out.returncode == 6, out.stderr
    assert out.stderr.startswith("medfs: error:") and "Traceback" not in out.stderr
    assert not os.path.ismount(tmp_path / "mnt")
    out = run_medfs("mount", str(tmp_path / "mnt"), "--api", "/ip4/127.0.0.1/tcp/1", env=env)
    assert out.returncode == 3 and "cannot reach the IPFS API" in out.stderr
    assert not os.path.ismount(tmp_path / "mnt")
    out = run_medfs("umount", str(tmp_path / "mnt"), env=env)
    assert out.returncode == 2 and "not mounted" in out.stderr
    (tmp_path / "mnt2").mkdir()
    with mounted(tmp_path, kubo_api) as m:
        out = run_medfs("mount", str(tmp_path / "mnt2"), "--api", kubo_api, env=env)
        assert out.returncode == 9 and "already mounted" in out.stderr
        assert not os.path.ismount(tmp_path / "mnt2")
        assert m.daemon_pid() is not None


def test_read_only_mount(tmp_path: Path, kubo_api: str) -> None:
    with mounted(tmp_path, kubo_api) as m:
        (m.mnt / "f").write_bytes(b"data")
        m.umount()
        m.mount("-o", "ro")
        assert (m.mnt / "f").read_bytes() == b"data"
        with pytest.raises(OSError) as info:
            (m.mnt / "g").write_bytes(b"")
        assert info.value.errno == errno.EROFS
        m.umount()
