"""The audit log: each kind of tampering detected and named, crash recovery, batching, secrecy,
filters, and the `medfs audit` commands run as a user would."""

from __future__ import annotations

import functools
import hashlib
import itertools
import json
import logging
import os
import shutil
import signal
import stat
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from medfs import audit, state
from medfs.errors import AuditError
from medfs.identity import Identity
from medfs.ipfs import IPFS
from medfs.recipients import b64encode
from tests.conftest import run_medfs

ROOT = Path(__file__).resolve().parent.parent
PASSPHRASE = "audit test passphrase"
MARKER = "PATIENT-MARKER-7f3a"


@functools.cache
def owner() -> Identity:
    return Identity.generate()


@functools.cache
def mallory() -> Identity:
    return Identity.generate()


def trusted() -> dict:
    return {owner().fingerprint: owner().public}


class FakeIPFS:
    """Just enough of the IPFS adapter for `AuditLog.anchor`."""

    def __init__(self) -> None:
        self.objects: dict[str, bytes] = {}

    def add(self, data: bytes) -> str:
        cid = "bafkfake" + hashlib.sha256(data).hexdigest()[:40]
        self.objects[cid] = data
        return cid


@dataclass
class Log:
    path: Path
    key: bytes

    @property
    def anchors_path(self) -> Path:
        return self.path.with_name(audit.ANCHORS_NAME)

    def open(self, **kwargs) -> audit.AuditLog:
        return audit.AuditLog(self.path, owner(), self.key, **kwargs)

    def lines(self) -> list[bytes]:
        return self.path.read_bytes().split(b"\n")[:-1]

    def write_lines(self, lines: list[bytes]) -> None:
        self.path.write_bytes(b"".join(line + b"\n" for line in lines))

    def verify(self, *, anchors: bool = True) -> audit.VerifyResult:
        found = audit.load_anchors(self.anchors_path) if anchors else []
        return audit.verify(self.path, trusted(), found)

    def entries(self, **kwargs) -> list[audit.Entry]:
        return list(audit.read_entries(self.path, self.key, **kwargs))


def record_some(log: audit.AuditLog) -> None:
    """Eight entries, one of each kind the filesystem writes most."""
    log.append("mount", mountpoint="/mnt/records")
    log.append("create", path="/lab/blood.pdf")
    log.append("version", cid="bafkreiaaaa", path="/lab/blood.pdf")
    log.append_batched("open", path="/lab/blood.pdf", pid=4242, uid=1000, command="evince")
    log.append("rename", path="/lab/blood.pdf", new_path="/lab/2025/blood.pdf")
    log.append("share", recipient="medfs1" + "a" * 32, paths=["/lab/2025"])
    log.append("revoke", recipient="medfs1" + "a" * 32, paths=["/lab/2025"])
    log.append("delete", path="/lab/2025/blood.pdf")


@pytest.fixture
def log(tmp_path) -> Log:
    made = Log(tmp_path / audit.LOG_NAME, audit.audit_key(os.urandom(32)))
    with made.open() as writer:
        record_some(writer)
    return made


def edited(line: bytes, **changes) -> bytes:
    obj = json.loads(line)
    obj.update(changes)
    return audit.canonical(obj)


def signed(line: bytes, by: Identity, **changes) -> bytes:
    obj = json.loads(line)
    obj.update(changes)
    del obj["sig"]
    obj["sig"] = b64encode(by.sign(audit.ENTRY_PURPOSE, audit.canonical(obj)))
    return audit.canonical(obj)


def assert_bad(result: audit.VerifyResult, first_bad: int, *needles: str) -> None:
    assert not result.ok
    assert result.first_bad == first_bad, result
    assert result.count == first_bad
    for needle in needles:
        assert needle in result.reason, result.reason


# --- an intact log -------------------------------------------------------------------------------


