from __future__ import annotations

import gc
import sys

import pytest

from django_leakguard import free_tuples
from django_leakguard.recorder_heap import live_blocks

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="the counts are read through /proc/self/mem"
)

_kept: list[tuple[int, int]] = []


def keep_pairs() -> None:
    _kept.extend([(i, -i) for i in range(150)])  # 150 tuples and 150 ints kept


def report() -> int:
    rows = [(i, f"line-{i}") for i in range(100_000)]  # made and freed: a spike
    return len(rows)


def test_freed_tuples_kept_for_reuse_are_found_and_counted() -> None:
    free_tuples.look_up()
    assert free_tuples.free_tuples() > 0
    assert free_tuples._counts is not None
    held = [(i, i) for i in range(3000)]  # empties the free list of pairs
    empty = free_tuples.free_tuples()
    del held[:10]
    assert free_tuples.free_tuples() == empty + 10


def test_a_spike_of_tuples_is_not_charged_with_what_a_leak_took_from_the_free_list() -> None:
    enabled = gc.isenabled()
    gc.disable()
    try:
        report()
        for _ in range(3):
            before = live_blocks()
            keep_pairs()
            kept = live_blocks() - before
            before = live_blocks()
            report()
            spike = live_blocks() - before
            # Counted by sys.getallocatedblocks() alone: the pairs the leak took from the free
            # list (about 150 blocks) were not its, and the spike, refilling it, got them.
            assert kept >= 290, kept
            assert abs(spike) <= 5, spike
    finally:
        _kept.clear()
        if enabled:
            gc.enable()


def test_nothing_is_counted_when_the_counts_cannot_be_found(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(free_tuples, "_counts", None)
    monkeypatch.setattr(free_tuples, "_tries", 0)
    monkeypatch.setattr(free_tuples, "_find_counts", lambda: None)
    for _ in range(5):
        free_tuples.look_up()
    assert [free_tuples.free_tuples() for _ in range(5)] == [0] * 5
    assert free_tuples._tries == free_tuples.TRIES  # looked for a few times, then no more
    # Counting never looks (it may run inside a reading, where looking spoils it).
    monkeypatch.setattr(free_tuples, "_tries", 0)
    assert free_tuples.free_tuples() == 0
    assert free_tuples._tries == 0


def test_the_counts_are_found_before_a_reading_not_inside_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from django_leakguard import memory
    from django_leakguard.recorder_process import get_recorder

    if not memory.heap_available():  # pragma: no cover - CI has glibc >= 2.33
        pytest.skip("glibc mallinfo2 is not available here")
    # Looking for them frees thousands of tuples into the free lists: inside a reading, after
    # the blocks were read, that reading came out thousands of blocks low.
    monkeypatch.setattr(free_tuples, "_counts", None)
    monkeypatch.setattr(free_tuples, "_tries", 0)
    recorder = get_recorder()
    # Free lists of short tuples empty (their tuples held), as a process may have them.
    held = [[(i,) for i in range(2100)], [(i, i) for i in range(2100)]]
    held.append([(i, i, i) for i in range(2100)])
    first = recorder._time_heap()
    assert free_tuples._counts is not None
    second = recorder._time_heap()
    assert first is not None
    assert second is not None
    assert abs(second[1] - first[1]) < 100, (first, second)
    del held


def _ints(*values: int) -> bytes:
    return b"".join(value.to_bytes(4, sys.byteorder) for value in values)


def test_the_counts_are_the_one_place_that_grew_as_tuples_were_freed() -> None:
    # A decoy (12, 9) that did not grow so, misaligned copies, and the counts at offset 12.
    before = _ints(12, 9, 0, 1, 0, 0, 7)
    middle = _ints(12, 9, 0, 5, 7, 3, 7)
    after = _ints(12, 9, 0, 10, 12, 9, 7)
    assert free_tuples._matches([before, middle, after]) == [12]
    assert free_tuples._matches([before, before, after]) == []


def test_looking_for_the_counts_never_fails_a_reading(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken() -> None:
        raise RuntimeError("unexpected")

    monkeypatch.setattr(free_tuples, "_counts", None)
    monkeypatch.setattr(free_tuples, "_tries", 0)
    monkeypatch.setattr(free_tuples, "_find_counts", broken)
    free_tuples.look_up()
    assert free_tuples.free_tuples() == 0
    assert free_tuples._tries == 1
    monkeypatch.undo()
    monkeypatch.setattr(free_tuples.sys, "platform", "darwin")
    assert free_tuples._find_counts() is None  # /proc/self/mem is Linux's


def test_reading_stops_at_an_unmapped_address() -> None:
    with open("/proc/self/mem", "rb", buffering=0) as mem:
        assert free_tuples._read(mem, 0) == b""  # page 0 is never mapped
    free_tuples.look_up()
    counts = free_tuples._counts
    assert counts is not None
    tries = free_tuples._tries
    free_tuples.look_up()
    assert free_tuples._counts is counts  # found once, kept
    assert free_tuples._tries == tries  # not looked for again


def test_no_counts_where_the_place_is_not_one(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(free_tuples, "_matches", lambda snapshots: [])
    assert free_tuples._find_counts() is None
