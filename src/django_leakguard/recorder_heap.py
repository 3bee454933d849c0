"""The recorder's heap readings: what one costs, and which calls may read the heap."""

from __future__ import annotations

import asyncio
import gc
import random
import sys
import time

from django_leakguard import memory

# mallinfo2() walks the allocator's free lists, so its cost grows with fragmentation (0.4 µs
# in a bare interpreter, several µs in a large application). When a reading costs more than
# this, only a random fraction budget/cost of the calls read the heap; heap_calls counts them.
HEAP_PROBE_BUDGET = 1.0e-6
# A call that read the heap waits at most this long at its end for the threads it started and
# that are ending (the event loop thread of async_to_sync, which runs an async view under WSGI)
# to be gone, polling every THREADS_POLL seconds: until a thread has exited, its state and what
# it freed into its allocator cache count as in use. Calls ending on an event loop's thread do
# not wait (the loop serves other calls meanwhile).
THREADS_WAIT = 0.002
THREADS_POLL = 0.00005


def asyncio_running() -> bool:
    """Return whether an asyncio event loop runs in this thread."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


class HeapTiming:
    """Part of the Recorder: heap readings timed, and sampled when they are expensive."""

    _has_heap: bool
    _heap_cost: float  # moving average of one heap() reading, in seconds

    def _time_heap(self) -> tuple[int, int] | None:
        """Read the heap signals: C heap in use and pymalloc blocks, young garbage collected.

        Objects of the call that are only waiting for the cyclic collector (a request and its
        lazy user refer to each other) are freed first, so that they do not count as kept:
        a collection of the youngest generation, cheap since it holds a few hundred objects
        at most. A process that disabled the collector is left alone.
        """
        start = time.perf_counter()
        if gc.isenabled():
            gc.collect(0)
        heap = memory.heap()
        if heap is None:
            return None  # pragma: no cover - CI has glibc >= 2.33
        blocks = sys.getallocatedblocks()
        cost = time.perf_counter() - start
        # A moving average of the readings as requests really see them (slower than in a tight
        # loop); a reading slowed by preemption or page faults counts as at most 4 times the
        # average, so one outlier cannot starve the heap signal.
        previous = self._heap_cost
        self._heap_cost = cost if not previous else 0.9 * previous + 0.1 * min(cost, 4 * previous)
        return heap, blocks

    @staticmethod
    def _wait_for_threads(before: int) -> None:
        """Wait up to THREADS_WAIT for the process to have at most `before` threads again.

        Not on an event loop's thread, which serves other calls meanwhile.
        """
        count = memory.threads()
        if count is None or count <= before or asyncio_running():
            return
        deadline = time.perf_counter() + THREADS_WAIT
        while time.perf_counter() < deadline:
            time.sleep(THREADS_POLL)  # lets the ending threads run
            count = memory.threads()
            if count is None or count <= before:
                return

    def _reads_heap(self) -> bool:
        if not self._has_heap:
            return False  # pragma: no cover - CI has glibc >= 2.33
        cost = self._heap_cost
        return cost <= HEAP_PROBE_BUDGET or random.random() * cost < HEAP_PROBE_BUDGET
