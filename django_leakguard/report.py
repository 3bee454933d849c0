"""leakreport's logic: read growth rows (or a parsed uWSGI log), rank them, recommend limits."""

from __future__ import annotations

import contextlib
import csv
import datetime as dt
import io
import json
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from django.db.backends.base.base import BaseDatabaseWrapper
    from django.db.models import QuerySet

    from django_leakguard.models import Growth
    from django_leakguard.tracing import Site
    from django_leakguard.uwsgi_log import LogSummary

SORTS = ("heap", "rss", "per-call", "retained")
KINDS = ("request", "task", "all")
FORMATS = ("table", "json", "csv")
# Below these, rankings and recommendations are noise: the report says so in words.
MIN_CALLS = 100
MIN_WORKER_CALLS = 100
STARTED_AT_SLACK = dt.timedelta(seconds=1)
JSON_VERSION = 1

_SINCE_RE = re.compile(r"^\s*(\d+)\s*([mhdw])\s*$")
_SINCE_UNITS = {"m": "minutes", "h": "hours", "d": "days", "w": "weeks"}


def parse_since(value: str, now: dt.datetime) -> dt.datetime:
    """Return the start of a window given as 30m, 24h, 7d, 2w or an ISO date or datetime."""
    match = _SINCE_RE.match(value)
    if match:
        amount, unit = match.groups()
        return now - dt.timedelta(**{_SINCE_UNITS[unit]: int(amount)})
    try:
        parsed = dt.datetime.fromisoformat(value.strip())
    except ValueError:
        raise ValueError(
            f"--since should be a duration such as 30m, 24h or 7d, or an ISO date such as "
            f"2025-01-31, got {value!r}"
        ) from None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=now.tzinfo)
    if parsed > now:
        raise ValueError(f"--since {value!r} is in the future")
    return parsed


def floor_hour(moment: dt.datetime) -> dt.datetime:
    return moment.replace(minute=0, second=0, microsecond=0)


def format_bytes(value: float | None, signed: bool = False) -> str:
    """Return a size in binary units: 512 B, 1.5 KiB, 12.0 MiB."""
    if value is None:
        return "n/a"
    sign = "-" if value < 0 else ("+" if signed and value > 0 else "")
    size = abs(value)
    if size < 1024:
        return f"{sign}{size:.0f} B"
    for unit in ("KiB", "MiB", "GiB"):
        size /= 1024
        if size < 1024 or unit == "GiB":
            break
    return f"{sign}{size:.1f} {unit}"


@dataclass
class Row:
    """The growth of one kind and key over the window (summed hourly rows)."""

    kind: str
    key: str
    calls: int
    rss_growth: int = 0
    rss_growth_positive: int = 0
    rss_grew_calls: int = 0
    rss_growth_max: int = 0
    heap_calls: int = 0
    heap_growth: int = 0
    heap_growth_max: int = 0
    view: str = ""
    traced_calls: int = 0
    traced_retained: int = 0

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
    def heap_per_call(self) -> float | None:
        return self.heap_growth / self.heap_calls if self.heap_calls else None

    @property
    def heap_kept(self) -> int:
        """Net heap growth of all calls: per call times calls.

        The recorder reads the heap on a share of the calls when reading it is expensive
        (heap_calls of calls), so the sum of the readings is scaled up to all calls.
        """
        if not self.heap_calls:
            return 0
        return round(self.heap_growth * self.calls / self.heap_calls)

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


# Reading -------------------------------------------------------------------------------------


# How much of a SQLite file the report maps into memory while it reads (see sqlite_mmap).
SQLITE_MMAP_SIZE = 1 << 30


