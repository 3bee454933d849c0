"""leakreport's one function: from its options to the text it prints (the pipeline, end to end).

Rows come from the database (`database`, through `pages.ranking_report()`, which the admin's
pages share) or from uWSGI logs (`logs`); `ranking` orders them and recommends a limit;
`render` or `html_report` writes them. `--detail` reads and renders one key (`detail`).
Every failure the user can fix is a ReportError: one line that says what is wrong and what to
do, which the command shows as its error.
"""

from __future__ import annotations

import datetime as dt
import importlib.util
from collections.abc import Sequence
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from typing import BinaryIO

from django.db import DatabaseError

from django_leakguard import conf, lookup, memory, refine
from django_leakguard.records import TASK
from django_leakguard.reporting import detail, html_report, logs, pages, uwsgi_parallel
from django_leakguard.reporting.ranking import build_report
from django_leakguard.reporting.render import render
from django_leakguard.units import parse_since


class ReportError(Exception):
    """Something the user can fix: the message says what and how, in one line."""


@dataclass(frozen=True)
class Options:
    """leakreport's options (see docs/commands.md)."""

    since: str = "24h"
    kind: str = "all"
    limit: int = 10
    min_count: int = 0
    sort: str = "heap"
    format: str = "table"
    detail: str | None = None
    uwsgi_logs: Sequence[str] = ()
    group_by: str = "auto"
    # Processes that parse a large plain log (0: uwsgi_parallel.default_jobs()).
    jobs: int = 0


@dataclass(frozen=True)
class Output:
    """What leakreport prints. A notice (nothing recorded) goes to the terminal, not to -o."""

    text: str
    notice: bool = False


def leakreport(
    options: Options, settings: conf.Settings, now: dt.datetime, stdin: BinaryIO | None = None
) -> Output:
    """Return the report the options ask for; raise ReportError for what the user can fix."""
    if options.detail is not None:
        return _detail(options, settings, now)
    if options.uwsgi_logs:
        return _from_logs(options, settings, stdin)
    since = _since(options.since, now)
    using = settings.DATABASE
    try:
        ranking = pages.ranking_report(
            since,
            now,
            kind=options.kind,
            sort=options.sort,
            limit=options.limit,
            min_count=options.min_count,
            using=using,
        )
        if options.format == "html":
            text = html_report.render_html(ranking, since, now, kind=options.kind)
        else:
            text = render(ranking.report, options.format)
    except DatabaseError as exc:
        raise _missing_tables(using, exc) from None
    if not ranking.any_rows and options.format == "table":
        return Output(nothing_recorded(options.kind, since, settings), notice=True)
    return Output(text)


def _from_logs(options: Options, settings: conf.Settings, stdin: BinaryIO | None) -> Output:
    if options.kind == TASK:
        raise ReportError("--kind task does not apply to --uwsgi-log: logs hold requests.")
    try:
        summary = logs.parse_logs(
            options.uwsgi_logs,
            options.group_by,
            stdin=stdin,
            jobs=options.jobs or uwsgi_parallel.default_jobs(),
        )
    except (OSError, EOFError) as exc:
        raise ReportError(f"Cannot read the uWSGI log: {exc}") from None
    except BrokenProcessPool as exc:
        raise ReportError(
            f"A process parsing the uWSGI log ended abruptly ({exc}); out of memory? Run "
            "again with --jobs 1 to parse in this process."
        ) from None
    rows, workers, log = logs.rows_from_log(summary)
    if options.format == "html":
        raise ReportError(
            "--format html draws the hourly rows stored in the database; uWSGI logs "
            "have none. Use --format table, json or csv with --uwsgi-log."
        )
    built = build_report(
        rows,
        workers,
        source="uwsgi-log",
        since=None,
        until=None,
        sort=options.sort,
        limit=options.limit,
        min_count=options.min_count,
        available=memory.available_memory(),
        log=log,
        **pages.recycling_limits(options.kind, settings),
    )
    if refine.active() and built.rows:
        built.notes.append(refine.LOG_NOTE)
    return Output(render(built, options.format))


def _detail(options: Options, settings: conf.Settings, now: dt.datetime) -> Output:
    key = options.detail
    assert key is not None
    if options.uwsgi_logs:
        raise ReportError(
            "--detail reads the allocation sites sampled tracing stored in the database; "
            "uWSGI logs have none."
        )
    since = _since(options.since, now)
    using = settings.DATABASE
    try:
        details = [
            found
            for name in lookup.keys_named(key, since, options.kind, using)
            for found in detail.details_from_database(
                name, since, options.kind, using, settings.TRACE_TOP_SITES
            )
        ]
    except DatabaseError as exc:
        raise _missing_tables(using, exc) from None
    if not details:
        raise ReportError(
            f"Nothing recorded for {key!r} since {since:%Y-%m-%d %H:%M %Z}. Pass the key as "
            "leakreport lists it (a URL pattern such as /products/<int:pk>/ or a task "
            "name), a URL name (shop:product) or a view's dotted name, or widen --since."
        )
    return Output(detail.render_detail(details, key, since, options.format))


def _since(value: str, now: dt.datetime) -> dt.datetime:
    try:
        return parse_since(value, now)
    except ValueError as exc:
        raise ReportError(str(exc)) from None


def _missing_tables(using: str, exc: DatabaseError) -> ReportError:
    return ReportError(
        f"Cannot read the leakguard tables in database {using!r} ({exc}). Run "
        f"`{conf.migrate_command(using)}`."
    )


def nothing_recorded(kind: str, since: dt.datetime, settings: conf.Settings) -> str:
    """Return what to do when the window holds no row of kind."""
    window = f"since {since:%Y-%m-%d %H:%M %Z}"
    written = f"rows are written every {settings.FLUSH_INTERVAL:g} s and when a worker exits"
    if kind == TASK:
        if importlib.util.find_spec("celery") is None:
            return (
                f"No task recorded {window}. Tasks are recorded in Celery workers, and Celery "
                "is not installed here."
            )
        return (
            f"No task recorded {window}. Call django_leakguard.celery.configure(app) on your "
            f"Celery app, let its workers run tasks ({written}), or widen --since."
        )
    return (
        f"No memory growth recorded {window}. Add "
        "'django_leakguard.middleware.LeakGuardMiddleware' first in MIDDLEWARE, let "
        f"the app serve requests ({written}), or widen --since."
    )
