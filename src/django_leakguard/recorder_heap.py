"""The recorder's heap readings: what one costs, and which calls may read the heap."""

from __future__ import annotations

import asyncio
import ctypes
import gc
import random
import sys
import time
from collections.abc import Container, Iterable

from django_leakguard import free_tuples, memory, tracing_gc
from django_leakguard.dropped import dropped_parts
from django_leakguard.sizes import object_size
from django_leakguard.tracing_baseline import response_content

# mallinfo2() walks the allocator's free lists and sys.getallocatedblocks() pymalloc's pools,
# so a reading's cost grows with fragmentation and the heap's size (0.5 µs in a bare
# interpreter, 10 to 20 µs in a large application). A call that reads the heap reads it twice,
# counts the process's threads and walks its response (see the Recorder): when that costs more
# than this, only a random fraction budget/cost of the calls read the heap; heap_calls counts
# them. A call's heap readings so cost about this much on average.
HEAP_PROBE_BUDGET = 1.0e-6
# A call that read the heap waits at most this long at its end for the threads it started and
# that are ending (the event loop thread of async_to_sync, which runs an async view under WSGI)
# to be gone, polling every THREADS_POLL seconds: until a thread has exited, its state and what
# it freed into its allocator cache count as in use. Calls ending on an event loop's thread do
# not wait (the loop serves other calls meanwhile).
THREADS_WAIT = 0.002
THREADS_POLL = 0.00005


# While a call that read the heap is in flight, the collector's middle generation is collected
# after this many collections of the youngest (CPython's default: 10). Each collection of the
# middle one moves what is alive then to the oldest generation, which only a full collection
# scans: a heavy view (a REST framework list in NetBox, about 30 collections of the youngest a
# call) had its temporary reference cycles moved there mid-call, garbage by the call's end
# that the end's collection of the young generations could not free (2.2 MiB a call "kept",
# freed by the next full collection, which discards the call it falls in). Deferred, they are
# still young at the end, which frees them; what the collector would have scanned mid-call is
# scanned then, once. Bounded: the middle generation still collects past this many, and the
# deferral ends after DEFER_MAX seconds whatever happens (a call that never ends).
DEFERRED_THRESHOLD = 100
DEFER_MAX = 10.0
_saved_threshold: tuple[int, ...] | None = None
_deferred_at = 0.0
_middle_collections = -1  # the middle generation's collections when the deferral began


def defer_promotion() -> None:
    """Collect the middle generation less often, until end_deferral() (see DEFERRED_THRESHOLD).

    Not where the collector is off or tuned by the application beyond it, nor on Python 3.14
    and later (an incremental collector with other generations).
    """
    global _saved_threshold, _deferred_at, _middle_collections
    if _saved_threshold is not None or not _GENERATIONAL or not gc.isenabled():
        return
    threshold = gc.get_threshold()
    if len(threshold) < 2 or threshold[0] <= 0 or threshold[1] >= DEFERRED_THRESHOLD:
        return
    _saved_threshold = threshold
    _deferred_at = time.monotonic()
    _middle_collections = gc.get_stats()[1]["collections"]
    gc.set_threshold(threshold[0], DEFERRED_THRESHOLD, *threshold[2:])


def still_young() -> bool:
    """Whether everything made since the deferral began is in the young generations still:
    deferred, and no collection of the middle one since (a call's own gc.collect(), one past
    DEFERRED_THRESHOLD)."""
    return _saved_threshold is not None and gc.get_stats()[1]["collections"] == _middle_collections


def end_deferral(now: float | None = None) -> None:
    """Give the collector its thresholds back; with now, only once DEFER_MAX has passed.

    Left alone where someone changed them meanwhile (theirs stand).
    """
    global _saved_threshold
    saved = _saved_threshold
    if saved is None or (now is not None and now - _deferred_at < DEFER_MAX):
        return
    _saved_threshold = None
    if gc.get_threshold() == (saved[0], DEFERRED_THRESHOLD, *saved[2:]):
        gc.set_threshold(*saved)


_GENERATIONAL = sys.version_info < (3, 14)