@contextlib.contextmanager
def sqlite_mmap(connection: BaseDatabaseWrapper) -> Iterator[None]:
    """Let SQLite read the growth table through mmap() for the duration of one query.

    SQLite sums the rows of each key in the order of the (kind, key, hour) index, fetching
    every row from the table by rowid: through its page cache (2 MiB by default) each fetch
    is a read() system call, which doubles the time of a report over a million rows. The
    connection's own setting is restored afterwards; other databases, and SQLite databases
    held in memory (no file to map: the pragma answers nothing), are left alone.
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


def rows_from_database(
    since: dt.datetime, kind: str = "all", using: str = "default", *, traced: bool = True
) -> list[Row]:
    """Sum the hourly growth rows from the hour that contains since: the ranking's figures.

    Only what ranks, filters and totals every key is summed here (calls, net RSS and heap
    growth, heap calls; traced calls and retained bytes when traced, which --sort retained
    needs): each sum costs SQLite a step per stored row. The figures only the rows shown need
    (positive RSS growth, calls that grew, the largest growths, the view; the traced figures
    when not traced) stay 0 or empty until fill_rows() reads them.
    """
    from django.db import connections
    from django.db.models import Sum

    names = ["calls", "rss_growth", "heap_calls", "heap_growth"]
    if traced:
        names += ["traced_calls", "traced_retained"]
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
        rows.append(Row(entry["kind"], entry["key"], **figures))
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
    figures: dict[str, Sum | Max] = {
        "rss_growth_positive": Sum("rss_growth_positive"),
        "rss_grew_calls": Sum("rss_grew_calls"),
        "rss_growth_max": Max("rss_growth_max"),
        "heap_growth_max": Max("heap_growth_max"),
    }
    if traced:
        figures.update(traced_calls=Sum("traced_calls"), traced_retained=Sum("traced_retained"))
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
    from django_leakguard.uwsgi_log import most_at_once

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


def rows_from_log(summary: LogSummary) -> tuple[list[Row], Workers, dict[str, Any]]:
    """Return a parsed uWSGI log as rows (RSS only), worker figures and the log's counts."""
    rows = [
        Row(
            kind="request",
            key=key,
            calls=group.calls,
            rss_growth=group.rss_growth,
            rss_growth_positive=group.rss_growth_positive,
            rss_grew_calls=group.rss_grew_calls,
            rss_growth_max=group.rss_growth_max,
        )
        for key, group in summary.groups.items()
    ]
    workers = Workers(
        seen=summary.workers,
        calls=summary.worker_calls,
        rss_growth=summary.worker_rss_growth,
        rss_first_total=summary.worker_rss_first_total,
        at_once=summary.workers_at_once,
    )
    log = {
        "files": summary.files,
        "lines": summary.lines,
        "request_lines": summary.request_lines,
        "skipped_lines": summary.skipped_lines,
        "respawns": summary.respawns,
        "group_by": summary.group_by,
        "group_by_reason": summary.group_by_reason,
        "groups_folded_into_other": summary.folded_groups,
        "first_request_at": _epoch_iso(summary.first_date),
        "last_request_at": _epoch_iso(summary.last_date),
    }
    return rows, workers, log


def _epoch_iso(value: float | None) -> str | None:
    if value is None:
        return None
    return dt.datetime.fromtimestamp(value).astimezone().isoformat()


# Ranking -------------------------------------------------------------------------------------


