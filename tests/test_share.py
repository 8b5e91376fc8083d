"""Sharing and revocation across two real Kubo nodes, through real mounts and the real CLI."""

from __future__ import annotations

import errno
import json
import mmap
import os
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from medfs import forked, state
from medfs.ipfs import IPFS
from medfs.kubo import EmbeddedNode
from tests.conftest import run_medfs
from tests.mounting import PASSPHRASE, Mounted, mounted
from tests.test_ipfs import free_port

pytestmark = pytest.mark.skipif(not os.path.exists("/dev/fuse"), reason="needs /dev/fuse")


class Person:
    """Someone with their own identity, state directory and IPFS node."""

    def __init__(self, root: Path, name: str, api: str, *keygen: str) -> None:
        self.root = root / name
        self.root.mkdir()
        self.name = name
        self.api = api
        self.state = self.root / "state"
        self.mnt = self.root / "mnt"
        self.mnt.mkdir()
        self.key = self.root / f"{name}.key"
        self.pub = self.root / f"{name}.pub"
        out = run_medfs("keygen", "--out", str(self.root / name), *keygen, env=self.env)
        assert out.returncode == 0, out.stderr
        out = run_medfs("init", "--key", str(self.key), env=self.env)
        assert out.returncode == 0, out.stderr

    @property
    def env(self) -> dict[str, str]:
        return {"MEDFS_STATE": str(self.state), "MEDFS_PASSPHRASE": PASSPHRASE}

    def medfs(self, *args: str) -> subprocess.CompletedProcess[str]:
        return run_medfs(*args, env=self.env)

    def mount_share(self, manifest: Path | str, issuer: Path) -> subprocess.CompletedProcess[str]:
        return self.medfs(
            "mount", str(self.mnt), "--manifest", str(manifest), "--from", str(issuer),
            "--api", self.api,
        )  # fmt: skip

    def umount(self) -> None:
        if os.path.ismount(self.mnt):
            out = self.medfs("umount", str(self.mnt))
            assert out.returncode == 0, out.stderr


@pytest.fixture(scope="module")
def nodes(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str]]:
    """Alice's node and everyone else's: two daemons that know nothing of each other."""
    a = EmbeddedNode(tmp_path_factory.mktemp("node-a"))
    b = EmbeddedNode(tmp_path_factory.mktemp("node-b"))
    try:
        yield a.ensure_running(), b.ensure_running()
    finally:
        a.stop()
        b.stop()


def share(alice: Mounted, *args: str) -> subprocess.CompletedProcess[str]:
    out = alice.medfs("share", *args, "--api", alice.api)
    assert out.returncode == 0, out.stderr
    return out


def test_share_mount_update_rollback_revoke(tmp_path: Path, nodes: tuple[str, str]) -> None:
    api_a, api_b = nodes
    bob = Person(tmp_path, "bob", api_b)
    carol = Person(tmp_path, "carol", api_b)
    dave = Person(tmp_path, "dave", api_b, "--classic")
    erin = Person(tmp_path, "erin", api_b, "--rsa")
    people = [bob, carol, dave, erin]
    with mounted(tmp_path / "alice", api_a) as alice:
        try:
            _scenario(tmp_path, alice, bob, carol, dave, erin)
        finally:
            for person in people:
                if os.path.ismount(person.mnt):
                    subprocess.run(["fusermount3", "-u", "-z", str(person.mnt)], check=False)


