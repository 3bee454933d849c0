"""manage.py leakguard_config [gunicorn|uwsgi|celery]: print the effective recycling config."""

from __future__ import annotations

import os
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from django_leakguard import conf, memory, recycling

SERVERS = ("gunicorn", "uwsgi", "celery")


class Command(BaseCommand):
    help = (
        "Print the recycling settings LEAKGUARD gives each server: Gunicorn's values, a uWSGI "
        "ini snippet, and Celery's per-child limits. Without a server name, print all three."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument(
            "server", nargs="?", choices=SERVERS, help="print only this server's config"
        )
        parser.add_argument(
            "--processes",
            type=int,
            help="uWSGI worker processes (max-requests-delta depends on it); default: CPUs",
        )
        parser.add_argument(
            "--uwsgi-version",
            help="uWSGI version to write the snippet for; default: the installed uWSGI",
        )
        parser.add_argument(
            "--concurrency",
            type=int,
            help="Celery pool children (-c); default: CPUs, as Celery does",
        )

    def handle(
        self,
        *args: Any,
        server: str | None,
        processes: int | None,
        uwsgi_version: str | None,
        concurrency: int | None,
        **options: Any,
    ) -> None:
        for name, value in (("--processes", processes), ("--concurrency", concurrency)):
            if value is not None and value < 1:
                raise CommandError(f"{name} should be a positive integer, got {value}.")
        if uwsgi_version is not None:
            try:
                recycling.parse_version(uwsgi_version)
            except ValueError as exc:
                raise CommandError(f"--uwsgi-version: {exc}.") from exc
        settings = conf.get_settings()
        cpus = os.cpu_count() or 1
        parts: list[str] = []
        if server in (None, "gunicorn"):
            parts.append(recycling.render_gunicorn(settings))
        if server in (None, "uwsgi"):
            version = uwsgi_version or recycling.installed_uwsgi_version()
            parts.append(recycling.render_uwsgi(settings, processes or cpus, version))
        if server in (None, "celery"):
            parts.append(
                recycling.render_celery(settings, concurrency or cpus, memory.available_memory())
            )
        self.stdout.write("\n".join(parts), ending="")
