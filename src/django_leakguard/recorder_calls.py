"""The record of one call in flight, as the recorder's request path keeps it."""

from __future__ import annotations

from django_leakguard.tracing import Trace


class Call:
    """One request or task in flight: where the running shares stood when it began."""

    __slots__ = (
        "alone_since",
        "blocks_share",
        "collect",
        "epoch",
        "flushes",
        "generation",
        "heap_share",
        "late",
        "rss_share",
        "threads",
        "trace",
    )

    def __init__(
        self,
        generation: int,
        rss_share: float,
        heap_share: float | None,
        flushes: int = 0,
        blocks_share: float = 0.0,
    ) -> None:
        self.generation = generation
        self.rss_share = rss_share
        # None when this call does not read the heap (see recorder_heap.HEAP_PROBE_BUDGET and
        # Recorder.measure_heap).
        self.heap_share = heap_share
        self.blocks_share = blocks_share
        # Whether the call comes in the second half of its process's life (LATE_AFTER).
        self.late = False
        # The recorder's flush count when the call began: a call that overlaps a flush in its
        # process is not charged with what the flush allocated (see Recorder._flushes).
        self.flushes = flushes
        # The collector's full collections when the call read the heap, plus the looks for the
        # freed tuples' counts (see free_tuples.looks): a full collection frees the garbage of
        # earlier calls (a REST framework response's reference cycle, moved to the oldest
        # generation while its server still held it), so a call that saw one is not charged
        # with it, nor credited (see HeapTiming._finish_reading).
        self.epoch = 0
        # The recorder's count of begun and ended calls when the call read the heap with no
        # other call in flight; -1 otherwise. A heap reading counts only for a call that stayed
        # alone until its end (see Recorder._end).
        self.alone_since = -1
        # The process's threads when the call read the heap (-1: not read, or not known): its
        # end waits briefly for the threads it started to be gone (see HeapTiming).
        self.threads = -1
        # The garbage collector's generations its end's heap reading collects first: 1 for a
        # call whose first reading came before Django made its request (see
        # Recorder.read_heap_early), so that the request's reference cycles are freed by then.
        self.collect = 0
        # The allocation trace of a sampled call; None for almost every call.
        self.trace: Trace | None = None
