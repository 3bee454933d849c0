"""Emptying CPython's free lists at a traced call's end, without upsetting the collector.

Objects a traced call freed into CPython's free lists (tuples, floats, lists, dicts kept for
reuse) are still traced, so the lists are emptied before the snapshot. Only a full collection
empties them; with every object frozen first it walks nothing. Such a collection has two side
effects on the collector, which this module undoes or bounds:

- It resets the counts that trigger the automatic collections of the older generations
  (collections of the next younger one since their last). Done more often than they reach
  their thresholds, it would stop those collections for good, and cyclic garbage in the
  older generations would grow without bound. The counts are put back.
- It records that no object survived a full collection (every object was frozen). CPython
  defers a full collection until the objects promoted since reach a quarter of those that
  survived the last one; after an emptying, the next full collection is no longer deferred.
  At most one full collection is brought forward per emptying. Its duration is measured (the
  least of the last three), and the free lists are emptied again only once GC_BUDGET of the
  time since covers it: however large the heap, collections brought forward cost at most
  GC_BUDGET of the process's time.
  Until then no call is traced (see free_lists_waiting): where full collections are slow,
  fewer calls are traced than TRACE_SAMPLE_RATE asks.
"""

from __future__ import annotations

import contextlib
import gc
import time
from collections import deque
from typing import Any

# Share of the process's time that full collections brought forward may take.
GC_BUDGET = 0.05

# Python 3.12 keeps a few hundred objects of its own in the permanent generation (immortal
# ones, which every collection moves back there, also after gc.unfreeze()): only more than
# that means the application froze objects. Several thousand frozen when this module is
# imported are the application's, not Python's.
_frozen_by_python = min(gc.get_freeze_count(), 1000)
_not_before = 0.0  # time.monotonic() before which no call is traced (free_lists_waiting)
_watching = False  # _time_full_collection is in gc.callbacks
# Full collections clear_free_lists() made: they free no object (everything is frozen), so a
# heap reading does not count them as full collections (see recorder_heap).
own_full_collections = 0
_measured = False  # it has measured the full collection since the last emptying
_full_started: float | None = None
_durations: deque[float] = deque(maxlen=3)  # of the full collections measured last


def free_lists_waiting() -> bool:
    """Return whether the budget for collections brought forward is spent for now."""
    return time.monotonic() < _not_before


def clear_free_lists() -> bool:
    """Empty CPython's free lists (tuples, floats, lists, dicts, ...), cheaply.

    Return whether they were emptied: never in an application that froze objects itself
    (gc.freeze() before forking workers), which keeps them frozen. The budget is for the
    caller to check before it begins what needs an emptying (free_lists_waiting()): a trace
    that has begun is ended with one.
    """
    if gc.get_freeze_count() > _frozen_by_python:
        return False
    _unwatch()  # our own collections are not measured, nor slowed by a callback
    # Collections of each younger generation since the last of the next one, as far as they
    # matter (above its threshold, a full collection only waits for enough promoted objects).
    _, since_middle, since_full = gc.get_count()
    _, middle_threshold, full_threshold = gc.get_threshold()
    since_middle = min(since_middle, middle_threshold + 1)
    since_full = min(since_full, full_threshold + 1)
    global own_full_collections
    gc.freeze()
    try:
        gc.collect(2)
        own_full_collections += 1
    finally:
        gc.unfreeze()
    # A full collection set both counts to zero: put them back, oldest first.
    for _ in range(since_full):
        gc.collect(1)  # each counts one toward the next full collection
    for _ in range(since_middle):
        gc.collect(0)  # each counts one toward the next collection of the middle generation
    _watch()
    return True


def _unwatch() -> None:
    """Stop measuring (called outside any collection: CPython walks gc.callbacks by index
    while it calls them, and a removal there would make it skip the next one)."""
    global _watching
    if _watching:
        with contextlib.suppress(ValueError):  # removed by someone else
            gc.callbacks.remove(_time_full_collection)
        _watching = False


def _watch() -> None:
    """Measure the next full collection: the one this emptying brings forward."""
    global _watching, _measured
    _measured = False
    gc.callbacks.append(_time_full_collection)
    _watching = True


def _time_full_collection(phase: str, info: dict[str, Any]) -> None:
    global _full_started, _not_before, _measured
    if _measured or info["generation"] != 2:
        return
    if phase == "start":
        _full_started = time.perf_counter()
    elif _full_started is not None:
        _durations.append(time.perf_counter() - _full_started)
        _full_started = None
        _measured = True
        # The least of the last few: a collection while a request held a million transient
        # objects is not what the next one brought forward will cost.
        _not_before = time.monotonic() + min(_durations) / GC_BUDGET
