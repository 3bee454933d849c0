from __future__ import annotations

import datetime as dt
import os
from pathlib import Path
from typing import Any

import pytest
from django.db import connections
from django.db.utils import ConnectionHandler

from django_leakguard import report
from django_leakguard.report import Row, Workers

NOW = dt.datetime(2025, 11, 1, 12, 30, tzinfo=dt.timezone.utc)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("30m", NOW - dt.timedelta(minutes=30)),
        ("24h", NOW - dt.timedelta(hours=24)),
        (" 7d ", NOW - dt.timedelta(days=7)),
        ("2w", NOW - dt.timedelta(weeks=2)),
        ("2025-10-31", dt.datetime(2025, 10, 31, tzinfo=dt.timezone.utc)),
        ("2025-10-31T08:00:00+01:00", dt.datetime(2025, 10, 31, 7, tzinfo=dt.timezone.utc)),
    ],
)
def test_parse_since(value: str, expected: dt.datetime) -> None:
    assert report.parse_since(value, NOW) == expected


@pytest.mark.parametrize("value", ["", "5y", "soon", "2026-01-01"])
def test_parse_since_rejects(value: str) -> None:
    with pytest.raises(ValueError, match="--since"):
        report.parse_since(value, NOW)


@pytest.mark.parametrize(
    ("value", "signed", "text"),
    [
        (None, False, "n/a"),
        (0, False, "0 B"),
        (512, True, "+512 B"),
        (-1536, False, "-1.5 KiB"),
        (3 * 1024**2, False, "3.0 MiB"),
        (5 * 1024**4, False, "5120.0 GiB"),
    ],
)
def test_format_bytes(value: float | None, signed: bool, text: str) -> None:
    assert report.format_bytes(value, signed) == text


def workers(calls: int = 1000, growth: int = 1000 * 1024, seen: int = 2) -> Workers:
    return Workers(
        seen=seen,
        calls=calls,
        rss_growth=growth,
        rss_first_total=seen * 100 * 1024**2,
        at_once=seen,
    )


def test_recommend_is_none_when_thin() -> None:
    assert report.recommend(Workers(), 1000, None, 1024**3) is None
    assert report.recommend(workers(calls=50), 1000, None, 1024**3) is None


def test_recommend_lower_limit() -> None:
    # 512 MiB per worker, starting at 100 MiB, growing 1 KiB per request.
    rec = report.recommend(workers(), 500_000, None, 1024**3)
    assert rec is not None
    assert rec.share == 512 * 1024**2
    assert rec.suggested_max_requests == 412 * 1024
    assert rec.lines[-1].endswith("lower MAX_REQUESTS to at most that.")


def test_recommend_no_growth() -> None:
    rec = report.recommend(workers(growth=-5000), 1000, None, 1024**3)
    assert rec is not None
    assert rec.suggested_max_requests is None
    assert "Workers do not grow on average (-5 B per request)" in rec.lines[-1]


def test_recommend_over_share() -> None:
    rec = report.recommend(workers(), 1000, 50 * 1024**2, 1024**3)
    assert rec is not None
    assert rec.suggested_max_requests is None
    assert "already above their share of 50.0 MiB (WORKER_MAX_MEMORY 50.0 MiB)" in rec.lines[-1]


def test_build_report_rejects_unknown_sort() -> None:
    with pytest.raises(ValueError, match="sort should be"):
        report.build_report([], Workers(), source="database", since=NOW, until=NOW, sort="x")


def test_rss_per_call_ranking_without_heap() -> None:
    rows = [
        Row("request", "/a/", calls=10, rss_growth=100),
        Row("request", "/b/", calls=1, rss_growth=50),
    ]
    built = report.build_report(
        rows, Workers(), source="database", since=NOW, until=NOW, sort="per-call", limit=0
    )
    assert built.ranked_by == "rss-per-call"
    assert [row.key for row in built.rows] == ["/b/", "/a/"]
    assert built.shares == [pytest.approx(1 / 3), pytest.approx(2 / 3)]


def test_zero_calls_row() -> None:
    row = Row("task", "t", calls=0)
    assert row.rss_per_call == 0.0
    assert row.grew_fraction == 0.0
    assert row.heap_per_call is None
    assert Workers().growth_per_call is None
    assert Workers().mean_first_rss is None