def test_a_share_of_hundreds_of_files_opens_for_the_recipient(
    tmp_path: Path, nodes: tuple[str, str]
) -> None:
    """Enough files for the wrapping to be split across processes (medfs.forked: the command
    shares by itself, with no mount running), under two shared directories and one file shared
    twice: every file opens with the recipient's key."""
    api_a, api_b = nodes
    frank = Person(tmp_path, "frank", api_b, "--classic")
    n = 2 * forked.MIN_PER_PROCESS + 10
    with mounted(tmp_path / "alice", api_a) as alice:
        try:
            bodies = {}
            for d in ("ward1", "ward2"):
                (alice.mnt / d).mkdir()
                for i in range(n // 2):
                    bodies[f"{d}/r{i}.txt"] = f"{d} record {i} ".encode() * (i + 1)
                    (alice.mnt / d / f"r{i}.txt").write_bytes(bodies[f"{d}/r{i}.txt"])
            alice.umount()  # every version committed; the command alone does the share
            # A node that cannot be reached stops the share before anything is granted.
            down = alice.medfs("share", "/ward1", "--to", str(frank.pub),
                               "--api", f"/ip4/127.0.0.1/tcp/{free_port()}")  # fmt: skip
            assert down.returncode == 3, down.stderr
            assert down.stderr.startswith("medfs: error: cannot reach the IPFS API at ")
            listed = alice.medfs("grants", "--json")
            assert listed.returncode == 0 and json.loads(listed.stdout) == [], listed.stderr
            out = share(alice, "/ward1", "/ward2", "/ward1/r0.txt", "--to", str(frank.pub),
                        "--out", str(tmp_path / "frank1"), "--publish")  # fmt: skip
            assert f"({n} files wrapped)" in out.stdout
            published = re.findall(r"^published as (\S+)$", out.stdout, re.MULTILINE)
            assert len(published) == 1, out.stdout  # by the node the share itself asked
            assert IPFS(alice.api).cat(published[0]) == (tmp_path / "frank1").read_bytes()
            out = frank.mount_share(tmp_path / "frank1", alice.state / "owner.pub")
            assert out.returncode == 0, out.stderr
            assert sorted(os.listdir(frank.mnt)) == ["ward1", "ward2"]  # r0.txt only once
            for rel, body in bodies.items():
                assert (frank.mnt / rel).read_bytes() == body, rel
            frank.umount()
        finally:
            if os.path.ismount(frank.mnt):
                subprocess.run(["fusermount3", "-u", "-z", str(frank.mnt)], check=False)


def test_the_running_mount_does_the_share_and_still_wants_the_passphrase(
    tmp_path: Path, nodes: tuple[str, str]
) -> None:
    """While the owner's mount runs, `medfs share` has the mount do it (medfs/control.py): it
    works with the key file out of reach, refuses a wrong passphrase (and audits that), and
    includes a file closed just before, committed or not."""
    api_a, api_b = nodes
    gina = Person(tmp_path, "gina", api_b)
    with mounted(tmp_path / "alice", api_a) as alice:
        try:
            (alice.mnt / "ward").mkdir()
            (alice.mnt / "ward" / "a.txt").write_bytes(b"record a")
            assert (alice.state / "control.sock").exists()
            key = alice.state / "owner.key"
            away = key.with_name("owner.key.away")
            key.rename(away)  # only the mount can use the key now
            try:
                wrong = run_medfs("share", str(alice.mnt / "ward"), "--to", str(gina.pub),
                                  "--api", alice.api,
                                  env={**alice.env, "MEDFS_PASSPHRASE": "not it"})  # fmt: skip
                assert wrong.returncode == 6, wrong.stderr
                assert wrong.stderr.startswith("medfs: error: wrong passphrase")
                out = share(alice, str(alice.mnt / "ward"), "--to", str(gina.pub),
                            "--out", str(tmp_path / "gina1"), "--publish")  # fmt: skip
                assert "(1 files wrapped)" in out.stdout
            finally:
                away.rename(key)
            published = re.search(r"^published as (\S+)$", out.stdout, re.MULTILINE)
            assert published is not None, out.stdout
            assert IPFS(alice.api).cat(published.group(1)) == (tmp_path / "gina1").read_bytes()
            shown = alice.medfs("audit", "show")
            assert shown.returncode == 0, shown.stderr
            events = [line.split()[3] for line in shown.stdout.splitlines() if "#" in line]
            # The refused share waits for nothing, so a.txt's version may be logged after it;
            # the share that went through settles first, so it comes after that version.
            assert events[-1] == "share" and events.count("share-refused") == 1, events
            assert events.index("share-refused") < events.index("share"), events
            assert "version" in events[: events.index("share")], events
            listed = alice.medfs("grants", "--json")
            assert [g["path"] for g in json.loads(listed.stdout)] == ["/ward"]
            out = gina.mount_share(tmp_path / "gina1", alice.state / "owner.pub")
            assert out.returncode == 0, out.stderr
            assert (gina.mnt / "ward" / "a.txt").read_bytes() == b"record a"
            gina.umount()
        finally:
            if os.path.ismount(gina.mnt):
                subprocess.run(["fusermount3", "-u", "-z", str(gina.mnt)], check=False)
    assert not (alice.state / "control.sock").exists()  # removed at umount


def _scenario(
    tmp: Path, alice: Mounted, bob: Person, carol: Person, dave: Person, erin: Person
) -> None:
    alice_pub = alice.state / "owner.pub"
    patients = alice.mnt / "patients"
    (patients / "p1").mkdir(parents=True)
    a_txt = b"allergies: penicillin\n" * 5000
    b_bin = os.urandom(3 << 20)
    (patients / "p1/a.txt").write_bytes(a_txt)
    (patients / "p1/b.bin").write_bytes(b_bin)
    (patients / "p1/link").symlink_to("a.txt")
    (alice.mnt / "private.txt").write_bytes(b"not shared")

    share(alice, str(patients), "--to", str(bob.pub), "--out", str(tmp / "bob1"))
    grants = json.loads(alice.medfs("grants", "--json").stdout)
    assert [(g["path"], g["kind"]) for g in grants] == [("/patients", "mlkem768-x25519")]

    # Bob mounts it from his own node; the provider hints make the connection.
    out = bob.mount_share(tmp / "bob1", alice_pub)
    assert out.returncode == 0, out.stderr
    assert (bob.mnt / "patients/p1/a.txt").read_bytes() == a_txt
    assert (bob.mnt / "patients/p1/b.bin").read_bytes() == b_bin
    assert os.readlink(bob.mnt / "patients/p1/link") == "a.txt"
    assert sorted(os.listdir(bob.mnt)) == ["patients"]  # private.txt is not there
    with pytest.raises(OSError) as info:
        (bob.mnt / "patients/new").write_bytes(b"x")
    assert info.value.errno == errno.EROFS

    # Carol holds Bob's manifest but is not its recipient.
    out = carol.mount_share(tmp / "bob1", alice_pub)
    assert out.returncode == 8, out.stderr
    assert "medfs: error:" in out.stderr and not os.path.ismount(carol.mnt)

    # A manifest verified against the wrong issuer key, and a damaged one, are refused.
    out = bob.mount_share(tmp / "bob1", carol.pub)
    assert out.returncode != 0 and not os.path.ismount(bob.mnt / "x")
    damaged = bytearray((tmp / "bob1").read_bytes())
    damaged[len(damaged) // 2] ^= 1
    (tmp / "damaged").write_bytes(bytes(damaged))
    out = carol.mount_share(tmp / "damaged", alice_pub)
    assert out.returncode in (7, 8, 11) and "Traceback" not in out.stderr

    # Alice changes a file and adds one; the next manifest carries both.
    (patients / "p1/a.txt").write_bytes(b"allergies: none\n")
    (patients / "p1/c.txt").write_bytes(b"new note")
    share(alice, str(patients), "--to", str(bob.pub), "--out", str(tmp / "bob2"))
    bob.umount()
    out = bob.mount_share(tmp / "bob2", alice_pub)
    assert out.returncode == 0, out.stderr
    assert (bob.mnt / "patients/p1/a.txt").read_bytes() == b"allergies: none\n"
    assert (bob.mnt / "patients/p1/c.txt").read_bytes() == b"new note"
    bob.umount()
    out = bob.mount_share(tmp / "bob1", alice_pub)  # rollback to the older manifest
    assert out.returncode == 13 and "already accepted" in out.stderr

    # Every recipient kind works: x25519 (Dave) and RSA-OAEP (Erin).
    for person, name in ((dave, "dave1"), (erin, "erin1")):
        share(alice, str(patients), "--to", str(person.pub), "--out", str(tmp / name))
        out = person.mount_share(tmp / name, alice_pub)
        assert out.returncode == 0, out.stderr
        assert (person.mnt / "patients/p1/b.bin").read_bytes() == b_bin
        person.umount()

    # Revoke Bob: new versions under fresh keys, old CIDs unpinned, fresh manifests for others.
    before = {
        name: json.loads(alice.medfs("stat", str(patients / "p1" / name), "--json").stdout)
        for name in ("a.txt", "b.bin", "c.txt")
    }
    out = alice.medfs(
        "revoke", str(patients), "--from", str(bob.pub), "--out", str(tmp / "after"),
        "--api", alice.api,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert "re-encrypted 3 files" in out.stdout
    after = {
        name: json.loads(alice.medfs("stat", str(patients / "p1" / name), "--json").stdout)
        for name in before
    }
    bob_fpr = _fingerprint(bob)
    pins = IPFS(alice.api).pins()
    for name in before:
        assert after[name]["cid"] != before[name]["cid"]
        assert bob_fpr in before[name]["recipients"]
        assert bob_fpr not in after[name]["recipients"]
        assert before[name]["cid"] not in pins and after[name]["cid"] in pins
    assert (alice.mnt / "patients/p1/b.bin").read_bytes() == b_bin
    fresh = sorted((tmp / "after").iterdir())
    assert len(fresh) == 2  # Dave and Erin, not Bob
    dave_manifest = next(p for p in fresh if _fingerprint(dave)[:16] in p.name)
    out = dave.mount_share(dave_manifest, alice_pub)
    assert out.returncode == 0, out.stderr
    assert (dave.mnt / "patients/p1/b.bin").read_bytes() == b_bin
    dave.umount()
    # Bob's newest manifest names only the old versions: none of the new CIDs.
    out = bob.mount_share(tmp / "bob2", alice_pub)
    assert out.returncode == 0, out.stderr
    cids = {
        json.loads(bob.medfs("stat", str(bob.mnt / "patients/p1" / n), "--json").stdout)["cid"]
        for n in before
    }
    assert cids.isdisjoint({after[n]["cid"] for n in before})
    bob.umount()


def _fingerprint(person: Person) -> str:
    out = run_medfs("id", str(person.pub), "--json")
    assert out.returncode == 0, out.stderr
    return str(json.loads(out.stdout)["fingerprint"])


def test_commands_follow_the_mounts_node_and_an_interrupted_revoke_finishes(
    tmp_path: Path, kubo_api: str
) -> None:
    out = run_medfs("keygen", "--out", str(tmp_path / "bob"), env={"MEDFS_PASSPHRASE": "x"})
    assert out.returncode == 0, out.stderr
    with mounted(tmp_path / "alice", kubo_api) as alice:
        (alice.mnt / "r.txt").write_bytes(b"record")
        # No --api: the mount's node is used, not a new embedded node without the data.
        out = alice.medfs("share", str(alice.mnt / "r.txt"), "--to", str(tmp_path / "bob.pub"),
                          "--out", str(tmp_path / "m"))  # fmt: skip
        assert out.returncode == 0, out.stderr
        status = json.loads(alice.medfs("node", "status", "--json").stdout)
        assert status["running"] is False
        # A revoke interrupted after removing the grant: running it again finishes the job.
        session = state.unlock(state.Layout(alice.state), PASSPHRASE)
        try:
            inode = session.manifest.resolve("/r.txt")
            assert inode is not None
            bob = _fingerprint_of(tmp_path / "bob.pub")
            assert session.manifest.remove_grant(inode.ino, bob)
        finally:
            session.manifest.close()
        out = alice.medfs("revoke", str(alice.mnt / "r.txt"), "--from", str(tmp_path / "bob.pub"))
        assert out.returncode == 0, out.stderr
        assert "re-encrypted 1 files" in out.stdout
        info = json.loads(alice.medfs("stat", str(alice.mnt / "r.txt"), "--json").stdout)
        assert bob not in info["recipients"]
        out = alice.medfs("revoke", str(alice.mnt / "r.txt"), "--from", str(tmp_path / "bob.pub"))
        assert out.returncode == 2 and "is not granted" in out.stderr  # now really nothing to do
        assert (alice.mnt / "r.txt").read_bytes() == b"record"


def _fingerprint_of(pub: Path) -> str:
    out = run_medfs("id", str(pub), "--json")
    assert out.returncode == 0, out.stderr
    return str(json.loads(out.stdout)["fingerprint"])


def test_a_file_held_open_reads_the_version_a_revoke_made_meanwhile(tmp_path: Path) -> None:
    """The mount keeps each file's version between reads; a revoke (another process)
    re-encrypts the file and drops the old object. Reads must follow, even on a
    descriptor opened before, once the old object's blocks are gone from the node."""
    node = EmbeddedNode(tmp_path / "node")  # its own node: the test collects its garbage
    api = node.ensure_running()
    out = run_medfs("keygen", "--out", str(tmp_path / "bob"), env={"MEDFS_PASSPHRASE": "x"})
    assert out.returncode == 0, out.stderr
    data = os.urandom(4 << 20)  # streamed, 64 segments: a read fetches only its own
    try:
        with mounted(tmp_path / "alice", api, "--timeout", "3") as alice:
            path = alice.mnt / "scan.bin"
            path.write_bytes(data)
            out = share(alice, str(path), "--to", str(tmp_path / "bob.pub"),
                        "--out", str(tmp_path / "m"))  # fmt: skip
            assert out.returncode == 0, out.stderr
            old = os.getxattr(path, "user.medfs.cid").decode()
            fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
            try:
                buf = mmap.mmap(-1, 4096)  # O_DIRECT wants an aligned buffer
                assert os.preadv(fd, [buf], 0) == 4096 and buf[:] == data[:4096]
                out = alice.medfs("revoke", str(path), "--from", str(tmp_path / "bob.pub"))
                assert out.returncode == 0, out.stderr
                assert os.getxattr(path, "user.medfs.cid").decode() != old
                assert IPFS(api).gc() > 0  # the old version's blocks are gone
                for off in (3 << 20, 1 << 20):
                    assert os.preadv(fd, [buf], off) == 4096
                    assert buf[:] == data[off : off + 4096]
            finally:
                os.close(fd)
            assert path.read_bytes() == data
    finally:
        node.stop()
