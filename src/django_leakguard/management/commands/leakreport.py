"""manage.py leakreport: rank the URL patterns and tasks whose memory grows fastest.

Parses options, calls reporting.run.leakreport() (or storage's prune and reset) and prints.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.db import DatabaseError
from django.utils import timezone

from django_leakguard import conf, storage
from django_leakguard.reporting.model import FORMATS, KINDS, SORTS
from django_leakguard.reporting.run import Options, ReportError, leakreport


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
        parser.add_argument("--kind", choices=KINDS, default="all")
        parser.add_argument(
            "--limit", type=_positive_int, default=10, help="Rows to show (0: all; 10)."
        )
        parser.add_argument(
            "--min-count", type=_positive_int, default=0, help="Hide keys with fewer calls."
        )
        parser.add_argument("--sort", choices=SORTS, default="heap")
        parser.add_argument("--format", choices=(*FORMATS, "html"), default="table")
        parser.add_argument(
            "-o",
            "--output",
            metavar="FILE",
            help="Write the report to FILE instead of standard output (e.g. with --format html).",
        )
        parser.add_argument(
            "--detail",
            metavar="KEY",
            help="Print the top allocation sites that sampled tracing found for one URL "
            "pattern or task: its key (--detail /products/<int:pk>/), URL name "
            "(--detail shop:product) or view's dotted name (--detail shop.views.product).",
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
        problems = conf.problems()
        if problems:
            # A default in place of an invalid value could read, or reset, another database.
            more = f" ({len(problems) - 1} more: run manage.py check)" if len(problems) > 1 else ""
            raise CommandError(f"{problems[0].message} {problems[0].hint}{more}")
        settings = conf.get_settings()
        if options["reset"]:
            self._reset(settings.DATABASE, options["interactive"])
            return
        if options["prune"]:
            deleted = storage.prune(settings.RETENTION_DAYS)
            self.stdout.write(
                f"Deleted {deleted:,} rows older than {settings.RETENTION_DAYS} days."
            )
            return
        chosen = Options(
            since=options["since"],
            kind=options["kind"],
            limit=options["limit"],
            min_count=options["min_count"],
            sort=options["sort"],
            format=options["format"],
            detail=options["detail"],
            uwsgi_logs=options["uwsgi_log"] or (),
            group_by=options["group_by"],
            jobs=options["jobs"],
        )
        try:
            output = leakreport(chosen, settings, timezone.now(), stdin=sys.stdin.buffer)
        except ReportError as exc:
            raise CommandError(str(exc)) from None
        if output.notice or options["detail"] is not None:
            self.stdout.write(output.text, ending="")
            return
        self._write(output.text, options["output"])

    def _write(self, text: str, output: str | None) -> None:
        if output is None:
            self.stdout.write(text, ending="")
            return
        try:
            Path(output).write_text(text, encoding="utf-8")
        except OSError as exc:
            raise CommandError(f"Cannot write {output}: {exc}") from None
        self.stderr.write(f"Wrote {output}")

    def _reset(self, using: str, interactive: bool) -> None:
        if interactive:
            try:
                answer = input(
                    f"This deletes every leakguard growth and worker row in database "
                    f"{using!r}. Type 'yes' to continue: "
                )
            except EOFError:
                raise CommandError(
                    "--reset asks for confirmation, but there is no terminal to answer on "
                    "(stdin is closed or empty). Pass --no-input to reset without asking."
                ) from None
            if answer.strip().lower() != "yes":
                raise CommandError("Reset cancelled.")
        try:
            growth, workers = storage.reset(using)
        except DatabaseError as exc:
            raise CommandError(f"Cannot reset the leakguard tables: {exc}") from None
        self.stdout.write(f"Deleted {growth:,} growth rows and {workers:,} worker rows.")