def test_intact_log_verifies_and_reads_back(log):
    result = log.verify()
    assert result.ok and result.first_bad is None and result.count == 8
    entries = log.entries()
    assert [e.seq for e in entries] == list(range(8))
    assert [e.event for e in entries] == [
        "mount", "create", "version", "open", "rename", "share", "revoke", "delete",
    ]  # fmt: skip
    assert entries[2].cid == "bafkreiaaaa"
    assert entries[3].details == {
        "path": "/lab/blood.pdf",
        "pid": 4242,
        "uid": 1000,
        "command": "evince",
    }
    assert {e.actor for e in entries} == {owner().fingerprint}
    assert all(a.time_ns <= b.time_ns for a, b in itertools.pairwise(entries))


def test_lines_are_canonical_and_chained(log):
    lines = log.lines()
    prev = audit.GENESIS
    for n, line in enumerate(lines):
        obj = json.loads(line)
        assert audit.canonical(obj) == line
        assert obj["seq"] == n and obj["prev"] == prev and obj["v"] == 1
        prev = hashlib.sha256(line).hexdigest()


def test_log_file_is_private(log):
    assert stat.S_IMODE(log.path.stat().st_mode) == 0o600


def test_reopening_continues_the_chain(log):
    with log.open() as writer:
        assert writer.count == 8
        assert writer.append("unmount") == 8
    assert log.verify().ok and log.verify().count == 9


def test_an_empty_or_missing_log_is_intact(tmp_path):
    result = audit.verify(tmp_path / "audit.log", trusted())
    assert result.ok and result.count == 0


# --- tampering, each kind detected and the first bad entry named ---------------------------------


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("time_ns", 1),
        ("event", "create"),
        ("cid", "bafkreiforged"),
        ("actor", "medfs1" + "b" * 32),
        ("prev", "f" * 64),
        ("seq", 9),
        ("sealed", None),  # another entry's sealed details
        ("sig", None),  # another entry's signature
    ],
)
def test_edited_field_is_detected(log, field, value):
    lines = log.lines()
    if value is None:
        value = json.loads(lines[6])[field]
    lines[4] = edited(lines[4], **{field: value})
    log.write_lines(lines)
    assert_bad(log.verify(), 4)


def test_edited_bytes_are_detected(log):
    lines = log.lines()
    lines[5] = lines[5].replace(b'"seq":5', b'"seq": 5')  # valid JSON, not canonical
    log.write_lines(lines)
    assert_bad(log.verify(), 5, "canonical")
    lines[5] = lines[5][:40] + b"garbage" + lines[5][47:]
    log.write_lines(lines)
    assert_bad(log.verify(), 5)


def test_deleted_entry_is_detected(log):
    lines = log.lines()
    log.write_lines(lines[:3] + lines[4:])
    assert_bad(log.verify(), 3, "holds entry 4", "entry 3 is missing (deleted)")
    log.write_lines(lines[1:])
    assert_bad(log.verify(), 0, "deleted")
    log.write_lines(lines[:2] + lines[5:])
    assert_bad(log.verify(), 2, "entry 2..4 is missing")


def test_inserted_entry_is_detected(log):
    lines = log.lines()
    log.write_lines([*lines[:5], lines[2], *lines[5:]])  # a replayed copy
    assert_bad(log.verify(), 5, "holds entry 2", "duplicated or inserted")
    # A forged entry in the right place, chained correctly, claiming to be the owner's.
    forged = signed(lines[5], mallory(), event="delete", prev=hashlib.sha256(lines[4]).hexdigest())
    log.write_lines([*lines[:5], forged, *lines[5:]])
    assert_bad(log.verify(), 5, "signature")
    # The same, renumbering everything after it: the next entry no longer chains.
    rest = [edited(line, seq=n + 6) for n, line in enumerate(lines[5:])]
    log.write_lines([*lines[:5], forged, *rest])
    assert_bad(log.verify(), 5)


