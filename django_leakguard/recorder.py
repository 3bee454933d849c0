"""Per-process attribution of memory changes to calls in flight, bounded aggregation, flushing.

Every call (a request or a task) samples rss and heap when it begins and when it ends. Each
change between two consecutive samples is split evenly among the calls in flight during it.
Instead of visiting every call at every sample, the recorder keeps a running sum of the shares
(``share += change / calls_in_flight``): a call's attributed growth is the difference of that sum
between its end and its begin. Serially this is the exact delta of the call; with threads or
async the shares of all calls add up to the process's change over the time calls were in flight,
so nothing is counted twice.

A call that begins while no other call is in flight, less than REUSE_WINDOW after the previous
call's closing sample, takes that sample as its own first one instead of reading memory again
(unless it asks for fresh readings, as Celery tasks do):
under load a worker serves calls back to back, and the reading costs more than what it would
separate (the server's work between two calls, which this attributes to the next call).

With LEAKGUARD["TRACE_SAMPLE_RATE"] above 0, that share of the calls that begin while no other
call is in flight are traced with tracemalloc (see tracing); a traced call's sample is dropped
as soon as another call begins in the process, so two calls are never traced together.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import random
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from django.test.signals import setting_changed

from django_leakguard import conf, memory, tracing
from django_leakguard.tracing import Site, Trace, TraceResult, merge_sites

logger = logging.getLogger("django_leakguard")

OTHER = "<other>"
UNMATCHED = "<unmatched>"
KEY_MAX_LENGTH = 255

# Hourly buckets kept in memory while the database is unreachable; older ones are dropped.
MAX_PENDING_HOURS = 24
# A process prunes old rows at its first flush, then at most once per this many seconds.
PRUNE_EVERY = 24 * 3600.0
# mallinfo2() walks the allocator's free lists, so its cost grows with fragmentation (0.4 µs
# in a bare interpreter, several µs in a large application). When a reading costs more than
# this, only a random fraction budget/cost of the calls read the heap; heap_calls counts them.
HEAP_PROBE_BUDGET = 1.0e-6
# Keys whose first (warm-up) call is left out of the heap signal; past it, none is left out.
WARM_KEYS_MAX = 4096
# A call that begins alone within this many seconds of the previous call's closing sample
# reuses it (see the module docstring); after a longer pause it reads memory afresh, so that
# what background threads do while the process is idle is not charged to the next call.
REUSE_WINDOW = 0.002
# A flush at process exit waits at most this many seconds for the recorder's locks: a call cut
# off while it held one (uWSGI ends a worker from a C signal handler, which can interrupt the
# main thread anywhere) would otherwise hang the worker's exit for good.
EXIT_LOCK_TIMEOUT = 5.0
# Recording errors are logged at most once per this many seconds.
ERROR_LOG_INTERVAL = 60.0


class Call:
    """One request or task in flight: where the running shares stood when it began."""

    __slots__ = ("generation", "heap_share", "rss_share", "trace")

    def __init__(self, generation: int, rss_share: float, heap_share: float | None) -> None:
        self.generation = generation
        self.rss_share = rss_share
        # None when this call does not read the heap (see HEAP_PROBE_BUDGET).
        self.heap_share = heap_share
        # The allocation trace of a sampled call; None for almost every call.
        self.trace: Trace | None = None


class Aggregate:
    """Totals of one (kind, key) during one hour."""

    __slots__ = (
        "calls",
        "heap_calls",
        "heap_growth",
        "heap_growth_max",
        "rss_grew_calls",
        "rss_growth",
        "rss_growth_max",
        "rss_growth_positive",
        "traced_calls",
        "traced_retained",
        "traced_sites",
        "view",
    )

    def __init__(self, view: str) -> None:
        self.view = view
        self.calls = 0
        self.rss_growth = 0
        self.rss_growth_positive = 0
        self.rss_grew_calls = 0
        self.rss_growth_max = 0
        self.heap_calls = 0
        self.heap_growth = 0
        self.heap_growth_max = 0
        self.traced_calls = 0
        self.traced_retained = 0
        self.traced_sites: tuple[Site, ...] = ()

    def add_trace(self, result: TraceResult, top_n: int) -> None:
        """Count one traced call: its retained bytes and sites, keeping the top_n sites."""
        self.traced_calls += 1
        self.traced_retained += result.retained
        self.traced_sites = merge_sites(self.traced_sites, result.sites, top_n)

    def add(self, rss_growth: int, heap_growth: int | None) -> None:
        if self.calls == 0 or rss_growth > self.rss_growth_max:
            self.rss_growth_max = rss_growth
        self.calls += 1
        self.rss_growth += rss_growth
        if rss_growth > 0:
            self.rss_growth_positive += rss_growth
            self.rss_grew_calls += 1
        if heap_growth is not None:
            if self.heap_calls == 0 or heap_growth > self.heap_growth_max:
                self.heap_growth_max = heap_growth
            self.heap_calls += 1
            self.heap_growth += heap_growth

    def merge(self, other: Aggregate) -> None:
        if other.calls:
            if self.calls == 0 or other.rss_growth_max > self.rss_growth_max:
                self.rss_growth_max = other.rss_growth_max
            if other.view:
                self.view = other.view
        if other.heap_calls and (
            self.heap_calls == 0 or other.heap_growth_max > self.heap_growth_max
        ):
            self.heap_growth_max = other.heap_growth_max
        self.calls += other.calls
        self.rss_growth += other.rss_growth
        self.rss_growth_positive += other.rss_growth_positive
        self.rss_grew_calls += other.rss_grew_calls
        self.heap_calls += other.heap_calls
        self.heap_growth += other.heap_growth
        if other.traced_calls:
            # Both hold at most TRACE_TOP_SITES sites: the merge keeps as many as the larger.
            top_n = max(len(self.traced_sites), len(other.traced_sites))
            self.traced_sites = merge_sites(self.traced_sites, other.traced_sites, top_n)
            self.traced_calls += other.traced_calls
            self.traced_retained += other.traced_retained


# pending[hour][(kind, key)]; hour is the Unix time divided by 3600.
Pending = dict[int, dict[tuple[str, str], Aggregate]]


@dataclass
class WorkerState:
    """This process's identity and memory at its first and latest call."""

    host: str
    pid: int
    started_at: datetime
    kind: str = ""
    rss_first: int | None = None
    heap_first: int | None = None
    rss_last: int = 0
    heap_last: int | None = None
    calls: int = 0  # calls not flushed yet


