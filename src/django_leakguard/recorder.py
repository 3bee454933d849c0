"""Per-process attribution of memory changes to calls in flight, and their aggregation.

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

import gc
import itertools
import os
import socket
import time
from collections import deque
from collections.abc import Callable
from datetime import datetime
from datetime import timezone as dt_timezone
from typing import NamedTuple

from django_leakguard import conf, dropped, lifespan, memory, threads, tracing
from django_leakguard.dropped import young_ids
from django_leakguard.flusher import Flusher
from django_leakguard.recorder_calls import Call
from django_leakguard.recorder_flush import Flushing, RateLimitedLog
from django_leakguard.recorder_heap import (
    HeapTiming,
    defer_promotion,
    end_deferral,
    fill_free_lists,
    held_memory,
    live_blocks,
    still_young,
)
from django_leakguard.records import (
    KEY_MAX_LENGTH,
    TASK,
    Batch,
    Pending,
    WorkerState,
    Writer,
    fit_key,
)
from django_leakguard.tracing import Trace
from django_leakguard.tracing_baseline import Baseline
from django_leakguard.tracing_records import TraceResult

# Keys whose first (warm-up) call is left out of the heap signal; past it, none is left out.
WARM_KEYS_MAX = 4096
# Heap readings a key gets in each band and hour before only a budgeted share of its calls
# read the heap: enough for a figure to rest on (the report flags fewer as low confidence).
MIN_READINGS = 30
# Heap readings a key's band takes at most in the hour before the budgeted share, counting
# those of calls that did not run alone (and so do not count): where threads or an event loop
# keep calls overlapping, the readings stop here.
MAX_ATTEMPTS = 4 * MIN_READINGS
# Where a key's readings of a band count those tries (see Recorder._readings_in): the band's
# slot plus this.
ATTEMPTS = 2
# Calls are "late" once their process has served half the calls of its kind that recycling
# gives it (MAX_REQUESTS, CELERY_MAX_TASKS_PER_CHILD): a cache that fills up keeps memory in
# its process's early calls only, a leak in its late calls too (see the report's "levels
# off"). Where recycling is off, late after this many calls of the kind.
LATE_AFTER = 500
# A call that begins alone within this many seconds of the previous call's closing sample
# reuses it (see the module docstring); after a longer pause it reads memory afresh, so that
# what background threads do while the process is idle is not charged to the next call.
REUSE_WINDOW = 0.002
# Calls answered and awaiting their teardown that are noted for the exit flush (see
# awaiting_close): more are in flight only if responses are kept unclosed (a leak of its own).
AWAITING_MAX = 10_000


def _half_life(kind: str) -> int:
    """From how many calls of kind on a process's calls of that kind are late (LATE_AFTER)."""
    # The server's or queue's own count where this process can tell it (see lifespan).
    life = lifespan.recycled_after(kind)
    if life is None:
        try:
            settings = conf.get_settings()
            life = settings.CELERY_MAX_TASKS_PER_CHILD if kind == TASK else settings.MAX_REQUESTS
        except Exception:  # invalid settings (the checks report them)
            life = 0
    return life // 2 if life >= 2 else LATE_AFTER