def test_reordered_entries_are_detected(log):
    lines = log.lines()
    lines[2], lines[3] = lines[3], lines[2]
    log.write_lines(lines)
    assert_bad(log.verify(), 2, "holds entry 3", "out of order")


def test_reordered_and_renumbered_entries_are_detected(log):
    lines = log.lines()
    second, third = lines[2], lines[3]
    # Swapped and renumbered, even re-signed with the owner's own key:
    lines[2] = signed(third, owner(), seq=2, prev=json.loads(second)["prev"])
    lines[3] = signed(second, owner(), seq=3, prev=hashlib.sha256(lines[2]).hexdigest())
    log.write_lines(lines)
    # Re-signed in place by the owner, the chain breaks at the entry after the rewrite.
    assert_bad(log.verify(), 4, "chain")


def test_resigned_with_another_key_is_detected(log):
    lines = log.lines()
    original = lines[3]
    lines[3] = signed(original, mallory(), actor=mallory().fingerprint)
    log.write_lines(lines)
    assert_bad(log.verify(), 3, mallory().fingerprint, "not a trusted identity")
    lines[3] = signed(original, mallory())  # still claiming to be the owner
    log.write_lines(lines)
    assert_bad(log.verify(), 3, "does not verify")


def test_whole_tail_resigned_with_another_key_is_detected(log):
    lines = log.lines()
    prev = json.loads(lines[5])["prev"]
    for n in range(5, len(lines)):
        lines[n] = signed(lines[n], mallory(), prev=prev)
        prev = hashlib.sha256(lines[n]).hexdigest()
    log.write_lines(lines)
    assert_bad(log.verify(), 5, "signature")


def test_truncated_tail_is_detected_against_the_last_anchor(log):
    with log.open() as writer:
        anchor = writer.anchor(FakeIPFS())
        writer.append("unmount")
    assert anchor.count == 8 and log.verify().anchors == 1
    lines = log.lines()
    assert json.loads(lines[8])["event"] == "anchor" and json.loads(lines[8])["cid"] == anchor.cid
    log.write_lines(lines[:6])
    assert_bad(log.verify(), 6, "cut off the end", "recorded 8", anchor.cid)


def test_truncation_without_an_anchor_is_undetectable(log):
    # By construction: what remains is a valid chain. This is why umount anchors.
    log.write_lines(log.lines()[:5])
    result = log.verify()
    assert result.ok and result.count == 5
    # Likewise the entries after the last anchor (at least the anchor's own entry).
    with log.open() as writer:
        writer.anchor(FakeIPFS())
        writer.append("unmount")
    log.write_lines(log.lines()[:5])
    assert log.verify().ok


def test_history_rewritten_with_the_owners_key_is_caught_by_an_anchor(log):
    with log.open() as writer:
        writer.anchor(FakeIPFS())
    lines = log.lines()
    prev = json.loads(lines[3])["prev"]
    for n in range(3, len(lines)):
        lines[n] = signed(lines[n], owner(), prev=prev, time_ns=n)
        prev = hashlib.sha256(lines[n]).hexdigest()
    log.write_lines(lines)
    assert log.verify(anchors=False).ok  # only an anchor can tell
    assert_bad(log.verify(), 7, "anchor")


def test_a_forged_anchor_is_rejected(log):
    with log.open() as writer:
        writer.anchor(FakeIPFS())
    records = json.loads(log.anchors_path.read_text())
    records[0]["count"] = 3
    log.anchors_path.write_text(json.dumps(records))
    result = log.verify()
    assert not result.ok and result.first_bad is None
    assert "anchor" in result.reason and "does not verify" in result.reason


def test_anchor_document_holds_no_secret(log):
    ipfs = FakeIPFS()
    with log.open() as writer:
        anchor = writer.anchor(ipfs)
    document = ipfs.objects[anchor.cid]
    assert set(json.loads(document)) == {"type", "v", "count", "head", "time_ns", "actor", "sig"}
    assert audit.Anchor.from_document(document, anchor.cid) == anchor
    assert audit.load_anchors(log.anchors_path) == [anchor]


