from __future__ import annotations

import gc
import logging
import mmap
import os
import sys
import threading
import time
from collections.abc import Iterator

import pytest
from django.db import transaction
from django.test import override_settings

import django_leakguard
from django_leakguard import (
    memory,
    recorder,
    recorder_flush,
    recorder_heap,
    recorder_pending,
    recorder_process,
)
from django_leakguard.models import Growth, Worker
from django_leakguard.recorder import Recorder
from django_leakguard.recorder_calls import Call
from django_leakguard.recorder_process import get_recorder
from django_leakguard.records import OTHER, Aggregate

MiB = 1024 * 1024


@pytest.fixture
def rec(monkeypatch: pytest.MonkeyPatch) -> Iterator[Recorder]:
    """The process recorder, emptied, reading the heap at every call, with no warm-up call."""
    monkeypatch.setattr(recorder_heap, "HEAP_PROBE_BUDGET", float("inf"))
    monkeypatch.setattr(recorder, "WARM_KEYS_MAX", 0)
    instance = get_recorder()
    instance.discard()
    # Garbage of earlier tests freed in the middle of a call would lower its heap growth.
    gc.collect()
    gc.disable()
    try:
        yield instance
    finally:
        gc.enable()
        instance.discard()


def test_get_recorder_is_one_per_process() -> None:
    assert get_recorder() is get_recorder()


def test_serial_growth_is_the_exact_delta(rec: Recorder) -> None:
    # RSS: fresh anonymous mappings, every page touched (malloc could reuse resident memory
    # freed by earlier tests). Heap: bytes objects the allocator hands out and that are kept.
    mappings: list[mmap.mmap] = []
    kept: list[bytes] = []
    for _ in range(5):
        call = rec.begin()
        mapping = mmap.mmap(-1, 4 * MiB)
        mapping.write(b"x" * (4 * MiB))
        mappings.append(mapping)
        kept.append(os.urandom(MiB))
        rec.end(call, "request", "/keep/", "tests.keep")
    aggregate = rec.totals()["request", "/keep/"]
    assert aggregate.calls == 5
    assert aggregate.view == "tests.keep"
    assert 5 * 4 * MiB <= aggregate.rss_growth <= 5 * (6 * MiB)
    assert aggregate.rss_grew_calls == 5
    assert aggregate.rss_growth_positive == aggregate.rss_growth
    assert aggregate.rss_growth_max >= 4 * MiB
    if memory.heap_available():
        assert aggregate.heap_calls == 5
        assert 5 * MiB - 64 * 1024 <= aggregate.heap_growth <= 5 * (MiB + 64 * 1024)
        assert aggregate.heap_growth_max >= MiB
    for mapping in mappings:
        mapping.close()


def test_one_serial_call_gets_exactly_the_change_between_its_samples(rec: Recorder) -> None:
    call = rec.begin()
    rss0, heap0 = rec.last_sample
    block = os.urandom(2 * MiB)
    rec.end(call, "request", "/one/")
    rss1, heap1 = rec.last_sample
    aggregate = rec.totals()["request", "/one/"]
    assert aggregate.rss_growth == rss1 - rss0
    if memory.heap_available():
        assert aggregate.heap_growth == heap1 - heap0
    del block


