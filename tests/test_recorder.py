from __future__ import annotations

import gc
import logging
import mmap
import os
import threading
from collections.abc import Iterator

import pytest
from django.db import transaction
from django.test import override_settings

import django_leakguard
from django_leakguard import memory, recorder
from django_leakguard.models import Growth, Worker
from django_leakguard.recorder import OTHER, Aggregate, Recorder, get_recorder

MiB = 1024 * 1024


@pytest.fixture
def rec(monkeypatch: pytest.MonkeyPatch) -> Iterator[Recorder]:
    """The process recorder, emptied, reading the heap at every call."""
    monkeypatch.setattr(recorder, "HEAP_PROBE_BUDGET", float("inf"))
    instance = get_recorder()
    instance.discard()
    yield instance
    instance.discard()


def totals(rec: Recorder) -> dict[tuple[str, str], Aggregate]:
    merged: dict[tuple[str, str], Aggregate] = {}
    for bucket in rec.pending().values():
        for name, aggregate in bucket.items():
            merged.setdefault(name, Aggregate(aggregate.view)).merge(aggregate)
    return merged


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
    aggregate = totals(rec)["request", "/keep/"]
    assert aggregate.calls == 5
    assert aggregate.view == "tests.keep"
    assert 5 * 4 * MiB <= aggregate.rss_growth <= 5 * (6 * MiB)
    assert aggregate.rss_grew_calls == 5
    assert aggregate.rss_growth_positive == aggregate.rss_growth
    assert aggregate.rss_growth_max >= 4 * MiB
    if memory.heap_available():
        assert aggregate.heap_calls == 5
        assert 5 * MiB <= aggregate.heap_growth <= 5 * (MiB + 64 * 1024)
        assert aggregate.heap_growth_max >= MiB
    for mapping in mappings:
        mapping.close()


def test_one_serial_call_gets_exactly_the_change_between_its_samples(rec: Recorder) -> None:
    call = rec.begin()
    rss0, heap0 = rec.last_sample
    block = os.urandom(2 * MiB)
    rec.end(call, "request", "/one/")
    rss1, heap1 = rec.last_sample
    aggregate = totals(rec)["request", "/one/"]
    assert aggregate.rss_growth == rss1 - rss0
    if memory.heap_available():
        assert aggregate.heap_growth == heap1 - heap0
    del block


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
    rss0, heap0 = rec.last_sample
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
    rss1, heap1 = rec.last_sample
    assert rec.in_flight == 0
    aggregates = totals(rec)
    calls = sum(a.calls for a in aggregates.values())
    assert calls == 8 * 20 + 1
    # Each call's share is rounded to a byte: the sum may differ by half a byte per call.
    assert abs(sum(a.rss_growth for a in aggregates.values()) - (rss1 - rss0)) <= calls
    if memory.heap_available():
        heap = sum(a.heap_growth for a in aggregates.values())
        assert abs(heap - (heap1 - heap0)) <= calls
        assert heap >= 10 * 36 * 64 * 1024  # the kept blocks: 10 per thread, 64..512 KiB


def test_keys_are_bounded(rec: Recorder) -> None:
    with override_settings(LEAKGUARD={"MAX_KEYS": 50}):
        for i in range(10_000):
            rec.end(rec.begin(), "request", f"/k/{i}/", "tests.view")
        rec.end(rec.begin(), "task", "a.task")
    aggregates = totals(rec)
    assert len(aggregates) == 51 + 1  # 50 keys, "<other>" for requests and for tasks
    assert aggregates["request", OTHER].calls == 10_000 - 50
    assert aggregates["request", OTHER].view == ""
    assert aggregates["task", OTHER].calls == 1
    assert sum(a.calls for a in aggregates.values()) == 10_001


def test_long_keys_are_cut_to_the_column_size(rec: Recorder) -> None:
    rec.end(rec.begin(), "request", "/" + "x" * 400, "v" * 400)
    [(kind, key)] = totals(rec)
    assert len(key) == 255
    assert len(totals(rec)[kind, key].view) == 255


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
    monkeypatch.setattr(recorder, "HEAP_PROBE_BUDGET", 1e-12)
    for _ in range(300):
        rec.end(rec.begin(), "request", "/cheap/")
    aggregate = totals(rec)["request", "/cheap/"]
    assert aggregate.calls == 300
    assert aggregate.heap_calls < 30
    assert rec.in_flight == 0


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
    assert len(pending) == recorder.MAX_PENDING_HOURS
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
    assert totals(rec)["request", "/parent/"].calls == 2
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
    rec.end(rec.begin(), "request", "/a/")
    with (
        override_settings(LEAKGUARD={"MAX_KEYS": 0}),
        caplog.at_level(logging.WARNING, logger="django_leakguard"),
    ):
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
    flushed: list[bool] = []
    monkeypatch.setattr(Recorder, "flush", lambda self: flushed.append(True) or True)
    recorder._flush_at_exit()
    assert flushed == [True]
    monkeypatch.setattr(recorder, "_recorder", None)
    recorder._flush_at_exit()
    assert flushed == [True]
