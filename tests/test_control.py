"""The control protocol's pure parts (medfs/control.py); the mount serving it is tested for real
in tests/test_share.py."""

from __future__ import annotations

import socket
import threading
from pathlib import Path

import pytest

from medfs import control
from medfs.errors import MedfsError, PassphraseError

REQUEST = {"v": 1, "op": "share", "passphrase": "pw", "paths": ["/ward"], "to": "pub text"}


def test_the_passphrase_check_keeps_no_passphrase() -> None:
    check = control.Passphrase("correct horse")
    assert check.matches("correct horse")
    assert not check.matches("correct hors")
    assert not check.matches("")
    assert "correct horse" not in repr(vars(check))
    assert not control.Passphrase("correct horse").matches("other")


def test_a_request_round_trips_through_a_frame() -> None:
    data = control.frame(REQUEST)
    length = control.frame_length(data[:4], control.MAX_REQUEST)
    assert length == len(data) - 4
    request = control.share_request(control.parse(data[4:]))
    assert request == control.ShareRequest("pw", ["/ward"], "pub text")


@pytest.mark.parametrize(
    "change",
    [
        {"v": 2},
        {"op": "revoke"},
        {"passphrase": None},
        {"passphrase": 7},
        {"to": ["x"]},
        {"paths": []},
        {"paths": "/ward"},
        {"paths": ["/ward", 3]},
    ],
)
def test_a_request_that_is_not_the_protocols_is_refused(change: dict[str, object]) -> None:
    with pytest.raises(control.BadRequest):
        control.share_request({**REQUEST, **change})


@pytest.mark.parametrize("body", [b"\xff\xfe", b"not json", b"[1, 2]", b'"text"'])
def test_a_body_that_is_not_a_json_object_is_refused(body: bytes) -> None:
    with pytest.raises(control.BadRequest):
        control.parse(body)


def test_a_frame_over_the_limit_is_refused_before_it_is_read() -> None:
    with pytest.raises(control.BadRequest, match="at most"):
        control.frame_length(control.FRAME.pack(control.MAX_REQUEST + 1), control.MAX_REQUEST)


def serve_once(root: Path, reply: bytes) -> threading.Thread:
    """A stand-in for the mount: answers one connection on root's socket with `reply`."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    with control.socket_address(root) as address:
        listener.bind(address)
    listener.listen(1)

    def run() -> None:
        with listener:
            conn, _ = listener.accept()
            with conn:
                prefix = conn.recv(4)
                length = control.frame_length(prefix, control.MAX_REQUEST)
                got = b""
                while len(got) < length:
                    got += conn.recv(length - len(got))
                control.share_request(control.parse(got))
                conn.sendall(reply)

    thread = threading.Thread(target=run)
    thread.start()
    return thread


def ask(root: Path) -> control.Shared | None:
    return control.ask_share(root, control.ShareRequest("pw", ["/ward"], "pub"), timeout=10)


def test_no_mount_listening_means_the_command_does_the_share(tmp_path: Path) -> None:
    assert ask(tmp_path) is None  # no socket
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    with control.socket_address(tmp_path) as address:
        stale.bind(address)  # a socket file left by a daemon that died: nobody listens
    stale.close()
    assert ask(tmp_path) is None


def test_answers_and_refusals_come_back(tmp_path: Path) -> None:
    root = tmp_path / ("long-" * 30)  # beyond a Unix socket path's 108 bytes
    root.mkdir()
    result = control.Shared(wrapped=2, sequence=3, entries=4, sealed=b"\x00sealed\xff")
    thread = serve_once(root, control.frame(control.answer(result)))
    assert ask(root) == result
    thread.join()
    (root / control.SOCKET_NAME).unlink()
    wrong = PassphraseError("wrong passphrase", hint="try again")
    thread = serve_once(root, control.frame(control.refusal(wrong)))
    with pytest.raises(control.ControlError) as info:
        ask(root)
    thread.join()
    assert (info.value.message, info.value.hint, info.value.exit_code) == (
        "wrong passphrase",
        "try again",
        PassphraseError.exit_code,
    )


@pytest.mark.parametrize(
    "reply",
    [
        control.frame({"ok": True, "wrapped": 1}),  # fields missing
        control.frame({"ok": True, "wrapped": 1, "sequence": 1, "entries": 1, "sealed": "@@"}),
        control.frame({"ok": False, "code": 999, "message": "odd"}),  # no such exit code
        control.FRAME.pack(10) + b"{}",  # cut short
    ],
)
def test_a_malformed_answer_is_an_error_not_a_crash(tmp_path: Path, reply: bytes) -> None:
    thread = serve_once(tmp_path, reply)
    with pytest.raises(control.ControlError) as info:
        ask(tmp_path)
    thread.join()
    assert isinstance(info.value, MedfsError)
    assert info.value.exit_code == 9  # a mount problem