def test_long_keys_are_shortened_in_the_table() -> None:
    rows = [Row("request", "/" + "x" * 80 + "/", calls=200, heap_calls=200, heap_growth=1)]
    built = report.build_report(rows, workers(seen=1), source="database", since=NOW, until=NOW)
    table = report.render_table(built)
    assert "/" + "x" * 58 + "…" in table
    assert "Only one worker was seen" in table


@pytest.mark.django_db
def test_sqlite_mmap_is_raised_for_one_query_then_restored(tmp_path: Path) -> None:
    # A real SQLite file (the test database lives in memory, where the pragma answers nothing).
    handler = ConnectionHandler(
        {"default": {"ENGINE": "django.db.backends.sqlite3", "NAME": str(tmp_path / "db.sqlite3")}}
    )
    connection = handler["default"]
    try:

        def mmap_size() -> int:
            with connection.cursor() as cursor:
                cursor.execute("PRAGMA mmap_size")
                return int(cursor.fetchone()[0])

        before = mmap_size()
        with report.sqlite_mmap(connection):
            assert mmap_size() == max(before, report.SQLITE_MMAP_SIZE)
        assert mmap_size() == before
    finally:
        connection.close()


@pytest.mark.django_db
def test_sqlite_mmap_leaves_a_database_in_memory_alone() -> None:
    with report.sqlite_mmap(connections["default"]):
        pass


# The "postgres" alias exists only with the URL; without it the postgres_url fixture skips
# (or fails when services are required), but pytest-django would error first.
@pytest.mark.skipif(
    not os.environ.get("LEAKGUARD_TEST_POSTGRES_URL")
    and os.environ.get("LEAKGUARD_REQUIRE_SERVICES") != "1",
    reason="PostgreSQL tests need LEAKGUARD_TEST_POSTGRES_URL",
)
@pytest.mark.postgres
@pytest.mark.django_db(databases=["default", "postgres"])
def test_sqlite_mmap_leaves_other_databases_alone(postgres_url: str) -> None:
    with report.sqlite_mmap(connections["postgres"]), connections["postgres"].cursor() as cursor:
        cursor.execute("SELECT 1")
        assert cursor.fetchone() == (1,)


def test_heap_kept_scales_sampled_readings_to_all_calls() -> None:
    # The recorder read the heap on 10 of 40 calls: 10 x 64 KiB read, 40 x 64 KiB kept.
    sampled = report.Row(
        kind="request", key="/leak/", calls=40, heap_calls=10, heap_growth=10 * 65536
    )
    always = report.Row(
        kind="request", key="/other/", calls=40, heap_calls=40, heap_growth=40 * 1000
    )
    unread = report.Row(kind="request", key="/none/", calls=40)
    assert sampled.heap_per_call == 65536
    assert sampled.heap_kept == 40 * 65536
    assert always.heap_kept == 40 * 1000
    assert unread.heap_kept == 0
    ranked = report.build_report(
        [always, sampled], report.Workers(), source="database", since=None, until=None
    )
    assert [row.key for row in ranked.rows] == ["/leak/", "/other/"]
    assert ranked.total_heap_growth == 40 * 65536 + 40 * 1000


POSTGRES = pytest.param(
    "postgres",
    marks=[
        pytest.mark.skipif(
            not os.environ.get("LEAKGUARD_TEST_POSTGRES_URL")
            and os.environ.get("LEAKGUARD_REQUIRE_SERVICES") != "1",
            reason="PostgreSQL tests need LEAKGUARD_TEST_POSTGRES_URL",
        ),
        pytest.mark.postgres,
        pytest.mark.django_db(databases=["default", "postgres"]),
    ],
)
DATABASES = pytest.mark.parametrize(
    "using", [pytest.param("default", marks=pytest.mark.django_db), POSTGRES]
)
SINCE = NOW - dt.timedelta(hours=24)
START = report.floor_hour(SINCE)


