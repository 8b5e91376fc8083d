"""The crash-safe file writers every module that keeps secrets on disk goes through."""

from __future__ import annotations

import fcntl
import os
import stat
from pathlib import Path

import pytest

from medfs import durable


def test_write_new_sets_the_mode_whatever_the_umask(tmp_path: Path) -> None:
    old = os.umask(0o077)
    try:
        durable.write_new(tmp_path / "pub", b"public", 0o644)
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "pub").stat().st_mode) == 0o644
    assert (tmp_path / "pub").read_bytes() == b"public"


def test_write_new_never_overwrites_nor_follows_a_planted_link(tmp_path: Path) -> None:
    (tmp_path / "key").write_bytes(b"the old key")
    with pytest.raises(FileExistsError):
        durable.write_new(tmp_path / "key", b"new")
    assert (tmp_path / "key").read_bytes() == b"the old key"
    (tmp_path / "link").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(FileExistsError):
        durable.write_new(tmp_path / "link", b"secret")
    assert not (tmp_path / "elsewhere").exists()


def test_replace_swaps_the_content_and_leaves_no_temporary_file(tmp_path: Path) -> None:
    target = tmp_path / "anchors.json"
    durable.replace(target, b"first")
    durable.replace(target, b"second, longer")
    assert target.read_bytes() == b"second, longer"
    assert stat.S_IMODE(target.stat().st_mode) == 0o600
    assert sorted(p.name for p in tmp_path.iterdir()) == ["anchors.json"]


def test_write_all_finishes_short_writes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real = os.write
    monkeypatch.setattr(os, "write", lambda fd, data: real(fd, bytes(data)[:7]))
    fd = os.open(tmp_path / "f", os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        durable.write_all(fd, b"x" * 100 + b"end")
    finally:
        os.close(fd)
    assert (tmp_path / "f").read_bytes() == b"x" * 100 + b"end"


def _inode_flags(path: Path) -> int | None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        buf = bytearray(8)
        fcntl.ioctl(fd, durable._FS_IOC_GETFLAGS, buf)
        return int.from_bytes(buf[:4], "little")
    except OSError:
        return None  # a filesystem without inode flags (tmpfs)
    finally:
        os.close(fd)


def test_an_empty_directory_is_made_anew_under_a_parent_marked_as_a_top(tmp_path: Path) -> None:
    staging = tmp_path / "staging"
    staging.mkdir(mode=0o755)
    # Left by crashes between a mkdir and its rename, by this version and an older one.
    (tmp_path / "staging.new").mkdir()
    (tmp_path / "staging.new-00112233445566ff").mkdir()
    before = staging.stat().st_ino
    assert durable.renew_empty_directory(staging)
    assert staging.is_dir() and staging.stat().st_ino != before
    assert stat.S_IMODE(staging.stat().st_mode) == 0o700
    assert sorted(p.name for p in tmp_path.iterdir()) == ["staging"]
    flags = _inode_flags(tmp_path)
    if flags is not None:  # ext4 here: the hint that places the new directory elsewhere
        assert flags & durable._FS_TOPDIR_FL


def test_each_renewal_makes_its_directory_under_a_new_name(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # ext4 hashes a new top-level directory's name to pick its block group: a name used again
    # would put every mount's staging directory back where the last one freed its files.
    made: list[str] = []
    real_rename = Path.rename

    def rename(self: Path, target: str | Path) -> Path:
        made.append(self.name)
        return real_rename(self, target)

    monkeypatch.setattr(Path, "rename", rename)
    staging = tmp_path / "staging"
    staging.mkdir()
    assert durable.renew_empty_directory(staging)
    assert durable.renew_empty_directory(staging)
    assert len(made) == 2 and made[0] != made[1]
    assert all(name.startswith("staging.new-") for name in made)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["staging"]


def test_a_directory_with_anything_in_it_is_left_as_it_was(tmp_path: Path) -> None:
    staging = tmp_path / "staging"
    staging.mkdir()
    (staging / "waiting.obj").write_bytes(b"a version waiting for its upload")
    before = staging.stat().st_ino
    assert not durable.renew_empty_directory(staging)
    assert staging.stat().st_ino == before
    assert (staging / "waiting.obj").read_bytes() == b"a version waiting for its upload"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["staging"]