@dataclass
class Batch:
    """What one flush writes: taken from the recorder, given back when the write fails."""

    pending: Pending
    worker: WorkerState
    prune: bool = False


class _RateLimitedLog:
    """Log an exception at most once per interval, counting the ones left out."""

    def __init__(self, interval: float = ERROR_LOG_INTERVAL) -> None:
        self.interval = interval
        self.next_at = 0.0
        self.suppressed = 0

    def exception(self, message: str) -> None:
        now = time.monotonic()
        if now < self.next_at:
            self.suppressed += 1
            return
        suffix = f" ({self.suppressed} similar errors not logged)" if self.suppressed else ""
        self.suppressed = 0
        self.next_at = now + self.interval
        logger.exception("%s%s", message, suffix)


class Recorder:
    """Attribute memory changes to calls in flight and aggregate them per (kind, key, hour)."""

    def __init__(self) -> None:
        self._reset()

    def _reset(self) -> None:
        # Also called in a forked child: new locks (a lock held by another thread at fork time
        # would stay held forever), no calls in flight, nothing pending: the parent flushes its
        # own data.
        traced: Call | None = getattr(self, "_traced", None)
        if traced is not None and traced.trace is not None:
            traced.trace.discard()  # a no-op in a forked child: tracing stopped it already
        self._traced: Call | None = None  # the call being traced, if any
        # Whether calls may be sampled for tracing: True until the settings say the rate is
        # 0, so that at rate 0 begin() costs one attribute check more (see _trace_settings).
        self._tracing = True
        self._trace_rate: float | None = None  # read from the settings on first use
        self._trace_top = int(conf.DEFAULTS["TRACE_TOP_SITES"])
        self._lock = threading.Lock()
        self._flush_lock = threading.Lock()
        self._generation = getattr(self, "_generation", 0) + 1
        self._in_flight = 0
        self._rss_share = 0.0
        self._heap_share = 0.0
        self._heap_in_flight = 0  # calls in flight that read the heap
        self._last_rss = 0
        self._last_heap = 0
        # When the latest closing sample was taken (monotonic), and whether it read the heap.
        self._closed_at = float("-inf")
        self._closed_heap = False
        self._has_heap = memory.heap_available()
        self._heap_cost = 0.0  # moving average of one heap() reading, in seconds
        if self._has_heap:
            # The first readings after a fork pay for copy-on-write page faults: start from
            # the cheapest of a few, or an outlier would starve the heap signal for a long time.
            costs = []
            for _ in range(3):
                start = time.perf_counter()
                memory.heap()
                costs.append(time.perf_counter() - start)
            self._heap_cost = min(costs)
        self._pending: Pending = {}
        self._warmed: set[tuple[str, str]] = set()  # keys whose warm-up call has ended
        self._keys: dict[int, int] = {}  # hour -> keys other than OTHER in that bucket
        self._worker = WorkerState(
            host=socket.gethostname()[:255], pid=os.getpid(), started_at=_now()
        )
        self._last_flush = time.monotonic()
        self._next_prune = 0.0
        self._failing = False
        self._dropped_logged = False
        self._errors = _RateLimitedLog()

    # The request path -------------------------------------------------------------------

    def _time_heap(self) -> int | None:
        start = time.perf_counter()
        heap = memory.heap()
        cost = time.perf_counter() - start
        # A moving average of the readings as requests really see them (slower than in a tight
        # loop); a reading slowed by preemption or page faults counts as at most 4 times the
        # average, so one outlier cannot starve the heap signal.
        previous = self._heap_cost
        self._heap_cost = cost if not previous else 0.9 * previous + 0.1 * min(cost, 4 * previous)
        return heap

    def _reads_heap(self) -> bool:
        if not self._has_heap:
            return False  # pragma: no cover - CI has glibc >= 2.33
        cost = self._heap_cost
        return cost <= HEAP_PROBE_BUDGET or random.random() * cost < HEAP_PROBE_BUDGET

    def begin(self, *, read_heap: bool = False) -> Call:
        """Sample memory and register a call in flight.

        read_heap=True reads both signals afresh whatever they cost (no sampled heap, no reuse
        of the previous call's closing reading): for calls such as Celery tasks, whose duration
        dwarfs a reading, and whose small numbers a sampled heap would leave unread.
        """
        try:
            reads_heap = read_heap or self._reads_heap()
            # Unlocked first look: reuse the previous call's closing sample when it is fresh and
            # holds what this call reads; confirmed under the lock below.
            reuse = (
                not read_heap
                and not self._in_flight
                and time.monotonic() - self._closed_at < REUSE_WINDOW
                and (self._closed_heap or not reads_heap)
            )
            rss = heap = None
            if not reuse:
                rss = memory.rss()
                heap = self._time_heap() if reads_heap else None
            with self._lock:
                in_flight = self._in_flight
                if rss is None:
                    if in_flight or (reads_heap and not self._closed_heap):
                        # Another call began or ended meanwhile: read after all (rarely).
                        rss = memory.rss()
                        heap = self._time_heap() if reads_heap else None
                    else:
                        # The latest sample is a closing one, at most REUSE_WINDOW old.
                        rss = self._last_rss
                        heap = self._last_heap if reads_heap else None
                if in_flight:
                    self._rss_share += (rss - self._last_rss) / in_flight
                self._last_rss = rss
                self._in_flight = in_flight + 1
                heap_share = None
                if heap is not None:
                    n = self._heap_in_flight
                    if n:
                        self._heap_share += (heap - self._last_heap) / n
                    self._last_heap = heap
                    self._heap_in_flight = n + 1
                    heap_share = self._heap_share
                worker = self._worker
                if worker.rss_first is None:
                    worker.rss_first = rss
                    worker.heap_first = heap
                call = Call(self._generation, self._rss_share, heap_share)
                lost = self._sample(call, in_flight) if self._tracing else None
            if lost is not None:
                lost.discard()  # outside the lock: stopping tracemalloc frees every trace
            return call
        except Exception:
            self._errors.exception("LeakGuard could not sample memory at the start of a call")
            return Call(-1, 0.0, None)

    def _sample(self, call: Call, in_flight: int) -> Trace | None:
        """Under the lock: drop a sample another call interrupts, or start tracing call.

        Return the interrupted trace, for the caller to discard outside the lock.
        """
        traced = self._traced
        if traced is not None:
            # Another call begins while one is traced: its allocations would mix with the
            # traced call's, so the sample is dropped (and the cost of tracing ends now).
            self._traced = None
            return traced.trace
        rate = self._trace_rate
        if rate is None:
            rate = self._trace_settings()
        if not in_flight and tracing.should_sample(rate):
            # Under the lock, so that no call can begin between the check and the start.
            call.trace = tracing.start_trace()
            if call.trace is not None:
                self._traced = call
        return None

    def _trace_settings(self) -> float:
        try:
            settings = conf.get_settings()
            rate, top = settings.TRACE_SAMPLE_RATE, settings.TRACE_TOP_SITES
        except Exception:  # invalid settings (the checks report them): do not trace
            rate, top = 0.0, self._trace_top
        self._trace_rate, self._trace_top = rate, top
        if not rate:
            self._tracing = False
        return rate

    def settings_changed(self) -> None:
        """Read TRACE_SAMPLE_RATE and TRACE_TOP_SITES again at the next call."""
        self._trace_rate = None
        self._tracing = True

    def _end_trace(self, call: Call, trace: Trace) -> TraceResult | None:
        """Stop call's trace; return its result unless another call began meanwhile."""
        call.trace = None
        # Snapshot first, then check: a call that begins before the check drops the sample,
        # one that begins after it can no longer add to the snapshot.
        result = trace.stop(self._trace_top)
        with self._lock:
            if self._traced is not call:
                return None  # interrupted, or the recorder was reset meanwhile
            self._traced = None
        return result

    def end(self, call: Call, kind: str, key: str, view: str = "") -> None:
        """Sample memory, attribute the change, and add the call to its key's totals."""
        try:
            trace = call.trace
            # Before the memory probes: the snapshot's own allocations are freed by then.
            result = None if trace is None else self._end_trace(call, trace)
            if call.generation != self._generation:
                return  # begun before a fork or a discard(), or begin() failed
            call.generation = -1  # a second end() of the same call is ignored
            rss = memory.rss()
            heap = None if call.heap_share is None else self._time_heap()
            hour = int(time.time()) // 3600
            with self._lock:
                n = self._in_flight
                self._rss_share += (rss - self._last_rss) / n
                self._last_rss = rss
                self._in_flight = n - 1
                heap_growth: int | None = None
                if heap is not None:
                    n = self._heap_in_flight
                    self._heap_share += (heap - self._last_heap) / n
                    self._last_heap = heap
                    self._heap_in_flight = n - 1
                    heap_growth = round(self._heap_share - call.heap_share)  # type: ignore[operator]
                name = (kind, key)
                warmed = self._warmed
                if name not in warmed and len(warmed) < WARM_KEYS_MAX:
                    # The first call of a key in a process fills what every process fills
                    # once (URL resolver and template caches, lazy imports, allocator pools):
                    # warm-up, not a leak. Recycled workers repeat it, so it would rank a
                    # transient pattern among the leaks. It counts as a call, not in the heap.
                    warmed.add(name)
                    heap_growth = None
                bucket = self._pending.get(hour)
                if bucket is None:
                    bucket = self._new_bucket(hour)
                aggregate = bucket.get(name)
                if aggregate is None:
                    aggregate = self._new_aggregate(bucket, hour, kind, key, view)
                aggregate.add(round(self._rss_share - call.rss_share), heap_growth)
                if result is not None:
                    aggregate.add_trace(result, self._trace_top)
                worker = self._worker
                if not worker.kind:
                    worker.kind = kind
                worker.rss_last = rss
                if heap is not None:
                    worker.heap_last = heap
                worker.calls += 1
                self._closed_at = time.monotonic()
                self._closed_heap = heap is not None and not self._heap_in_flight
        except Exception:
            self._errors.exception("LeakGuard could not record a call")

    def _new_bucket(self, hour: int) -> dict[tuple[str, str], Aggregate]:
        if len(self._pending) >= MAX_PENDING_HOURS:
            oldest = min(self._pending)
            del self._pending[oldest]
            self._keys.pop(oldest, None)
            if not self._dropped_logged:
                self._dropped_logged = True
                logger.warning(
                    "LeakGuard dropped memory measurements older than %d hours: the database "
                    "has been unreachable for that long.",
                    MAX_PENDING_HOURS,
                )
        bucket: dict[tuple[str, str], Aggregate] = {}
        self._pending[hour] = bucket
        self._keys[hour] = 0
        return bucket

    def _new_aggregate(
        self, bucket: dict[tuple[str, str], Aggregate], hour: int, kind: str, key: str, view: str
    ) -> Aggregate:
        if key != OTHER and self._keys[hour] >= _max_keys():
            key, view = OTHER, ""
            aggregate = bucket.get((kind, key))
            if aggregate is not None:
                return aggregate
        if key != OTHER:
            self._keys[hour] += 1
        aggregate = Aggregate(view[:KEY_MAX_LENGTH])
        bucket[(kind, key[:KEY_MAX_LENGTH])] = aggregate
        return aggregate

    # Flushing ---------------------------------------------------------------------------

    def flush_due(self) -> bool:
        """Return whether FLUSH_INTERVAL has elapsed since the last flush; never raises."""
        try:
            return time.monotonic() - self._last_flush >= conf.get_settings().FLUSH_INTERVAL
        except Exception:
            return False

    def flush_if_due(self) -> None:
        """Flush when FLUSH_INTERVAL has elapsed, unless a flush is running; never raises."""
        try:
            if not self.flush_due():
                return
            if not self._flush_lock.acquire(blocking=False):
                return  # another thread is flushing
            try:
                from django_leakguard import storage

                if storage.in_transaction():
                    return  # never write inside someone's transaction: retry later
                self._flush_locked()
            finally:
                self._flush_lock.release()
        except Exception:
            self._errors.exception("LeakGuard could not flush")

    def flush(self, *, timeout: float | None = None) -> bool:
        """Write pending aggregates now; return False when they could not be written.

        timeout: wait at most this many seconds for another flush, or a call being recorded,
        to let go of the recorder (None: as long as it takes); the exit hooks pass one.
        """
        wait = -1 if timeout is None else timeout
        try:
            if not self._flush_lock.acquire(timeout=wait):
                self._busy_at_flush(timeout)
                return False
            try:
                return self._flush_locked(wait)
            finally:
                self._flush_lock.release()
        except Exception:
            self._errors.exception("LeakGuard could not flush")
            return False

    def _busy_at_flush(self, timeout: float | None) -> None:
        logger.warning(
            "LeakGuard could not flush: the recorder stayed busy for %s s (a call or a flush "
            "cut off while it held a lock?); its measurements are not written, and are lost "
            "if the process is exiting.",
            timeout,
        )

    def _take(self, wait: float = -1) -> Batch | None:
        """Take the pending aggregates (None: nothing to write).

        Raise TimeoutError when the lock was not free within wait seconds (-1: no limit).
        """
        if not self._lock.acquire(timeout=wait):
            raise TimeoutError
        try:
            worker = self._worker
            if not self._pending and not worker.calls:
                return None
            batch = Batch(pending=self._pending, worker=_copy_worker(worker))
            self._pending = {}
            self._keys = {}
            worker.calls = 0
            return batch
        finally:
            self._lock.release()

    def _give_back(self, batch: Batch) -> None:
        """Merge a batch that failed to write back into the pending aggregates."""
        with self._lock:
            for hour in sorted(batch.pending):
                for (kind, key), old in batch.pending[hour].items():
                    bucket = self._pending.get(hour)
                    if bucket is None:
                        bucket = self._new_bucket(hour)
                    aggregate = bucket.get((kind, key))
                    if aggregate is None:
                        aggregate = self._new_aggregate(bucket, hour, kind, key, old.view)
                    aggregate.merge(old)
            self._worker.calls += batch.worker.calls

    def _flush_locked(self, wait: float = -1) -> bool:
        from django_leakguard import storage

        self._last_flush = time.monotonic()
        try:
            batch = self._take(wait)
        except TimeoutError:
            self._busy_at_flush(wait)
            return False
        if batch is None:
            return True
        now = time.monotonic()
        batch.prune = now >= self._next_prune
        try:
            storage.write(batch)
        except Exception as exc:
            self._give_back(batch)
            if not self._failing:
                self._failing = True
                logger.warning(
                    "LeakGuard could not write memory measurements to the database %s "
                    "(%s: %s); keeping them in memory and retrying every flush.",
                    _database_name(),
                    type(exc).__name__,
                    exc,
                )
            with contextlib.suppress(Exception):
                storage.discard_broken_connection()
            return False
        if batch.prune:
            # Separate from the write: a failed prune must not give back a written batch.
            self._next_prune = now + PRUNE_EVERY
            try:
                storage.prune()
            except Exception:
                self._errors.exception("LeakGuard could not delete old rows")
        if self._failing:
            self._failing = False
            self._dropped_logged = False
            logger.info("LeakGuard wrote its pending memory measurements again.")
        return True

    # Introspection, for tests and hooks --------------------------------------------------

    def pending(self) -> Pending:
        """Return a copy of the aggregates not written yet."""
        with self._lock:
            copy: Pending = {}
            for hour, bucket in self._pending.items():
                copy[hour] = {}
                for name, aggregate in bucket.items():
                    clone = Aggregate(aggregate.view)
                    clone.merge(aggregate)
                    copy[hour][name] = clone
            return copy

    @property
    def worker(self) -> WorkerState:
        """A copy of this process's worker state."""
        with self._lock:
            return _copy_worker(self._worker)

    @property
    def in_flight(self) -> int:
        return self._in_flight

    @property
    def last_sample(self) -> tuple[int, int]:
        """The latest (rss, heap) sample; heap is 0 when unavailable."""
        return self._last_rss, self._last_heap

    def totals(self) -> dict[tuple[str, str], Aggregate]:
        """Return the aggregates not written yet per (kind, key), all hours merged."""
        merged: dict[tuple[str, str], Aggregate] = {}
        for bucket in self.pending().values():
            for name, aggregate in bucket.items():
                merged.setdefault(name, Aggregate(aggregate.view)).merge(aggregate)
        return merged

    def discard(self) -> None:
        """Forget everything not flushed and start afresh (for tests)."""
        self._reset()

    @property
    def traced_call(self) -> Call | None:
        """The call being traced now, if any."""
        return self._traced