# --- crashes ------------------------------------------------------------------------------------


def test_torn_last_line_is_recovered_with_an_intact_chain(log, caplog):
    whole = log.lines()[5]
    with open(log.path, "ab") as fh:
        fh.write(whole[: len(whole) // 2])  # a write cut short
    assert_bad(log.verify(), 8, "incomplete")
    with caplog.at_level(logging.WARNING, logger="medfs.audit"), log.open() as writer:
        assert writer.count == 9
        writer.append("mount")
    assert "torn" in caplog.text
    result = log.verify()
    assert result.ok and result.count == 10
    recovered = log.entries()[8]
    assert recovered.event == "recovered"
    assert recovered.details["bytes_dropped"] == len(whole) // 2


def test_zero_filled_tail_is_recovered(log, caplog):
    with open(log.path, "ab") as fh:
        fh.write(b"\x00" * 3000 + b"\n" + b"\x00" * 1000)
    with caplog.at_level(logging.WARNING, logger="medfs.audit"), log.open():
        pass
    assert log.verify().ok
    assert log.entries()[-1].details["bytes_dropped"] == 4001


def test_damaged_last_line_is_not_papered_over(log):
    lines = log.lines()
    lines[-1] = lines[-1].replace(b'"v":1', b'"v":2')
    log.write_lines(lines)
    with pytest.raises(AuditError, match="damaged"):
        log.open()
    assert log.lines() == lines  # nothing dropped, nothing appended


CRASHER = """
import os, sys
from medfs import audit
from medfs.identity import Identity
identity = Identity.from_secret_bytes(bytes.fromhex(os.environ["TEST_SECRET"]))
log = audit.AuditLog(sys.argv[1], identity, bytes.fromhex(os.environ["TEST_KEY"]),
                     batch_size=3, batch_delay=0.001)
i = 0
while True:
    log.append_batched("open", path=f"/r/{i}", pid=os.getpid(), command="cat")
    print(log.append("version", cid="bafkreitest", path=f"/r/{i}"), flush=True)
    i += 1
"""


def test_log_survives_a_killed_writer(log):
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "TEST_SECRET": owner().to_secret_bytes().hex(),
        "TEST_KEY": log.key.hex(),
    }
    child = subprocess.Popen(
        [sys.executable, "-c", CRASHER, str(log.path)], env=env, stdout=subprocess.PIPE, text=True
    )
    acknowledged = []
    try:
        assert child.stdout is not None
        while len(acknowledged) < 60:
            line = child.stdout.readline()
            assert line, "the writer died on its own"
            acknowledged.append(int(line))
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
        if child.stdout:
            child.stdout.close()
    with log.open() as writer:
        writer.append("mount")
    result = log.verify()
    assert result.ok, result
    seqs = {entry.seq: entry for entry in log.entries()}
    assert all(seqs[seq].event == "version" for seq in acknowledged)


# --- batching -----------------------------------------------------------------------------------


def wait_for(predicate, timeout: float = 20.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.01)
    return predicate()


def test_batched_entries_wait_then_flush_within_the_delay(tmp_path):
    made = Log(tmp_path / "audit.log", audit.audit_key(os.urandom(32)))
    with made.open(batch_delay=0.05) as writer:
        writer.append_batched("open", path="/a")
        assert wait_for(lambda: len(made.lines()) == 1)
        assert made.verify().ok


def test_batched_entries_flush_at_the_batch_size(tmp_path):
    made = Log(tmp_path / "audit.log", audit.audit_key(os.urandom(32)))
    with made.open(batch_size=3, batch_delay=3600) as writer:
        writer.append_batched("open", path="/a")
        writer.append_batched("open", path="/b")
        time.sleep(0.05)
        assert made.path.read_bytes() == b""  # not due yet
        writer.append_batched("open", path="/c")
        assert wait_for(lambda: len(made.lines()) == 3)


def test_batched_entries_flush_on_close_and_before_durable_ones(tmp_path):
    made = Log(tmp_path / "audit.log", audit.audit_key(os.urandom(32)))
    with made.open(batch_delay=3600) as writer:
        writer.append_batched("open", path="/a")
        assert writer.append("version", cid="bafkreib", path="/b") == 1
        assert [e.event for e in made.entries()] == ["open", "version"]
        writer.append_batched("open", path="/c")
        writer.flush()
        assert len(made.lines()) == 3
        writer.append_batched("open", path="/d")
    assert [e.details["path"] for e in made.entries()] == ["/a", "/b", "/c", "/d"]
    assert made.verify().ok


def test_two_writers_interleave_into_one_chain(log):
    # The mount daemon and a `medfs share` run while mounted both write: one chain, no fork.
    before = len(log.lines())
    with log.open(batch_delay=3600) as first, log.open() as second:
        first.append("mount")
        second.append("share", paths=["/p"])
        first.append_batched("open", path="/a")
        second.append("revoke", paths=["/p"])
        first.append("version", cid="bafkreib", path="/b")
    events = [e.event for e in log.entries()][before:]
    assert events == ["mount", "share", "revoke", "open", "version"]
    assert log.verify().ok


def test_two_processes_write_concurrently(log, tmp_path):
    secret = tmp_path / "secret"
    secret.write_bytes(owner().to_secret_bytes())
    script = (
        "import sys, os\n"
        "from pathlib import Path\n"
        "from medfs import audit\n"
        "from medfs.identity import Identity\n"
        "me = Identity.from_secret_bytes(Path(sys.argv[3]).read_bytes())\n"
        "with audit.AuditLog(sys.argv[1], me, bytes.fromhex(sys.argv[2])) as w:\n"
        "    for i in range(50): w.append('version', cid='bafkreib', path=f'/{os.getpid()}/{i}')\n"
    )
    argv = [sys.executable, "-c", script, str(log.path), log.key.hex(), str(secret)]
    procs = [subprocess.Popen(argv, cwd=ROOT) for _ in range(3)]
    assert [p.wait(timeout=120) for p in procs] == [0, 0, 0]
    before = len(log.lines()) - 150
    result = log.verify()
    assert result.ok and result.count == before + 150, result


def test_closed_log_refuses_entries(log):
    writer = log.open()
    writer.close()
    writer.close()
    with pytest.raises(AuditError, match="closed"):
        writer.append("mount")


# --- secrecy and reading ------------------------------------------------------------------------


def test_no_path_or_name_reaches_the_disk(tmp_path):
    made = Log(tmp_path / "audit.log", audit.audit_key(os.urandom(32)))
    secret_name = f"/{MARKER}/scan.pdf"
    with made.open() as writer:
        writer.append("create", path=secret_name)
        writer.append_batched("open", path=secret_name, pid=1, uid=0, command=f"{MARKER}-viewer")
        writer.append("rename", path=secret_name, new_path=f"/x/{MARKER}.pdf")
        writer.append("share", recipient=MARKER, paths=[secret_name])
        writer.append("manifest-refused", reason=f"bad signature on {MARKER}")
        writer.append("delete", path=os.fsencode(f"/{MARKER}-\udcff"))
        writer.anchor(FakeIPFS())
    for path in tmp_path.iterdir():
        data = path.read_bytes()
        for needle in (MARKER.encode(), MARKER.lower().encode(), b"scan.pdf", b"viewer"):
            assert needle not in data, path
    assert MARKER in made.entries()[0].details["path"]
    assert os.fsencode(made.entries()[5].details["path"]) == os.fsencode(f"/{MARKER}-\udcff")


def test_reading_needs_the_right_key(log):
    with pytest.raises(AuditError, match=r"entry 0.*do not open"):
        list(audit.read_entries(log.path, audit.audit_key(os.urandom(32))))


def test_show_filters_by_path_prefix(log):
    assert [e.seq for e in log.entries(prefix="/lab/blood.pdf")] == [1, 2, 3, 4]
    assert [e.seq for e in log.entries(prefix="/lab/2025")] == [4, 5, 6, 7]
    assert [e.seq for e in log.entries(prefix="/lab/")] == [1, 2, 3, 4, 5, 6, 7]
    assert log.entries(prefix="/la") == []
    assert [e.seq for e in log.entries(prefix="/")] == [1, 2, 3, 4, 5, 6, 7]


def test_show_filters_by_time(log):
    entries = log.entries()
    cut = entries[5].time_ns
    later = [e.seq for e in entries if e.time_ns >= cut]
    assert [e.seq for e in log.entries(since_ns=cut)] == later
    assert log.entries(since_ns=entries[-1].time_ns + 1) == []


def test_audit_key_is_derived_not_the_manifest_key():
    manifest_key = os.urandom(32)
    assert audit.audit_key(manifest_key) != manifest_key
    assert audit.audit_key(manifest_key) == audit.audit_key(manifest_key)


# --- the command line ---------------------------------------------------------------------------


@dataclass
class State:
    root: Path

    @property
    def env(self) -> dict[str, str]:
        return {
            "MEDFS_STATE": str(self.root),
            "MEDFS_PASSPHRASE": PASSPHRASE,
            "PYTHONPATH": str(ROOT),
        }

    def run(self, *args: str) -> subprocess.CompletedProcess[str]:
        return run_medfs("audit", *args, env=self.env)

    @property
    def log(self) -> Path:
        return audit.log_path(self.root)


@pytest.fixture(scope="module")
def base_state(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("audit-state") / "state"
    out = run_medfs("init", env={"MEDFS_STATE": str(root), "MEDFS_PASSPHRASE": PASSPHRASE})
    assert out.returncode == 0, out.stderr
    session = state.unlock(state.Layout(root), PASSPHRASE)
    session.manifest.close()
    with audit.AuditLog(
        audit.log_path(root), session.owner, audit.audit_key(session.manifest_key)
    ) as writer:
        record_some(writer)
        writer.anchor(FakeIPFS())
        writer.append("unmount")
    return root


@pytest.fixture
def cli_state(base_state, tmp_path) -> State:
    root = tmp_path / "state"
    shutil.copytree(base_state, root, ignore=shutil.ignore_patterns("ipfs"))
    return State(root)


def test_cli_verify_intact(cli_state):
    out = run_medfs("audit", "verify", env={"MEDFS_STATE": str(cli_state.root)})  # no passphrase
    assert out.returncode == 0, out.stderr
    assert "intact: 10 entries" in out.stdout
    assert "1 anchor" in out.stdout


@pytest.mark.parametrize(
    ("tamper", "entry", "needle"),
    [
        ("edit", 3, "signature"),
        ("delete", 3, "deleted"),
        ("insert", 3, "holds entry"),
        ("reorder", 3, "out of order"),
        ("resign", 3, "not a trusted identity"),
        ("truncate", 6, "cut off the end"),
        ("torn", 10, "incomplete"),
    ],
)
def test_cli_verify_names_the_first_bad_entry(cli_state, tamper, entry, needle):
    data = cli_state.log.read_bytes()
    lines = data.split(b"\n")[:-1]
    if tamper == "edit":
        lines[3] = edited(lines[3], time_ns=12345)
    elif tamper == "delete":
        del lines[3]
    elif tamper == "insert":
        lines.insert(3, lines[1])
    elif tamper == "reorder":
        lines[3], lines[4] = lines[4], lines[3]
    elif tamper == "resign":
        lines[3] = signed(lines[3], mallory(), actor=mallory().fingerprint)
    elif tamper == "truncate":
        lines = lines[:6]
    new = b"".join(line + b"\n" for line in lines)
    if tamper == "torn":
        new += lines[2][:100]
    cli_state.log.write_bytes(new)
    out = cli_state.run("verify")
    assert out.returncode == AuditError.exit_code == 12, out.stderr
    assert out.stderr.startswith(f"medfs: error: audit log entry {entry}: "), out.stderr
    assert needle in out.stderr
    assert "Traceback" not in out.stderr


def test_cli_verify_needs_an_initialised_state(tmp_path):
    out = run_medfs("audit", "verify", env={"MEDFS_STATE": str(tmp_path / "nothing")})
    assert out.returncode == 2 and "medfs init" in out.stderr


def test_cli_show(cli_state):
    out = cli_state.run("show")
    assert out.returncode == 0, out.stderr
    rows = out.stdout.splitlines()
    assert len(rows) == 10
    assert "open" in rows[3] and "/lab/blood.pdf" in rows[3] and "command=evince" in rows[3]
    assert "cid=bafkreiaaaa" in rows[2]
    out = cli_state.run("show", "--path", "/lab/2025", "--json")
    assert out.returncode == 0, out.stderr
    assert [row["seq"] for row in json.loads(out.stdout)] == [4, 5, 6, 7]
    assert json.loads(out.stdout)[0]["details"]["new_path"] == "/lab/2025/blood.pdf"
    out = cli_state.run("show", "--since", str(time.time() + 3600), "--json")
    assert json.loads(out.stdout) == []
    out = cli_state.run("show", "--since", "2000-01-01T00:00:00+00:00", "--json")
    assert len(json.loads(out.stdout)) == 10


def test_cli_show_warns_about_a_broken_log_and_rejects_bad_times(cli_state):
    lines = cli_state.log.read_bytes().split(b"\n")[:-1]
    cli_state.log.write_bytes(b"".join(line + b"\n" for line in lines[:4] + lines[5:]))
    out = cli_state.run("show")
    assert out.returncode == 0
    assert "warning: the audit log does not verify (entry 4" in out.stderr
    out = cli_state.run("show", "--since", "last tuesday")
    assert out.returncode == 2 and "cannot read the time" in out.stderr


@pytest.mark.kubo
def test_cli_anchor_against_a_real_node(cli_state, kubo_api):
    out = cli_state.run("anchor", "--api", kubo_api)
    assert out.returncode == 0, out.stderr
    cid = out.stdout.strip()
    client = IPFS(kubo_api)
    try:
        anchor = audit.Anchor.from_document(client.cat(cid), cid)
        assert cid in client.pins()
    finally:
        client.close()
    assert anchor.count == 10
    assert audit.load_anchors(audit.anchors_path(cli_state.root))[-1] == anchor
    out = cli_state.run("verify", "--anchor", cid, "--api", kubo_api)
    assert out.returncode == 0, out.stderr
    assert "intact: 11 entries" in out.stdout and "2 anchor" in out.stdout
    # Roll back both the log and the anchors file: the anchor kept elsewhere still tells.
    lines = cli_state.log.read_bytes().split(b"\n")[:-1]
    cli_state.log.write_bytes(b"".join(line + b"\n" for line in lines[:7]))
    audit.anchors_path(cli_state.root).unlink()
    assert cli_state.run("verify").returncode == 0
    out = cli_state.run("verify", "--anchor", cid, "--api", kubo_api)
    assert out.returncode == 12 and "audit log entry 7: missing" in out.stderr


def test_cli_anchor_while_another_writer_has_the_log_open(cli_state, kubo_api):
    session = state.unlock(state.Layout(cli_state.root), PASSPHRASE)
    session.manifest.close()
    key = audit.audit_key(session.manifest_key)
    with audit.AuditLog(cli_state.log, session.owner, key) as daemon:
        daemon.append("mount")
        out = cli_state.run("anchor", "--api", kubo_api)
        assert out.returncode == 0, out.stderr
        daemon.append("unmount")
    out = cli_state.run("verify")
    assert out.returncode == 0, out.stderr
