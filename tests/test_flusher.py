"""The flush thread: off the request path, self-healing, and a bounded flush at exit."""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Iterator

import pytest

from django_leakguard import flusher, memory, recorder
from django_leakguard.recorder import Recorder
from django_leakguard.records import Batch
from tests.waiting import wait_for


class FakeWriter:
    """A database stand-in: hanging or failing on demand (a hung server has its own test)."""

    def __init__(self) -> None:
        self.batches: list[Batch] = []
        self.hang = threading.Event()  # set: writes hang until released
        self.release = threading.Event()
        self.fail = False
        self.closed = False
        self.threads: set[str] = set()

    def write(self, batch: Batch) -> None:
        self.threads.add(threading.current_thread().name + str(threading.get_ident()))
        if self.hang.is_set():
            self.release.wait(30)
        if self.fail:
            raise OSError("database down")
        self.batches.append(batch)

    def prune(self) -> int:
        return 0

    def in_transaction(self) -> bool:
        return False

    def discard_broken_connection(self) -> None:
        return None

    def close(self) -> None:
        self.closed = True

    def calls(self) -> int:
        return sum(
            aggregate.calls
            for batch in self.batches
            for bucket in batch.pending.values()
            for aggregate in bucket.values()
        )


@pytest.fixture
def writer(settings: object) -> FakeWriter:
    return FakeWriter()


@pytest.fixture
def rec(writer: FakeWriter) -> Iterator[Recorder]:
    instance = Recorder(writer)
    yield instance
    writer.release.set()
    instance.discard()


def serve(rec: Recorder, n: int = 1, key: str = "/a/") -> None:
    for _ in range(n):
        rec.end(rec.begin(), "request", key)


@pytest.mark.parametrize("settings", [{"FLUSH_INTERVAL": 0.05}])
def test_an_idle_process_flushes_within_the_interval(
    rec: Recorder, writer: FakeWriter, settings: dict[str, float], django_settings: None
) -> None:
    serve(rec, 3)
    wait_for(lambda: writer.calls() == 3)
    assert writer.threads
    assert all("django-leakguard-flush" in name for name in writer.threads)


@pytest.fixture
def django_settings(settings: dict[str, float]) -> Iterator[None]:
    from django.test import override_settings

    with override_settings(LEAKGUARD=settings):
        yield


@pytest.mark.parametrize("settings", [{"FLUSH_INTERVAL": 3600}])
def test_a_stopped_flush_thread_closes_its_connection(
    rec: Recorder, writer: FakeWriter, django_settings: None
) -> None:
    serve(rec)
    assert not writer.closed
    rec.discard()  # stops the thread, as the exit does
    assert writer.closed


@pytest.mark.parametrize("settings", [{"FLUSH_INTERVAL": 0.05}])
def test_a_hung_write_is_left_behind_and_a_new_thread_takes_over(
    rec: Recorder,
    writer: FakeWriter,
    django_settings: None,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    monkeypatch.setattr(flusher, "WRITE_STUCK_AFTER", 0.2)
    monkeypatch.setattr(flusher, "WATCH_EVERY", 0.0)
    writer.hang.set()
    serve(rec)
    wait_for(lambda: writer.threads)  # the first thread is stuck in its write
    writer.hang.clear()
    time.sleep(0.3)
    rec._flusher.watch_at = 0.0
    with caplog.at_level(logging.WARNING, logger="django_leakguard"):
        serve(rec, 2)  # a call notices the hung write and starts another thread
    assert "has hung for more than" in caplog.text
    wait_for(lambda: writer.calls() == 2)
    assert len(writer.threads) == 2
    writer.release.set()
    wait_for(lambda: writer.calls() == 3)  # the hung write was not lost


@pytest.mark.parametrize("settings", [{"FLUSH_INTERVAL": 3600}])
def test_the_flush_at_exit_is_bounded_and_counts_what_it_loses(
    rec: Recorder,
    writer: FakeWriter,
    django_settings: None,
    caplog: pytest.LogCaptureFixture,
) -> None:
    serve(rec, 3, "/a/")
    serve(rec, 1, "/b/")
    writer.hang.set()
    started = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="django_leakguard"):
        assert rec.flush_at_exit(timeout=0.3) is False
    assert time.monotonic() - started < 2
    assert "within 0 s at exit: 4 calls of 2 keys lost" in caplog.text


