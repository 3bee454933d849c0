from __future__ import annotations

from datetime import datetime, timezone
from io import StringIO

import pytest
from django.core.management import call_command

from django_leakguard.models import Growth, Kind, Worker


@pytest.mark.django_db
def test_no_missing_migrations() -> None:
    out = StringIO()
    call_command("makemigrations", "django_leakguard", "--check", "--dry-run", stdout=out)
    assert "No changes detected" in out.getvalue()


def test_str() -> None:
    hour = datetime(2027, 1, 2, 3, tzinfo=timezone.utc)
    assert str(Growth(kind=Kind.REQUEST, key="/a/", hour=hour)) == "request /a/ @ 2027-01-02 03:00"
    assert str(Worker(host="web-1", pid=42)) == "web-1:42"