# pymalloc serves requests of up to this many bytes (one block each); larger ones are glibc's,
# whose chunks of up to TCACHE_MAX bytes go to and come from a per-thread cache that
# mallinfo2() counts as in use: the heap signal does not see them come and go. Larger chunks
# are the request plus an 8-byte header, in 16-byte steps.
PYMALLOC_MAX = 512
TCACHE_MAX = 1032


# The collector's header before an object of a type it may track (tracked now or not: an
# empty dict is not), and the type flag that says so (Py_TPFLAGS_HAVE_GC).
GC_HEADER = 16
_HAVE_GC = 1 << 14
# Since Python 3.11 an instance's __dict__ pointer (and up to 3.12 its values pointer) lies
# before it, in the same allocation, counted by sys.getsizeof() (Py_TPFLAGS_MANAGED_DICT).
MANAGED_DICT_HEADER = 16
_MANAGED_DICT = 1 << 4 if sys.version_info >= (3, 11) else 0
# Python 3.11 and 3.12 keep the attributes' values in an array of their own until __dict__ is
# asked for (then the dict owns it, and sys.getsizeof() of the dict counts it): where the
# instance's pointer to it lies before the instance, and the tag that marks it (3.12 shares
# the word with the dict pointer). Python 3.13 keeps the values inside the instance, where
# sys.getsizeof() does not count them (see sizes.inline_values_size).
_VALUES_AT, _VALUES_TAG = {(3, 11): (32, 0), (3, 12): (24, 1)}.get(sys.version_info[:2], (0, 0))


def _values_apart(instance: object) -> bool:
    """Whether an instance of a type with a managed dict has its own values array."""
    if not _VALUES_AT:
        return False
    word = ctypes.c_size_t.from_address(id(instance) - _VALUES_AT).value
    return bool(word & 1) if _VALUES_TAG else word != 0


def chunk_size(request: int) -> int:
    """Return the bytes of heap glibc's malloc(request) takes: its chunk (see above)."""
    return (request + 8 + 15) & ~15


# What a held response owns is counted up to this many objects. A template response owns its
# context to the end: a page listing a few hundred model instances owns thousands of objects
# (Baby Buddy's timeline: about 11,000), all freed with the response; with a few dozen
# counted, the rest counted as kept by every call of the page. Walking them costs about half
# a µs each, counted in the reading's cost.
HELD_MEMORY_PARTS = 50_000


def held_memory(held: Iterable[object], young: Container[int] | None = None) -> tuple[int, int]:
    """Return (C heap bytes, pymalloc blocks) that held and what only it refers to take.

    held is what a call's caller still refers to at the call's end and lets go of right after
    (the response the server is closing: its content, headers, cookies): the memory is freed
    then, so it is not the call's to keep. Each object counts as the allocations CPython
    makes for it: one for a str, bytes or tuple, two for a list, dict or set (the object and
    its table), each a pymalloc block or C heap bytes by its size, as the heap signals see
    them (see TCACHE_MAX). An estimate: what matters is that a 30 KiB page is not taken for
    30 KiB kept. young: see dropped.dropped_parts.
    """
    try:
        return _held_memory(held, young)
    except Exception:  # a part's own __sizeof__ that fails: take nothing off, keep the call
        return 0, 0


def _held_memory(held: Iterable[object], young: Container[int] | None) -> tuple[int, int]:
    heap = blocks = 0
    for root in held:
        # An HttpResponse's content, whoever else refers to it: the server's loop over the
        # response holds its last chunk until it has closed it.
        parts = [root, *response_content(root)]
        parts.extend(dropped_parts(root, [id(part) for part in parts], HELD_MEMORY_PARTS, young))
        for part in parts:
            kind = type(part)
            size = object_size(part)
            flags = kind.__flags__
            head = kind.__basicsize__ + (GC_HEADER if flags & _HAVE_GC else 0)
            if flags & _MANAGED_DICT:
                head += MANAGED_DICT_HEADER
                if _values_apart(part):
                    blocks += 1
            if size > head and isinstance(part, _TABLES):
                sizes: tuple[int, ...] = (head, size - head)  # the table's own allocation
            else:
                sizes = (size,)  # one allocation (a str, an int, a tuple, an instance)
            for allocation in sizes:
                if allocation <= 0:
                    continue
                if allocation <= PYMALLOC_MAX:
                    blocks += 1
                elif allocation > TCACHE_MAX:
                    heap += chunk_size(allocation)
    return heap, blocks


