"""Every checked-in vector through every decrypt path; the generator must reproduce them."""

from __future__ import annotations

import hashlib
import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest

from medfs import format as fmt
from medfs import layout
from medfs.errors import FormatError, MedfsError, NotForIdentityError
from medfs.identity import Identity
from medfs.recipients import Stanza

ROOT = Path(__file__).resolve().parent.parent
VECTORS = ROOT / "tests" / "vectors"
NAMES = sorted(path.name for path in VECTORS.iterdir())
EXPECTATIONS = {
    "success": None,
    "format error": FormatError,
    "not for identity": NotForIdentityError,
}


def load_generator() -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        "gen_vectors", ROOT / "scripts" / "gen_vectors.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("gen_vectors", module)
    spec.loader.exec_module(module)
    return module


def parse(name: str) -> tuple[dict[str, list[str]], bytes]:
    head, sep, body = (VECTORS / name).read_bytes().partition(b"\n\n")
    assert sep, "no blank line after the header"
    header: dict[str, list[str]] = {}
    for line in head.decode("ascii").split("\n"):
        key, colon, value = line.partition(": ")
        assert colon, f"bad header line {line!r}"
        header.setdefault(key, []).append(value)
    return header, body


def content_key(header: dict[str, list[str]]) -> bytes:
    if "key" in header:
        return bytes.fromhex(header["key"][0])
    me = Identity.from_secret_bytes(_b64(header["identity"][0]))
    context = bytes.fromhex(header["context"][0])
    stanzas = [Stanza.from_text(text) for text in header["stanza"]]
    return me.unwrap_any(stanzas, context)


def _b64(text: str) -> bytes:
    from medfs.recipients import b64decode

    return b64decode(text)


def whole_object(header: dict[str, list[str]], body: bytes) -> bytes:
    key = content_key(header)
    # Odd-sized chunks so segment boundaries never line up with chunk boundaries.
    chunks = [body[i : i + 7919] for i in range(0, len(body), 7919)]
    streamed = b"".join(fmt.decrypt(key, chunks))
    assert fmt.decrypt_bytes(key, body) == streamed
    return streamed


def random_access(header: dict[str, list[str]], body: bytes) -> bytes:
    key = content_key(header)
    calls: list[tuple[int, int]] = []

    def fetch(offset: int, length: int) -> bytes:
        calls.append((offset, length))
        return body[offset : offset + length]

    reader = fmt.ObjectReader(key, fetch, len(body))
    whole = reader.read(0, reader.plaintext_size + 1)
    # And segment by segment, each alone, as the mount would read them.
    size = reader.plaintext_size
    pieces = [
        reader.read(offset, layout.SEGMENT_SIZE)
        for offset in range(0, max(size, 1), layout.SEGMENT_SIZE)
    ]
    assert b"".join(pieces) == whole
    return whole


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("path", [whole_object, random_access], ids=["whole", "random-access"])
def test_vector(name, path):
    header, body = parse(name)
    (expect,) = header["expect"]
    assert expect in EXPECTATIONS
    error = EXPECTATIONS[expect]
    if error is None:
        plaintext = path(header, body)
        assert hashlib.sha256(plaintext).hexdigest() == header["payload"][0]
    else:
        with pytest.raises(MedfsError) as info:
            path(header, body)
        assert type(info.value) is error, info.value.message


def test_vectors_cover_the_issue_list():
    expects = {parse(name)[0]["expect"][0] for name in NAMES}
    assert expects == set(EXPECTATIONS)
    for needed in [
        "format-truncated-final-segment",
        "format-missing-middle-segment",
        "format-swapped-segments",
        "format-duplicated-segment",
        "format-header-bitflip-salt",
        "format-segment-body-bitflip",
        "format-tag-bitflip",
        "format-trailing-byte",
        "format-unknown-version",
        "format-spliced-segment",
        "recipient-wrong-identity",
        "recipient-mlkem768-x25519-moved-entry",
        "recipient-stanza-short-body",
    ]:
        assert needed in NAMES


def test_regenerating_gives_identical_files(tmp_path):
    generator = load_generator()
    written = generator.generate(tmp_path, previous=VECTORS)
    assert written == NAMES, "vectors were added or removed: rerun scripts/gen_vectors.py"
    for name in NAMES:
        assert (tmp_path / name).read_bytes() == (VECTORS / name).read_bytes(), name
