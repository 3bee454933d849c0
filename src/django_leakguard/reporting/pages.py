"""What the admin pages and the HTML report show: the ranking, one key, the workers.

Each function reads through the report's modules (database, ranking, render, detail) and
history.py and returns what a template lays out: formatted cells and inline SVG charts. The
admin views (admin.py) and `leakreport --format html` (html_report.py) call the same
functions, so a figure is computed in one place.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from django.utils import timezone
from django.utils.safestring import SafeString

from django_leakguard import conf, jitter, memory, records
from django_leakguard.reporting import charts
from django_leakguard.reporting.database import (
    fill_rows,
    rows_from_database,
    workers_from_database,
)
from django_leakguard.reporting.detail import Detail, details_from_database
from django_leakguard.reporting.history import Hour, Key, WorkerLife, hours_from_database, kept
from django_leakguard.reporting.history import worker_lives as read_worker_lives
from django_leakguard.reporting.model import Recommendation, Report, Row, Workers, floor_hour
from django_leakguard.reporting.ranking import build_report, recommend
from django_leakguard.reporting.render import render_table, row_dict
from django_leakguard.units import format_bytes

# Columns of the JSON row that the ranking table leaves to the key page, and those it shows
# first; the others follow in the JSON row's order (new fields appear without a change here).
HIDDEN_COLUMNS = frozenset(
    {
        "rank",
        "kind",
        "key",
        "view",
        "heap_growth_max_bytes",
        "rss_growth_bytes",
        "rss_growth_positive_bytes",
        "rss_growth_max_bytes",
        "traced_calls",
        "retained_bytes",
        "blocks_growth",
        "late_readings",
        "late_heap_growth_bytes",
        "late_blocks_growth",
    }
)
FIRST_COLUMNS = ("calls", "heap_calls", "confidence", "trend")
# A sparkline shows the last hours of the window, at most this many (a week), one point each:
# reading every hour of a long window for every row shown would cost more than the ranking.
SPARKLINE_HOURS = 168


@dataclass
class Ranking:
    """The database report and whether the window held any row before --min-count."""

    report: Report
    any_rows: bool


def recycling_limits(kind: str, settings: conf.Settings) -> dict[str, Any]:
    """Return the recycling limit the recommendation is about: Celery's for tasks alone."""
    if kind == records.TASK:
        # Celery's pool children: the per-child memory limit is a share of CELERY_MEMORY_FRACTION,
        # not WORKER_MAX_MEMORY (docs/guide/celery).
        return {
            "max_requests": settings.CELERY_MAX_TASKS_PER_CHILD,
            "worker_max_memory": None,
            "limit_name": "CELERY_MAX_TASKS_PER_CHILD",
            "call_name": "task",
        }
    return {"max_requests": settings.MAX_REQUESTS, "worker_max_memory": settings.WORKER_MAX_MEMORY}


def ranking_report(
    since: dt.datetime,
    now: dt.datetime,
    *,
    kind: str = "all",
    sort: str = "heap",
    limit: int = 10,
    min_count: int = 0,
    using: str | None = None,
) -> Ranking:
    """Rank the stored rows since, as `leakreport` does; raises DatabaseError when unreadable."""
    settings = conf.get_settings()
    using = using or settings.DATABASE
    # Only --sort retained ranks by the traced figures: otherwise the rows shown read them
    # afterwards (fill_rows), sparing SQLite two sums per row.
    rows = rows_from_database(since, kind, using, traced=sort == "retained")
    workers = workers_from_database(since, kind, using)
    built = build_report(
        rows,
        workers,
        source="database",
        since=since,
        until=now,
        sort=sort,
        limit=limit,
        min_count=min_count,
        available=memory.available_memory(),
        **recycling_limits(kind, settings),
    )
    fill_rows(built.rows, since, using, traced=sort != "retained")
    advice = jitter.stored_advice(since, kind, using, settings)
    if advice is not None and built.recommendation is not None:
        built.recommendation.lines.extend(advice.lines())
    return Ranking(built, any_rows=bool(rows))


# Cells ---------------------------------------------------------------------------------------


