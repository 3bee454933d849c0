"""manage.py leakreport: rank the URL patterns and tasks whose memory grows fastest."""

from __future__ import annotations

import argparse
import datetime as dt
import sys
from concurrent.futures.process import BrokenProcessPool
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.db import DatabaseError
from django.utils import timezone

from django_leakguard import conf, memory, report


def _positive_int(value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {value!r}") from None
    if number < 0:
        raise argparse.ArgumentTypeError(f"expected 0 or more, got {value!r}")
    return number


def _jobs(value: str) -> int:
    """Return --jobs as a number of processes (0 for auto)."""
    if value == "auto":
        return 0
    try:
        number = int(value)
    except ValueError:
        number = 0
    if number < 1:
        raise argparse.ArgumentTypeError(
            f"expected auto or a number of processes, 1 or more (1 parses in this process), "
            f"got {value!r}"
        )
    return number


class Command(BaseCommand):
    help = (
        "Rank the URL patterns and Celery tasks whose memory grows fastest, from the rows the "
        "middleware records or from uWSGI memory-report logs, and recommend a recycling limit."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument(
            "--since", default="24h", help="Window: 30m, 24h, 7d, 2w or an ISO date (24h)."
        )
        parser.add_argument("--kind", choices=report.KINDS, default="all")
        parser.add_argument(
            "--limit", type=_positive_int, default=10, help="Rows to show (0: all; 10)."
        )
        parser.add_argument(
            "--min-count", type=_positive_int, default=0, help="Hide keys with fewer calls."
        )
        parser.add_argument("--sort", choices=report.SORTS, default="heap")
        parser.add_argument("--format", choices=report.FORMATS, default="table")
        parser.add_argument(
            "--detail",
            metavar="KEY",
            help="Print the top allocation sites that sampled tracing found for one URL "
            "pattern or task, e.g. --detail /products/<int:pk>/.",
        )
        parser.add_argument(
            "--uwsgi-log",
            nargs="+",
            metavar="FILE",
            help="Read uWSGI memory-report logs (plain or .gz; - for stdin) instead.",
        )
        parser.add_argument(
            "--group-by",
            choices=("auto", "urlconf", "pattern"),
            default="auto",
            help="How --uwsgi-log groups paths (auto: the URLconf when it resolves most).",
        )
        parser.add_argument(
            "--jobs",
            type=_jobs,
            default="auto",
            metavar="N",
            help="Processes that parse a large plain --uwsgi-log file in parallel (auto: the "
            "CPUs this process may use, at most 8; 1: none, parse here).",
        )
        parser.add_argument(
            "--prune", action="store_true", help="Delete rows older than RETENTION_DAYS."
        )
        parser.add_argument("--reset", action="store_true", help="Delete all recorded rows.")
        parser.add_argument(
            "--no-input",
            "--noinput",
            action="store_false",
            dest="interactive",
            help="Do not ask for confirmation.",
        )

    def handle(self, *args: Any, **options: Any) -> None:
        settings = conf.get_settings()
        using = settings.DATABASE
        if options["prune"] or options["reset"]:
            self._maintain(options, using, settings.RETENTION_DAYS)
            return
        now = timezone.now()
        if options["detail"] is not None:
            self._detail(options, now, using, settings.TRACE_TOP_SITES)
            return
        since: dt.datetime | None = None
        log: dict[str, Any] | None = None
        if options["uwsgi_log"]:
            rows, workers, log = self._from_logs(options)
        else:
            since = self._since(options["since"], now)
            # Only --sort retained ranks by the traced figures: otherwise the rows shown
            # read them afterwards (report.fill_rows), sparing SQLite two sums per row.
            rows, workers = self._from_database(
                options["kind"], since, using, traced=options["sort"] == "retained"
            )
        built = report.build_report(
            rows,
            workers,
            source="uwsgi-log" if log is not None else "database",
            since=since,
            until=now if log is None else None,
            sort=options["sort"],
            limit=options["limit"],
            min_count=options["min_count"],
            max_requests=settings.MAX_REQUESTS,
            worker_max_memory=settings.WORKER_MAX_MEMORY,
            available=memory.available_memory(),
            log=log,
        )
        if log is None and since is not None:
            report.fill_rows(built.rows, since, using, traced=options["sort"] != "retained")
        if since is not None and not rows and options["format"] == "table":
            self.stdout.write(
                f"No memory growth recorded since {since:%Y-%m-%d %H:%M %Z}. Add "
                "'django_leakguard.middleware.LeakGuardMiddleware' first in MIDDLEWARE, let "
                f"the app serve requests (rows are written every {settings.FLUSH_INTERVAL:g} "
                "s and when a worker exits), or widen --since."
            )
            return
        self.stdout.write(report.render(built, options["format"]), ending="")

    def _detail(self, options: dict[str, Any], now: dt.datetime, using: str, top_n: int) -> None:
        key = options["detail"]
        if options["uwsgi_log"]:
            raise CommandError(
                "--detail reads the allocation sites sampled tracing stored in the database; "
                "uWSGI logs have none."
            )
        since = self._since(options["since"], now)
        try:
            details = report.details_from_database(key, since, options["kind"], using, top_n)
        except DatabaseError as exc:
            raise CommandError(
                f"Cannot read the leakguard tables in database {using!r} ({exc}). Run "
                "'manage.py migrate django_leakguard'."
            ) from None
        if not details:
            raise CommandError(
                f"Nothing recorded for {key!r} since {since:%Y-%m-%d %H:%M %Z}. Pass the key as "
                "leakreport lists it (a URL pattern such as /products/<int:pk>/ or a task "
                "name), or widen --since."
            )
        self.stdout.write(report.render_detail(details, key, since, options["format"]), ending="")

    def _since(self, value: str, now: dt.datetime) -> dt.datetime:
        try:
            return report.parse_since(value, now)
        except ValueError as exc:
            raise CommandError(str(exc)) from None

    def _from_database(
        self, kind: str, since: dt.datetime, using: str, *, traced: bool
    ) -> tuple[list[report.Row], report.Workers]:
        try:
            rows = report.rows_from_database(since, kind, using, traced=traced)
            workers = report.workers_from_database(since, kind, using)
        except DatabaseError as exc:
            raise CommandError(
                f"Cannot read the leakguard tables in database {using!r} ({exc}). Run "
                "'manage.py migrate django_leakguard'."
            ) from None
        return rows, workers

    def _from_logs(
        self, options: dict[str, Any]
    ) -> tuple[list[report.Row], report.Workers, dict[str, Any]]:
        from django_leakguard import uwsgi_log

        if options["kind"] == "task":
            raise CommandError("--kind task does not apply to --uwsgi-log: logs hold requests.")
        try:
            summary = uwsgi_log.parse_logs(
                options["uwsgi_log"],
                options["group_by"],
                stdin=sys.stdin.buffer,
                jobs=options["jobs"] or uwsgi_log.default_jobs(),
            )
        except (OSError, EOFError) as exc:
            raise CommandError(f"Cannot read the uWSGI log: {exc}") from None
        except BrokenProcessPool as exc:
            raise CommandError(
                f"A process parsing the uWSGI log ended abruptly ({exc}); out of memory? Run "
                "again with --jobs 1 to parse in this process."
            ) from None
        return report.rows_from_log(summary)

    def _maintain(self, options: dict[str, Any], using: str, retention_days: int) -> None:
        if options["reset"]:
            if options["interactive"]:
                answer = input(
                    f"This deletes every leakguard growth and worker row in database {using!r}."
                    " Type 'yes' to continue: "
                )
                if answer.strip().lower() != "yes":
                    raise CommandError("Reset cancelled.")
            from django_leakguard.models import Growth, Worker

            try:
                growth, _ = Growth.objects.using(using).all().delete()
                workers, _ = Worker.objects.using(using).all().delete()
            except DatabaseError as exc:
                raise CommandError(f"Cannot reset the leakguard tables: {exc}") from None
            self.stdout.write(f"Deleted {growth:,} growth rows and {workers:,} worker rows.")
            return
        from django_leakguard import storage

        deleted = storage.prune(retention_days)
        self.stdout.write(f"Deleted {deleted:,} rows older than {retention_days} days.")
