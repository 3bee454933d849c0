from __future__ import annotations

import datetime as dt

import pytest
from django.test import override_settings
from django.utils import timezone

from django_leakguard import memory
from django_leakguard.models import Growth, Worker
from django_leakguard.reporting import pages
from django_leakguard.reporting.model import Row, Workers
from django_leakguard.reporting.ranking import recommend
from tests.test_history import KIB, fill

pytestmark = pytest.mark.django_db
GIB = 1024**3


@pytest.fixture(autouse=True)
def fixed_memory(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(memory, "available_memory", lambda: 8 * GIB)


def window() -> tuple[dt.datetime, dt.datetime]:
    now = timezone.now()
    return now - dt.timedelta(hours=5), now


def test_ranking_report_is_leakreports() -> None:
    fill()
    since, now = window()
    ranking = pages.ranking_report(since, now, limit=2)
    assert ranking.any_rows
    assert [(row.kind, row.key) for row in ranking.report.rows] == [
        ("request", "/leak/retain/"),
        ("request", "/spike/"),
    ]
    assert ranking.report.rows[0].view == "shop.views.leak_retain"  # filled in


def test_ranking_report_of_nothing() -> None:
    assert not pages.ranking_report(*window()).any_rows


def test_ranking_page_has_a_sparkline_of_each_hour() -> None:
    hour = fill()
    since, now = window()
    page = pages.ranking_page(pages.ranking_report(since, now, sort="rss"), since, now)
    first = page.rows[0]
    assert first.key == "/leak/retain/"
    values = first.sparkline.split('data-values="')[1].split('"')[0].split()
    hours = pages.hours_between(since, now)
    assert len(values) == len(hours)
    assert values[hours.index(hour)] == str(80 * 64 * KIB)  # heap kept in the current hour
    assert values[0] == "0"  # an hour without a row
    assert "Calls" in page.titles
    assert {name: value for name, _, value in first.cells.shown}["calls"] == "300"
    assert any(line.startswith("Ranked by net RSS growth") for line in page.summary)


def test_ranking_page_of_nothing() -> None:
    since, now = window()
    page = pages.ranking_page(pages.ranking_report(since, now), since, now)
    assert page.rows == []
    assert page.titles == []
    assert page.summary == ["No data to rank."]


def test_long_windows_show_the_last_week() -> None:
    fill()
    now = timezone.now()
    since = now - dt.timedelta(days=30)
    page = pages.ranking_page(pages.ranking_report(since, now), since, now)
    assert "memory kept per hour, the last 168 hours" in page.rows[0].sparkline
    assert len(page.rows[0].sparkline.split('data-values="')[1].split('"')[0].split()) == 168


@pytest.mark.parametrize(
    ("name", "value", "shown"),
    [
        ("heap_growth_bytes", None, "n/a"),
        ("heap_growth_bytes", 1536, "1.5 KiB"),
        ("share", 0.25, "25.0%"),
        ("rss_grew_fraction", 0.5, "50.0%"),
        ("calls", 12345, "12,345"),
        ("bounded", True, "yes"),
        ("bounded", False, "no"),
        ("confidence", "low", "low"),
    ],
)
def test_cells(name: str, value: object, shown: str) -> None:
    assert pages.cell(name, value) == shown


def test_column_titles() -> None:
    assert pages.column_title("rss_growth_per_call_bytes") == "RSS growth per call"
    assert pages.column_title("calls") == "Calls"


def test_key_page() -> None:
    fill()
    Growth.objects.filter(key="/leak/retain/", calls=80).update(
        traced_calls=2,
        traced_retained=2048,
        traced_sites=[
            {
                "filename": "shop/views.py",
                "lineno": 12,
                "line": "RETAINED.append(payload)",
                "size": 2048,
                "count": 4,
                "frames": ["shop/views.py:12"],
            }
        ],
    )
    since, _ = window()
    page = pages.key_page("request", "/leak/retain/", since)
    assert page.total.calls == 300
    assert page.total.view == "shop.views.leak_retain"
    assert [entry.row.calls for entry in page.hours] == [100, 120, 80]
    assert len(page.charts) == 3
    assert 'data-y="120"' in page.charts[0]  # calls
    assert f'data-y="{64 * KIB}"' in page.charts[1]  # heap per call
    assert f'data-y="{300 * 64 * KIB}"' in page.charts[2]  # kept so far, at the end
    assert page.readings[1] == "150 heap readings (50% of calls)."
    assert page.sites == [
        ("shop/views.py:12", "1.0 KiB", "2.0 KiB", "4", "RETAINED.append(payload)")
    ]


def test_key_page_of_rss_only_and_of_nothing() -> None:
    fill()
    since, _ = window()
    spike = pages.key_page("request", "/spike/", since)
    assert "RSS growth per call" in spike.charts[1]
    assert spike.sites == []
    nothing = pages.key_page("request", "/nothing/", since)
    assert nothing.hours == []
    assert nothing.detail is None
    assert "No readings in this window." in nothing.charts[0]


def test_readings_without_calls() -> None:
    assert pages.readings(Row("request", "/"))[1] == "0 heap readings."


@override_settings(LEAKGUARD={"MAX_REQUESTS": 1000, "MAX_REQUESTS_JITTER": 0.1})
def test_workers_page() -> None:
    fill()
    page = pages.workers_page(timezone.now() - dt.timedelta(hours=3))
    assert page.workers.seen == 2
    assert page.replaced == 1
    assert page.chart.count("<circle") == 4
    assert [row[1] for row in page.rows] == ["101", "100"]
    assert page.rows[1][5] == "1:00:00"
    limits = {setting: (value, source) for setting, value, source in page.limits}
    assert limits["WORKER_MAX_MEMORY"][0] == "8.0 GiB"
    suggested = page.recommendation.suggested_max_requests  # type: ignore[union-attr]
    assert limits["MAX_REQUESTS"][0] == f"{suggested:,}"
    assert "share - 60.0 MiB at the first call" in limits["MAX_REQUESTS"][1]
    assert limits["MAX_REQUESTS_JITTER"][0] == f"0.1 ({round(suggested * 0.1):,} requests)"


def test_workers_page_without_enough_calls() -> None:
    page = pages.workers_page(timezone.now())
    assert page.recommendation is None
    assert page.limits == []


def recommendation(workers: Workers) -> list[tuple[str, str, str]]:
    rec = recommend(workers, 1000, 100 * 1024 * KIB, 0)
    settings = pages.conf.get_settings()
    return pages.limits(workers, rec, settings)


def test_limits_when_workers_do_not_grow_or_start_too_big() -> None:
    flat = recommendation(Workers(seen=2, calls=500, rss_growth=0, rss_first_total=2 * KIB))
    assert flat[0][1] == "none needed for memory"
    assert flat[1][1] == "0.05"  # the default jitter, without a number of requests
    big = Workers(seen=1, calls=500, rss_growth=500, rss_first_total=200 * 1024 * KIB)
    assert recommendation(big)[0][1] == "none fits: workers start above their share"


def test_duration() -> None:
    assert pages.duration(dt.timedelta(days=3, seconds=3725.6)) == "3 d 1:02:06"
    assert pages.duration(dt.timedelta(days=1)) == "1 d 0:00:00"


def test_worker_table_cells() -> None:
    now = timezone.now()
    Worker.objects.create(
        host="h", pid=1, started_at=now, last_seen=now, rss_first=1, rss_last=2, calls=0
    )
    assert pages.workers_page(now - dt.timedelta(minutes=1)).rows[0][9] == "n/a"


@override_settings(LEAKGUARD={"CELERY_MAX_TASKS_PER_CHILD": 100})
def test_limits_of_tasks_are_celerys() -> None:
    workers = Workers(seen=2, calls=500, rss_growth=500 * KIB, rss_first_total=2 * 1024 * KIB)
    settings = pages.conf.get_settings()
    rec = recommend(workers, 100, None, 1024**3, "CELERY_MAX_TASKS_PER_CHILD", "task")
    found = pages.limits(workers, rec, settings, "task")
    assert [setting for setting, _, _ in found] == [
        "CELERY_MAX_TASKS_PER_CHILD",
        "memory per child",
    ]


def test_ranking_columns_start_with_calls_readings_confidence_and_trend() -> None:
    fill()
    since, now = window()
    page = pages.ranking_page(pages.ranking_report(since, now), since, now)
    names = [name for name, _, _ in page.rows[0].cells.shown]
    assert names[:4] == ["calls", "heap_calls", "confidence", "trend"]
    assert "rss_growth_max_bytes" not in names