# CPython keeps up to 80 freed dicts (with their key tables) and 80 freed lists for reuse, as
# allocated blocks (Python 3.10 to 3.13). How many it holds depends on what ran last: a
# response dropped after a call's end puts its dicts there, and the next call takes them.
# Both readings of a call fill them first, so that the blocks counted do not depend on it.
FREE_LIST_SIZE = 80
# Freed tuples shorter than 20 go to free lists of up to 2,000 each: too many to fill; the
# readings count them out instead (see live_blocks), so a tuple freed counts as its block given
# back (counted so in held_memory).
FREE_FLOATS = 100  # and 100 floats


# Containers whose items or table are an allocation of their own, which sys.getsizeof()
# counts with the object.
_TABLES = (list, dict, set, frozenset, bytearray)


def fill_free_lists() -> None:
    """Fill CPython's free lists of dicts, lists and floats (see FREE_LIST_SIZE): about 10 µs.

    Chains of objects, each referring to the one made before it: a list of 80 would take an
    array from the C heap, which a thread's allocator cache would count as in use after.
    """
    dicts: object = None
    lists: object = None
    floats: object = None
    for _ in range(FREE_LIST_SIZE):
        dicts = {"": dicts}  # a str key: the key table is kept for reuse too
        lists = [lists]
    for number in range(FREE_FLOATS):
        floats = (number + 0.5, floats)
    del dicts, lists, floats


def live_blocks() -> int:
    """pymalloc blocks in use, less the freed tuples CPython keeps for reuse (see free_tuples):
    a call that makes and frees many tuples puts them back there, one that keeps some takes
    them from there, and neither should be charged with the other's."""
    free = free_tuples.free_tuples()
    return sys.getallocatedblocks() - free


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
    _epoch: int  # full collections and looks for freed tuples by the latest reading (Call.epoch)

    def _time_heap(self, spent: float = 0.0, collect: int = 0) -> tuple[int, int] | None:
        """Read the heap signals: C heap in use and pymalloc blocks, young garbage collected.

        Objects of the call that are only waiting for the cyclic collector (a request and its
        lazy user refer to each other) are freed first, so that they do not count as kept:
        a collection of the youngest generation, cheap since it holds a few hundred objects
        at most. A process that disabled the collector is left alone. Names made at run time
        that only CPython's type attribute cache refers to are freed too. spent: seconds the
        caller spent on the reading already (held_memory), counted in its cost. collect: the
        oldest generation collected (1 around a call read from before its request existed; -1:
        none, see Recorder.read_again).
        """
        start = time.perf_counter() - spent
        self._prepare_reading(collect)
        return self._finish_reading(start)

    @staticmethod
    def _prepare_reading(collect: int) -> None:
        """What a heap reading does first (see _time_heap)."""
        free_tuples.look_up()  # once per process, before any reading (see live_blocks)
        if collect >= 0 and gc.isenabled():
            gc.collect(collect)
        # Names made at run time that only the type cache refers to (see memory): not kept.
        memory.clear_type_cache()
        fill_free_lists()

    def _finish_reading(self, start: float) -> tuple[int, int] | None:
        """Read the heap signals, once prepared; count the time since start in the cost."""
        heap = memory.heap()
        if heap is None:
            return None  # pragma: no cover - CI has glibc >= 2.33
        blocks = live_blocks()
        # A full collection since a call's first reading freed other calls' garbage too (not
        # tracing's, which frees nothing but CPython's free lists); a look for the freed
        # tuples' counts changed what the readings count (see free_tuples.looks). Both only
        # grow: their sum changes when either does.
        self._epoch = (
            gc.get_stats()[2]["collections"]
            - tracing_gc.own_full_collections
            + free_tuples.looks()
        )
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
        # _heap_cost is one reading's, with what the call spends beside it: a call reads twice.
        cost = 2 * self._heap_cost
        return cost <= HEAP_PROBE_BUDGET or random.random() * cost < HEAP_PROBE_BUDGET
