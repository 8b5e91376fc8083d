"""scripts/bench --quick runs to completion and reports every figure (issue #8).

No figure is checked against its target here: timings depend on the machine and its load, and
the suite has no timed assertions. What is checked is that every row is there, with positive
numbers, and that the run left no mount, node or temporary directory behind.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import statistics
import subprocess
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT

# Rows each section reports, in order.
EXPECTED = {
    "adapter": 2,
    "mount": 4,
    "random": 5,
    "tree": 3,
    "rss": 2,
    "share": 2,
    "revoke": 1,
    "gocryptfs": 2,
    "ceilings": 8,
}


def _processes_using(path: Path) -> list[str]:
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            environ = (proc / "environ").read_bytes()
            cmdline = (proc / "cmdline").read_bytes()
        except OSError:
            continue
        if str(path).encode() in environ or str(path).encode() in cmdline:
            found.append(cmdline.replace(b"\0", b" ").decode(errors="replace"))
    return found


@pytest.mark.skipif(not os.path.exists("/dev/fuse"), reason="needs FUSE")
@pytest.mark.skipif(shutil.which("fusermount3") is None, reason="needs fusermount3")
def test_quick_bench_runs_to_completion(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    work = tmp_path / "tmp"
    work.mkdir()
    env = {**os.environ, "TMPDIR": str(work)}
    env.pop("MEDFS_IPFS_API", None)
    env.pop("MEDFS_STATE", None)
    done = subprocess.run(
        [str(REPO_ROOT / "scripts" / "bench"), "--quick", "--json", str(out)],
        capture_output=True,
        text=True,
        env=env,
        timeout=900,
        check=False,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["quick"] is True
    assert result["sections"] == list(EXPECTED)
    machine = result["machine"]
    assert machine["nproc"] > 0 and machine["cpu"] and machine["kernel"]
    by_section: dict[str, list[dict[str, object]]] = {}
    for row in result["rows"]:
        by_section.setdefault(str(row["section"]), []).append(row)
    assert {name: len(rows) for name, rows in by_section.items()} == EXPECTED
    for row in result["rows"]:
        assert isinstance(row["value"], int | float) and row["value"] > 0, row
        if row["baseline_value"] is not None:
            assert row["baseline_value"] > 0, row
            assert row["ratio"] is not None and row["ratio"] > 0, row
        assert row["met"] in (True, False, None), row
        # Every row is in the printed table too.
        assert str(row["measure"]) in done.stdout
    # The random-read row counts what the mount fetched, read by read.
    (segments,) = [r for r in by_section["random"] if r["unit"] == "segments"]
    for name in ("histogram", "node_histogram"):  # reads from the local copy, then the node
        histogram = segments["details"][name]  # type: ignore[index]
        assert sum(histogram.values()) == result["sizes"]["random_reads"]
    # The big write and the tree compare medians of rounds taken in turn, each round kept.
    tree = by_section["tree"][0]
    rounds = tree["details"]["rounds"]  # type: ignore[index]
    assert len(rounds["cp_s"]) == len(rounds["add_s"]) == result["sizes"]["tree_rounds"]
    assert tree["value"] in rounds["cp_s"] and tree["baseline_value"] in rounds["add_s"]
    probes = tree["details"]["create_us"]  # type: ignore[index]
    assert set(probes) == {"medfs_staging", "kubo_blocks"} and min(probes.values()) > 0
    write = by_section["mount"][0]
    rounds = write["details"]["rounds"]  # type: ignore[index]
    assert len(rounds["cp_s"]) == len(rounds["add_s"]) == result["sizes"]["big_rounds"]
    mib = result["sizes"]["big"] / (1 << 20)
    assert math.isclose(write["value"], mib / statistics.median(rounds["cp_s"]))
    assert math.isclose(write["baseline_value"], mib / statistics.median(rounds["add_s"]))
    # So do the cold reads: from the copy and from the node against `ipfs cat`, and against
    # gocryptfs's read.
    reads = [*by_section["mount"][2:4], by_section["gocryptfs"][1]]
    for row, (mine, theirs) in zip(
        reads,
        [("cat_s", "ipfs_cat_s"), ("cat_s", "ipfs_cat_s"), ("medfs_cat_s", "gocryptfs_cat_s")],
        strict=True,
    ):
        rounds = row["details"]["rounds"]  # type: ignore[index]
        assert len(rounds[mine]) == len(rounds[theirs]) == result["sizes"]["read_rounds"], row
        assert math.isclose(row["value"], mib / statistics.median(rounds[mine])), row
        assert math.isclose(row["baseline_value"], mib / statistics.median(rounds[theirs])), row
    # Nothing left behind: no mount, no daemon, no temporary directory.
    mounts = Path("/proc/self/mountinfo").read_text()
    assert str(work) not in mounts
    assert _processes_using(work) == []
    assert list(work.iterdir()) == []
