"""Emptying the free lists at a traced call's end leaves the garbage collector working."""

from __future__ import annotations

import gc
import time
from collections.abc import Iterator

import pytest

from django_leakguard import tracing, tracing_gc


def forget_measurements() -> None:
    tracing_gc._not_before = 0.0
    tracing_gc._durations.clear()
    if tracing_gc._time_full_collection in gc.callbacks:
        gc.callbacks.remove(tracing_gc._time_full_collection)
    tracing_gc._watching = False
    tracing_gc._measured = False


@pytest.fixture(autouse=True)
def fresh_state() -> Iterator[None]:
    forget_measurements()  # other tests' traces may have left a full collection to measure
    yield
    forget_measurements()


class Node:
    def __init__(self) -> None:
        self.me = self


def full_collections(callback_log: list[int]) -> int:
    return sum(1 for generation in callback_log if generation == 2)


def test_the_counts_of_younger_collections_are_put_back() -> None:
    gc.collect()
    for _ in range(4):
        gc.collect(1)
    for _ in range(3):
        gc.collect(0)
    assert gc.get_count()[1:] == (3, 4)
    assert tracing_gc.clear_free_lists()
    assert gc.get_count()[1:] == (3, 4)


def test_automatic_full_collections_still_run_when_every_call_is_traced() -> None:
    # Cyclic garbage that lives long enough to reach the oldest generation, with the free
    # lists emptied after every hundred of them, as at a traced call's end: without the count
    # put back, no automatic full collection ever ran and the garbage grew without bound.
    started: list[int] = []

    def log(phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            started.append(info["generation"])

    emptyings = 80  # each runs one full collection of its own

    young: list[list[Node]] = []
    gc.collect()
    gc.callbacks.append(log)
    try:
        for _ in range(emptyings):
            assert tracing_gc.clear_free_lists()
            for _ in range(100):
                young.append([Node() for _ in range(50)])
                if len(young) > 200:
                    young.pop(0)
    finally:
        gc.callbacks.remove(log)
    automatic = full_collections(started) - emptyings
    assert automatic >= 1, (started.count(0), started.count(1))
    gc.collect()


def test_a_full_collection_spends_the_budget(monkeypatch: pytest.MonkeyPatch) -> None:
    assert tracing_gc.clear_free_lists()
    monkeypatch.setattr(tracing_gc, "GC_BUDGET", 1e-9)
    gc.collect()  # measured: it takes far more than a billionth of the time until now
    assert tracing_gc.free_lists_waiting()
    assert tracing_gc.clear_free_lists()  # a trace that has begun still ends with one
    monkeypatch.setattr(tracing_gc, "GC_BUDGET", 1e9)
    gc.collect()  # measured, and within any budget
    assert not tracing_gc.free_lists_waiting()


def test_the_least_of_the_last_durations_counts(monkeypatch: pytest.MonkeyPatch) -> None:
    # One collection slowed by a burst of transient objects does not stop tracing for long.
    monkeypatch.setattr(tracing_gc, "GC_BUDGET", 0.001)
    tracing_gc._durations.append(0.0001)  # an earlier collection: 0.1 s to wait
    assert tracing_gc.clear_free_lists()
    burst = [[] for _ in range(300_000)]
    gc.collect()  # measured: tens of milliseconds, with the burst alive
    del burst
    assert tracing_gc._durations[-1] > 0.005
    assert tracing_gc._not_before < time.monotonic() + 1  # not 5 s or more


def test_our_own_collections_are_not_measured_and_the_watch_stays_single() -> None:
    for _ in range(5):
        assert tracing_gc.clear_free_lists()  # its frozen full collection is not measured
        assert tracing_gc._not_before == 0.0
        gc.collect()  # measured
        assert tracing_gc._not_before > 0.0
        tracing_gc._not_before = 0.0
    assert gc.callbacks.count(tracing_gc._time_full_collection) == 1


def test_free_lists_are_left_alone_when_the_application_froze_objects() -> None:
    gc.freeze()
    try:
        frozen = gc.get_freeze_count()
        assert not tracing_gc.clear_free_lists()
        assert gc.get_freeze_count() == frozen  # nothing of theirs unfrozen
    finally:
        gc.unfreeze()
    assert tracing_gc.clear_free_lists()
    assert gc.get_freeze_count() == 0


def test_no_call_is_traced_while_the_budget_is_spent() -> None:
    # Its snapshot would count what it freed into the free lists as retained.
    tracing_gc._not_before = time.monotonic() + 60
    assert tracing.start_trace() is None
    tracing_gc._not_before = 0.0
    trace = tracing.start_trace()
    assert trace is not None
    trace.discard()
