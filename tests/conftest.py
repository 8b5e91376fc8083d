"""Shared fixtures: a real Kubo daemon per test session, in a throwaway repo on loopback."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from medfs.ipfs import IPFS
from medfs.kubo import EmbeddedNode

REPO_ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def kubo_node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedNode]:
    node = EmbeddedNode(tmp_path_factory.mktemp("kubo-state"))
    try:
        node.ensure_running()
        yield node
    finally:
        node.stop()


@pytest.fixture(scope="session")
def kubo_api(kubo_node: EmbeddedNode) -> str:
    api = kubo_node.api()
    assert api is not None
    return api


@pytest.fixture
def ipfs(kubo_api: str) -> Iterator[IPFS]:
    client = IPFS(kubo_api)
    yield client
    client.close()


def run_medfs(
    *args: str, env: dict[str, str] | None = None, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    """Run the real CLI in a subprocess, as a user would."""
    full_env = dict(os.environ)
    full_env.pop("MEDFS_IPFS_API", None)
    full_env.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "medfs", *args],
        capture_output=True,
        text=True,
        env=full_env,
        timeout=timeout,
        check=False,
    )
