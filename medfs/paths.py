"""Where medfs keeps things on this machine."""

from __future__ import annotations

import os
from pathlib import Path

KUBO_VERSION = "0.43.1"


def _xdg(var: str, fallback: str) -> Path:
    value = os.environ.get(var)
    # The XDG spec says relative values are invalid and must be ignored.
    if value and Path(value).is_absolute():
        return Path(value)
    return Path.home() / fallback


def state_dir(given: str | os.PathLike[str] | None = None) -> Path:
    """The state directory: `--state`, else `$MEDFS_STATE`, else `$XDG_DATA_HOME/medfs`."""
    if given:
        return Path(given).expanduser().absolute()
    env = os.environ.get("MEDFS_STATE")
    if env:
        return Path(env).expanduser().absolute()
    return _xdg("XDG_DATA_HOME", ".local/share") / "medfs"


def manifest_path(path: str, mountpoint: str | None) -> str:
    """A user's PATH as a path in the manifest: inside the running mount, or as given."""
    if mountpoint:
        absolute = str(Path(path).absolute())
        if absolute == mountpoint or absolute.startswith(mountpoint.rstrip("/") + "/"):
            return "/" + absolute[len(mountpoint) :].strip("/")
    return path


def installed_kubo_binary() -> Path:
    """Where `scripts/setup` puts the Kubo it builds: a cache, since it can always be rebuilt."""
    root = os.environ.get("MEDFS_TOOLS_DIR")
    base = Path(root) if root else _xdg("XDG_CACHE_HOME", ".cache") / "medfs"
    return base / f"kubo-v{KUBO_VERSION}" / "ipfs"
