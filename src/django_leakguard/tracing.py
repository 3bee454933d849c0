"""Sampled allocation tracing: what one request or task allocated and kept, and where.

This module runs tracemalloc for one call; its parts are the records (tracing_records), which
frame an allocation is blamed on (tracing_sites), what a call holds anyway (tracing_baseline)
and the snapshot grouped into sites (tracing_snapshot). The names in __all__ are its public
API, wherever they are defined.
"""

from __future__ import annotations

import gc
import os
import random
import sys
import threading
import time
import tracemalloc
from collections.abc import Iterable

from django_leakguard.tracing_baseline import Baseline, held_anyway
from django_leakguard.tracing_gc import clear_free_lists, free_lists_waiting
from django_leakguard.tracing_records import Site, TraceResult, TraceTotals, merge_sites
from django_leakguard.tracing_sites import Cell
from django_leakguard.tracing_snapshot import site_statistics

__all__ = [
    "TRACE_FRAMES",
    "Site",
    "Trace",
    "TraceResult",
    "TraceTotals",
    "merge_sites",
    "should_sample",
    "site_statistics",
    "start_trace",
]

# Frames kept per allocation: enough to step out of the standard library and Django into the
# caller's code, few enough to keep tracing's overhead low.
TRACE_FRAMES = 5


# Reentrant: the garbage collection in stop() may run finalizers that start a trace.
_lock = threading.RLock()
_active: Trace | None = None


class Trace:
    """tracemalloc running for one call; end it with stop() or discard()."""

    def __init__(self) -> None:
        # Threads alive when the call began (made before tracing starts): its end waits only
        # for others (see _let_threads_finish), and looks for them only when more threads are
        # alive than then (a count, which allocates nothing while tracing).
        self._threads = frozenset(threading.enumerate())

    def stop(
        self,
        top_n: int,
        held: Iterable[object] = (),
        baseline: Baseline | None = None,
        key: str = "",
    ) -> TraceResult | None:
        """Stop tracing and return what the call retained; None if the trace was lost.

        held: what the call still holds at its end anyway (see held_anyway); baseline: what
        every call of the process keeps (see Baseline), for a call of key. Neither is retained.
        """
        ended = self._end(take_snapshot=True, held=held)
        if ended is None:
            return None
        snapshot, held_sites = ended
        retained, blocks, sites = site_statistics(snapshot, top_n, held_sites, baseline, key)
        return TraceResult(retained, blocks, sites)

    def discard(self) -> None:
        """Stop tracing without a result (another call ran in the process meanwhile)."""
        self._end(take_snapshot=False)

    def _end(
        self, *, take_snapshot: bool, held: Iterable[object] = ()
    ) -> tuple[tracemalloc.Snapshot, dict[Cell, list[int]]] | None:
        global _active
        with _lock:
            if _active is not self:
                return None  # already ended, or lost to a fork
            _active = None
            if not tracemalloc.is_tracing():
                return None  # someone else stopped tracemalloc meanwhile
            try:
                if not take_snapshot:
                    return None
                # Garbage cycles made by the call (a response and its request, say) are not
                # retained; the young generations hold them and are cheap to collect.
                gc.collect(1)
                if threading.active_count() > len(self._threads):
                    _let_threads_finish(self._threads)
                # Objects the call freed into CPython's free lists are still traced.
                clear_free_lists()
                # CPython's type attribute cache keeps the names it looked up last (a getattr
                # of "as_" + vendor) until another lookup takes their slot: not the call's.
                sys._clear_type_cache()
                snapshot = tracemalloc.take_snapshot()
                # After the snapshot, so that its own allocations are not in it; it stops
                # tracing once it has looked up where the responses were made.
                return snapshot, held_anyway(held, tracemalloc.stop)
            finally:
                if tracemalloc.is_tracing():
                    tracemalloc.stop()  # also frees every trace


def start_trace(frames: int = TRACE_FRAMES) -> Trace | None:
    """Start tracing allocations for one call; None when tracemalloc is already in use, or
    while the free lists may not be emptied at its end (see tracing_gc).

    tracemalloc is process-wide: a user's own tracing (python -X tracemalloc, a profiler) or
    a trace already under way is left alone.
    """
    global _active
    if free_lists_waiting():
        return None  # its snapshot would count what the call freed into them as retained
    trace = Trace()  # before start(): the trace object is not part of what it measures
    with _lock:
        if _active is not None or tracemalloc.is_tracing():
            return None
        tracemalloc.start(frames)
        _active = trace
    return trace


# How long a traced call's end waits for threads that are winding down (see below).
THREAD_WAIT = 0.005


def _let_threads_finish(before: frozenset[threading.Thread]) -> None:
    """Give threads the call started, and that are ending, a moment to end.

    An async view served by a WSGI server runs in an event loop that asgiref's async_to_sync
    starts in a thread of its own for the call; the thread is still winding down when the
    response is closed, and what it holds (a few KiB) is not the call's. Threads of the
    executor the call left behind (collected just before) end within microseconds; any other
    thread is waited for at most THREAD_WAIT in all. Threads in before, alive when the call
    began (an executor of the application's), are not the call's and are not waited for.
    """
    current = threading.current_thread()
    deadline = time.monotonic() + THREAD_WAIT
    for thread in threading.enumerate():
        if thread is current or thread.daemon or thread in before:
            continue
        if not thread.name.startswith("ThreadPoolExecutor-"):
            continue  # a thread of the application's, not one asgiref made for the call
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return
        thread.join(remaining)


def should_sample(rate: float) -> bool:
    """Return True for a share rate of calls, chosen at random; never when rate is 0."""
    return rate > 0 and random.random() < rate


def _stop_after_fork() -> None:
    # A child forked while its parent traced a call must not trace forever.
    global _active
    if _active is not None:
        _active = None
        if tracemalloc.is_tracing():
            tracemalloc.stop()


if hasattr(os, "register_at_fork"):  # pragma: no branch - POSIX
    os.register_at_fork(after_in_child=_stop_after_fork)