def column_title(name: str) -> str:
    """A JSON field's name as a column title: rss_growth_per_call_bytes -> RSS growth per call."""
    words = name.removesuffix("_bytes").split("_")
    title = " ".join("RSS" if word == "rss" else word for word in words)
    return title[:1].upper() + title[1:]


def cell(name: str, value: Any) -> str:
    """A JSON field's value as the table shows it: sizes in binary units, shares in percent."""
    if value is None:
        return "n/a"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if name.endswith("_bytes") and isinstance(value, int | float):
        return format_bytes(value)
    if (name == "share" or name.endswith("_fraction")) and isinstance(value, int | float):
        return f"{value:.1%}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


@dataclass
class Cells:
    """One ranked row: its JSON fields, their titles and shown values."""

    fields: dict[str, Any]
    shown: list[tuple[str, str, str]]  # (name, title, value)

    @classmethod
    def of(
        cls, rank: int, row: Row, share: float, hidden: frozenset[str], first: Sequence[str] = ()
    ) -> Cells:
        fields = row_dict(rank, row, share)
        names = [name for name in first if name in fields]
        names += [name for name in fields if name not in names]
        shown = [
            (name, column_title(name), cell(name, fields[name]))
            for name in names
            if name not in hidden
        ]
        return cls(fields, shown)


# Time axis -----------------------------------------------------------------------------------


def hour_label(epoch: float) -> str:
    moment = dt.datetime.fromtimestamp(epoch, tz=timezone.get_current_timezone())
    return f"{moment:%Y-%m-%d %H:%M}"


def moment_label(epoch: float) -> str:
    moment = dt.datetime.fromtimestamp(epoch, tz=timezone.get_current_timezone())
    return f"{moment:%Y-%m-%d %H:%M:%S}"


def hours_between(since: dt.datetime, now: dt.datetime) -> list[dt.datetime]:
    """Every hour of the window, the one containing since first."""
    start, end = floor_hour(since), floor_hour(now)
    count = max(int((end - start) / dt.timedelta(hours=1)) + 1, 1)
    return [start + dt.timedelta(hours=n) for n in range(count)]


# The ranking ---------------------------------------------------------------------------------


@dataclass
class RankedRow:
    rank: int
    kind: str
    key: str
    view: str
    cells: Cells
    sparkline: SafeString


@dataclass
class RankingPage:
    report: Report
    any_rows: bool
    rows: list[RankedRow]
    titles: list[str]
    summary: list[str]


def ranking_page(ranking: Ranking, since: dt.datetime, now: dt.datetime) -> RankingPage:
    """The ranking with each row's memory kept per hour (the last SPARKLINE_HOURS) as a line."""
    built = ranking.report
    keys: list[Key] = [(row.kind, row.key) for row in built.rows]
    using = conf.get_settings().DATABASE
    recent = max(since, now - dt.timedelta(hours=SPARKLINE_HOURS - 1))
    series = hours_from_database(keys, recent, using)
    hours = hours_between(recent, now)
    ranked = []
    for rank, (row, share) in enumerate(zip(built.rows, built.shares, strict=True), 1):
        by_hour = {entry.hour: kept(entry.row) for entry in series[(row.kind, row.key)]}
        values = [by_hour.get(hour, 0) for hour in hours]
        title = f"{row.kind} {row.key}: memory kept per hour, the last {len(hours):,} hours"
        ranked.append(
            RankedRow(
                rank,
                row.kind,
                row.key,
                row.view,
                Cells.of(rank, row, share, HIDDEN_COLUMNS, FIRST_COLUMNS),
                charts.sparkline(values, title),
            )
        )
    titles = [title for _, title, _ in ranked[0].cells.shown] if ranked else []
    return RankingPage(built, ranking.any_rows, ranked, titles, summary_lines(built))


def summary_lines(built: Report) -> list[str]:
    """What the text report says above its table: its notes and the status line."""
    # render_table's paragraphs: the header and notes, the status line, the table, workers.
    paragraphs = render_table(built).split("\n\n")
    return [*paragraphs[0].splitlines()[1:], *paragraphs[1].splitlines()]