class Recorder(Flushing, HeapTiming):
    """Attribute memory changes to calls in flight and aggregate them per (kind, key, hour).

    Its parts: the heap readings' timing (recorder_heap), the pending aggregates
    (recorder_pending) and the flushes (recorder_flush); this process's recorder is
    recorder_process.get_recorder().
    """

    def __init__(self, writer: Writer | None = None) -> None:
        # Where flushes write (storage.DatabaseWriter unless a test hands another).
        self._writer = writer
        self._reset()

    def _reset(self) -> None:
        # Also called in a forked child: new locks (a lock held by another thread at fork time
        # would stay held forever), no calls in flight, nothing pending: the parent flushes its
        # own data.
        flusher: Flusher | None = getattr(self, "_flusher", None)
        if flusher is not None:
            flusher.stop(join=0.5)  # in a forked child, its thread did not come along
        self._flusher = Flusher(self)
        # Calls that ended without the recorder's lock (see end_later).
        self._late: deque[tuple[Call, str, str, str]] = deque()
        self._closing: dict[int, tuple[Call, str, str, str]] = {}
        # Incremented when a flush starts and when it ends: odd while one runs.
        self._flushes = 0
        traced: Call | None = getattr(self, "_traced", None)
        if traced is not None and traced.trace is not None:
            traced.trace.discard()  # a no-op in a forked child: tracing stopped it already
        self._traced: Call | None = None  # the call being traced, if any
        # What every traced call in this process keeps anyway (see tracing_baseline.Baseline).
        self._baseline = Baseline()
        # Whether calls may be sampled for tracing: True until the settings say the rate is
        # 0, so that at rate 0 begin() costs one attribute check more (see _trace_settings).
        self._tracing = True
        self._trace_rate: float | None = None  # read from the settings on first use
        self._trace_top = int(conf.DEFAULTS["TRACE_TOP_SITES"])
        self._lock = threads.allocate_lock()
        self._flush_lock = threads.allocate_lock()
        self._generation = getattr(self, "_generation", 0) + 1
        self._in_flight = 0
        # Calls begun and ended so far: a call alone from its heap reading to its end saw it
        # unchanged (see Call.alone_since).
        self._call_events = 0
        self._rss_share = 0.0
        self._heap_share = 0.0
        self._heap_in_flight = 0  # calls in flight that read the heap
        end_deferral()  # theirs (see recorder_heap.defer_promotion), ended with them
        self._last_rss = 0
        self._last_heap = 0
        # When the latest closing sample was taken (monotonic), and whether it read the heap.
        self._closed_at = float("-inf")
        self._closed_heap = False
        self._has_heap = memory.heap_available()
        self._heap_cost = 0.0  # moving average of one heap reading and what goes with it (s)
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
        # Calls ended per kind in this process, and from how many on each kind's are late.
        self._served: dict[str, int] = {}
        self._late_from: dict[str, int] = {}
        # Calls per key in this process (past WARM_KEYS_MAX keys, new keys are not counted:
        # none of their calls is warm-up).
        self._key_calls: dict[tuple[str, str], int] = {}
        # Heap readings per key in the current hour (see _readings_in and measure_heap).
        self._readings: dict[tuple[str, str], list[int]] = {}
        self._readings_hour = 0
        self._blocks_share = 0.0
        self._last_blocks = 0
        self._epoch = 0  # see HeapTiming._epoch
        self._keys: dict[int, int] = {}  # hour -> keys other than OTHER in that bucket
        self._worker = WorkerState(
            host=socket.gethostname()[:255],
            pid=os.getpid(),
            started_at=_now(),
            process_started_at=memory.process_started_at(),
        )
        self._last_flush = time.monotonic()
        self._next_prune = 0.0
        self._failing = False
        self._dropped_logged = False
        self._errors = RateLimitedLog()
        # Batches being written, by a token of their own; those already counted as lost.
        self._write_tokens = itertools.count()
        self._writing: dict[int, Batch] = {}
        self._reported: set[int] = set()
        self._abandoned = False

    # The request path -------------------------------------------------------------------

    def begin(self, *, read_heap: bool | None = None, kind: str | None = None) -> Call:
        """Sample memory and register a call in flight.

        read_heap=True reads both signals afresh whatever they cost (no sampled heap, no reuse
        of the previous call's closing reading): for calls such as Celery tasks, whose duration
        dwarfs a reading, and whose small numbers a sampled heap would leave unread.
        read_heap=False reads RSS only: the middleware decides once the key is known
        (measure_heap). None: a budgeted share of the calls read the heap.
        kind: the call's kind, where known, for its heap reading's band (see LATE_AFTER).
        """
        if read_heap is False:
            return self.begin_rss()
        try:
            reads_heap = read_heap or (read_heap is None and self._reads_heap())
            late = reads_heap and kind is not None and self._is_late(kind)
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
            threads = memory.threads() if reads_heap else None
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
                        heap = (self._last_heap, self._last_blocks) if reads_heap else None
                self._join_rss(rss)
                heap_share = None
                if heap is not None:
                    heap_share = self._join_heap(heap)
                if self._worker.rss_first is None:
                    self._first_call(rss, None if heap is None else heap[0])
                call = Call(
                    self._generation,
                    self._rss_share,
                    heap_share,
                    self._flushes,
                    self._blocks_share,
                )
                if heap is not None:
                    call.threads = -1 if threads is None else threads
                    call.epoch = self._epoch
                    call.late = late
                    if not in_flight:
                        call.alone_since = self._call_events
                lost = self._sample(call, in_flight) if self._tracing else None
            if lost is not None:
                lost.discard()  # outside the lock: stopping tracemalloc frees every trace
            return call
        except Exception:
            return self._begin_failed()

    def begin_rss(self, early: EarlyReading | None = None) -> Call:
        """begin(read_heap=False), the middleware's: the heap is read once the key is known.

        early: the heap reading read_heap_early() took for this call before Django made its
        request; the call takes it as its first if no other call began or ended since.
        """
        try:
            # The previous call's closing sample, when fresh (confirmed under the lock).
            rss = (
                None
                if not self._in_flight and time.monotonic() - self._closed_at < REUSE_WINDOW
                else memory.rss()
            )
            with self._lock:
                if rss is None:
                    rss = memory.rss() if self._in_flight else self._last_rss
                adopt = (
                    early is not None
                    and early.generation == self._generation
                    and early.call_events == self._call_events
                    and not self._in_flight
                )
                in_flight = self._join_rss(rss)
                if self._worker.rss_first is None:
                    self._first_call(rss, None)
                call = Call(self._generation, self._rss_share, None, self._flushes)
                lost = self._sample(call, in_flight) if self._tracing else None
                # A traced call reads the heap once tracing runs (process_view): tracemalloc's
                # own tables, made after an early reading, would count as the call's.
                if adopt and call.trace is None:
                    call.heap_share = self._join_heap(early.heap)  # type: ignore[union-attr]
                    call.blocks_share = self._blocks_share
                    call.flushes = early.flushes  # type: ignore[union-attr]
                    call.threads = early.threads  # type: ignore[union-attr]
                    call.epoch = early.epoch  # type: ignore[union-attr]
                    call.alone_since = self._call_events
                    call.collect = 1
            if lost is not None:
                lost.discard()  # outside the lock: stopping tracemalloc frees every trace
            return call
        except Exception:
            return self._begin_failed()

    def _join_rss(self, rss: int) -> int:
        """Under the lock: add an RSS reading at a call's start; return the calls in flight."""
        in_flight = self._in_flight
        if in_flight:
            self._rss_share += (rss - self._last_rss) / in_flight
        self._last_rss = rss
        self._in_flight = in_flight + 1
        self._call_events += 1
        return in_flight

    def _begin_failed(self) -> Call:
        """Log why a call could not begin; return a call that every later step ignores."""
        self._errors.exception("LeakGuard could not sample memory at the start of a call")
        return Call(-1, 0.0, None)

    def _first_call(self, rss: int, heap: int | None) -> None:
        """Under the lock: note the process's first sample."""
        worker = self._worker
        worker.rss_first = rss
        worker.heap_first = heap
        worker.first_call_at = datetime.now(dt_timezone.utc)

    def _join_heap(self, heap: tuple[int, int]) -> float:
        """Under the lock: add a heap reading at a call's start; return the heap share."""
        n = self._heap_in_flight
        if n:
            self._heap_share += (heap[0] - self._last_heap) / n
            self._blocks_share += (heap[1] - self._last_blocks) / n
        else:
            defer_promotion()  # the call's cycles stay young until its end (see there)
        self._last_heap, self._last_blocks = heap
        self._heap_in_flight = n + 1
        return self._heap_share

    def measure_heap(self, call: Call, kind: str, key: str) -> None:
        """Read the heap signals for call, now that its key is known, if the key needs them.

        Every call of a key reads them until the key has MIN_READINGS readings in the hour,
        in each of its two bands (calls in the first half of their process's life, and the
        later ones, see LATE_AFTER), of calls that ran alone (see _end); past that a budgeted
        share does (HEAP_PROBE_BUDGET over the reading's cost). A key's first call in a process is
        warm-up and reads nothing. The cost is bounded: at most 2 x MAX_ATTEMPTS readings per
        key and hour (where few calls run alone), plus the budgeted share.
        """
        try:
            if call.generation != self._generation:
                return
            if call.heap_share is not None:
                if call.collect:  # read before its request existed: the key is known now
                    self._count_early(call, kind, key)
                return
            if not self._has_heap:
                return  # pragma: no cover - CI has glibc >= 2.33
            if self._in_flight > 1:
                # Another call is in flight: this one's reading could not count (see _end), and
                # would use up one of the key's tries (MAX_ATTEMPTS) for nothing.
                return
            name = _name(kind, key)
            hour = int(time.time()) // 3600
            late = self._heap_band(name, hour)
            if late is None:
                return
            start = time.perf_counter()
            threads = memory.threads()
            heap = self._time_heap(time.perf_counter() - start)
            if heap is None:
                return  # pragma: no cover - CI has glibc >= 2.33
            with self._lock:
                if call.generation != self._generation:
                    return
                call.heap_share = self._join_heap(heap)
                call.blocks_share = self._blocks_share
                call.flushes = self._flushes
                call.epoch = self._epoch
                call.late = late
                call.threads = -1 if threads is None else threads
                if self._in_flight == 1:
                    call.alone_since = self._call_events
                self._tally(name, ATTEMPTS + late, hour)
        except Exception:
            self._errors.exception("LeakGuard could not read the heap during a call")

    def _heap_band(self, name: tuple[str, str], hour: int) -> bool | None:
        """Whether a call of name now is late (see LATE_AFTER), if it reads the heap; None if
        it does not (see measure_heap)."""
        if name not in self._key_calls and len(self._key_calls) < WARM_KEYS_MAX:
            return None  # the key's warm-up call
        late = self._is_late(name[0])
        readings = self._readings_in(hour).get(name)
        enough = readings is not None and (
            readings[late] >= MIN_READINGS or readings[ATTEMPTS + late] >= MAX_ATTEMPTS
        )
        if enough and not self._reads_heap():
            return None
        return late

    def heap_wanted(self, kind: str, key: str) -> bool:
        """Whether a call of key beginning now would read the heap (see _heap_band), other
        calls in flight aside; for read_heap_early(decided=True) after waiting for them."""
        try:
            name = _name(kind, key)
            return self._has_heap and self._heap_band(name, int(time.time()) // 3600) is not None
        except Exception:
            self._errors.exception("LeakGuard could not read the heap before a call")
            return False

    def read_heap_early(
        self,
        kind: str,
        key: str,
        before: Callable[[], object] | None = None,
        *,
        decided: bool = False,
    ) -> EarlyReading | None:
        """Read the heap signals for the call about to begin, expected to be of key, if that
        key needs them: before Django makes the request (request_started), with young
        garbage collected up to generation 1, for begin_rss(early) to take.

        Read at process_view instead, the request would already be there, and a collection
        of the youngest generation would move it to the next: a view that hangs objects on it
        (request.user refers back to the request) would keep them until some later call's
        collection. Read here, the call's end collects generation 1 and frees them.
        before: called first when it reads (what other request_started receivers free, done
        before the reading whatever their order). decided: heap_wanted() said yes already.
        """
        try:
            if self._in_flight or not self._has_heap:
                return None  # another call in flight: this one would not run alone
            name = _name(kind, key)
            if not decided and self._heap_band(name, int(time.time()) // 3600) is None:
                return None
            if before is not None:
                before()
            generation, events, flushes = self._generation, self._call_events, self._flushes
            threads = memory.threads()
            heap = self._time_heap(collect=1)
            if heap is None:
                return None  # pragma: no cover - CI has glibc >= 2.33
            threads = -1 if threads is None else threads
            return EarlyReading(generation, events, flushes, heap, threads, self._epoch)
        except Exception:
            self._errors.exception("LeakGuard could not read the heap before a call")
            return None

    def read_again(self, early: EarlyReading) -> EarlyReading | None:
        """Read the heap signals again, without a collection, for a call read early.

        Under ASGI the early reading comes inside Django's dispatch of request_started, run in
        the request's thread by asgiref: its futures, tasks and copied context (about 110
        pymalloc blocks) are alive then and freed before the call begins, and each call read
        so counted them as freed. Its collection is what the call needs (the request is made
        after it, in a young generation the call's end collects); the figures are read again
        once the call begins. The request, its executor and the handler's own objects are
        there then and freed by the end: counted as freed still (see docs/recording).
        """
        try:
            heap = self._time_heap(collect=-1)
        except Exception:
            self._errors.exception("LeakGuard could not read the heap before a call")
            return None
        return None if heap is None else early._replace(heap=heap, epoch=self._epoch)

    def _is_late(self, kind: str) -> bool:
        """Whether a call of kind beginning now is late: its process has served half the calls
        of that kind recycling gives it (see LATE_AFTER)."""
        late_from = self._late_from.get(kind)
        if late_from is None:
            late_from = self._late_from[kind] = _half_life(kind)
        return self._served.get(kind, 0) >= late_from

    def _count_early(self, call: Call, kind: str, key: str) -> None:
        """Count the early reading of call (see read_heap_early) for its key, now known."""
        name = _name(kind, key)
        call.late = self._is_late(kind)  # as read_heap_early's band (no call came between)
        with self._lock:
            self._tally(name, ATTEMPTS + call.late, int(time.time()) // 3600)

    def _readings_in(self, hour: int) -> dict[tuple[str, str], list[int]]:
        """The heap readings per key of this hour: [early, late, early tries, late tries]."""
        if hour != self._readings_hour:
            self._readings.clear()
            self._readings_hour = hour
        return self._readings

    def _tally(self, name: tuple[str, str], slot: int, hour: int) -> None:
        """Under the lock: count one in slot of name's readings (see _readings_in)."""
        readings = self._readings_in(hour).get(name)
        if readings is None:
            if len(self._readings) >= WARM_KEYS_MAX:
                return
            readings = self._readings[name] = [0, 0, 0, 0]
        readings[slot] += 1

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
        """Read TRACE_SAMPLE_RATE, TRACE_TOP_SITES and the recycling limits again."""
        self._trace_rate = None
        self._late_from = {}
        self._tracing = True

    def _end_trace(
        self, call: Call, trace: Trace, key: str, held: tuple[object, ...]
    ) -> TraceResult | None:
        """Stop call's trace; return its result unless another call began meanwhile.

        What the call holds at its end anyway (held: its response, and the request it refers
        to; what every traced call keeps, such as the framework's context variables, see
        tracing_baseline.Baseline) is not retained: every call would show it, leak or not.
        """
        call.trace = None
        # Snapshot first, then check: a call that begins before the check drops the sample,
        # one that begins after it can no longer add to the snapshot.
        result = trace.stop(self._trace_top, held, self._baseline, key)
        with self._lock:
            if self._traced is not call:
                return None  # interrupted, or the recorder was reset meanwhile
            self._traced = None
        return result

    def awaiting_close(self, call: Call, kind: str, key: str, view: str = "") -> None:
        """Note that call was answered and ends at its teardown (the response's close()).

        If the process exits first, the exit flush records it (as a late call) rather than
        losing it: its client had the answer. At most AWAITING_MAX calls are noted.
        """
        closing = self._closing
        if len(closing) < AWAITING_MAX:
            closing[id(call)] = (call, kind, key, view)

    def end_later(self, call: Call, kind: str, key: str, view: str = "") -> None:
        """End call at the next call's end or flush: for finalisers, which must not lock."""
        self._late.append((call, kind, key, view))

    def _end_late(self) -> None:
        """Record the calls end_later() queued (at a call's end, or before a flush takes them).

        Their memory is read now, not when they ended: their heap readings do not count.
        """
        late = self._late
        queued = []
        while late:
            try:
                queued.append(late.popleft())
            except IndexError:  # pragma: no cover - another thread took the last one
                break
        # Taken first, then ended: each end() finds the queue empty (unless a finaliser
        # queued more meanwhile) and does not end the rest inside itself.
        for call, kind, key, view in queued:
            call.alone_since = -1
            self.end(call, kind, key, view)

    def end(
        self,
        call: Call,
        kind: str,
        key: str,
        view: str = "",
        held: tuple[object, ...] = (),
        server_heap: int = 0,
    ) -> None:
        """Sample memory, attribute the change, and add the call to its key's totals.

        held: what the call's caller still refers to and frees right after (the response
        being closed): a traced call does not count it as retained. server_heap: C heap
        bytes the server holds for the call and frees right after (see uwsgi.server_heap):
        not kept by the call either.
        """
        if self._late:
            self._end_late()
        try:
            trace = call.trace
            # Before the memory probes: the snapshot's own allocations are freed by then.
            result = None if trace is None else self._end_trace(call, trace, key, held)
            if call.generation != self._generation:
                return  # begun before a fork or a discard(), or begin() failed, or ended
            heap = None if call.heap_share is None else self._end_heap(call, held, server_heap)
            rss = memory.rss()
            hour = int(time.time()) // 3600
            name = _name(kind, key)
            key = name[1]
            with self._lock:
                if call.generation != self._generation:
                    return  # ended meanwhile (the exit flush ends a call cut off by the exit)
                call.generation = -1  # a second end() of the same call is ignored
                if self._closing:
                    self._closing.pop(id(call), None)
                n = self._in_flight
                self._rss_share += (rss - self._last_rss) / n
                self._last_rss = rss
                self._in_flight = n - 1
                heap_growth = None
                blocks_growth = 0
                if heap is not None:
                    heap_growth, blocks_growth = self._join_end_heap(call, heap, n)
                self._call_events += 1
                served = self._served
                served[kind] = served.get(kind, 0) + 1
                key_calls = self._key_calls
                seen = key_calls.get(name)
                if seen is not None:
                    key_calls[name] = seen + 1
                elif len(key_calls) < WARM_KEYS_MAX:
                    # The first call of a key in a process fills what every process fills
                    # once (URL resolver and template caches, lazy imports, allocator pools):
                    # warm-up, not a leak. Recycled workers repeat it, so it would rank a
                    # transient pattern among the leaks. It counts as a call, not in the heap.
                    key_calls[name] = 1
                    heap_growth = None
                    result = None  # what a first call keeps is warm-up for tracing too
                if heap_growth is not None:
                    self._tally(name, call.late, hour)  # a reading of a call alone
                bucket = self._pending.get(hour)
                if bucket is None:
                    bucket = self._new_bucket(hour)
                aggregate = bucket.get(name)
                if aggregate is None:
                    aggregate = self._new_aggregate(bucket, hour, kind, key, view)
                aggregate.add(
                    round(self._rss_share - call.rss_share), heap_growth, blocks_growth, call.late
                )
                if result is not None:
                    aggregate.add_trace(result, self._trace_top)
                worker = self._worker
                worker.rss_last = rss
                worker.calls += 1
                if heap is not None:
                    worker.heap_last = heap[0]
                if not worker.kind:
                    worker.kind = kind
                self._closed_at = now = time.monotonic()
                end_deferral(now)  # a call that read the heap and never ended (see there)
                self._closed_heap = heap is not None and not self._heap_in_flight
            if now >= self._flusher.watch_at:
                self._flusher.watch(now)
        except Exception:
            self._errors.exception("LeakGuard could not record a call")

    def _end_heap(
        self, call: Call, held: tuple[object, ...], server_heap: int = 0
    ) -> tuple[int, int] | None:
        """Read the heap signals at the end of a call that read them at its start."""
        start = time.perf_counter()
        if call.threads >= 0:
            self._wait_for_threads(call.threads)
        # What the call made is young (see recorder_heap.defer_promotion): where it still is,
        # the walk of what the caller frees goes no further (noted before the collection,
        # which makes it old), once a walk in this process has been cut short at its limit.
        young = young_ids() if held and dropped.walks_cut and still_young() else None
        if self._heap_in_flight == 1:
            end_deferral()  # before the readings, like its start: what it made is not counted
        # Garbage first: a template's rendering context (a reference cycle, garbage once the
        # page is rendered) refers to the objects of the response's context too, which would
        # not look the response's own.
        if gc.isenabled():
            gc.collect(call.collect)
        # What the caller frees right after (the response) is not kept by the call. Nor what
        # the walk of it leaves behind: the C heap chunks of its tables, kept in the thread's
        # allocator cache (counted as in use) the first times it needs them that large, and
        # the types it remembers (one call had 19 KiB and 270 blocks of it).
        if not held:
            heap = self._time_heap(time.perf_counter() - start, collect=-1)
            return None if heap is None else (heap[0] - server_heap, heap[1])
        # Read before the walk and after it, the free lists full on both sides (the walk's
        # temporary lists and dicts parked there are not what it leaves behind), and take the
        # smaller of the two: whatever the walk left, not more.
        self._prepare_reading(-1)
        before = memory.heap()
        before_blocks = live_blocks()
        held_heap, held_blocks = held_memory(held, young)
        young = None
        fill_free_lists()
        after = self._finish_reading(start)
        if after is None or before is None:
            return None  # pragma: no cover - CI has glibc >= 2.33
        return (
            min(before, after[0]) - held_heap - server_heap,
            min(before_blocks, after[1]) - held_blocks,
        )

    def _join_end_heap(
        self, call: Call, heap: tuple[int, int], in_flight: int
    ) -> tuple[int | None, int]:
        """Under the lock: add a heap reading at a call's end; return its (heap, blocks) growth.

        in_flight: the calls in flight before this one ended. The heap growth is None unless
        the call ran alone from its heap reading to its end (see below).
        """
        n = self._heap_in_flight
        self._heap_share += (heap[0] - self._last_heap) / n
        self._blocks_share += (heap[1] - self._last_blocks) / n
        self._last_heap, self._last_blocks = heap
        self._heap_in_flight = n - 1
        if n == 1:
            end_deferral()
        flushes = self._flushes
        # A call that overlapped another, or a flush, would be charged with a share of what
        # they allocated and freed meanwhile (a database view in another thread opening a
        # connection: hundreds of KiB): its reading counts only if it ran alone (no other call
        # began or ended since its heap reading, and none is in flight) and no flush ran.
        if (
            in_flight == 1
            and call.alone_since == self._call_events
            and call.flushes == flushes
            and not flushes & 1
            and call.epoch == self._epoch
        ):
            return (
                round(self._heap_share - call.heap_share),  # type: ignore[operator]
                round(self._blocks_share - call.blocks_share),
            )
        return None, 0

    # Introspection, for tests and hooks --------------------------------------------------
    @property
    def in_flight(self) -> int:
        return self._in_flight

    @property
    def answered(self) -> int:
        """Calls in flight that were answered and end at their teardown (see awaiting_close)."""
        return len(self._closing)

    @property
    def last_sample(self) -> tuple[int, int]:
        """The latest (rss, heap) sample; heap is 0 when unavailable."""
        return self._last_rss, self._last_heap

    def discard(self) -> None:
        """Forget everything not flushed and start afresh (for tests)."""
        self._reset()

    @property
    def traced_call(self) -> Call | None:
        """The call being traced now, if any."""
        return self._traced


class EarlyReading(NamedTuple):
    """A heap reading taken before a call began (see Recorder.read_heap_early)."""

    generation: int  # the recorder's, at the reading
    call_events: int  # calls begun and ended by then: any since, and the reading is stale
    flushes: int
    heap: tuple[int, int]  # C heap in use, pymalloc blocks
    threads: int  # the process's threads then (-1: not known)
    epoch: int  # see Call.epoch


def _name(kind: str, key: str) -> tuple[str, str]:
    """Return a call's (kind, key) as its totals are stored and looked up (records.fit_key)."""
    return kind, key if len(key) <= KEY_MAX_LENGTH else fit_key(key)


def _now() -> datetime:
    from datetime import timezone

    return datetime.now(timezone.utc).replace(microsecond=0)
