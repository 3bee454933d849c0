"""What a report is made of: a row per kind and key, worker figures, the recommendation."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from django_leakguard import records
from django_leakguard.records import Counts

SORTS = ("heap", "rss", "per-call", "retained")
KINDS = (*records.KINDS, "all")
FORMATS = ("table", "json", "csv")
# Small objects are counted in pymalloc blocks, not bytes (sys.getallocatedblocks()); the
# heap figures count each as 64 bytes: CPython's small objects are 16 to 512 bytes, and the
# ones leaks are made of (tuples of a few items, floats, ints, short strings) mostly 32 to 80.
BLOCK_BYTES = 64
# Heap figures are never scaled up to all calls from fewer readings than this.
MIN_EXTRAPOLATE = 5
# Readings a heap figure needs not to be flagged "low" (the recorder's MIN_READINGS per hour).
CONFIDENT_READINGS = 30
# The trend needs this many readings in each band; growth per call below TREND_NOISE bytes is
# noise; late calls keeping less than LEVELS_OFF_RATIO of the early ones' is levelling off.
# (Under 20, noise labelled a leak under Uvicorn workers "levels off" on 13 late readings.)
TREND_READINGS = 20
TREND_NOISE = 256
LEVELS_OFF_RATIO = 0.25
# Below these, rankings and recommendations are noise: the report says so in words.
MIN_CALLS = 100
MIN_WORKER_CALLS = 100
STARTED_AT_SLACK = dt.timedelta(seconds=1)
JSON_VERSION = 1


def floor_hour(moment: dt.datetime) -> dt.datetime:
    return moment.replace(minute=0, second=0, microsecond=0)


T = TypeVar("T", float, "dt.datetime")


def most_at_once(intervals: Iterable[tuple[T, T]]) -> int:
    """Return the largest number of (start, end) intervals that overlap at one instant."""
    events: list[tuple[T, int]] = []
    for start, end in intervals:
        events.append((start, 1))
        events.append((max(start, end), -1))
    # At one instant, starts count before ends: a worker seen once (start == end) counts.
    events.sort(key=lambda event: (event[0], -event[1]))
    current = best = 0
    for _, step in events:
        current += step
        best = max(best, current)
    return best


@dataclass(init=False, kw_only=True)
class Row(Counts):
    """The growth of one kind and key over the window (summed hourly rows)."""

    kind: str
    key: str
    view: str

    def __init__(self, kind: str, key: str, view: str = "", **counts: int) -> None:
        Counts.__init__(self, **counts)
        self.kind = kind
        self.key = key
        self.view = view

    @property
    def retained_per_call(self) -> float | None:
        """Bytes a traced call allocated and still held at its end; None when untraced."""
        return self.traced_retained / self.traced_calls if self.traced_calls else None

    @property
    def retained_estimate(self) -> float:
        """Retained per traced call times all calls: what the key kept, estimated."""
        per_call = self.retained_per_call
        return per_call * self.calls if per_call is not None else 0.0

    @property
    def heap_available(self) -> bool:
        return self.heap_calls > 0

    @property
    def heap_read(self) -> int:
        """What the calls that read the heap signals kept: C heap plus small objects.

        Small objects are counted in pymalloc blocks; each counts as BLOCK_BYTES (see there).
        """
        return self.heap_growth + self.blocks_growth * BLOCK_BYTES

    @property
    def heap_per_call(self) -> float | None:
        return self.heap_read / self.heap_calls if self.heap_calls else None

    @property
    def heap_kept(self) -> int:
        """What all calls kept: per call times calls.

        The recorder reads the heap signals on a share of the calls (heap_calls of calls), so
        the readings are scaled up to all calls, but never from fewer than MIN_EXTRAPOLATE
        readings: below that, the figure is what the readings themselves kept.
        """
        if self.heap_calls < MIN_EXTRAPOLATE:
            return self.heap_read
        return round(self.heap_read * self.calls / self.heap_calls)

    @property
    def confidence(self) -> str:
        """How many readings the heap figures rest on: "none", "low" or "high"."""
        if not self.heap_calls:
            return "none"
        return "high" if self.heap_calls >= CONFIDENT_READINGS else "low"

    @property
    def trend(self) -> str | None:
        """ "levels off" when the late calls keep little of what the early ones kept (a cache
        filling up), "grows" when they keep as much, None when there are too few readings.

        Early and late are a key's calls in the first half of each process's life and the ones
        after (recorder.LATE_AFTER), so recycled workers each fill their own cache again.
        """
        late = self.late_calls
        early = self.heap_calls - late
        if late < TREND_READINGS or early < TREND_READINGS:
            return None
        late_per_call = (self.late_heap_growth + self.late_blocks_growth * BLOCK_BYTES) / late
        early_read = self.heap_read - self.late_heap_growth - self.late_blocks_growth * BLOCK_BYTES
        early_per_call = early_read / early
        if early_per_call <= TREND_NOISE:
            return "grows" if late_per_call > TREND_NOISE else None
        if late_per_call < LEVELS_OFF_RATIO * early_per_call:
            return "levels off"
        return "grows"

    @property
    def rss_per_call(self) -> float:
        return self.rss_growth / self.calls if self.calls else 0.0

    @property
    def grew_fraction(self) -> float:
        return self.rss_grew_calls / self.calls if self.calls else 0.0


@dataclass
class Workers:
    """Worker figures over the window."""

    seen: int = 0
    calls: int = 0
    rss_growth: int = 0
    rss_first_total: int = 0
    at_once: int = 0

    @property
    def growth_per_call(self) -> float | None:
        return self.rss_growth / self.calls if self.calls else None

    @property
    def mean_first_rss(self) -> float | None:
        return self.rss_first_total / self.seen if self.seen else None


@dataclass
class Recommendation:
    """How far a worker grows before recycling, and the largest safe max_requests."""

    max_requests: int
    share: int | None
    share_source: str
    growth_before_recycle: float | None
    peak: float | None
    suggested_max_requests: int | None
    lines: list[str]


@dataclass
class Report:
    source: str
    since: dt.datetime | None
    until: dt.datetime | None
    sort: str
    ranked_by: str
    heap_available: bool
    rows: list[Row]
    total_keys: int
    total_calls: int
    total_heap_growth: int
    total_rss_growth: int
    shares: list[float]
    workers: Workers
    recommendation: Recommendation | None
    thin: bool
    notes: list[str] = field(default_factory=list)
    log: dict[str, Any] | None = None