def recommend(
    workers: Workers, max_requests: int, worker_max_memory: int | None, available: int
) -> Recommendation | None:
    """Return the recycling recommendation, or None when the worker data is too thin."""
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
            f"With MAX_REQUESTS = {max_requests:,}, a worker grows about "
            f"{format_bytes(before)} before it is recycled "
            f"(from {format_bytes(start)} at its first request to about {format_bytes(peak)})."
        )
    else:
        lines.append("MAX_REQUESTS is 0: workers are never recycled by request count.")
    suggested = None
    if growth <= 0:
        lines.append(
            f"Workers do not grow on average ({format_bytes(growth, signed=True)} per request): "
            "no request limit is needed for memory."
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
            "MAX_REQUESTS is within it."
            if max_requests and max_requests <= suggested
            else "lower MAX_REQUESTS to at most that."
            if max_requests
            else "set MAX_REQUESTS to at most that."
        )
        lines.append(
            f"Largest max_requests that keeps a worker under its share of "
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

    ranked = sorted(kept, key=lambda row: (-signal(row), row.kind, row.key))
    positive_total = sum(max(total_signal(row), 0) for row in kept)
    top = ranked[:limit] if limit else ranked
    shares = [max(total_signal(row), 0) / positive_total if positive_total else 0.0 for row in top]
    thin = total_calls < MIN_CALLS
    recommendation = recommend(workers, max_requests, worker_max_memory, available)
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


# Rendering -----------------------------------------------------------------------------------

COLUMNS = (
    "rank",
    "kind",
    "key",
    "view",
    "calls",
    "heap_calls",
    "heap_growth_bytes",
    "heap_growth_per_call_bytes",
    "heap_growth_max_bytes",
    "rss_growth_bytes",
    "rss_growth_per_call_bytes",
    "rss_growth_positive_bytes",
    "rss_growth_max_bytes",
    "rss_grew_fraction",
    "share",
    "traced_calls",
    "retained_bytes",
    "retained_per_call_bytes",
)


def row_dict(rank: int, row: Row, share: float) -> dict[str, Any]:
    """Return one row as JSON and CSV write it: plain bytes, heap fields None when unknown."""
    per_call = row.heap_per_call
    return {
        "rank": rank,
        "kind": row.kind,
        "key": row.key,
        "view": row.view,
        "calls": row.calls,
        "heap_growth_bytes": row.heap_kept if row.heap_available else None,
        "heap_calls": row.heap_calls,
        "heap_growth_per_call_bytes": round(per_call) if per_call is not None else None,
        "heap_growth_max_bytes": row.heap_growth_max if row.heap_available else None,
        "rss_growth_bytes": row.rss_growth,
        "rss_growth_per_call_bytes": round(row.rss_per_call),
        "rss_growth_positive_bytes": row.rss_growth_positive,
        "rss_growth_max_bytes": row.rss_growth_max,
        "rss_grew_fraction": round(row.grew_fraction, 4),
        "share": round(share, 4),
        "traced_calls": row.traced_calls,
        "retained_bytes": row.traced_retained if row.traced_calls else None,
        "retained_per_call_bytes": (
            round(row.retained_per_call) if row.retained_per_call is not None else None
        ),
    }


def _iso(moment: dt.datetime | None) -> str | None:
    return moment.isoformat() if moment is not None else None


def as_json(report: Report) -> dict[str, Any]:
    """Return the report as the documented JSON object."""
    workers = report.workers
    rec = report.recommendation
    return {
        "version": JSON_VERSION,
        "source": report.source,
        "since": _iso(report.since),
        "until": _iso(report.until),
        "sort": report.sort,
        "ranked_by": report.ranked_by,
        "heap_available": report.heap_available,
        "thin": report.thin,
        "notes": report.notes,
        "totals": {
            "keys": report.total_keys,
            "calls": report.total_calls,
            "heap_growth_bytes": report.total_heap_growth if report.heap_available else None,
            "rss_growth_bytes": report.total_rss_growth,
        },
        "rows": [
            row_dict(rank, row, share)
            for rank, (row, share) in enumerate(zip(report.rows, report.shares, strict=True), 1)
        ],
        "workers": {
            "seen": workers.seen,
            "at_once": workers.at_once,
            "calls": workers.calls,
            "rss_growth_bytes": workers.rss_growth,
            "rss_growth_per_call_bytes": (
                round(workers.growth_per_call) if workers.growth_per_call is not None else None
            ),
            "rss_first_mean_bytes": (
                round(workers.mean_first_rss) if workers.mean_first_rss is not None else None
            ),
        },
        "recommendation": None
        if rec is None
        else {
            "max_requests": rec.max_requests,
            "memory_per_worker_bytes": rec.share,
            "memory_per_worker_source": rec.share_source,
            "growth_before_recycle_bytes": (
                round(rec.growth_before_recycle) if rec.growth_before_recycle is not None else None
            ),
            "peak_rss_bytes": round(rec.peak) if rec.peak is not None else None,
            "suggested_max_requests": rec.suggested_max_requests,
        },
        "log": report.log,
    }


def render_json(report: Report) -> str:
    return json.dumps(as_json(report), indent=2) + "\n"


def render_csv(report: Report) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=COLUMNS, lineterminator="\n")
    writer.writeheader()
    for rank, (row, share) in enumerate(zip(report.rows, report.shares, strict=True), 1):
        writer.writerow(row_dict(rank, row, share))
    return buffer.getvalue()


_RANKED_BY = {
    "heap": "net heap growth (the memory each key kept)",
    "rss": "net RSS growth (what the OS charged)",
    "heap-per-call": "heap kept per call",
    "rss-per-call": "RSS growth per call",
    "retained": "memory retained per traced call times calls (allocation tracing)",
}


def _header(report: Report) -> str:
    if report.source == "database":
        assert report.since is not None
        window = f"since {report.since:%Y-%m-%d %H:%M %Z}".rstrip()
        return f"Memory growth by URL pattern and task, {window}."
    files = ", ".join((report.log or {}).get("files", [])) or "-"
    return f"Memory growth by URL from uWSGI memory-report logs ({files})."


