"""Ranking and recommendations: order the rows, keep the top ones, recommend a recycling limit."""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from typing import Any

from django_leakguard.reporting.model import (
    MIN_CALLS,
    MIN_WORKER_CALLS,
    SORTS,
    Recommendation,
    Report,
    Row,
    Workers,
)
from django_leakguard.units import format_bytes


def recommend(
    workers: Workers,
    max_requests: int,
    worker_max_memory: int | None,
    available: int,
    limit_name: str = "MAX_REQUESTS",
    call_name: str = "request",
) -> Recommendation | None:
    """Return the recycling recommendation, or None when the worker data is too thin.

    limit_name names the setting that recycles the workers after max_requests calls, each a
    call_name ("request"; for Celery's pool children: CELERY_MAX_TASKS_PER_CHILD, "task").
    """
    growth = workers.growth_per_call
    start = workers.mean_first_rss
    if growth is None or start is None or workers.calls < MIN_WORKER_CALLS:
        return None
    if worker_max_memory is not None:
        share: int | None = worker_max_memory
        share_source = f"WORKER_MAX_MEMORY {format_bytes(worker_max_memory)}"
    else:
        per = max(workers.at_once, 1)
        share = available // per
        share_source = (
            f"{format_bytes(available)} available / {per} worker{'s' if per != 1 else ''} at once"
        )
    lines = []
    before = peak = None
    if max_requests:
        before = growth * max_requests
        peak = start + before
        lines.append(
            f"With {limit_name} = {max_requests:,}, a worker grows about "
            f"{format_bytes(before)} before it is recycled "
            f"(from {format_bytes(start)} at its first {call_name} to about {format_bytes(peak)})."
        )
    else:
        lines.append(f"{limit_name} is 0: workers are never recycled by {call_name} count.")
    suggested = None
    if growth <= 0:
        lines.append(
            f"Workers do not grow on average ({format_bytes(growth, signed=True)} per "
            f"{call_name}): no {call_name} limit is needed for memory."
        )
    elif share is not None and share <= start:
        lines.append(
            f"Workers start at {format_bytes(start)}, already above their share of "
            f"{format_bytes(share)} ({share_source}): reduce the number of workers or give "
            "them more memory."
        )
    elif share is not None:
        suggested = int((share - start) // growth)
        verdict = (
            f"{limit_name} is within it."
            if max_requests and max_requests <= suggested
            else f"lower {limit_name} to at most that."
            if max_requests
            else f"set {limit_name} to at most that."
        )
        option = "max_requests" if limit_name == "MAX_REQUESTS" else limit_name
        lines.append(
            f"Largest {option} that keeps a worker under its share of "
            f"{format_bytes(share)} ({share_source}): {suggested:,}; {verdict}"
        )
    return Recommendation(
        max_requests=max_requests,
        share=share,
        share_source=share_source,
        growth_before_recycle=before,
        peak=peak,
        suggested_max_requests=suggested,
        lines=lines,
    )


def build_report(
    rows: Sequence[Row],
    workers: Workers,
    *,
    source: str,
    since: dt.datetime | None,
    until: dt.datetime | None,
    sort: str = "heap",
    limit: int = 10,
    min_count: int = 0,
    max_requests: int = 0,
    worker_max_memory: int | None = None,
    available: int = 0,
    log: dict[str, Any] | None = None,
    limit_name: str = "MAX_REQUESTS",
    call_name: str = "request",
) -> Report:
    """Rank rows best first (the fastest growing), keep the top `limit`, add the summary."""
    if sort not in SORTS:
        raise ValueError(f"sort should be one of {', '.join(SORTS)}, got {sort!r}")
    notes: list[str] = []
    heap_available = any(row.heap_available for row in rows)
    ranked_by = sort
    if not heap_available and sort in ("heap", "per-call"):
        ranked_by = "rss" if sort == "heap" else "rss-per-call"
        if rows:
            notes.append(
                "The heap signal was unavailable (no heap readings: glibc's mallinfo2 is "
                "missing, or the source is a uWSGI log), so rows are ranked by RSS growth."
            )
    elif sort == "per-call":
        ranked_by = "heap-per-call"
    if ranked_by.startswith("rss") and rows and source == "database":  # logs say it already
        notes.append(
            "RSS names the calls that made the process grow, which are not always the ones that "
            "keep memory: a call that allocates and frees a lot (a transient spike) ranks high, "
            "and the calls that later fill the memory it freed rank low. The default ranking "
            "(heap) names what keeps memory."
        )
    elif sort == "retained" and rows and not any(row.traced_calls for row in rows):
        notes.append(
            "No call was traced in this window (LEAKGUARD['TRACE_SAMPLE_RATE'] is 0, or too "
            "few calls were sampled), so every key has 0 bytes retained."
        )
    kept = [row for row in rows if row.calls >= min_count]
    total_calls = sum(row.calls for row in kept)
    total_heap = sum(row.heap_kept for row in kept)
    total_rss = sum(row.rss_growth for row in kept)

    def signal(row: Row) -> float:
        if ranked_by == "retained":
            return row.retained_estimate
        if ranked_by == "heap":
            return row.heap_kept
        if ranked_by == "heap-per-call":
            return row.heap_per_call or 0.0
        if ranked_by == "rss-per-call":
            return row.rss_per_call
        return row.rss_growth

    def total_signal(row: Row) -> int:
        if ranked_by == "retained":
            return round(row.retained_estimate)
        return row.heap_kept if ranked_by.startswith("heap") else row.rss_growth

    def tier(row: Row) -> int:
        # By the heap signals: keys that keep memory, then caches that level off, then keys
        # with no reading at all (nothing to rank them by: counted as 0 B, they came above
        # every key whose readings gave memory back). A key with too few readings to scale up
        # from ranks among the others by what its readings kept (see Row.heap_kept): where
        # threads keep calls overlapping, a leak may have only a few readings, each keeping
        # as much as the others.
        if not ranked_by.startswith("heap"):
            return 0
        if not row.heap_calls:
            return 2
        return 1 if row.trend == "levels off" else 0

    # Ties (a signal of 0 B, say) by what the OS charged, then by traffic.
    ranked = sorted(
        kept,
        key=lambda row: (tier(row), -signal(row), -row.rss_growth, -row.calls, row.kind, row.key),
    )
    positive_total = sum(max(total_signal(row), 0) for row in kept)
    top = ranked[:limit] if limit else ranked
    shares = [max(total_signal(row), 0) / positive_total if positive_total else 0.0 for row in top]
    thin = total_calls < MIN_CALLS
    recommendation = recommend(
        workers, max_requests, worker_max_memory, available, limit_name, call_name
    )
    return Report(
        source=source,
        since=since,
        until=until,
        sort=sort,
        ranked_by=ranked_by,
        heap_available=heap_available,
        rows=top,
        total_keys=len(kept),
        total_calls=total_calls,
        total_heap_growth=total_heap,
        total_rss_growth=total_rss,
        shares=shares,
        workers=workers,
        recommendation=recommendation,
        thin=thin,
        notes=notes,
        log=log,
    )