def _database_name() -> str:
    try:
        return repr(conf.get_settings().DATABASE)
    except Exception:
        return "(LEAKGUARD is invalid)"


def _max_keys() -> int:
    try:
        return conf.get_settings().MAX_KEYS
    except Exception:  # invalid settings (the checks report them): keep recording, bounded
        return int(conf.DEFAULTS["MAX_KEYS"])


def _copy_worker(worker: WorkerState) -> WorkerState:
    return WorkerState(**vars(worker))


def _now() -> datetime:
    from datetime import timezone

    return datetime.now(timezone.utc).replace(microsecond=0)


_recorder: Recorder | None = None
_recorder_lock = threading.Lock()


def recording() -> bool:
    """Return LEAKGUARD["RECORD"]; False when the setting is invalid (the checks report it)."""
    try:
        return conf.get_settings().RECORD
    except Exception:  # a bad setting never fails a request or a task
        return False


def get_recorder() -> Recorder:
    """Return this process's recorder (a forked child starts with an empty one)."""
    recorder = _recorder
    if recorder is None:
        recorder = _create()
    return recorder


def _create() -> Recorder:
    global _recorder
    with _recorder_lock:
        if _recorder is None:
            _recorder = Recorder()
            atexit.register(flush_at_exit)
        return _recorder


