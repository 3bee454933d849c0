"""The report over time: hourly rows of the keys shown, and each worker's life.

database.py sums a window into one Row per key; these read the same rows hour by hour, as
Row objects, so every hourly figure (heap kept, growth per call) comes from the same
properties as the ranking's.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass

from django_leakguard import records
from django_leakguard.reporting.database import sqlite_mmap
from django_leakguard.reporting.model import STARTED_AT_SLACK, Row, floor_hour

Key = tuple[str, str]


@dataclass(frozen=True)
class Hour:
    """One hour of one key: its figures as a report Row."""

    hour: dt.datetime
    row: Row


def kept(row: Row) -> int:
    """The memory a row kept: heap kept when the heap was read, else net RSS growth.

    The same choice build_report makes when it ranks by "heap" and falls back to RSS.
    """
    return row.heap_kept if row.heap_available else row.rss_growth


def hours_from_database(
    keys: Sequence[Key], since: dt.datetime, using: str = "default"
) -> dict[Key, list[Hour]]:
    """Return the hourly rows of each (kind, key) from the hour that contains since, in order.

    One query, limited to the keys' kinds and keys (range scans of the (kind, key, hour)
    index); a key with no rows maps to an empty list.
    """
    from django.db import connections

    from django_leakguard.models import Growth

    series: dict[Key, list[Hour]] = {key: [] for key in keys}
    if not keys:
        return series
    queryset = Growth.objects.using(using).filter(
        hour__gte=floor_hour(since),
        kind__in=sorted({kind for kind, _ in keys}),
        key__in=sorted({key for _, key in keys}),
    )
    names = ("kind", "key", "hour", "view", *records.COUNTER_NAMES)
    with sqlite_mmap(connections[using]):
        found = list(queryset.order_by("kind", "key", "hour").values_list(*names))
    for kind, key, hour, view, *counts in found:
        hours = series.get((kind, key))
        if hours is not None:  # another kind's key of the same name
            figures = dict(zip(records.COUNTER_NAMES, counts, strict=True))
            hours.append(Hour(hour, Row(kind, key, view, **figures)))
    return series


def _replaced(latest_start: dt.datetime, started_at: dt.datetime, last_seen: dt.datetime) -> bool:
    """Whether the latest worker of a host started after this one, once this one had stopped.

    started_at is stored in whole seconds: a replacement that started within the second of the
    last call counts (STARTED_AT_SLACK, as workers_from_database allows).
    """
    return started_at < latest_start and last_seen - STARTED_AT_SLACK <= latest_start


@dataclass(frozen=True)
class WorkerLife:
    """One worker process from its first to its latest recorded call."""

    host: str
    pid: int
    kind: str
    started_at: dt.datetime
    last_seen: dt.datetime
    rss_first: int
    rss_last: int
    calls: int
    replaced: bool  # a later worker of the same host and kind started once it was last seen

    @property
    def lifetime(self) -> dt.timedelta:
        return self.last_seen - self.started_at

    @property
    def rss_growth(self) -> int:
        return self.rss_last - self.rss_first

    @property
    def growth_per_call(self) -> float | None:
        return self.rss_growth / self.calls if self.calls else None

    @property
    def label(self) -> str:
        return f"{self.host}:{self.pid} ({self.started_at:%H:%M:%S})"


def worker_lives(
    since: dt.datetime, kind: str = "all", using: str = "default", limit: int = 200
) -> list[WorkerLife]:
    """Return the workers seen since (as workers_from_database counts them), latest first.

    limit: at most this many, the latest started; a fleet's month of recycled workers would
    otherwise fill the page.
    """
    from django_leakguard.models import Worker

    queryset = Worker.objects.using(using).filter(last_seen__gte=since)
    if kind != "all":
        queryset = queryset.filter(kind=kind)
    fields = (
        "host",
        "pid",
        "kind",
        "started_at",
        "last_seen",
        "rss_first",
        "rss_last",
        "calls",
        "process_started_at",
    )
    found = list(
        queryset.order_by("-started_at", "host", "pid").values_list(*fields, named=True)[:limit]
    )
    # When each process started: to the millisecond where the row has it (migration 0006),
    # else started_at's whole second. Workers replaced within one second stay apart.
    starts = [row.process_started_at or row.started_at for row in found]
    latest_start: dict[tuple[str, str], dt.datetime] = {}
    for row, start in zip(found, starts, strict=True):
        latest = latest_start.get((row.host, row.kind))
        if latest is None or start > latest:
            latest_start[(row.host, row.kind)] = start
    return [
        WorkerLife(
            row.host,
            row.pid,
            row.kind,
            row.started_at,
            row.last_seen,
            row.rss_first,
            row.rss_last,
            row.calls,
            replaced=_replaced(latest_start[(row.host, row.kind)], start, row.last_seen),
        )
        for row, start in zip(found, starts, strict=True)
    ]
