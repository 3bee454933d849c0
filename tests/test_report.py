from __future__ import annotations

import datetime as dt
import json
import os
from pathlib import Path
from typing import Any

import pytest
from django.db import connections
from django.db.utils import ConnectionHandler

from django_leakguard.reporting import database
from django_leakguard.reporting.database import (
    FILL_KEYS_MAX,
    SQLITE_MMAP_SIZE,
    fill_rows,
    rows_from_database,
    sqlite_mmap,
)
from django_leakguard.reporting.detail import Detail, render_detail
from django_leakguard.reporting.model import Report, Row, Workers, floor_hour
from django_leakguard.reporting.ranking import build_report, recommend
from django_leakguard.reporting.render import render_csv, render_json, render_table
from django_leakguard.tracing import Site

NOW = dt.datetime(2025, 11, 1, 12, 30, tzinfo=dt.timezone.utc)


def workers(calls: int = 1000, growth: int = 1000 * 1024, seen: int = 2) -> Workers:
    return Workers(
        seen=seen,
        calls=calls,
        rss_growth=growth,
        rss_first_total=seen * 100 * 1024**2,
        at_once=seen,
    )


def test_recommend_is_none_when_thin() -> None:
    assert recommend(Workers(), 1000, None, 1024**3) is None
    assert recommend(workers(calls=50), 1000, None, 1024**3) is None


def test_recommend_lower_limit() -> None:
    # 512 MiB per worker, starting at 100 MiB, growing 1 KiB per request.
    rec = recommend(workers(), 500_000, None, 1024**3)
    assert rec is not None
    assert rec.share == 512 * 1024**2
    assert rec.suggested_max_requests == 412 * 1024
    assert rec.lines[-1].endswith("lower MAX_REQUESTS to at most that.")


def test_recommend_no_growth() -> None:
    rec = recommend(workers(growth=-5000), 1000, None, 1024**3)
    assert rec is not None
    assert rec.suggested_max_requests is None
    assert "Workers do not grow on average (-5 B per request)" in rec.lines[-1]


def test_recommend_names_the_limit_and_the_call() -> None:
    rec = recommend(workers(growth=-5000), 0, None, 1024**3, "CELERY_MAX_TASKS_PER_CHILD", "task")
    assert rec is not None
    assert rec.lines == [
        "CELERY_MAX_TASKS_PER_CHILD is 0: workers are never recycled by task count.",
        "Workers do not grow on average (-5 B per task): no task limit is needed for memory.",
    ]


def test_recommend_over_share() -> None:
    rec = recommend(workers(), 1000, 50 * 1024**2, 1024**3)
    assert rec is not None
    assert rec.suggested_max_requests is None
    assert "already above their share of 50.0 MiB (WORKER_MAX_MEMORY 50.0 MiB)" in rec.lines[-1]


def test_build_report_rejects_unknown_sort() -> None:
    with pytest.raises(ValueError, match="sort should be"):
        build_report([], Workers(), source="database", since=NOW, until=NOW, sort="x")


