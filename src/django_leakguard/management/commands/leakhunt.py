"""manage.py leakhunt PATH: replay a request under tracemalloc and name the lines that leak."""

from __future__ import annotations

from typing import Any

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError, CommandParser

from django_leakguard import hunt


class Command(BaseCommand):
    help = (
        "Replay a request in-process many times with tracemalloc and print the lines whose "
        "retained memory grows with the number of requests. Database writes are rolled back "
        "unless --commit."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument(
            "path",
            help="URL path to replay, e.g. /products/1/ or /search/?q=shoes; "
            "{n} is replaced by the request's number (1, 2, ...), e.g. /cache/{n}/.",
        )
        parser.add_argument(
            "--requests",
            type=int,
            default=hunt.DEFAULT_REQUESTS,
            help=f"measured requests (default {hunt.DEFAULT_REQUESTS})",
        )
        parser.add_argument("--method", default="GET", help="HTTP method (default GET)")
        parser.add_argument("--user", dest="username", help="log this user in first")
        parser.add_argument(
            "--header",
            dest="headers",
            action="append",
            default=[],
            metavar="'NAME: VALUE'",
            help="send this header with every request, e.g. 'Authorization: Token ...' "
            "(repeatable)",
        )
        parser.add_argument(
            "--warmup",
            type=int,
            default=hunt.DEFAULT_WARMUP,
            help=f"requests before measuring, to fill one-time caches "
            f"(default {hunt.DEFAULT_WARMUP})",
        )
        parser.add_argument(
            "--top",
            type=int,
            default=hunt.DEFAULT_TOP,
            help=f"lines to print (default {hunt.DEFAULT_TOP})",
        )
        parser.add_argument(
            "--commit", action="store_true", help="keep database writes instead of rolling back"
        )
        parser.add_argument("--force", action="store_true", help="run even with DEBUG = False")
        parser.add_argument(
            "--no-c-heap",
            dest="c_heap",
            action="store_false",
            help="skip the second pass that watches the C heap line by line (for leaks in C "
            "extensions, which tracemalloc does not see)",
        )

    def handle(
        self,
        *args: Any,
        path: str,
        requests: int,
        method: str,
        username: str | None,
        headers: list[str],
        warmup: int,
        top: int,
        commit: bool,
        force: bool,
        c_heap: bool,
        **options: Any,
    ) -> None:
        if not settings.DEBUG and not force:
            raise CommandError(
                "leakhunt refuses to run with DEBUG = False: it is slow and meant for local "
                "debugging, and DEBUG = False usually means production settings. Run it with "
                "your development settings, or pass --force."
            )
        try:
            result = hunt.hunt(
                path,
                requests=requests,
                method=method,
                username=username,
                headers=headers,
                warmup=warmup,
                top=top,
                commit=commit,
                c_heap=c_heap,
                progress=self.stderr.write,
            )
        except hunt.HuntError as exc:
            raise CommandError(str(exc)) from exc
        self.stdout.write(hunt.render(result))
        warning = hunt.unsuccessful_warning(
            result, logged_in=username is not None, with_headers=bool(headers)
        )
        if warning is not None:
            self.stderr.write(warning)