@pytest.mark.parametrize("settings", [{"FLUSH_INTERVAL": 0.05}])
def test_the_flush_at_exit_waits_for_the_flush_threads_write(
    rec: Recorder, writer: FakeWriter, django_settings: None
) -> None:
    # A recycled worker exiting while its flush thread writes must not lose that batch.
    writer.hang.set()
    serve(rec, 3)
    wait_for(lambda: writer.threads)  # the thread has taken the batch and is writing it
    serve(rec, 2)
    threading.Timer(0.3, writer.release.set).start()
    assert rec.flush_at_exit(timeout=3) is True
    assert writer.calls() == 5


@pytest.mark.parametrize("settings", [{"FLUSH_INTERVAL": 3600}])
def test_a_failed_write_at_exit_says_what_is_lost(
    rec: Recorder,
    writer: FakeWriter,
    django_settings: None,
    caplog: pytest.LogCaptureFixture,
) -> None:
    serve(rec, 2)
    writer.fail = True
    with caplog.at_level(logging.WARNING, logger="django_leakguard"):
        assert rec.flush_at_exit() is False
    [record] = caplog.records
    assert "at exit (OSError: database down): 2 calls of 1 key lost." in record.getMessage()
    assert "retrying" not in caplog.text


@pytest.mark.parametrize("settings", [{"FLUSH_INTERVAL": 0.05}])
def test_a_write_hung_before_the_exit_is_counted_as_lost_once(
    rec: Recorder,
    writer: FakeWriter,
    django_settings: None,
    caplog: pytest.LogCaptureFixture,
) -> None:
    writer.hang.set()
    serve(rec, 2, "/a/")
    wait_for(lambda: writer.threads)  # the flush thread has taken /a/ and hangs
    serve(rec, 1, "/b/")
    started = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="django_leakguard"):
        assert rec.flush_at_exit(timeout=0.3) is False
        assert time.monotonic() - started < 2
        assert "within 0 s at exit: 3 calls of 2 keys lost." in caplog.text
        caplog.clear()
        # A second exit hook (Gunicorn's worker_exit, then atexit) neither waits nor counts.
        started = time.monotonic()
        assert rec.flush_at_exit(timeout=0.3) is True
        assert time.monotonic() - started < 0.2
    assert caplog.text == ""


@pytest.mark.parametrize("settings", [{"FLUSH_INTERVAL": 0.05}])
def test_the_exit_waits_for_a_write_the_flush_thread_has_begun(
    rec: Recorder,
    writer: FakeWriter,
    django_settings: None,
    caplog: pytest.LogCaptureFixture,
) -> None:
    writer.hang.set()
    serve(rec, 2)
    wait_for(lambda: writer.threads)
    threading.Timer(0.2, writer.release.set).start()
    with caplog.at_level(logging.WARNING, logger="django_leakguard"):
        assert rec.flush_at_exit(timeout=5) is True
    assert writer.calls() == 2
    assert caplog.text == ""


@pytest.mark.parametrize("settings", [{"FLUSH_INTERVAL": 0.05}])
def test_a_write_that_fails_during_the_exit_is_counted_as_lost(
    rec: Recorder,
    writer: FakeWriter,
    django_settings: None,
    caplog: pytest.LogCaptureFixture,
) -> None:
    writer.hang.set()
    serve(rec, 2)
    wait_for(lambda: writer.threads)
    writer.fail = True
    threading.Timer(0.2, writer.release.set).start()
    with caplog.at_level(logging.WARNING, logger="django_leakguard"):
        assert rec.flush_at_exit(timeout=5) is False
    # The flush thread's write may fail first and give the batch back, then the exit's own
    # write fails and names the error: either way the two calls are counted lost once.
    losses = re.findall(r"at exit[^\n]*: (.*) lost\.", caplog.text)
    assert losses == ["2 calls of 1 key"]