class CountingProbes:
    """Wrap the real probes to count the readings (they still read this process's memory)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.rss = self.heap = 0
        real_rss, real_heap = memory.rss, memory.heap

        def rss() -> int:
            self.rss += 1
            return real_rss()

        def heap() -> int | None:
            self.heap += 1
            return real_heap()

        monkeypatch.setattr(memory, "rss", rss)
        monkeypatch.setattr(memory, "heap", heap)


def test_back_to_back_calls_reuse_the_closing_sample(
    rec: Recorder, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(recorder, "REUSE_WINDOW", 60.0)
    probes = CountingProbes(monkeypatch)
    for _ in range(10):
        rec.end(rec.begin(), "request", "/a/")
    # One reading to begin with, then one per call: each call begins with the previous end's.
    assert probes.rss == 11
    if memory.heap_available():
        assert probes.heap == 11
    assert rec.totals()["request", "/a/"].calls == 10
    # Calls that ask for fresh readings (Celery tasks) never reuse one.
    for _ in range(3):
        rec.end(rec.begin(read_heap=True), "task", "tasks.t")
    assert probes.rss == 11 + 6


def test_growth_between_back_to_back_calls_goes_to_the_next_call(
    rec: Recorder, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(recorder, "REUSE_WINDOW", 60.0)
    rec.end(rec.begin(), "request", "/first/")
    rss0, heap0 = rec.last_sample
    between = os.urandom(2 * MiB)  # allocated by "the server" between two calls
    rec.end(rec.begin(), "request", "/next/")
    rss1, heap1 = rec.last_sample
    aggregate = rec.totals()["request", "/next/"]
    # The next call's first sample is the first call's last: it gets everything since.
    assert aggregate.rss_growth == rss1 - rss0
    if memory.heap_available():
        assert aggregate.heap_growth == heap1 - heap0
        assert aggregate.heap_growth >= 2 * MiB
    del between


def test_a_call_after_a_pause_or_beside_another_reads_afresh(
    rec: Recorder, monkeypatch: pytest.MonkeyPatch
) -> None:
    probes = CountingProbes(monkeypatch)
    monkeypatch.setattr(recorder, "REUSE_WINDOW", 0.0)  # every gap is a pause
    for _ in range(5):
        rec.end(rec.begin(), "request", "/paused/")
    assert probes.rss == 10
    monkeypatch.setattr(recorder, "REUSE_WINDOW", 60.0)
    probes.rss = 0
    outer = rec.begin()  # reuses the latest closing sample
    assert probes.rss == 0
    inner = rec.begin()  # another call is in flight: nothing to reuse
    rec.end(inner, "request", "/inner/")
    rec.end(outer, "request", "/outer/")
    assert probes.rss == 3


def test_a_call_reading_the_heap_after_one_that_did_not_reads_it(
    rec: Recorder, monkeypatch: pytest.MonkeyPatch
) -> None:
    if not memory.heap_available():
        pytest.skip("glibc mallinfo2 is not available here")
    monkeypatch.setattr(recorder, "REUSE_WINDOW", 60.0)
    reads = iter([False, True])
    monkeypatch.setattr(rec, "_reads_heap", lambda: next(reads))
    rec.end(rec.begin(), "request", "/no-heap/")
    probes = CountingProbes(monkeypatch)
    call = rec.begin()
    assert call.heap_share is not None
    rec.end(call, "request", "/heap/")
    # The previous end did not read the heap: this call takes a whole fresh sample.
    assert (probes.rss, probes.heap) == (2, 2)
    assert rec.totals()["request", "/heap/"].heap_calls == 1


def test_a_call_that_loses_the_race_for_the_closing_sample_reads_afresh(
    rec: Recorder, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Between the unlocked look and the lock another thread begins a call: simulated by
    # beginning one from inside the first heap-cost check (the only call before the lock).
    monkeypatch.setattr(recorder, "REUSE_WINDOW", 60.0)
    rec.end(rec.begin(), "request", "/warm/")
    probes = CountingProbes(monkeypatch)
    others: list[Call] = []
    real_reads_heap = rec._reads_heap

    def reads_heap() -> bool:
        monkeypatch.setattr(rec, "_reads_heap", real_reads_heap)
        others.append(rec.begin())
        return real_reads_heap()

    monkeypatch.setattr(rec, "_reads_heap", reads_heap)
    raced = rec.begin()
    assert rec.in_flight == 2
    assert probes.rss == 1  # the other call reused the sample; this one read afresh
    rec.end(raced, "request", "/raced/")
    rec.end(others[0], "request", "/other/")
    assert rec.in_flight == 0


def test_threads_never_count_growth_twice(rec: Recorder) -> None:
    # A holder call spans the whole busy period, so the process's observed change over
    # in-flight time is the change between the holder's two samples. The collector is paused
    # so that garbage from earlier tests is not freed during the measurement.
    gc.collect()
    gc.disable()
    try:
        run_threads(rec)
    finally:
        gc.enable()


def run_threads(rec: Recorder) -> None:
    holder = rec.begin()
    rss0, _ = rec.last_sample
    kept: list[bytes] = []
    lock = threading.Lock()
    start = threading.Barrier(8)

    def work(index: int) -> None:
        start.wait()
        for i in range(20):
            call = rec.begin()
            block = os.urandom((index + 1) * 64 * 1024)
            if i % 2:
                with lock:
                    kept.append(block)
            rec.end(call, "request", f"/thread/{index}/")

    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    rec.end(holder, "request", "/holder/")
    rss1, _ = rec.last_sample
    assert rec.in_flight == 0
    aggregates = rec.totals()
    calls = sum(a.calls for a in aggregates.values())
    assert calls == 8 * 20 + 1
    # Each call's share is rounded to a byte: the sum may differ by half a byte per call.
    assert abs(sum(a.rss_growth for a in aggregates.values()) - (rss1 - rss0)) <= calls
    # Every call overlapped another (the holder at least): none counts a heap reading, which
    # would hold a share of what other threads allocated and freed meanwhile.
    assert sum(a.heap_calls for a in aggregates.values()) == 0
    assert sum(a.heap_growth for a in aggregates.values()) == 0


def test_a_heap_reading_counts_only_for_a_call_alone(rec: Recorder) -> None:
    if not memory.heap_available():
        pytest.skip("no heap signal on this C library")
    rec.end(rec.begin(read_heap=True), "request", "/alone/")
    first = rec.begin(read_heap=True)
    second = rec.begin(read_heap=True)  # in flight with the first
    rec.end(second, "request", "/second/")
    rec.end(first, "request", "/first/")
    # One that was alone when it read the heap, until another began and ended meanwhile.
    third = rec.begin(read_heap=True)
    rec.end(rec.begin(read_heap=False), "request", "/rss-only/")
    rec.end(third, "request", "/third/")
    totals = rec.totals()
    readings = {key: a.heap_calls for (_, key), a in totals.items()}
    assert readings == {"/alone/": 1, "/second/": 0, "/first/": 0, "/rss-only/": 0, "/third/": 0}
    assert {key: a.calls for (_, key), a in totals.items()} == dict.fromkeys(readings, 1)


def test_a_call_that_reads_the_heap_defers_the_middle_generation(
    rec: Recorder, monkeypatch: pytest.MonkeyPatch
) -> None:
    # What a call makes and drops in a reference cycle stays young until its end, whose
    # collection frees it, instead of waiting in the oldest generation for a full collection.
    if not memory.heap_available():
        pytest.skip("no heap signal on this C library")
    gc.enable()
    before = gc.get_threshold()
    deferred = (before[0], recorder_heap.DEFERRED_THRESHOLD, *before[2:])
    assert before[1] < recorder_heap.DEFERRED_THRESHOLD
    call = rec.begin(read_heap=True)
    assert gc.get_threshold() == deferred
    assert recorder_heap.still_young()
    gc.collect(1)  # the call's own collection of the middle generation made things old
    assert not recorder_heap.still_young()
    rec.end(call, "request", "/deferred/")
    assert gc.get_threshold() == before
    assert not recorder_heap.still_young()
    # A call that does not read the heap changes nothing.
    call = rec.begin(read_heap=False)
    assert gc.get_threshold() == before
    rec.end(call, "request", "/rss-only/")
    # Thresholds tuned beyond it by the application, or the collector off: left alone.
    gc.set_threshold(before[0], 500, *before[2:])
    try:
        call = rec.begin(read_heap=True)
        assert gc.get_threshold()[1] == 500
        rec.end(call, "request", "/tuned/")
    finally:
        gc.set_threshold(*before)
    gc.disable()
    call = rec.begin(read_heap=True)
    assert gc.get_threshold() == before
    rec.end(call, "request", "/off/")
    gc.enable()
    # Changed by the application meanwhile: its thresholds stand.
    call = rec.begin(read_heap=True)
    gc.set_threshold(before[0], 50, *before[2:])
    try:
        rec.end(call, "request", "/changed/")
        assert gc.get_threshold()[1] == 50
    finally:
        gc.set_threshold(*before)
    # A call that never ends: the deferral ends at a later call's end once DEFER_MAX passed.
    monkeypatch.setattr(recorder_heap, "DEFER_MAX", 0.0)
    rec.begin(read_heap=True)
    assert gc.get_threshold() == deferred
    rec.end(rec.begin(read_heap=False), "request", "/later/")
    assert gc.get_threshold() == before
    # And a discard (a fork's child) ends it too.
    monkeypatch.setattr(recorder_heap, "DEFER_MAX", 3600.0)
    rec.discard()  # the call that never ended is forgotten
    rec.begin(read_heap=True)
    assert gc.get_threshold() == deferred
    rec.discard()
    assert gc.get_threshold() == before


def test_keys_are_bounded(rec: Recorder, monkeypatch: pytest.MonkeyPatch) -> None:
    # MAX_KEYS counts per hour: a clock hour that turned during the loop made two buckets.
    monkeypatch.setattr(recorder.time, "time", lambda: 1_800_000_000.0)
    with override_settings(LEAKGUARD={"MAX_KEYS": 50}):
        for i in range(10_000):
            rec.end(rec.begin(), "request", f"/k/{i}/", "tests.view")
        rec.end(rec.begin(), "task", "a.task")
    aggregates = rec.totals()
    assert len(aggregates) == 51 + 1  # 50 keys, "<other>" for requests and for tasks
    assert aggregates["request", OTHER].calls == 10_000 - 50
    assert aggregates["request", OTHER].view == ""
    assert aggregates["task", OTHER].calls == 1
    assert sum(a.calls for a in aggregates.values()) == 10_001


def test_long_keys_are_cut_to_the_column_size(rec: Recorder) -> None:
    rec.end(rec.begin(), "request", "/" + "x" * 400, "v" * 400)
    [(kind, key)] = rec.totals()
    assert len(key) == 255
    assert len(rec.totals()[kind, key].view) == 255


def test_a_long_key_takes_one_slot_and_long_keys_stay_apart(rec: Recorder) -> None:
    # Issue 14, item 5: the lookup used the whole key and the store the cut one, so every
    # call of a long route took a new MAX_KEYS slot.
    first, second = "/" + "x" * 300 + "/a/", "/" + "x" * 300 + "/b/"
    for _ in range(50):
        rec.end(rec.begin(), "request", first)
    rec.end(rec.begin(), "request", second)
    totals = rec.totals()
    assert sorted(a.calls for a in totals.values()) == [1, 50]
    assert all(len(key) == 255 for _, key in totals)


def test_second_end_and_ends_after_discard_are_ignored(rec: Recorder) -> None:
    call = rec.begin()
    rec.end(call, "request", "/a/")
    rec.end(call, "request", "/a/")
    stale = rec.begin()
    rec.discard()
    rec.end(stale, "request", "/a/")
    assert rec.in_flight == 0
    assert rec.pending() == {}


def test_recording_errors_are_caught_and_rate_limited(
    rec: Recorder, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # A failing /proc read cannot be provoked here, so the probe is replaced by one that fails.
    def broken() -> int:
        raise OSError("no /proc")

    call = rec.begin()
    monkeypatch.setattr(memory, "rss", broken)
    with caplog.at_level(logging.ERROR, logger="django_leakguard"):
        rec.end(call, "request", "/a/")
        dead = rec.begin()
        rec.end(dead, "request", "/a/")
        rec._errors.next_at = 0.0
        rec.begin()
    messages = [r.getMessage() for r in caplog.records]
    assert messages == [
        "LeakGuard could not record a call",
        "LeakGuard could not sample memory at the start of a call (1 similar errors not logged)",
    ]
    assert dead.generation == -1


def test_heap_is_read_by_a_fraction_of_calls_when_it_is_costly(
    rec: Recorder, monkeypatch: pytest.MonkeyPatch
) -> None:
    if not memory.heap_available():
        pytest.skip("glibc mallinfo2 is not available here")
    monkeypatch.setattr(recorder_heap, "HEAP_PROBE_BUDGET", 1e-12)
    for _ in range(300):
        rec.end(rec.begin(), "request", "/cheap/")
    aggregate = rec.totals()["request", "/cheap/"]
    assert aggregate.calls == 300
    assert aggregate.heap_calls < 30
    assert rec.in_flight == 0
    # Calls that ask for it (Celery tasks) read the heap whatever it costs.
    for _ in range(20):
        rec.end(rec.begin(read_heap=True), "task", "tasks.costly")
    assert rec.totals()["task", "tasks.costly"].heap_calls == 20


def test_a_costly_heap_reading_does_not_starve_the_heap_signal(
    rec: Recorder, monkeypatch: pytest.MonkeyPatch
) -> None:
    if not memory.heap_available():
        pytest.skip("glibc mallinfo2 is not available here")
    # The first reading after a fork pays for page faults: simulated by a slow first call.
    real_heap = memory.heap
    calls = [0]

    def slow_first_heap() -> int | None:
        calls[0] += 1
        if calls[0] == 1:
            time.sleep(0.05)
        return real_heap()

    monkeypatch.setattr(memory, "heap", slow_first_heap)
    rec.discard()  # starts afresh, as a forked child does
    assert rec._heap_cost < 0.04  # not the 50 ms outlier (a loaded machine may take ms)
    # A later outlier moves the average by at most 4 times a tenth of it.
    before = rec._heap_cost
    calls[0] = 0
    rec._time_heap()
    assert rec._heap_cost <= before * 1.31


def test_a_traced_call_is_never_started_beside_an_unread_one(
    rec: Recorder, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The first call does not read the heap, the second does: the second still sees the first
    # in flight and is not traced.
    reads = iter([False, True])
    monkeypatch.setattr(rec, "_reads_heap", lambda: next(reads))
    first = rec.begin()  # TRACE_SAMPLE_RATE is 0 here: not traced
    with override_settings(LEAKGUARD={"TRACE_SAMPLE_RATE": 1.0}):
        second = rec.begin()
        assert first.trace is None
        assert first.heap_share is None
        assert second.heap_share is not None
        assert second.trace is None
        rec.end(second, "request", "/b/")
        rec.end(first, "request", "/a/")


def test_pending_hours_are_bounded(
    rec: Recorder, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # Thirty hours cannot pass in a test: the clock the recorder buckets by is moved instead.
    now = [1_800_000_000.0]
    monkeypatch.setattr(recorder.time, "time", lambda: now[0])
    with caplog.at_level(logging.WARNING, logger="django_leakguard"):
        for _ in range(30):
            rec.end(rec.begin(), "request", "/h/")
            now[0] += 3600
    pending = rec.pending()
    assert len(pending) == recorder_pending.MAX_PENDING_HOURS
    assert max(pending) == int(now[0] - 3600) // 3600
    assert len([r for r in caplog.records if "dropped" in r.getMessage()]) == 1


def test_aggregate_merge_keeps_maxima() -> None:
    a = Aggregate("v")
    a.add(-5, None)
    b = Aggregate("")
    b.add(-9, -3)
    b.add(-7, -4)
    a.merge(b)
    assert (a.calls, a.rss_growth, a.rss_growth_max) == (3, -21, -5)
    assert (a.heap_calls, a.heap_growth, a.heap_growth_max) == (2, -7, -3)
    assert a.view == "v"
    empty = Aggregate("x")
    empty.merge(a)
    assert (empty.rss_growth_max, empty.heap_growth_max, empty.view) == (-5, -3, "v")


def test_fork_child_starts_empty(rec: Recorder) -> None:
    rec.end(rec.begin(), "request", "/parent/")
    in_flight = rec.begin()
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the child
        try:
            os.close(read)
            child = get_recorder()
            empty = child.pending() == {} and child.in_flight == 0
            child.end(in_flight, "request", "/parent/")  # begun in the parent: ignored
            child.end(child.begin(), "request", "/child/")
            keys = sorted(k for b in child.pending().values() for (_, k) in b)
            worker = child.worker
            os.write(write, f"{empty} {keys} {worker.pid == os.getpid()} {worker.calls}".encode())
        finally:
            os._exit(0)
    os.close(write)
    answer = os.read(read, 1000).decode()
    os.close(read)
    os.waitpid(pid, 0)
    assert answer == "True ['/child/'] True 1"
    rec.end(in_flight, "request", "/parent/")
    assert rec.totals()["request", "/parent/"].calls == 2
    assert rec.worker.pid == os.getpid()


@pytest.mark.django_db(transaction=True)
def test_flush_writes_and_empties(rec: Recorder) -> None:
    rec.end(rec.begin(), "request", "/a/", "tests.a")
    rec.end(rec.begin(), "request", "/a/", "tests.a")
    assert django_leakguard.flush() is True
    assert rec.pending() == {}
    [row] = Growth.objects.all()
    assert (row.kind, row.key, row.view, row.calls) == ("request", "/a/", "tests.a", 2)
    [worker] = Worker.objects.all()
    assert (worker.pid, worker.calls, worker.kind) == (os.getpid(), 2, "request")
    assert rec.flush() is True  # nothing pending: no query, still a success
    rec.end(rec.begin(), "request", "/a/", "tests.a")
    assert rec.flush() is True
    assert Growth.objects.get().calls == 3
    assert Worker.objects.get().calls == 3


@pytest.mark.django_db(transaction=True)
def test_a_flush_records_the_calls_ended_later(rec: Recorder) -> None:
    # A response freed without close() ends its call from a finaliser (end_later): a process
    # whose last call that was is flushed with it, not left behind.
    call = rec.begin()
    rec.end_later(call, "request", "/dropped/", "tests.dropped")
    assert rec.in_flight == 1
    assert rec.flush() is True
    assert rec.in_flight == 0
    row = Growth.objects.get(key="/dropped/")
    assert (row.calls, row.heap_calls) == (1, 0)  # read at the flush, not at its end


def test_many_calls_ended_later_are_recorded_without_recursion(rec: Recorder) -> None:
    # Responses freed without close() queue their calls; the next call's end records them
    # all, one after the other (not one end inside another: thousands would overflow the
    # stack inside a server's close()).
    queued = 3 * sys.getrecursionlimit()
    for _ in range(queued):
        rec.end_later(rec.begin(), "request", "/dropped/", "tests.dropped")
    rec.end(rec.begin(), "request", "/closed/", "tests.closed")
    totals = rec.totals()
    assert totals["request", "/dropped/"].calls == queued
    assert totals["request", "/closed/"].calls == 1
    assert rec.in_flight == 0


@pytest.mark.django_db(transaction=True)
def test_the_exit_flush_records_the_calls_awaiting_their_teardown(rec: Recorder) -> None:
    # A uWSGI worker told to stop while it closes a response exits from a signal handler: the
    # call was answered, so the exit flush records it rather than losing it without a word.
    answered = rec.begin()
    rec.awaiting_close(answered, "request", "/answered/", "tests.answered")
    closed = rec.begin()
    rec.awaiting_close(closed, "request", "/closed/", "tests.closed")
    rec.end(closed, "request", "/closed/", "tests.closed")
    assert rec.flush_at_exit(timeout=5) is True
    rows = {row.key: row for row in Growth.objects.all()}
    assert (rows["/answered/"].calls, rows["/answered/"].heap_calls) == (1, 0)
    assert rows["/closed/"].calls == 1  # ended once, not again at exit
    assert rec.in_flight == 0
    assert rec._closing == {}


@pytest.mark.django_db(transaction=True)
def test_an_end_cut_off_by_the_exit_is_recorded_by_the_exit_flush(
    rec: Recorder, monkeypatch: pytest.MonkeyPatch
) -> None:
    # uWSGI exits from a signal handler, which may interrupt the main thread inside end():
    # simulated by running the exit flush from the end's RSS reading. The call is recorded once.
    call = rec.begin()
    rec.awaiting_close(call, "request", "/cut/", "tests.cut")
    real_rss = memory.rss
    exits: list[bool] = []

    def rss_interrupted_by_exit() -> int:
        if not exits:
            exits.append(False)
            exits[0] = rec.flush_at_exit(timeout=5)
        return real_rss()

    monkeypatch.setattr(memory, "rss", rss_interrupted_by_exit)
    rec.end(call, "request", "/cut/", "tests.cut")  # resumed after the exit flush: ignored
    assert exits == [True]
    assert Growth.objects.get(key="/cut/").calls == 1
    assert rec.flush() is True
    assert Growth.objects.get(key="/cut/").calls == 1
    assert rec.in_flight == 0


def test_the_calls_awaiting_their_teardown_are_bounded(
    rec: Recorder, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(recorder, "AWAITING_MAX", 3)
    calls = [rec.begin() for _ in range(5)]
    for call in calls:
        rec.awaiting_close(call, "request", "/kept/")
    assert len(rec._closing) == 3
    for call in calls:
        rec.end(call, "request", "/kept/")
    assert rec._closing == {}


def test_a_suspended_recorder_notes_no_call() -> None:
    with recorder_process.suspended():
        recorder = recorder_process.get_recorder()
        call = recorder.begin()
        recorder.awaiting_close(call, "request", "/hunted/")
        assert recorder._closing == {}


@pytest.mark.django_db(transaction=True)
def test_flush_if_due_waits_for_the_interval(rec: Recorder) -> None:
    rec.end(rec.begin(), "request", "/a/")
    rec.flush_if_due()
    assert not Growth.objects.exists()
    with override_settings(LEAKGUARD={"FLUSH_INTERVAL": 1e-9}):
        assert rec.flush_due()
        with transaction.atomic():
            rec.flush_if_due()  # never inside someone's transaction: retried later
        assert not Growth.objects.exists()
        rec.flush_if_due()
    assert Growth.objects.get().calls == 1


@pytest.mark.django_db(transaction=True)
def test_flush_if_due_skips_while_another_thread_flushes(rec: Recorder) -> None:
    rec.end(rec.begin(), "request", "/a/")
    with override_settings(LEAKGUARD={"FLUSH_INTERVAL": 1e-9}), rec._flush_lock:
        rec.flush_if_due()
    assert not Growth.objects.exists()
    assert rec.pending() != {}


def test_flush_due_is_false_when_settings_are_invalid(rec: Recorder) -> None:
    with override_settings(LEAKGUARD={"FLUSH_INTERVAL": -1}):
        assert rec.flush_due() is False


@pytest.mark.django_db(transaction=True)
def test_explicit_flush_inside_a_transaction_joins_it(rec: Recorder) -> None:
    rec.end(rec.begin(), "request", "/a/")
    with transaction.atomic():
        assert rec.flush() is True
    assert Growth.objects.get().calls == 1


@pytest.mark.django_db(transaction=True)
def test_flush_errors_outside_the_database_are_caught(
    rec: Recorder, caplog: pytest.LogCaptureFixture
) -> None:
    from django_leakguard import storage

    rec.end(rec.begin(), "request", "/a/")
    with (
        pytest.MonkeyPatch.context() as patch,
        caplog.at_level(logging.WARNING, logger="django_leakguard"),
    ):
        patch.setattr(storage, "write", lambda batch: 1 / 0)
        assert rec.flush() is False
    assert "could not write memory measurements" in caplog.text
    assert rec.flush() is True  # the aggregates were kept
    assert Growth.objects.get().calls == 1


def test_unexpected_flush_errors_are_caught(
    rec: Recorder, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # Only a bug could make _take() fail; one is simulated to show flush() never raises.
    def broken() -> None:
        raise RuntimeError("bug")

    monkeypatch.setattr(rec, "_take", broken)
    with caplog.at_level(logging.ERROR, logger="django_leakguard"):
        assert rec.flush() is False
        rec._errors.next_at = 0.0
        with override_settings(LEAKGUARD={"FLUSH_INTERVAL": 1e-9}):
            rec.flush_if_due()
    assert caplog.text.count("LeakGuard could not flush") == 2


@pytest.mark.django_db(transaction=True)
def test_old_rows_are_pruned_at_the_first_flush_then_daily(rec: Recorder) -> None:
    from datetime import timedelta

    from django.utils import timezone

    old = timezone.now() - timedelta(days=30)

    def old_row(key: str) -> None:
        Growth.objects.create(kind="request", key=key, hour=old, calls=1)

    old_row("/old/")
    rec.end(rec.begin(), "request", "/a/")
    assert rec.flush()
    assert not Growth.objects.filter(key="/old/").exists()
    old_row("/old-again/")
    rec.end(rec.begin(), "request", "/a/")
    assert rec.flush()
    assert Growth.objects.filter(key="/old-again/").exists()  # next prune in 24 hours


@pytest.mark.django_db(transaction=True)
def test_a_failed_prune_keeps_the_written_batch(
    rec: Recorder, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from django_leakguard import storage

    # A DELETE that fails while the INSERT succeeded is hard to provoke: prune() is replaced.
    def failing_prune(retention_days: int | None = None) -> int:
        raise RuntimeError("prune failed")

    monkeypatch.setattr(storage, "prune", failing_prune)
    rec.end(rec.begin(), "request", "/a/")
    with caplog.at_level(logging.ERROR, logger="django_leakguard"):
        assert rec.flush() is True
    assert "could not delete old rows" in caplog.text
    assert rec.pending() == {}
    assert Growth.objects.get().calls == 1


def test_flush_at_exit_flushes_the_recorder(
    rec: Recorder, monkeypatch: pytest.MonkeyPatch
) -> None:
    flushed: list[float | None] = []

    def flush(self: Recorder, *, timeout: float | None = None, exiting: bool = False) -> bool:
        flushed.append(timeout)
        return exiting

    monkeypatch.setattr(Recorder, "flush", flush)
    assert recorder_process.flush_at_exit() is True
    [timeout] = flushed
    assert 4 < timeout <= recorder_flush.EXIT_LOCK_TIMEOUT  # bounded: never hangs an exit
    monkeypatch.setattr(recorder_process, "_recorder", None)
    assert recorder_process.flush_at_exit() is True
    assert len(flushed) == 1


@pytest.mark.django_db
@pytest.mark.parametrize("held", ["_lock", "_flush_lock"])
def test_a_flush_at_exit_never_hangs_on_a_held_lock(
    rec: Recorder,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    held: str,
) -> None:
    # A call cut off by a signal while it held the recorder's lock (or a flush cut off while it
    # held the flush lock) in this very thread: a blocking flush would wait forever.
    rec.end(rec.begin(), "request", "/cut/")
    monkeypatch.setattr(recorder_flush, "EXIT_LOCK_TIMEOUT", 0.2)
    lock = getattr(rec, held)
    lock.acquire()
    try:
        started = time.monotonic()
        with caplog.at_level(logging.WARNING, logger="django_leakguard"):
            assert recorder_process.flush_at_exit() is False
        assert time.monotonic() - started < 5
    finally:
        lock.release()
    assert any("stayed busy for 0.2 s" in r.getMessage() for r in caplog.records)
    assert not Growth.objects.exists()
    if held == "_lock":
        # Nothing could be taken; counted without the lock, and left: the next flush writes it.
        assert "at exit: 1 call of 1 key lost." in caplog.text
        assert rec.flush() is True
        assert Growth.objects.get(key="/cut/").calls == 1
    else:
        # Taken and counted as lost, once: a second exit hook does not count it again.
        assert "at exit: 1 call of 1 key lost." in caplog.text
        caplog.clear()
        assert recorder_process.flush_at_exit() is True
        assert "lost" not in caplog.text


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("held", ["_lock", "_flush_lock"])
def test_an_exit_on_top_of_the_recorder_writes_past_the_locks_it_held(
    rec: Recorder, held: str, caplog: pytest.LogCaptureFixture
) -> None:
    # uWSGI's C handler calls exit() on top of the thread's code: cut off inside the recorder
    # with a lock held, that code never resumes. The exit flush writes anyway, at once.
    rec.end(rec.begin(), "request", "/cut/")
    getattr(rec, held).acquire()  # by the cut-off code, for good
    started = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="django_leakguard"):
        assert recorder_process.flush_at_exit(cut_off_inside=True) is True
    assert time.monotonic() - started < recorder_flush.EXIT_LOCK_TIMEOUT
    assert Growth.objects.get(key="/cut/").calls == 1
    assert "lost" not in caplog.text


@pytest.mark.django_db(transaction=True)
def test_locks_held_by_live_code_are_not_replaced(rec: Recorder) -> None:
    lock = rec._lock
    held = threading.Event()

    def hold_briefly() -> None:
        with lock:
            held.set()
            time.sleep(0.05)

    thread = threading.Thread(target=hold_briefly)
    thread.start()
    held.wait(5)
    rec.release_cut_off_locks()
    thread.join()
    assert rec._lock is lock


@pytest.mark.django_db(transaction=True)
def test_an_exit_that_cannot_write_safely_logs_the_loss_once(
    rec: Recorder, caplog: pytest.LogCaptureFixture
) -> None:
    rec.end(rec.begin(), "request", "/a/")
    rec.end(rec.begin(), "request", "/b/")
    with caplog.at_level(logging.WARNING, logger="django_leakguard"):
        recorder_process.abandon_at_exit("the worker was stopped during a garbage collection")
        recorder_process.abandon_at_exit("again")
        assert recorder_process.flush_at_exit() is False  # the later exit hooks write nothing
    [record] = caplog.records
    assert record.getMessage() == (
        "LeakGuard could not write memory measurements to the database 'default' at exit (the "
        "worker was stopped during a garbage collection): 2 calls of 2 keys lost."
    )
    assert not Growth.objects.exists()


# Sampled allocation tracing (issue 8) -----------------------------------------------------

KEPT: list[bytes] = []


@pytest.fixture
def traced(rec: Recorder) -> Iterator[Recorder]:
    """The recorder with TRACE_SAMPLE_RATE = 1; checks that no test leaves tracemalloc on."""
    import tracemalloc

    assert not tracemalloc.is_tracing()
    with override_settings(LEAKGUARD={"FLUSH_INTERVAL": 3600, "TRACE_SAMPLE_RATE": 1}):
        yield rec
    rec.discard()
    KEPT.clear()
    gc.collect()  # this test's garbage must not be freed during another test's calls
    assert not tracemalloc.is_tracing()


def test_rate_zero_costs_one_attribute_check(
    rec: Recorder, monkeypatch: pytest.MonkeyPatch
) -> None:
    from django_leakguard import tracing

    rec.end(rec.begin(), "request", "/a/")  # reads the rate (0) once
    assert rec._tracing is False

    def never(*args: object) -> None:
        raise AssertionError("sampling code ran at rate 0")

    monkeypatch.setattr(tracing, "should_sample", never)
    monkeypatch.setattr(tracing, "start_trace", never)
    monkeypatch.setattr(rec, "_trace_settings", never)
    for _ in range(10):
        call = rec.begin()
        assert call.trace is None
        rec.end(call, "request", "/a/")
    assert rec.totals()["request", "/a/"].traced_calls == 0


def test_a_traced_call_records_what_it_kept(traced: Recorder) -> None:
    import tracemalloc

    call = traced.begin()
    assert call.trace is not None
    assert tracemalloc.is_tracing()
    assert traced.traced_call is call
    KEPT.append(os.urandom(64 * 1024))
    traced.end(call, "request", "/kept/")
    assert not tracemalloc.is_tracing()
    assert traced.traced_call is None
    aggregate = traced.totals()["request", "/kept/"]
    assert (aggregate.calls, aggregate.traced_calls) == (1, 1)
    assert 64 * 1024 <= aggregate.traced_retained <= 1.1 * 64 * 1024
    top = aggregate.traced_sites[0]
    assert top.filename == "tests/test_recorder.py"
    assert top.line == "KEPT.append(os.urandom(64 * 1024))"


def test_sites_per_key_are_bounded(traced: Recorder) -> None:
    with override_settings(
        LEAKGUARD={"FLUSH_INTERVAL": 3600, "TRACE_SAMPLE_RATE": 1, "TRACE_TOP_SITES": 2}
    ):
        for _ in range(3):
            call = traced.begin()
            KEPT.append(os.urandom(4096))
            KEPT.append(os.urandom(2048))
            KEPT.append(os.urandom(1024))
            traced.end(call, "request", "/three/")
    aggregate = traced.totals()["request", "/three/"]
    assert aggregate.traced_calls == 3
    assert len(aggregate.traced_sites) == 2
    sizes = [site.size for site in aggregate.traced_sites]
    # On failure, name the sites: another test's thread still allocating would show here.
    sites = [(site.location, site.line, site.size) for site in aggregate.traced_sites]
    assert 3 * 4096 <= sizes[0] < 3 * 5000, sites
    assert 3 * 2048 <= sizes[1] < 3 * 3000, sites


def test_a_call_that_begins_during_a_trace_discards_it(traced: Recorder) -> None:
    import tracemalloc

    first = traced.begin()
    assert first.trace is not None
    second = traced.begin()  # another request in the process: the sample is dropped
    assert second.trace is None
    assert not tracemalloc.is_tracing()  # and tracing's cost ends at once
    traced.end(second, "request", "/second/")
    traced.end(first, "request", "/first/")
    merged = traced.totals()
    assert merged["request", "/first/"].traced_calls == 0
    assert merged["request", "/second/"].traced_calls == 0
    # Nothing in flight again: the next call is sampled.
    third = traced.begin()
    assert third.trace is not None
    traced.end(third, "request", "/third/")
    assert traced.totals()["request", "/third/"].traced_calls == 1


def test_a_call_that_begins_after_the_snapshot_drops_the_sample(
    traced: Recorder, monkeypatch: pytest.MonkeyPatch
) -> None:
    from django_leakguard.tracing import Trace

    stop = Trace.stop
    others: list[Call] = []

    def stop_then_another_call_begins(self: Trace, top_n: int, *args: object) -> object:
        result = stop(self, top_n, *args)  # type: ignore[arg-type]
        others.append(traced.begin())  # between the snapshot and the check
        return result

    monkeypatch.setattr(Trace, "stop", stop_then_another_call_begins)
    call = traced.begin()
    traced.end(call, "request", "/a/")
    traced.end(others[0], "request", "/b/")
    assert traced.totals()["request", "/a/"].traced_calls == 0


def test_threads_are_never_traced_together(traced: Recorder) -> None:
    import tracemalloc

    inside = threading.Event()
    release = threading.Event()
    seen: list[bool] = []

    def work() -> None:
        call = traced.begin()
        seen.append(call.trace is not None)
        inside.set()
        release.wait(10)
        KEPT.append(os.urandom(8192))
        traced.end(call, "request", "/thread/")

    thread = threading.Thread(target=work)
    thread.start()
    try:
        assert inside.wait(10)
        assert seen == [True]
        assert tracemalloc.is_tracing()
        other = traced.begin()  # the main thread begins a call while the thread is traced
        assert other.trace is None
        assert not tracemalloc.is_tracing()
    finally:
        release.set()
        thread.join(10)
    traced.end(other, "request", "/main/")
    merged = traced.totals()
    assert merged["request", "/thread/"].traced_calls == 0
    assert merged["request", "/main/"].traced_calls == 0


def test_many_threads_only_trace_calls_alone(traced: Recorder) -> None:
    """Many threads, rate 1: every sample kept ran alone (its blocks are its own)."""
    sizes = {"/a/": 3000, "/b/": 7000}
    errors: list[BaseException] = []

    def work(key: str) -> None:
        try:
            for _ in range(200):
                call = traced.begin()
                KEPT.append(os.urandom(sizes[key]))
                traced.end(call, "request", key)
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(key,)) for key in sizes for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not errors
    for key, size in sizes.items():
        aggregate = traced.totals()["request", key]
        assert aggregate.calls == 400
        if aggregate.traced_calls:
            # One call's block (plus the list's growth, the bytes header), never two.
            per_call = aggregate.traced_retained / aggregate.traced_calls
            assert size <= per_call < size + 2000, (key, per_call)


def test_a_users_own_tracemalloc_is_left_alone(traced: Recorder) -> None:
    import tracemalloc

    tracemalloc.start()
    try:
        call = traced.begin()
        assert call.trace is None
        traced.end(call, "request", "/a/")
        assert tracemalloc.is_tracing()
    finally:
        tracemalloc.stop()
    assert traced.totals()["request", "/a/"].traced_calls == 0


def test_a_trace_stopped_by_someone_else_is_lost(traced: Recorder) -> None:
    import tracemalloc

    call = traced.begin()
    tracemalloc.stop()
    traced.end(call, "request", "/a/")
    aggregate = traced.totals()["request", "/a/"]
    assert (aggregate.calls, aggregate.traced_calls) == (1, 0)


def test_discard_stops_a_trace_in_flight(traced: Recorder) -> None:
    import tracemalloc

    call = traced.begin()
    assert tracemalloc.is_tracing()
    traced.discard()
    assert not tracemalloc.is_tracing()
    traced.end(call, "request", "/a/")  # begun before the discard: ignored
    assert traced.pending() == {}


def test_settings_are_read_again_when_they_change(rec: Recorder) -> None:
    rec.end(rec.begin(), "request", "/a/")
    assert rec._tracing is False
    with override_settings(LEAKGUARD={"TRACE_SAMPLE_RATE": 1, "TRACE_TOP_SITES": 3}):
        assert rec._tracing is True
        call = rec.begin()
        assert call.trace is not None
        assert rec._trace_top == 3
        rec.end(call, "request", "/a/")
    call = rec.begin()
    assert call.trace is None
    rec.end(call, "request", "/a/")
    assert rec.totals()["request", "/a/"].traced_calls == 1


def test_invalid_settings_trace_nothing(rec: Recorder) -> None:
    with override_settings(LEAKGUARD={"TRACE_SAMPLE_RATE": 2}):
        call = rec.begin()
        assert call.trace is None
        rec.end(call, "request", "/a/")
        assert rec._tracing is False
    assert rec.totals()["request", "/a/"].calls == 1


def test_traced_totals_survive_a_failed_flush_and_are_written(
    traced: Recorder, monkeypatch: pytest.MonkeyPatch
) -> None:
    from django_leakguard import storage

    call = traced.begin()
    KEPT.append(os.urandom(16384))
    traced.end(call, "request", "/a/", "tests.a")

    def fail(batch: object) -> None:
        raise OSError("database down")

    monkeypatch.setattr(storage, "write", fail)
    assert traced.flush() is False
    aggregate = traced.totals()["request", "/a/"]
    assert aggregate.traced_calls == 1
    assert aggregate.traced_sites[0].size >= 16384


def test_aggregate_merge_adds_traces() -> None:
    from django_leakguard.tracing import Site, TraceResult

    a, b, empty = Aggregate("v"), Aggregate("v"), Aggregate("")
    a.add(0, None)
    b.add(0, None)
    a.add_trace(TraceResult(300, 3, (Site("x.py", 1, "", 300, 3),)), 2)
    b.add_trace(TraceResult(500, 5, (Site("x.py", 1, "", 200, 2), Site("y.py", 2, "", 300, 3))), 2)
    a.merge(empty)
    assert a.traced_calls == 1
    a.merge(b)
    assert (a.traced_calls, a.traced_retained) == (2, 800)
    assert [(s.location, s.size) for s in a.traced_sites] == [("x.py:1", 500), ("y.py:2", 300)]


@pytest.mark.django_db(transaction=True)
def test_flush_writes_traced_calls_and_sites(traced: Recorder) -> None:
    for _ in range(2):
        call = traced.begin()
        KEPT.append(os.urandom(32768))
        traced.end(call, "request", "/a/", "tests.a")
    assert traced.flush() is True
    row = Growth.objects.get()
    assert (row.calls, row.traced_calls) == (2, 2)
    assert 2 * 32768 <= row.traced_retained <= 1.1 * 2 * 32768
    assert row.traced_sites[0]["line"] == "KEPT.append(os.urandom(32768))"
    assert row.traced_sites[0]["size"] >= 2 * 32768


def test_suspended_records_nothing_and_restores_the_recorder(rec: Recorder) -> None:
    with recorder_process.suspended():
        inner = get_recorder()
        assert inner is not rec
        call = inner.begin()
        inner.end(call, "request", "/a/")
        assert inner.flush_due() is False
        inner.flush_if_due()
        assert inner.flush() is True
    assert get_recorder() is rec
    assert rec.pending() == {}


def test_the_first_call_of_a_key_is_warm_up_for_the_heap(
    rec: Recorder, monkeypatch: pytest.MonkeyPatch
) -> None:
    if not memory.heap_available():
        pytest.skip("glibc mallinfo2 is not available here")
    monkeypatch.setattr(recorder, "WARM_KEYS_MAX", 2)
    kept: list[bytes] = []
    for _ in range(3):
        for key in ("/a/", "/b/", "/c/"):
            call = rec.begin()
            kept.append(os.urandom(MiB))
            rec.end(call, "request", key)
    found = rec.totals()
    # /a/ and /b/ had a warm-up call left out of the heap; past the bound, /c/ had none.
    assert [found["request", key].calls for key in ("/a/", "/b/", "/c/")] == [3, 3, 3]
    assert [found["request", key].heap_calls for key in ("/a/", "/b/", "/c/")] == [2, 2, 3]
    assert MiB - 32 * 1024 <= found["request", "/a/"].heap_growth / 2 <= MiB + 64 * 1024
    del kept


@override_settings(INSTALLED_APPS=["django.contrib.contenttypes", "django.contrib.auth"])
def test_without_the_app_measurements_are_dropped_with_one_warning(
    rec: Recorder, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(recorder_flush, "_said_app_missing", False)
    with caplog.at_level(logging.WARNING, logger="django_leakguard"):
        for _ in range(2):
            rec.end(rec.begin(), "task", "t")
            assert rec.flush() is False
            assert rec.pending() == {}
    [record] = caplog.records
    assert "'django_leakguard' is not in INSTALLED_APPS" in record.getMessage()
    assert record.exc_info is None


def test_settings_that_cannot_be_read_never_fail_a_call(
    rec: Recorder, monkeypatch: pytest.MonkeyPatch
) -> None:
    # conf.get_settings() does not raise (invalid values fall back to defaults); a bug that
    # made it raise is simulated to show the recorder's calls never do.
    from django_leakguard import conf

    def broken() -> None:
        raise RuntimeError("bug")

    monkeypatch.setattr(conf, "get_settings", broken)
    assert recorder_process.recording() is False
    assert rec.flush_due() is False
    assert recorder_pending._max_keys() == 500
    assert recorder_flush._database_name() == "(LEAKGUARD is invalid)"
    rec.settings_changed()
    call = rec.begin()
    assert call.trace is None
    rec.end(call, "request", "/a/")


def test_the_worker_knows_when_its_process_started_and_its_first_call(rec: Recorder) -> None:
    import psutil

    started = rec.worker.process_started_at
    assert started is not None
    assert abs(started.timestamp() - psutil.Process().create_time()) < 0.01
    assert rec.worker.first_call_at is None
    before = time.time()
    rec.end(rec.begin(), "request", "/a/")
    first_call = rec.worker.first_call_at
    assert first_call is not None
    assert before <= first_call.timestamp() <= time.time()
    rec.end(rec.begin(), "request", "/a/")
    assert rec.worker.first_call_at == first_call  # the first call's, not the latest
