"""Golden outputs of leakreport: table, JSON and CSV, from the database and from uWSGI logs.

Frozen from the release before the counters, the key and the reporting pipeline were given one
home each (issue 15), so that a refactoring cannot change what users see without a test saying
so. Regenerate deliberately with LEAKGUARD_REGENERATE_GOLDEN=1 and review the diff.
"""

from __future__ import annotations

import io
import os
import re
from pathlib import Path

import pytest
from django.core.management import call_command

from django_leakguard import memory
from django_leakguard.reporting import uwsgi_parallel
from tests.test_leakreport import FIXTURE, GIB, fill, fill_traced
from tests.test_uwsgi_log import mixed_log

GOLDEN = Path(__file__).parent / "golden"
REGENERATE = os.environ.get("LEAKGUARD_REGENERATE_GOLDEN") == "1"
# Moments that depend on when the test runs: the window's start and end, the hours of rows.
_MOMENT = re.compile(r"\d{4}-\d{2}-\d{2}[T ]\d{2}:\d{2}(:\d{2}(\.\d+)?)?([+-]\d{2}:\d{2}|Z)?")

pytestmark = pytest.mark.django_db


@pytest.fixture(autouse=True)
def fixed_memory(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(memory, "available_memory", lambda: 8 * GIB)


def leakreport(*args: str) -> str:
    out = io.StringIO()
    call_command("leakreport", *args, stdout=out)
    return _MOMENT.sub("<moment>", out.getvalue())


def check(name: str, output: str) -> None:
    path = GOLDEN / name
    if REGENERATE:
        path.parent.mkdir(exist_ok=True)
        path.write_text(output)
    assert output == path.read_text(), f"{name} differs from its golden file"


DATABASE_CASES = {
    "db-heap": (),
    "db-rss": ("--sort", "rss"),
    "db-per-call": ("--sort", "per-call"),
    "db-retained": ("--sort", "retained"),
    "db-task": ("--kind", "task", "--since", "7d"),
    "db-detail": ("--detail", "/leak/retain/"),
}


@pytest.mark.parametrize("fmt", ["table", "json", "csv"])
@pytest.mark.parametrize("case", sorted(DATABASE_CASES))
def test_database_outputs(case: str, fmt: str) -> None:
    fill_traced()
    check(f"{case}.{fmt}", leakreport(*DATABASE_CASES[case], "--format", fmt))


@pytest.mark.parametrize("fmt", ["table", "json", "csv"])
def test_log_outputs(fmt: str) -> None:
    output = leakreport("--uwsgi-log", str(FIXTURE), "--format", fmt)
    check(f"log-fixture.{fmt}", output.replace(str(FIXTURE), "<fixture>"))


@pytest.mark.parametrize("fmt", ["table", "json"])
def test_mixed_log_outputs(fmt: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    log = tmp_path / "uwsgi.log"
    mixed_log(log, 3000)
    monkeypatch.setattr(uwsgi_parallel, "PARALLEL_MIN_SIZE", 1 << 40)  # one process: stable output
    output = leakreport("--uwsgi-log", str(log), "--format", fmt).replace(str(log), "<log>")
    check(f"log-mixed.{fmt}", output)


def test_untraced_table() -> None:
    fill()
    check("db-untraced.table", leakreport())
