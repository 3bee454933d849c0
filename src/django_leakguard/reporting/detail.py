"""--detail: the traced allocation sites of one key, read from the database and rendered."""

from __future__ import annotations

import csv
import datetime as dt
import io
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from django_leakguard.reporting.model import JSON_VERSION, floor_hour
from django_leakguard.reporting.render import escaped_cells, iso
from django_leakguard.text import escape_controls
from django_leakguard.tracing_sites import site_lines
from django_leakguard.units import format_bytes

if TYPE_CHECKING:
    from django_leakguard.tracing_records import Site


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
    from django_leakguard.tracing_records import merge_sites

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
        "since": iso(since),
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
                    escaped_cells(
                        {
                            "rank": rank,
                            "kind": detail.kind,
                            "key": detail.key,
                            **_site_dict(site, detail.traced_calls),
                        }
                    )
                )
        return buffer.getvalue()
    lines: list[str] = []
    for detail in details:
        if lines:
            lines.append("")
        window = f"since {floor_hour(since):%Y-%m-%d %H:%M %Z}".rstrip()  # rows are hourly
        shown = escape_controls(detail.key)
        if not detail.traced_calls:
            lines.append(
                f"No traced call of {detail.kind} {shown} {window} ({detail.calls:,} calls"
                " recorded): set LEAKGUARD['TRACE_SAMPLE_RATE'] (e.g. 0.01) to sample calls "
                "with tracemalloc, or widen --since."
            )
            continue
        lines.append(
            f"Allocation sites of {detail.kind} {shown} {window}: {detail.traced_calls:,} "
            f"traced of {detail.calls:,} calls, {format_bytes(detail.retained_per_call)} "
            "retained per traced call."
        )
        lines.append("")
        for rank, site in enumerate(detail.sites, 1):
            lines.append(
                f"{rank:>2}. {escape_controls(site.location)}  "
                f"{format_bytes(site.size / detail.traced_calls)} per traced call "
                f"({format_bytes(site.size)} in all; {site.count:,} blocks)"
            )
            lines.extend(site_lines(site, callers))
    return "\n".join(lines) + "\n"
