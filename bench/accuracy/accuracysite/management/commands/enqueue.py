"""manage.py enqueue FILE: send the tasks a JSON file lists ([[name, [args...]], ...])."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from django.core.management.base import BaseCommand, CommandParser


class Command(BaseCommand):
    help = "Send the Celery tasks listed in a JSON file, in order."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("file", type=Path)

    def handle(self, *args: Any, file: Path, **options: Any) -> None:
        from accuracysite.celery import app

        calls = json.loads(file.read_text())
        with app.producer_or_acquire() as producer:
            for name, arguments in calls:
                app.send_task(name, args=arguments, producer=producer)
        self.stdout.write(f"sent {len(calls)} tasks")