# One key -------------------------------------------------------------------------------------


@dataclass
class KeyPage:
    kind: str
    key: str
    total: Row
    hours: list[Hour]
    cells: Cells
    charts: list[SafeString]
    detail: Detail | None
    readings: list[str]
    sites: list[tuple[str, str, str, str, str]]  # location, per traced call, in all, blocks, line


def key_page(kind: str, key: str, since: dt.datetime, using: str | None = None) -> KeyPage:
    """One key's hourly charts, its figures and the readings behind them, its traced sites."""
    settings = conf.get_settings()
    using = using or settings.DATABASE
    hours = hours_from_database([(kind, key)], since, using)[(kind, key)]
    total = Row(kind, key)
    for entry in hours:
        total.merge(entry.row)
    if hours:
        total.view = next((entry.row.view for entry in reversed(hours) if entry.row.view), "")
    details = details_from_database(key, since, kind, using, settings.TRACE_TOP_SITES)
    x = [entry.hour.timestamp() for entry in hours]
    heap = total.heap_available
    per_call = [
        (entry.row.heap_per_call or 0.0) if heap else entry.row.rss_per_call for entry in hours
    ]
    so_far: list[float] = []
    for entry in hours:
        so_far.append((so_far[-1] if so_far else 0) + kept(entry.row))
    signal = "heap" if heap else "RSS"
    count = f"{len(hours):,} hours with calls"
    drawn = [
        charts.line_chart(
            f"Calls per hour, {kind} {key}",
            [charts.Series("calls", list(zip(x, [e.row.calls for e in hours], strict=True)))],
            x_format=hour_label,
            y_format=lambda value: f"{value:,.0f}",
            description=f"Calls recorded in each hour ({count}).",
            bars=True,
        ),
        charts.line_chart(
            f"{signal} growth per call, by hour",
            [charts.Series(f"{signal} per call", list(zip(x, per_call, strict=True)))],
            x_format=hour_label,
            y_format=format_bytes,
            description=f"Net {signal} growth divided by the calls that read it, each hour.",
        ),
        charts.line_chart(
            "Memory kept so far",
            [charts.Series(f"{signal} kept", list(zip(x, so_far, strict=True)))],
            x_format=hour_label,
            y_format=format_bytes,
            description=(
                f"Net {signal} growth added up hour after hour: a leak climbs on, growth that "
                "levels off (a cache filling up) flattens."
            ),
        ),
    ]
    return KeyPage(
        kind,
        key,
        total,
        hours,
        Cells.of(1, total, 1.0, frozenset({"rank", "kind", "key", "view", "share"})),
        drawn,
        details[0] if details else None,
        readings(total),
        site_cells(details[0]) if details else [],
    )


def site_cells(detail: Detail) -> list[tuple[str, str, str, str, str]]:
    """The traced allocation sites as the page lists them, largest first."""
    traced = detail.traced_calls
    return [
        (
            site.location,
            format_bytes(site.size / traced if traced else None),
            format_bytes(site.size),
            f"{site.count:,}",
            site.line,
        )
        for site in detail.sites
    ]


def readings(row: Row) -> list[str]:
    """The readings behind each of a row's figures, as sentences."""
    return [
        f"{row.calls:,} calls, each with an RSS reading.",
        f"{row.heap_calls:,} heap readings"
        + (f" ({row.heap_calls / row.calls:.0%} of calls)." if row.calls else "."),
        f"{row.traced_calls:,} calls traced with tracemalloc (allocation sites).",
    ]


# Workers -------------------------------------------------------------------------------------


@dataclass
class WorkersPage:
    workers: Workers
    lives: list[WorkerLife]
    replaced: int
    chart: SafeString
    recommendation: Recommendation | None
    limits: list[tuple[str, str, str]]  # (setting, value, where it comes from)
    rows: list[list[str]]
    titles: tuple[str, ...] = ()


WORKER_TITLES = (
    "Host",
    "PID",
    "Kind",
    "Started",
    "Last seen",
    "Lifetime",
    "Calls",
    "RSS at the first call",
    "RSS at the latest call",
    "Growth per call",
    "Replaced",
)