@pytest.mark.parametrize("settings", [{"FLUSH_INTERVAL": 3600}])
def test_a_database_error_is_logged_on_one_line(
    rec: Recorder,
    writer: FakeWriter,
    django_settings: None,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def fail(batch: Batch) -> None:
        raise OSError("connection failed:\n\tIs the server running on that host?")

    monkeypatch.setattr(writer, "write", fail)
    serve(rec)
    with caplog.at_level(logging.WARNING, logger="django_leakguard"):
        assert rec.flush() is False
        assert rec.flush_at_exit() is False
    assert [len(record.getMessage().splitlines()) for record in caplog.records] == [1, 1]
    assert "connection failed: Is the server running" in caplog.text


@pytest.mark.parametrize("settings", [{"FLUSH_INTERVAL": 0.01}])
def test_calls_flush_inline_when_threads_get_no_time(
    rec: Recorder, writer: FakeWriter, django_settings: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    # uWSGI without enable-threads: the thread exists but only runs while Python code does.
    monkeypatch.setattr(flusher.Flusher, "_run", lambda self, generation, wake: time.sleep(2))
    serve(rec)
    assert writer.calls() == 0
    monkeypatch.setattr(flusher, "SILENT_AFTER", 0.0)
    rec._flusher.watch_at = 0.0
    time.sleep(0.02)
    serve(rec)
    assert writer.calls() == 2


@pytest.mark.parametrize("settings", [{"FLUSH_INTERVAL": 0.01}])
def test_calls_never_flush_inline_while_the_thread_is_in_a_write(
    rec: Recorder, writer: FakeWriter, django_settings: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A database that never answers: the thread hangs in its write and stops beating. A call
    # that took that for "threads get no time" would hang on the same database.
    monkeypatch.setattr(flusher, "SILENT_AFTER", 0.0)
    monkeypatch.setattr(flusher, "WATCH_EVERY", 0.0)
    writer.hang.set()
    serve(rec)
    wait_for(lambda: writer.threads)
    time.sleep(0.05)
    started = time.monotonic()
    serve(rec, 3)
    assert time.monotonic() - started < 1
    assert len(writer.threads) == 1
    assert all("django-leakguard-flush" in name for name in writer.threads)


@pytest.mark.parametrize("settings", [{"FLUSH_INTERVAL": 3600}])
def test_a_new_process_starts_its_own_thread(
    rec: Recorder, writer: FakeWriter, django_settings: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    serve(rec)
    first = rec._flusher._thread
    assert first is not None
    assert first.is_alive()
    # A fork that ran no at-fork hook (uWSGI): the copied thread object looks alive.
    monkeypatch.setattr(flusher.os, "getpid", lambda: -1)
    rec._flusher.watch_at = 0.0
    serve(rec)
    assert rec._flusher._thread is not first
    # The replaced thread sees that it is no longer the current one, and ends by itself.
    first.join(5)
    assert not first.is_alive()


@pytest.mark.parametrize("settings", [{"FLUSH_INTERVAL": 3600}])
def test_a_call_overlapping_a_flush_is_not_charged_for_it(
    rec: Recorder, writer: FakeWriter, django_settings: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    if not memory.heap_available():  # pragma: no cover - CI has glibc >= 2.33
        pytest.skip("glibc mallinfo2 is not available here")
    monkeypatch.setattr(recorder, "WARM_KEYS_MAX", 0)
    serve(rec, 1, "/before/")
    call = rec.begin(read_heap=True)
    assert rec.flush() is True  # the write allocates while the call runs
    rec.end(call, "request", "/a/")
    totals = rec.totals()["request", "/a/"]
    assert (totals.calls, totals.heap_calls) == (1, 0)
    call = rec.begin(read_heap=True)
    rec.end(call, "request", "/a/")
    assert rec.totals()["request", "/a/"].heap_calls == 1


@pytest.mark.parametrize("settings", [{"FLUSH_INTERVAL": 0.05}])
def test_the_flush_thread_leaves_stop_signals_to_other_threads(
    rec: Recorder, writer: FakeWriter, settings: dict[str, float], django_settings: None
) -> None:
    import signal

    masks: list[set[signal.Signals]] = []
    write = writer.write

    def write_and_look(batch: Batch) -> None:
        # An empty SIG_BLOCK changes nothing and returns the calling thread's mask.
        masks.append(signal.pthread_sigmask(signal.SIG_BLOCK, []))
        write(batch)

    writer.write = write_and_look  # type: ignore[method-assign]
    serve(rec)
    wait_for(lambda: writer.calls() == 1)
    assert {signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT} <= masks[0]
    assert signal.SIGTERM not in signal.pthread_sigmask(signal.SIG_BLOCK, [])  # this thread's