def test_rss_per_call_ranking_without_heap() -> None:
    rows = [
        Row("request", "/a/", calls=10, rss_growth=100),
        Row("request", "/b/", calls=1, rss_growth=50),
    ]
    built = build_report(
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


def test_the_header_gives_the_hour_the_rows_start_at() -> None:
    built = build_report([], Workers(), source="database", since=NOW, until=NOW)
    # The rows are hourly: those of 12:00 to 12:59 are in a window since 12:30.
    assert render_table(built).splitlines()[0].endswith("since 2025-11-01 12:00 UTC.")


def test_long_keys_are_shortened_in_the_table() -> None:
    rows = [Row("request", "/" + "x" * 80 + "/", calls=200, heap_calls=200, heap_growth=1)]
    built = build_report(rows, workers(seen=1), source="database", since=NOW, until=NOW)
    table = render_table(built)
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
        with sqlite_mmap(connection):
            assert mmap_size() == max(before, SQLITE_MMAP_SIZE)
        assert mmap_size() == before
    finally:
        connection.close()


@pytest.mark.django_db
def test_sqlite_mmap_leaves_a_database_in_memory_alone() -> None:
    with sqlite_mmap(connections["default"]):
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
    with sqlite_mmap(connections["postgres"]), connections["postgres"].cursor() as cursor:
        cursor.execute("SELECT 1")
        assert cursor.fetchone() == (1,)


def test_heap_kept_scales_sampled_readings_to_all_calls() -> None:
    # The recorder read the heap on 10 of 40 calls: 10 x 64 KiB read, 40 x 64 KiB kept.
    sampled = Row(kind="request", key="/leak/", calls=40, heap_calls=10, heap_growth=10 * 65536)
    always = Row(kind="request", key="/other/", calls=40, heap_calls=40, heap_growth=40 * 1000)
    unread = Row(kind="request", key="/none/", calls=40)
    assert sampled.heap_per_call == 65536
    assert sampled.heap_kept == 40 * 65536
    assert always.heap_kept == 40 * 1000
    assert unread.heap_kept == 0
    ranked = build_report([always, sampled], Workers(), source="database", since=None, until=None)
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
MYSQL = pytest.param(
    "mysql",
    marks=[
        pytest.mark.skipif(
            not os.environ.get("LEAKGUARD_TEST_MYSQL_URL")
            and os.environ.get("LEAKGUARD_REQUIRE_SERVICES") != "1",
            reason="MySQL tests need LEAKGUARD_TEST_MYSQL_URL",
        ),
        pytest.mark.mysql,
        pytest.mark.django_db(databases=["default", "mysql"]),
    ],
)
DATABASES = pytest.mark.parametrize(
    "using", [pytest.param("default", marks=pytest.mark.django_db), POSTGRES, MYSQL]
)
SINCE = NOW - dt.timedelta(hours=24)
START = floor_hour(SINCE)


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
    rows = sorted(rows_from_database(SINCE, using=using), key=lambda r: (r.kind, r.key))
    assert rows == [
        Row("request", "/a/", **A_RANKING),
        Row("request", "/b/", calls=1),
        Row("task", "/a/", calls=3, rss_growth=3, heap_calls=3, heap_growth=3, traced_calls=3,
            traced_retained=3),
        Row("task", "t", calls=2),
    ]  # fmt: skip
    tasks = rows_from_database(SINCE, kind="task", using=using)
    assert sorted(row.key for row in tasks) == ["/a/", "t"]
    # Without the traced figures (what every --sort but retained ranks by).
    untraced = rows_from_database(SINCE, kind="request", using=using, traced=False)
    assert sorted(untraced, key=lambda r: r.key) == [
        Row("request", "/a/", **{**A_RANKING, "traced_calls": 0, "traced_retained": 0}),
        Row("request", "/b/", calls=1),
    ]


@DATABASES
@pytest.mark.parametrize(("keys_max", "traced"), [(FILL_KEYS_MAX, False), (1, True)])
def test_fill_rows_completes_the_rows_shown_only(
    using: str, keys_max: int, traced: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    # keys_max 1: more rows shown than keys listed, so the query reads the whole window.
    monkeypatch.setattr(database, "FILL_KEYS_MAX", keys_max)
    store(using)
    ranked = rows_from_database(SINCE, using=using, traced=not traced)
    rows = {(row.kind, row.key): row for row in ranked}
    shown = [rows["request", "/a/"], rows["task", "t"], rows["request", "/b/"]]
    fill_rows(shown, SINCE, using, traced=traced)
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
        fill_rows([], SINCE)


@pytest.mark.django_db
def test_fill_rows_leaves_a_key_deleted_since_the_ranking_alone() -> None:
    row = Row("request", "/gone/", calls=5)
    fill_rows([row], SINCE)
    assert row == Row("request", "/gone/", calls=5)


@pytest.mark.django_db
@pytest.mark.parametrize("kind", ["all", "task"])
@pytest.mark.parametrize("traced", [True, False])
@pytest.mark.parametrize("hours_before", [0, 2], ids=["window-filtered", "window-covers-all"])
def test_ranking_sums_read_the_ranking_index_alone_on_sqlite(
    kind: str, traced: bool, hours_before: int
) -> None:
    from django.test.utils import CaptureQueriesContext

    store("default")
    since = SINCE - dt.timedelta(hours=hours_before)
    connection = connections["default"]
    with CaptureQueriesContext(connection) as queries:
        rows = rows_from_database(since, kind, traced=traced)
    assert rows
    [ranking] = [query["sql"] for query in queries if "GROUP BY" in query["sql"]]
    assert ('"hour" >=' in ranking) is (hours_before == 0)
    with connection.cursor() as cursor:
        cursor.execute(f"EXPLAIN QUERY PLAN {ranking}")
        plan = [str(step[-1]) for step in cursor.fetchall()]
    # No step of the plan reads the table itself, nor sorts the rows.
    assert len(plan) == 1, plan
    assert "USING COVERING INDEX leakguard_growth_ranking" in plan[0]


# Control characters from clients never reach the terminal (issue 14, item 7) ----------------

HOSTILE = "/a\x1b]0;pwned\x07/\rb/\u202e/"
SHOWN = "/a\\x1b]0;pwned\\x07/\\x0db/\\u202e/"


def hostile_report() -> Report:
    rows = [Row("request", HOSTILE, calls=200, heap_calls=200, heap_growth=1, view="v\x1b[31m")]
    log = {"files": ["log\x1b.txt"], "request_lines": 1, "lines": 1, "skipped_lines": 0}
    log |= {"respawns": 0, "group_by": "pattern", "group_by_reason": "asked"}
    built = build_report(rows, workers(), source="uwsgi-log", since=None, until=None)
    built.log = log
    return built


def test_table_escapes_control_characters() -> None:
    table = render_table(hostile_report())
    assert SHOWN in table
    assert "log\\x1b.txt" in table
    assert not {"\x1b", "\x07", "\r", "\u202e"} & set(table)


def test_csv_escapes_control_characters() -> None:
    text = render_csv(hostile_report())
    assert f"{SHOWN},v\\x1b[31m," in text
    assert not {"\x1b", "\x07", "\r", "\u202e"} & set(text)


def test_json_keeps_the_key_as_recorded() -> None:
    data = json.loads(render_json(hostile_report()))
    assert data["rows"][0]["key"] == HOSTILE


def test_detail_escapes_control_characters() -> None:
    sites = (Site("shop/\x1bviews.py", 3, "x = '\x07'", 100, 1, ("a\x1b:1", "b\r:2")),)
    details = [Detail("request", HOSTILE, 10, 2, 100, sites)]
    for fmt in ("table", "csv"):
        text = render_detail(details, HOSTILE, NOW, fmt)
        assert SHOWN in text
        assert "shop/\\x1bviews.py" in text
        assert "\\x07" in text
        assert not {"\x1b", "\x07", "\r", "\u202e"} & set(text)
    untraced = [Detail("request", HOSTILE, 10, 0, 0, ())]
    assert SHOWN in render_detail(untraced, HOSTILE, NOW, "table")


def test_a_key_without_readings_ranks_after_the_keys_the_heap_ranks() -> None:
    # Under ASGI most views that keep nothing read a few KiB a call below 0; a key with no
    # reading at all (counted as 0 B) came above all of them. It has nothing to rank by: it
    # comes after every key with readings, caches that level off included, by RSS.
    rows = [
        Row("request", "/spike/", calls=30, rss_growth=30 * 1024**2),
        Row("request", "/plain/", calls=400, heap_calls=90, heap_growth=90 * -8000),
        Row("request", "/leak/", calls=100, heap_calls=30, heap_growth=30 * 2000),
        Row("request", "/quiet/", calls=5, rss_growth=0),
    ]
    built = build_report(rows, Workers(), source="database", since=NOW, until=NOW, limit=0)
    assert [row.key for row in built.rows] == ["/leak/", "/plain/", "/spike/", "/quiet/"]
    assert built.rows[2].confidence == "none"
    # Ranked by RSS, the same rows keep their RSS order.
    built = build_report(rows, Workers(), source="database", since=NOW, until=NOW, sort="rss")
    assert built.rows[0].key == "/spike/"


def test_a_key_with_few_readings_ranks_by_what_they_kept_among_the_others() -> None:
    # Where threads keep calls overlapping, few of a key's calls run alone: a leak read 4
    # times ranks by what those 4 readings kept (not scaled up to its 60 calls), among the
    # others; a key read twice keeping little ranks by that little.
    rows = [
        Row("request", "/spike/", calls=30, heap_calls=15, heap_growth=15 * 500),
        Row("request", "/leak/", calls=60, heap_calls=4, heap_growth=4 * 60_000),
        Row("request", "/rare/", calls=1000, heap_calls=2, heap_growth=2 * 1_000),
        Row("request", "/plain/", calls=1000, heap_calls=40, heap_growth=40 * 100),
    ]
    built = build_report(rows, Workers(), source="database", since=NOW, until=NOW, limit=0)
    assert [row.key for row in built.rows] == ["/leak/", "/plain/", "/spike/", "/rare/"]
    leak = built.rows[0]
    assert leak.heap_kept == 240_000  # what the readings kept, not 60 x 60,000
    assert leak.confidence == "low"