def _table(report: Report) -> list[str]:
    headers: tuple[str, ...]
    headers = ("#", "kind", "key", "calls", "heap/call", "heap kept", "RSS/call", "share", "grew")
    body: list[tuple[str, ...]] = [
        (
            str(rank),
            row.kind,
            row.key if len(row.key) <= 60 else row.key[:59] + "…",
            f"{row.calls:,}",
            format_bytes(row.heap_per_call),
            format_bytes(row.heap_kept) if row.heap_available else "n/a",
            format_bytes(row.rss_per_call),
            f"{share:.1%}",
            f"{row.grew_fraction:.0%}",
        )
        for rank, (row, share) in enumerate(zip(report.rows, report.shares, strict=True), 1)
    ]
    if any(row.traced_calls for row in report.rows):
        headers += ("retained/call (traced)",)
        body = [
            (*cells, format_bytes(row.retained_per_call))
            for cells, row in zip(body, report.rows, strict=True)
        ]
    widths = [max(len(cell) for cell in column) for column in zip(headers, *body, strict=False)]
    left = {1, 2}
    lines = []
    for cells in (headers, *body):
        lines.append(
            "  ".join(
                cell.ljust(width) if index in left else cell.rjust(width)
                for index, (cell, width) in enumerate(zip(cells, widths, strict=True))
            ).rstrip()
        )
    return lines


def _worker_lines(report: Report) -> list[str]:
    workers = report.workers
    if not workers.seen:
        return ["Workers: none recorded in this window."]
    growth = workers.growth_per_call
    lines = [
        f"Workers: {workers.seen:,} seen (at most {workers.at_once:,} at once on one host), "
        f"{workers.calls:,} requests and tasks served, mean RSS growth "
        f"{format_bytes(growth, signed=True)} per request."
    ]
    if workers.seen == 1:
        lines.append(
            "Only one worker was seen: its growth may be warm-up (imports, caches filling) "
            "rather than a leak; let more workers run before trusting the recommendation."
        )
    if report.recommendation is None:
        lines.append(
            f"Too few requests ({workers.calls:,}; at least {MIN_WORKER_CALLS:,} needed) to "
            "recommend a recycling limit."
        )
    else:
        lines.extend(report.recommendation.lines)
    return lines


def render_table(report: Report) -> str:
    lines = [_header(report)]
    if report.log is not None:
        log = report.log
        lines.append(
            "uWSGI logs carry RSS only: no heap signal, so this names the requests that "
            "grew the process, which are not always the ones that keep memory."
        )
        lines.append(
            f"Parsed {log['request_lines']:,} request lines in {log['lines']:,} lines; "
            f"skipped {log['skipped_lines']:,} lines that are not memory-report request lines"
            f"; {log['respawns']:,} respawned workers reused a pid. Grouped by "
            f"{log['group_by']} ({log['group_by_reason']})."
        )
    lines.extend(report.notes)
    lines.append("")
    if not report.rows and report.total_calls == 0:
        lines.append("No data to rank.")
    elif report.thin:
        lines.append(
            f"Only {report.total_calls:,} calls in {report.total_keys:,} keys: too few to rank "
            f"(at least {MIN_CALLS:,} needed). Let the app serve more traffic, or widen "
            "--since."
        )
    else:
        lines.append(
            f"Ranked by {_RANKED_BY[report.ranked_by]}; top {len(report.rows)} of "
            f"{report.total_keys:,} keys, {report.total_calls:,} calls."
        )
        lines.append("")
        lines.extend(_table(report))
    lines.append("")
    lines.extend(_worker_lines(report))
    return "\n".join(lines) + "\n"


def render(report: Report, fmt: str) -> str:
    if fmt == "json":
        return render_json(report)
    if fmt == "csv":
        return render_csv(report)
    return render_table(report)


# Allocation sites of one key (--detail) ------------------------------------------------------


@dataclass
class Detail:
    """The traced allocation sites of one kind and key over the window."""

    kind: str
    key: str
    calls: int
    traced_calls: int
    traced_retained: int
    sites: tuple[Site, ...]  # largest first; sizes add up over the traced calls

    @property
    def retained_per_call(self) -> float | None:
        return self.traced_retained / self.traced_calls if self.traced_calls else None