def flush_at_exit() -> bool:
    """Flush as the process exits, so that a recycled worker loses nothing.

    Registered with atexit, and called by the Gunicorn, uWSGI and Celery exit hooks. It waits
    at most EXIT_LOCK_TIMEOUT seconds for the recorder, so that it never hangs an exit.
    """
    recorder = _recorder
    if recorder is None:
        return True
    return recorder.flush(timeout=EXIT_LOCK_TIMEOUT)


class _SuspendedRecorder(Recorder):
    """Records nothing: what get_recorder() returns inside suspended()."""

    def begin(self, *, read_heap: bool = False) -> Call:
        return Call(-1, 0.0, None)

    def end(self, call: Call, kind: str, key: str, view: str = "") -> None:
        return None

    def flush_due(self) -> bool:
        return False

    def flush_if_due(self) -> None:
        return None

    def flush(self, *, timeout: float | None = None) -> bool:
        return True


@contextlib.contextmanager
def suspended() -> Iterator[None]:
    """Record nothing in this process while the block runs (leakhunt's replayed requests).

    The process's recorder is swapped for one that ignores every call, so the request path
    pays nothing for it; what the real recorder holds is kept and flushed as usual.
    """
    global _recorder
    real = get_recorder()
    with _recorder_lock:
        _recorder = _SuspendedRecorder()
    try:
        yield
    finally:
        with _recorder_lock:
            _recorder = real


def _settings_changed(setting: str = "", **kwargs: Any) -> None:
    recorder = _recorder
    if setting == conf.SETTING_NAME and recorder is not None:
        recorder.settings_changed()


setting_changed.connect(_settings_changed, dispatch_uid="django_leakguard.recorder.settings")


def _after_fork_in_child() -> None:
    global _recorder_lock
    _recorder_lock = threading.Lock()
    if _recorder is not None:
        _recorder._reset()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