def store(using: str) -> None:
    """Hourly rows around the window that starts at SINCE, one field per figure."""
    from django_leakguard.models import Growth

    def add(kind: str, key: str, hours: int, view: str = "", **figures: int) -> None:
        Growth.objects.using(using).create(
            kind=kind, key=key, hour=START + dt.timedelta(hours=hours), view=view, **figures
        )

    every: dict[str, Any] = {
        "calls": 10,
        "rss_growth": 5,
        "rss_growth_positive": 7,
        "rss_grew_calls": 2,
        "rss_growth_max": 4,
        "heap_calls": 8,
        "heap_growth": 100,
        "heap_growth_max": 30,
        "traced_calls": 1,
        "traced_retained": 50,
    }
    # Before the window: counted nowhere, its view is not the latest in the window.
    outside: dict[str, Any] = dict.fromkeys(every, 10**6)
    add("request", "/a/", -1, "old.outside", **outside)
    add("request", "/a/", 0, "a.older", **every)
    add("request", "/a/", 1, "a.latest", **{**every, "rss_growth_max": 9, "heap_growth_max": 3})
    add("request", "/a/", 2, **{**every, "rss_growth": -20})  # the latest hour has no view
    add("task", "/a/", 1, "task.view", **dict.fromkeys(every, 3))
    add("request", "/b/", 0, calls=1, rss_growth_positive=1)
    add("task", "t", 0, "t.view", calls=2, rss_grew_calls=1)


A_RANKING: dict[str, Any] = {
    "calls": 30,
    "rss_growth": -10,
    "heap_calls": 24,
    "heap_growth": 300,
    "traced_calls": 3,
    "traced_retained": 150,
}
A_SHOWN: dict[str, Any] = {
    "rss_growth_positive": 21,
    "rss_grew_calls": 6,
    "rss_growth_max": 9,
    "heap_growth_max": 30,
    "view": "a.latest",
}


@DATABASES
def test_rows_from_database_sums_what_ranks_every_key(using: str) -> None:
    store(using)
    rows = sorted(report.rows_from_database(SINCE, using=using), key=lambda r: (r.kind, r.key))
    assert rows == [
        Row("request", "/a/", **A_RANKING),
        Row("request", "/b/", calls=1),
        Row("task", "/a/", calls=3, rss_growth=3, heap_calls=3, heap_growth=3, traced_calls=3,
            traced_retained=3),
        Row("task", "t", calls=2),
    ]  # fmt: skip
    tasks = report.rows_from_database(SINCE, kind="task", using=using)
    assert sorted(row.key for row in tasks) == ["/a/", "t"]
    # Without the traced figures (what every --sort but retained ranks by).
    untraced = report.rows_from_database(SINCE, kind="request", using=using, traced=False)
    assert sorted(untraced, key=lambda r: r.key) == [
        Row("request", "/a/", **{**A_RANKING, "traced_calls": 0, "traced_retained": 0}),
        Row("request", "/b/", calls=1),
    ]


@DATABASES
@pytest.mark.parametrize(("keys_max", "traced"), [(report.FILL_KEYS_MAX, False), (1, True)])
def test_fill_rows_completes_the_rows_shown_only(
    using: str, keys_max: int, traced: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    # keys_max 1: more rows shown than keys listed, so the query reads the whole window.
    monkeypatch.setattr(report, "FILL_KEYS_MAX", keys_max)
    store(using)
    ranked = report.rows_from_database(SINCE, using=using, traced=not traced)
    rows = {(row.kind, row.key): row for row in ranked}
    shown = [rows["request", "/a/"], rows["task", "t"], rows["request", "/b/"]]
    report.fill_rows(shown, SINCE, using, traced=traced)
    assert shown == [
        Row("request", "/a/", **A_RANKING, **A_SHOWN),
        Row("task", "t", calls=2, rss_grew_calls=1, view="t.view"),
        Row("request", "/b/", calls=1, rss_growth_positive=1),
    ]
    # Not shown, so not read (this task shares its key with a row shown).
    assert rows["task", "/a/"].view == ""
    assert rows["task", "/a/"].rss_growth_positive == 0


@pytest.mark.django_db
def test_fill_rows_without_rows_reads_nothing(
    django_assert_num_queries: Any,
) -> None:
    with django_assert_num_queries(0):
        report.fill_rows([], SINCE)


@pytest.mark.django_db
def test_fill_rows_leaves_a_key_deleted_since_the_ranking_alone() -> None:
    row = Row("request", "/gone/", calls=5)
    report.fill_rows([row], SINCE)
    assert row == Row("request", "/gone/", calls=5)