def details_from_database(
    key: str, since: dt.datetime, kind: str = "all", using: str = "default", top_n: int = 10
) -> list[Detail]:
    """Merge the hourly rows of key (one Detail per kind it was recorded under)."""
    from django_leakguard.models import Growth
    from django_leakguard.storage import stored_sites
    from django_leakguard.tracing import merge_sites

    queryset = Growth.objects.using(using).filter(hour__gte=floor_hour(since), key=key)
    if kind != "all":
        queryset = queryset.filter(kind=kind)
    details: dict[str, Detail] = {}
    for row_kind, calls, traced_calls, traced_retained, sites in queryset.order_by(
        "kind", "hour"
    ).values_list("kind", "calls", "traced_calls", "traced_retained", "traced_sites"):
        detail = details.setdefault(row_kind, Detail(row_kind, key, 0, 0, 0, ()))
        detail.calls += calls
        detail.traced_calls += traced_calls
        detail.traced_retained += traced_retained
        detail.sites = merge_sites(detail.sites, stored_sites(sites), top_n)
    return list(details.values())


def _site_dict(site: Site, traced_calls: int) -> dict[str, Any]:
    return {
        "filename": site.filename,
        "lineno": site.lineno,
        "line": site.line,
        "size_bytes": site.size,
        "per_call_bytes": round(site.size / traced_calls) if traced_calls else None,
        "count": site.count,
        "frames": list(site.frames),
    }


def detail_json(details: Sequence[Detail], key: str, since: dt.datetime) -> dict[str, Any]:
    """Return --detail's JSON object."""
    return {
        "version": JSON_VERSION,
        "key": key,
        "since": _iso(since),
        "details": [
            {
                "kind": detail.kind,
                "key": detail.key,
                "calls": detail.calls,
                "traced_calls": detail.traced_calls,
                "retained_bytes": detail.traced_retained if detail.traced_calls else None,
                "retained_per_call_bytes": (
                    round(detail.retained_per_call)
                    if detail.retained_per_call is not None
                    else None
                ),
                "sites": [_site_dict(site, detail.traced_calls) for site in detail.sites],
            }
            for detail in details
        ],
    }


DETAIL_COLUMNS = (
    "rank",
    "kind",
    "key",
    "filename",
    "lineno",
    "line",
    "size_bytes",
    "per_call_bytes",
    "count",
)


def render_detail(
    details: Sequence[Detail], key: str, since: dt.datetime, fmt: str, callers: int = 3
) -> str:
    """Render --detail as a table (the default), JSON or CSV."""
    if fmt == "json":
        return json.dumps(detail_json(details, key, since), indent=2) + "\n"
    if fmt == "csv":
        buffer = io.StringIO()
        writer = csv.DictWriter(
            buffer, fieldnames=DETAIL_COLUMNS, lineterminator="\n", extrasaction="ignore"
        )
        writer.writeheader()
        for detail in details:
            for rank, site in enumerate(detail.sites, 1):
                writer.writerow(
                    {
                        "rank": rank,
                        "kind": detail.kind,
                        "key": detail.key,
                        **_site_dict(site, detail.traced_calls),
                    }
                )
        return buffer.getvalue()
    lines: list[str] = []
    for detail in details:
        if lines:
            lines.append("")
        window = f"since {since:%Y-%m-%d %H:%M %Z}".rstrip()
        if not detail.traced_calls:
            lines.append(
                f"No traced call of {detail.kind} {detail.key} {window} ({detail.calls:,} calls"
                " recorded): set LEAKGUARD['TRACE_SAMPLE_RATE'] (e.g. 0.01) to sample calls "
                "with tracemalloc, or widen --since."
            )
            continue
        lines.append(
            f"Allocation sites of {detail.kind} {detail.key} {window}: {detail.traced_calls:,} "
            f"traced of {detail.calls:,} calls, {format_bytes(detail.retained_per_call)} "
            "retained per traced call."
        )
        lines.append("")
        for rank, site in enumerate(detail.sites, 1):
            lines.append(
                f"{rank:>2}. {site.location}  {format_bytes(site.size / detail.traced_calls)} "
                f"per traced call ({format_bytes(site.size)} in all; {site.count:,} blocks)"
            )
            if site.line:
                lines.append(f"      {site.line}")
            # frames run innermost first: the callers are those after the site's own frame.
            own = site.frames.index(site.location) if site.location in site.frames else -1
            lines.extend(
                f"      from {frame}" for frame in site.frames[own + 1 : own + 1 + callers]
            )
    return "\n".join(lines) + "\n"
