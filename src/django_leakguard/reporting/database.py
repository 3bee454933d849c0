"""Rows from the database: the growth rows of a window summed per kind and key; workers."""

from __future__ import annotations

import contextlib
import datetime as dt
from collections.abc import Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from django_leakguard import records
from django_leakguard.reporting.model import (
    STARTED_AT_SLACK,
    Row,
    Workers,
    floor_hour,
    most_at_once,
)

if TYPE_CHECKING:
    from django.db.backends.base.base import BaseDatabaseWrapper
    from django.db.models import QuerySet

    from django_leakguard.models import Growth


# How much of a SQLite file the report maps into memory while it reads (see sqlite_mmap).
SQLITE_MMAP_SIZE = 1 << 30


@contextlib.contextmanager
def sqlite_mmap(connection: BaseDatabaseWrapper) -> Iterator[None]:
    """Let SQLite read the growth table through mmap() for the duration of one query.

    The ranking reads its index from end to end, and the other queries fetch rows by rowid:
    through SQLite's page cache (2 MiB by default) each page read is a read() system call,
    which doubled the time of a report over a million rows. The connection's own setting is
    restored afterwards; other databases, and SQLite databases held in memory (no file to
    map: the pragma answers nothing), are left alone.
    """
    if connection.vendor != "sqlite":
        yield
        return
    with connection.cursor() as cursor:
        cursor.execute("PRAGMA mmap_size")
        row = cursor.fetchone()
        if row is None:
            yield
            return
        previous = int(row[0])
        cursor.execute(f"PRAGMA mmap_size = {max(previous, SQLITE_MMAP_SIZE):d}")
    try:
        yield
    finally:
        with connection.cursor() as cursor:
            cursor.execute(f"PRAGMA mmap_size = {previous:d}")


def _window(since: dt.datetime, kind: str, using: str) -> QuerySet[Growth]:
    """Return the growth rows from the hour that contains since, of one kind or all."""
    from django.db.models import Min

    from django_leakguard.models import Growth

    queryset = Growth.objects.using(using)
    start = floor_hour(since)
    # A window that covers every row needs no filter (one index lookup tells): SQLite then
    # skips a comparison per row.
    first = queryset.aggregate(first=Min("hour"))["first"]
    if first is None or first < start:
        queryset = queryset.filter(hour__gte=start)
    if kind != "all":
        queryset = queryset.filter(kind=kind)
    return queryset


# What ranks, filters and totals every key; the other counters are read for the rows shown.
# Defined in records: the growth table's ranking index (models.Growth) holds the same columns.
RANKING_SUMS = records.RANKING_SUMS
TRACED_SUMS = records.TRACED_SUMS


def rows_from_database(
    since: dt.datetime, kind: str = "all", using: str = "default", *, traced: bool = True
) -> list[Row]:
    """Sum the hourly growth rows from the hour that contains since: the ranking's figures.

    Only what ranks, filters and totals every key is summed here (calls, net RSS and heap
    growth, heap calls; traced calls and retained bytes when traced, which --sort retained
    needs): each sum costs SQLite a step per stored row. The figures only the rows shown need
    (positive RSS growth, calls that grew, the largest growths, the view; the traced figures
    when not traced) stay 0 or empty until fill_rows() reads them. The sums read the growth
    table's ranking index alone (models.Growth), which holds these columns: a sum of another
    column would make the query read every row of the table again.
    """
    from django.db import connections
    from django.db.models import Sum

    names = RANKING_SUMS + (TRACED_SUMS if traced else ())
    sums = (
        _window(since, kind, using)
        .values("kind", "key")
        .annotate(**{f"s_{name}": Sum(name) for name in names})
    )
    with sqlite_mmap(connections[using]):
        entries: list[Mapping[str, Any]] = list(sums)
    rows = []
    for entry in entries:
        figures: dict[str, Any] = {name: entry[f"s_{name}"] or 0 for name in names}
        rows.append(Row(kind=entry["kind"], key=entry["key"], **figures))
    return rows


# Above this many rows shown, fill_rows() reads the whole window rather than list the keys.
FILL_KEYS_MAX = 100


def fill_rows(
    rows: Sequence[Row], since: dt.datetime, using: str = "default", *, traced: bool = False
) -> None:
    """Complete the rows shown with the figures rows_from_database() leaves out, in one query.

    traced: also read the traced calls and retained bytes (when rows_from_database() was
    told not to). The query is limited to the kinds and keys of the rows (a few range scans
    of the (kind, key, hour) index) and reads each key's view from its latest hourly row
    that has one (one index look-up per key).
    """
    if not rows:
        return
    from django.db import connections
    from django.db.models import Max, OuterRef, Subquery, Sum

    from django_leakguard.models import Growth

    start = floor_hour(since)
    queryset = Growth.objects.using(using).filter(
        hour__gte=start, kind__in=sorted({row.kind for row in rows})
    )
    if len(rows) <= FILL_KEYS_MAX:
        queryset = queryset.filter(key__in=sorted({row.key for row in rows}))
    latest_view = (
        Growth.objects.using(using)
        .filter(kind=OuterRef("kind"), key=OuterRef("key"), hour__gte=start)
        .exclude(view="")
        .order_by("-hour")
        .values("view")[:1]
    )
    ranked = RANKING_SUMS + (() if traced else TRACED_SUMS)
    figures: dict[str, Sum | Max] = {
        spec.name: (Sum if spec.merge == records.SUM else Max)(spec.name)
        for spec in records.COUNTERS
        if spec.name not in ranked
    }
    # The view in an annotate() of its own: with the sums, Django would group by it too,
    # and SQLite would run the subquery for every row rather than for every key.
    sums = (
        queryset.values("kind", "key")
        .annotate(**{f"f_{name}": aggregate for name, aggregate in figures.items()})
        .annotate(f_view=Subquery(latest_view))
    )
    with sqlite_mmap(connections[using]):
        entries: list[Mapping[str, Any]] = list(sums)
    found = {(entry["kind"], entry["key"]): entry for entry in entries}
    for row in rows:
        entry = found.get((row.kind, row.key))
        if entry is None:  # deleted (pruned, reset) since the ranking query
            continue
        for name in figures:
            setattr(row, name, entry[f"f_{name}"] or 0)
        row.view = entry["f_view"] or ""


def workers_from_database(
    since: dt.datetime, kind: str = "all", using: str = "default"
) -> Workers:
    """Sum the worker rows seen since; count the most workers alive at once on one host."""
    from django_leakguard.models import Worker

    queryset = Worker.objects.using(using).filter(last_seen__gte=since)
    if kind != "all":
        queryset = queryset.filter(kind=kind)
    workers = Workers()
    intervals: dict[str, list[tuple[dt.datetime, dt.datetime]]] = {}
    for host, started_at, last_seen, rss_first, rss_last, calls in queryset.values_list(
        "host", "started_at", "last_seen", "rss_first", "rss_last", "calls"
    ).iterator():
        workers.seen += 1
        workers.calls += calls
        workers.rss_growth += rss_last - rss_first
        workers.rss_first_total += rss_first
        # started_at is stored in whole seconds: a worker that replaced another within the
        # same second must not count as running beside it.
        intervals.setdefault(host, []).append((started_at + STARTED_AT_SLACK, last_seen))
    workers.at_once = max((most_at_once(spans) for spans in intervals.values()), default=0)
    return workers
