from __future__ import annotations

import datetime as dt

import pytest
from django.utils import timezone

from django_leakguard.models import Growth, Worker
from django_leakguard.reporting import history
from django_leakguard.reporting.model import Row

pytestmark = pytest.mark.django_db
KIB = 1024


def this_hour() -> dt.datetime:
    return timezone.now().replace(minute=0, second=0, microsecond=0)


def fill() -> dt.datetime:
    """Three hours of a leak, one hour of a spike, a task of the same name; two workers."""
    hour = this_hour()
    for offset, calls in ((2, 100), (1, 120), (0, 80)):
        Growth.objects.create(
            kind="request",
            key="/leak/retain/",
            hour=hour - dt.timedelta(hours=offset),
            view="shop.views.leak_retain" if offset < 2 else "",
            calls=calls,
            rss_growth=calls * 2 * KIB,
            rss_growth_positive=calls * 2 * KIB,
            rss_grew_calls=calls // 2,
            rss_growth_max=8 * KIB,
            heap_calls=calls // 2,
            heap_growth=calls // 2 * 64 * KIB,
            heap_growth_max=64 * KIB,
        )
    Growth.objects.create(
        kind="request", key="/spike/", hour=hour, calls=50, rss_growth=5000, rss_grew_calls=1
    )
    Growth.objects.create(kind="task", key="/leak/retain/", hour=hour, calls=7, rss_growth=70)
    start = timezone.now() - dt.timedelta(hours=2)
    for pid, minutes, last_rss in ((100, 0, 90 * 1024 * KIB), (101, 70, 70 * 1024 * KIB)):
        Worker.objects.create(
            host="web-1",
            pid=pid,
            started_at=start + dt.timedelta(minutes=minutes),
            last_seen=start + dt.timedelta(minutes=minutes + 60),
            rss_first=60 * 1024 * KIB,
            rss_last=last_rss,
            calls=300,
        )
    return hour


def test_hours_of_each_key_in_order() -> None:
    hour = fill()
    found = history.hours_from_database(
        [("request", "/leak/retain/"), ("request", "/nothing/")], hour - dt.timedelta(hours=5)
    )
    assert [entry.hour for entry in found[("request", "/leak/retain/")]] == [
        hour - dt.timedelta(hours=2),
        hour - dt.timedelta(hours=1),
        hour,
    ]
    first = found[("request", "/leak/retain/")][0].row
    assert (first.calls, first.heap_calls, first.heap_kept) == (100, 50, 100 * 64 * KIB)
    assert found[("request", "/nothing/")] == []  # and the task of the same name is left out


def test_hours_from_the_hour_that_contains_since() -> None:
    hour = fill()
    found = history.hours_from_database(
        [("request", "/leak/retain/")], hour - dt.timedelta(minutes=30)
    )
    assert [entry.hour for entry in found[("request", "/leak/retain/")]] == [
        hour - dt.timedelta(hours=1),
        hour,
    ]


def test_hours_of_no_key() -> None:
    assert history.hours_from_database([], timezone.now()) == {}


def test_kept_is_heap_when_read_else_rss() -> None:
    assert (
        history.kept(Row("request", "/", calls=10, heap_calls=5, heap_growth=50, rss_growth=1))
        == 100
    )
    assert history.kept(Row("request", "/", calls=10, rss_growth=7)) == 7


def test_worker_lives_latest_first_with_replacements() -> None:
    fill()
    lives = history.worker_lives(timezone.now() - dt.timedelta(hours=3))
    assert [life.pid for life in lives] == [101, 100]
    assert [life.replaced for life in lives] == [False, True]
    assert lives[1].lifetime == dt.timedelta(hours=1)
    assert lives[1].rss_growth == 30 * 1024 * KIB
    assert lives[1].growth_per_call == 30 * 1024 * KIB / 300
    assert lives[1].label.startswith("web-1:100 (")


def test_worker_lives_of_a_kind_and_a_limit() -> None:
    fill()
    since = timezone.now() - dt.timedelta(hours=3)
    assert history.worker_lives(since, "task") == []
    assert [life.pid for life in history.worker_lives(since, "request", limit=1)] == [101]


def test_worker_without_calls_has_no_growth_per_call() -> None:
    now = timezone.now()
    life = history.WorkerLife("h", 1, "request", now, now, 1, 2, 0, replaced=False)
    assert life.growth_per_call is None


def test_a_replacement_within_the_second_of_the_last_call_counts() -> None:
    start = timezone.now().replace(microsecond=0) - dt.timedelta(minutes=5)
    for pid, started, last in ((1, 0, 1.5), (2, 0, 1.5), (3, 1, 2), (4, 1, 2)):
        Worker.objects.create(
            host="h",
            pid=pid,
            started_at=start + dt.timedelta(seconds=started),
            last_seen=start + dt.timedelta(seconds=last),
            rss_first=1,
            rss_last=2,
            calls=1,
        )
    lives = history.worker_lives(start - dt.timedelta(minutes=1))
    assert {life.pid: life.replaced for life in lives} == {1: True, 2: True, 3: False, 4: False}


def test_a_later_worker_beside_a_long_lived_one_does_not_replace_it() -> None:
    now = timezone.now()
    for pid, started in ((1, 60), (2, 30)):
        Worker.objects.create(
            host="h",
            pid=pid,
            started_at=now - dt.timedelta(minutes=started),
            last_seen=now,
            rss_first=1,
            rss_last=2,
            calls=1,
        )
    assert not any(life.replaced for life in history.worker_lives(now - dt.timedelta(hours=2)))