def duration(span: dt.timedelta) -> str:
    """A lifetime in whole seconds: 3 d 4:05:06, 0:12:30."""
    return (
        str(dt.timedelta(seconds=round(span.total_seconds())))
        .replace(" days,", " d")
        .replace(" day,", " d")
    )


def worker_cells(life: WorkerLife) -> list[str]:
    local = timezone.localtime
    return [
        life.host,
        str(life.pid),
        life.kind,
        f"{local(life.started_at):%Y-%m-%d %H:%M:%S}",
        f"{local(life.last_seen):%Y-%m-%d %H:%M:%S}",
        duration(life.lifetime),
        f"{life.calls:,}",
        format_bytes(life.rss_first),
        format_bytes(life.rss_last),
        format_bytes(life.growth_per_call, signed=True),
        "yes" if life.replaced else "no",
    ]


def workers_page(since: dt.datetime, kind: str = "all", using: str | None = None) -> WorkersPage:
    """Each worker's RSS over its life, recycling, and the recommended limits."""
    settings = conf.get_settings()
    using = using or settings.DATABASE
    workers = workers_from_database(since, kind, using)
    lives = read_worker_lives(since, kind, using)
    policy = recycling_limits(kind, settings)
    recommendation = recommend(
        workers,
        policy["max_requests"],
        policy["worker_max_memory"],
        memory.available_memory(),
        policy.get("limit_name", "MAX_REQUESTS"),
        policy.get("call_name", "request"),
    )
    chart = charts.line_chart(
        "RSS of each worker from its first to its latest call",
        [
            charts.Series(
                life.label,
                [
                    (life.started_at.timestamp(), life.rss_first),
                    (life.last_seen.timestamp(), life.rss_last),
                ],
            )
            for life in reversed(lives)
        ],
        x_format=moment_label,
        y_format=format_bytes,
        description="One line per worker process: RSS at its first and at its latest call.",
        include_zero=False,
    )
    return WorkersPage(
        workers,
        lives,
        sum(life.replaced for life in lives),
        chart,
        recommendation,
        limits(workers, recommendation, settings, kind),
        [worker_cells(life) for life in lives],
        WORKER_TITLES,
    )


def limits(
    workers: Workers,
    rec: Recommendation | None,
    settings: conf.Settings,
    kind: str = "all",
) -> list[tuple[str, str, str]]:
    """The recommended MAX_REQUESTS, jitter and memory limit, and the figures behind them.

    For tasks alone, Celery's CELERY_MAX_TASKS_PER_CHILD (Celery has no jitter, and the memory
    per child comes from CELERY_MEMORY_FRACTION).
    """
    if rec is None:
        return []
    policy = recycling_limits(kind, settings)
    limit_name = policy.get("limit_name", "MAX_REQUESTS")
    growth = format_bytes(workers.growth_per_call, signed=True)
    start = format_bytes(workers.mean_first_rss)
    jitter = settings.MAX_REQUESTS_JITTER or conf.DEFAULTS["MAX_REQUESTS_JITTER"]
    suggested = rec.suggested_max_requests
    if suggested is not None:
        value = f"{suggested:,}"
    elif (workers.growth_per_call or 0) <= 0:
        value = "none needed for memory"
    else:
        value = "none fits: workers start above their share"
    found = [
        (
            limit_name,
            value,
            f"({format_bytes(rec.share)} share - {start} at the first call) / {growth} per "
            f"call, over {workers.calls:,} calls of {workers.seen:,} workers",
        ),
        (
            "MAX_REQUESTS_JITTER",
            f"{jitter:g}"
            + (f" ({round(suggested * jitter):,} requests)" if suggested is not None else ""),
            "spreads the restarts so that workers do not all recycle at once",
        ),
        ("WORKER_MAX_MEMORY", format_bytes(rec.share), rec.share_source),
    ]
    if limit_name != "MAX_REQUESTS":
        return [found[0], ("memory per child", format_bytes(rec.share), rec.share_source)]
    return found
