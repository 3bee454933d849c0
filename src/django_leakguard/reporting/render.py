"""Renderers of a report: the table, the JSON object and the CSV file."""

from __future__ import annotations

import csv
import datetime as dt
import io
import json
from typing import Any

from django_leakguard import records
from django_leakguard.reporting.model import (
    JSON_VERSION,
    MIN_CALLS,
    MIN_EXTRAPOLATE,
    MIN_WORKER_CALLS,
    Report,
    Row,
    floor_hour,
)
from django_leakguard.text import escape_controls
from django_leakguard.units import format_bytes

# The order of the fields of a JSON row; counters added to records.Counts with an output
# name come after these. The CSV columns are the same, heap_calls first of the heap fields.
_LAYOUT = (
    "rank",
    "kind",
    "key",
    "view",
    "calls",
    "heap_growth_bytes",
    "heap_calls",
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
    "confidence",
    "trend",
)


def columns(specs: tuple[records.Counter, ...] = records.COUNTERS) -> tuple[str, ...]:
    """The fields of a JSON row and the CSV columns, in order."""
    outputs = [spec.output for spec in specs if spec.output and spec.output not in _LAYOUT]
    return _LAYOUT + tuple(outputs)


def csv_columns(specs: tuple[records.Counter, ...] = records.COUNTERS) -> tuple[str, ...]:
    """The CSV columns, in order."""
    names = list(columns(specs))
    names.remove("heap_calls")
    names.insert(names.index("heap_growth_bytes"), "heap_calls")
    return tuple(names)


COLUMNS = csv_columns()


def row_dict(rank: int, row: Row, share: float) -> dict[str, Any]:
    """Return one row as JSON and CSV write it: plain bytes, heap fields None when unknown."""
    per_call = row.heap_per_call
    fields = records.output_values(row)
    fields.update(
        rank=rank,
        kind=row.kind,
        key=row.key,
        view=row.view,
        heap_growth_bytes=row.heap_kept if row.heap_available else None,
        heap_growth_per_call_bytes=round(per_call) if per_call is not None else None,
        rss_growth_per_call_bytes=round(row.rss_per_call),
        rss_grew_fraction=round(row.grew_fraction, 4),
        share=round(share, 4),
        confidence=row.confidence,
        trend=row.trend,
        retained_per_call_bytes=(
            round(row.retained_per_call) if row.retained_per_call is not None else None
        ),
    )
    return {name: fields[name] for name in columns() if name in fields}


def iso(moment: dt.datetime | None) -> str | None:
    return moment.isoformat() if moment is not None else None


def as_json(report: Report) -> dict[str, Any]:
    """Return the report as the documented JSON object."""
    workers = report.workers
    rec = report.recommendation
    return {
        "version": JSON_VERSION,
        "source": report.source,
        "since": iso(report.since),
        "until": iso(report.until),
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


def escaped_cells(cells: dict[str, Any]) -> dict[str, Any]:
    """Return a CSV row with control characters in its text shown as escapes."""
    return {
        name: escape_controls(value) if isinstance(value, str) else value
        for name, value in cells.items()
    }


def render_csv(report: Report) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=COLUMNS, lineterminator="\n")
    writer.writeheader()
    for rank, (row, share) in enumerate(zip(report.rows, report.shares, strict=True), 1):
        writer.writerow(escaped_cells(row_dict(rank, row, share)))
    return buffer.getvalue()


_RANKED_BY = {
    "heap": (
        "memory kept (C heap and small objects; caches that level off after the others; "
        f"keys with fewer than {MIN_EXTRAPOLATE} readings by what those kept, not scaled up)"
    ),
    "rss": "net RSS growth (what the OS charged)",
    "heap-per-call": "heap kept per call",
    "rss-per-call": "RSS growth per call",
    "retained": "memory retained per traced call times calls (allocation tracing)",
}


def _header(report: Report) -> str:
    if report.source == "database":
        assert report.since is not None
        # Rows are hourly: the window starts at the hour that contains since.
        window = f"since {floor_hour(report.since):%Y-%m-%d %H:%M %Z}".rstrip()
        return f"Memory growth by URL pattern and task, {window}."
    files = ", ".join((report.log or {}).get("files", [])) or "-"
    return f"Memory growth by URL from uWSGI memory-report logs ({escape_controls(files)})."


def _shown_key(key: str) -> str:
    shown = escape_controls(key)
    return shown if len(shown) <= 60 else shown[:59] + "…"


def _shown_view(view: str) -> str:
    # A dotted name says the most at its end (the module and the function).
    shown = escape_controls(view) or "-"
    return shown if len(shown) <= 40 else "…" + shown[-39:]


def _table(report: Report) -> list[str]:
    headers: tuple[str, ...]
    headers = (
        "#",
        "kind",
        "key",
        "calls",
        "readings",
        "heap/call",
        "heap kept",
        "RSS/call",
        "share",
        "grew",
    )
    body: list[tuple[str, ...]] = [
        (
            str(rank),
            row.kind,
            _shown_key(row.key),
            f"{row.calls:,}",
            _readings(row),
            format_bytes(row.heap_per_call),
            format_bytes(row.heap_kept) if row.heap_available else "n/a",
            format_bytes(row.rss_per_call),
            f"{share:.1%}",
            f"{row.grew_fraction:.0%}",
        )
        for rank, (row, share) in enumerate(zip(report.rows, report.shares, strict=True), 1)
    ]
    if not report.heap_available:
        headers = headers[:4] + headers[5:]
        body = [cells[:4] + cells[5:] for cells in body]
    if any(row.trend for row in report.rows):
        headers += ("trend",)
        body = [(*cells, row.trend or "") for cells, row in zip(body, report.rows, strict=True)]
    if any(row.traced_calls for row in report.rows):
        headers += ("retained/call (traced)",)
        body = [
            (*cells, format_bytes(row.retained_per_call))
            for cells, row in zip(body, report.rows, strict=True)
        ]
    left = {1, 2}
    if any(row.view for row in report.rows):
        # The view after the key: a regex key may stand for several (docs/recording).
        headers = (*headers[:3], "view", *headers[3:])
        body = [
            (*cells[:3], _shown_view(row.view), *cells[3:])
            for cells, row in zip(body, report.rows, strict=True)
        ]
        left.add(3)
    widths = [max(len(cell) for cell in column) for column in zip(headers, *body, strict=False)]
    lines = []
    for cells in (headers, *body):
        lines.append(
            "  ".join(
                cell.ljust(width) if index in left else cell.rjust(width)
                for index, (cell, width) in enumerate(zip(cells, widths, strict=True))
            ).rstrip()
        )
    return lines


def _readings(row: Row) -> str:
    """The readings behind a row's heap figures, flagged when they are few."""
    if not row.heap_calls:
        return "0"
    return f"{row.heap_calls:,}" + (" low" if row.confidence == "low" else "")


def _worker_lines(report: Report) -> list[str]:
    workers = report.workers
    if not workers.seen:
        return ["Workers: none recorded in this window."]
    growth = workers.growth_per_call
    lines = [
        f"Workers: {workers.seen:,} seen (at most {workers.at_once:,} at once on one host), "
        f"{workers.calls:,} calls served, mean RSS growth "
        f"{format_bytes(growth, signed=True)} per call."
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
