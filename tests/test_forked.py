"""medfs.forked: work split across forked children gives what the plain loop gives."""

from __future__ import annotations

import os

import pytest

from medfs import forked


def tagged(x: int) -> bytes:
    """Its input, and which process computed it."""
    return f"{x}:{os.getpid()}".encode()


def test_results_are_in_order_and_some_come_from_a_child() -> None:
    items = list(range(4 * forked.MIN_PER_PROCESS + 3))
    out = forked.map_split(tagged, items, workers=3)
    assert [int(r.split(b":")[0]) for r in out] == items
    pids = {int(r.split(b":")[1]) for r in out}
    assert os.getpid() in pids and len(pids) == 3


def test_few_items_stay_in_this_process() -> None:
    out = forked.map_split(tagged, list(range(forked.MIN_PER_PROCESS)), workers=4)
    assert {int(r.split(b":")[1]) for r in out} == {os.getpid()}


def test_empty_and_odd_sized_results_survive_the_pipe() -> None:
    def sized(x: int) -> bytes:
        return b"\xff" * (x % 7) * 1000

    items = list(range(3 * forked.MIN_PER_PROCESS))
    assert forked.map_split(sized, items, workers=2) == [sized(x) for x in items]


def test_a_child_that_dies_has_its_part_redone_here() -> None:
    parent = os.getpid()

    def dies_in_a_child(x: int) -> bytes:
        if os.getpid() != parent:
            os._exit(3)
        return str(x).encode()

    items = list(range(2 * forked.MIN_PER_PROCESS))
    assert forked.map_split(dies_in_a_child, items, workers=2) == [str(x).encode() for x in items]


def test_an_error_is_the_genuine_one_and_leaves_no_child_behind() -> None:
    def fails_on_the_last(x: int) -> bytes:
        if x == 2 * forked.MIN_PER_PROCESS - 1:  # in the child's part
            raise ValueError(f"bad item {x}")
        return b"ok"

    before = children()
    last = 2 * forked.MIN_PER_PROCESS - 1
    with pytest.raises(ValueError, match=f"bad item {last}"):
        forked.map_split(fails_on_the_last, list(range(last + 1)), workers=2)
    assert children() == before  # the child was reaped, not left a zombie


def children() -> set[int]:
    found: set[int] = set()
    for task in os.listdir("/proc/self/task"):
        with open(f"/proc/self/task/{task}/children") as fh:
            found.update(int(pid) for pid in fh.read().split())
    return found
