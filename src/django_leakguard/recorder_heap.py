"""The recorder's heap readings: what one costs, and which calls may read the heap."""

from __future__ import annotations

import gc
import random
import sys
import time

from django_leakguard import memory

# mallinfo2() walks the allocator's free lists, so its cost grows with fragmentation (0.4 µs
# in a bare interpreter, several µs in a large application). When a reading costs more than
# this, only a random fraction budget/cost of the calls read the heap; heap_calls counts them.
HEAP_PROBE_BUDGET = 1.0e-6


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

    def _reads_heap(self) -> bool:
        if not self._has_heap:
            return False  # pragma: no cover - CI has glibc >= 2.33
        cost = self._heap_cost
        return cost <= HEAP_PROBE_BUDGET or random.random() * cost < HEAP_PROBE_BUDGET
