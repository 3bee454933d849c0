# ruff: noqa: E501  (exact report output has long lines)
from __future__ import annotations

import datetime as dt
import importlib.util
import io
import json
import os
import re
import sys
from pathlib import Path
from typing import Any

import pytest
from django.core.management import CommandError, call_command
from django.test import override_settings
from django.utils import timezone

from django_leakguard import memory
from django_leakguard.models import Growth, Worker
from django_leakguard.reporting import detail, pages, uwsgi_log, uwsgi_parallel
from tests.test_uwsgi_log import mixed_log

FIXTURE = Path(__file__).parent / "fixtures" / "uwsgi-memory-report.log"
GIB = 1024**3
pytestmark = pytest.mark.django_db


@pytest.fixture(autouse=True)
def fixed_memory(monkeypatch: pytest.MonkeyPatch) -> None:
    # The host's memory differs between machines; the exact-output tests need one figure.
    monkeypatch.setattr(memory, "available_memory", lambda: 8 * GIB)


def run(*args: str) -> str:
    out = io.StringIO()
    call_command("leakreport", *args, stdout=out)
    return out.getvalue()


def fill(heap: bool = True) -> None:
    hour = timezone.now().replace(minute=0, second=0, microsecond=0)
    for offset in (0, 1):
        Growth.objects.create(
            kind="request",
            key="/leak/retain/",
            hour=hour - dt.timedelta(hours=offset),
            view="shop.views.leak_retain",
            calls=100,
            rss_growth=100 * 1024,
            rss_growth_positive=200 * 1024,
            rss_grew_calls=10,
            rss_growth_max=64 * 1024,
            heap_calls=100 if heap else 0,
            heap_growth=100 * 65536 if heap else 0,
            heap_growth_max=65536 if heap else 0,
        )
    Growth.objects.create(
        kind="request",
        key="/spike/",
        hour=hour,
        calls=50,
        rss_growth=50 * 250_000,
        rss_growth_positive=50 * 250_000,
        rss_grew_calls=25,
        rss_growth_max=20 * 1024 * 1024,
        heap_calls=50 if heap else 0,
        heap_growth=0,
    )
    Growth.objects.create(
        kind="task",
        key="shop.tasks.export",
        hour=hour,
        calls=20,
        rss_growth=-4096,
        heap_calls=20 if heap else 0,
        heap_growth=20 * 1024 if heap else 0,
    )
    Growth.objects.create(
        kind="request",
        key="/old/",
        hour=hour - dt.timedelta(days=3),
        calls=1000,
        heap_calls=1000,
        heap_growth=10**9,
        rss_growth=10**9,
    )
    now = timezone.now()
    for pid, calls in ((11, 150), (12, 120)):
        Worker.objects.create(
            host="web-1",
            pid=pid,
            started_at=now - dt.timedelta(minutes=30),
            rss_first=60 * 1024 * 1024,
            rss_last=60 * 1024 * 1024 + calls * 10 * 1024,
            calls=calls,
            last_seen=now,
        )


TABLE = """\
Ranked by memory kept (C heap and small objects; caches that level off after the others; keys with fewer than 5 readings by what those kept, not scaled up); top 3 of 3 keys, 270 calls.

#  kind     key                view                    calls  readings  heap/call  heap kept   RSS/call  share  grew
1  request  /leak/retain/      shop.views.leak_retain    200       200   64.0 KiB   12.5 MiB    1.0 KiB  99.8%   10%
2  task     shop.tasks.export  -                          20    20 low    1.0 KiB   20.0 KiB     -205 B   0.2%    0%
3  request  /spike/            -                          50        50        0 B        0 B  244.1 KiB   0.0%   50%

Workers: 2 seen (at most 2 at once on one host), 270 calls served, mean RSS growth +10.0 KiB per call.
With MAX_REQUESTS = 1,000, a worker grows about 9.8 MiB before it is recycled (from 60.0 MiB at its first request to about 69.8 MiB).
Largest max_requests that keeps a worker under its share of 4.0 GiB (8.0 GiB available / 2 workers at once): 413,286; MAX_REQUESTS is within it.
"""


def test_table() -> None:
    fill()
    output = run()
    header, _, rest = output.partition("\n\n")
    assert header.startswith("Memory growth by URL pattern and task, since ")
    assert rest == TABLE


def test_without_heap_ranks_by_rss() -> None:
    fill(heap=False)
    output = run("--limit", "2", "--min-count", "30")
    assert "The heap signal was unavailable" in output
    assert "Ranked by net RSS growth (what the OS charged); top 2 of 2 keys, 250 calls." in output
    assert output.index("/spike/") < output.index("/leak/retain/")
    assert "shop.tasks.export" not in output


def test_sorts_and_kinds() -> None:
    fill()
    per_call = json.loads(run("--sort", "per-call", "--format", "json"))
    assert per_call["ranked_by"] == "heap-per-call"
    rss = json.loads(run("--sort", "rss", "--format", "json", "--kind", "task"))
    assert [row["key"] for row in rss["rows"]] == ["shop.tasks.export"]
    week = json.loads(run("--since", "7d", "--format", "json"))
    assert week["rows"][0]["key"] == "/old/"


def test_json_schema() -> None:
    fill()
    data = json.loads(run("--format", "json"))
    assert set(data) == {
        "version",
        "source",
        "since",
        "until",
        "sort",
        "ranked_by",
        "heap_available",
        "thin",
        "notes",
        "totals",
        "rows",
        "workers",
        "recommendation",
        "log",
    }
    assert data["version"] == 1
    assert data["source"] == "database"
    assert data["log"] is None
    assert dt.datetime.fromisoformat(data["since"]) < dt.datetime.fromisoformat(data["until"])
    assert data["rows"][0] == {
        "rank": 1,
        "kind": "request",
        "key": "/leak/retain/",
        "view": "shop.views.leak_retain",
        "calls": 200,
        "heap_calls": 200,
        "heap_growth_bytes": 13107200,
        "heap_growth_per_call_bytes": 65536,
        "heap_growth_max_bytes": 65536,
        "rss_growth_bytes": 204800,
        "rss_growth_per_call_bytes": 1024,
        "rss_growth_positive_bytes": 409600,
        "rss_growth_max_bytes": 65536,
        "rss_grew_fraction": 0.1,
        "share": 0.9984,
        "traced_calls": 0,
        "retained_bytes": None,
        "retained_per_call_bytes": None,
        "confidence": "high",
        "trend": None,
        "blocks_growth": 0,
        "late_readings": 0,
        "late_heap_growth_bytes": 0,
        "late_blocks_growth": 0,
    }
    assert data["totals"] == {
        "keys": 3,
        "calls": 270,
        "heap_growth_bytes": 13127680,
        "rss_growth_bytes": 12700704,
    }
    assert data["workers"] == {
        "seen": 2,
        "at_once": 2,
        "calls": 270,
        "rss_growth_bytes": 2764800,
        "rss_growth_per_call_bytes": 10240,
        "rss_first_mean_bytes": 62914560,
    }
    assert data["recommendation"] == {
        "max_requests": 1000,
        "memory_per_worker_bytes": 4 * GIB,
        "memory_per_worker_source": "8.0 GiB available / 2 workers at once",
        "growth_before_recycle_bytes": 10240000,
        "peak_rss_bytes": 73154560,
        "suggested_max_requests": 413286,
    }


def test_csv() -> None:
    fill()
    lines = run("--format", "csv").splitlines()
    assert lines[0] == (
        "rank,kind,key,view,calls,heap_calls,heap_growth_bytes,heap_growth_per_call_bytes,"
        "heap_growth_max_bytes,rss_growth_bytes,rss_growth_per_call_bytes,"
        "rss_growth_positive_bytes,rss_growth_max_bytes,rss_grew_fraction,share,"
        "traced_calls,retained_bytes,retained_per_call_bytes,confidence,trend,blocks_growth,"
        "late_readings,late_heap_growth_bytes,late_blocks_growth"
    )
    assert lines[1] == (
        "1,request,/leak/retain/,shop.views.leak_retain,200,200,13107200,65536,65536,"
        "204800,1024,409600,65536,0.1,0.9984,0,,,high,,0,0,0,0"
    )
    assert len(lines) == 4


def test_empty_database_for_tasks_names_celery_not_the_middleware(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    output = run("--kind", "task")
    assert output.startswith("No task recorded since ")
    assert "django_leakguard.celery.configure(app)" in output
    assert "Middleware" not in output
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *args: None if name == "celery" else real_find_spec(name, *args),
    )
    output = run("--kind", "task")
    assert "Celery is not installed here" in output
    assert "Middleware" not in output


@override_settings(LEAKGUARD={"CELERY_MAX_TASKS_PER_CHILD": 5000, "MAX_REQUESTS": 7})
def test_task_report_recommends_the_celery_task_limit() -> None:
    fill()
    for pid in (21, 22):
        Worker.objects.create(
            host="worker-1",
            pid=pid,
            kind="task",
            started_at=timezone.now() - dt.timedelta(minutes=30),
            rss_first=60 * 1024 * 1024,
            rss_last=60 * 1024 * 1024 + 200 * 100 * 1024,
            calls=200,
            last_seen=timezone.now(),
        )
    Growth.objects.filter(kind="task").update(calls=100)
    output = run("--kind", "task")
    assert "With CELERY_MAX_TASKS_PER_CHILD = 5,000, a worker grows about" in output
    assert "at its first task" in output
    assert "Largest CELERY_MAX_TASKS_PER_CHILD that keeps a worker under its share" in output
    assert "MAX_REQUESTS" not in output.replace("CELERY_MAX_TASKS_PER_CHILD", "")
    data = json.loads(run("--kind", "task", "--format", "json"))
    assert data["recommendation"]["max_requests"] == 5000


def test_empty_database() -> None:
    output = run()
    assert output.startswith("No memory growth recorded since ")
    assert "LeakGuardMiddleware" in output
    data = json.loads(run("--format", "json"))
    assert data["rows"] == []
    assert data["thin"] is True


def test_thin_data() -> None:
    hour = timezone.now().replace(minute=0, second=0, microsecond=0)
    Growth.objects.create(kind="request", key="/a/", hour=hour, calls=12, heap_calls=12)
    output = run()
    assert "Only 12 calls in 1 keys: too few to rank (at least 100 needed)." in output
    assert "Workers: none recorded in this window." in output


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--since", "yesterday"), "--since should be a duration"),
        (("--since", "2999-01-01"), "is in the future"),
        (("--limit", "-1"), "expected 0 or more"),
        (("--limit", "ten"), "expected a whole number"),
        (("--sort", "size"), "invalid choice"),
        (("--uwsgi-log", "/nonexistent.log"), "Cannot read the uWSGI log: "),
        (("--uwsgi-log", str(FIXTURE), "--kind", "task"), "--kind task does not apply"),
        (("--uwsgi-log", str(FIXTURE), "--jobs", "0"), "argument --jobs: expected auto or a"),
        (("--uwsgi-log", str(FIXTURE), "--jobs", "all"), "argument --jobs: expected auto or a"),
    ],
)
def test_errors(args: tuple[str, ...], message: str) -> None:
    with pytest.raises(CommandError, match=message):
        run(*args)


def test_bad_gzip(tmp_path: Path) -> None:
    broken = tmp_path / "log.gz"
    broken.write_bytes(b"\x1f\x8b\x08\x00garbage")
    with pytest.raises(CommandError, match="Cannot read the uWSGI log"):
        run("--uwsgi-log", str(broken))


@pytest.mark.django_db(transaction=True)
def test_missing_tables() -> None:
    from django.db import connection

    with connection.schema_editor() as editor:
        editor.delete_model(Growth)
    try:
        with pytest.raises(
            CommandError, match=re.escape("Run `python manage.py migrate django_leakguard`.")
        ):
            run()
    finally:
        with connection.schema_editor() as editor:
            editor.create_model(Growth)


LOG_TABLE = """\
Memory growth by URL from uWSGI memory-report logs ({fixture}).
uWSGI logs carry RSS only: no heap signal, so this names the requests that grew the process, which are not always the ones that keep memory.
Parsed 13 request lines in 23 lines; skipped 10 lines that are not memory-report request lines; 1 respawned workers reused a pid. Grouped by urlconf (92% of the first 13 paths resolved against the URLconf).
The heap signal was unavailable (no heap readings: glibc's mallinfo2 is missing, or the source is a uWSGI log), so rows are ranked by RSS growth.

Only 10 calls in 5 keys: too few to rank (at least 100 needed). Let the app serve more traffic, or widen --since.

Workers: 3 seen (at most 2 at once on one host), 10 calls served, mean RSS growth +122.4 KiB per call.
Too few requests (10; at least 100 needed) to recommend a recycling limit.
"""


def test_uwsgi_log_table() -> None:
    assert run("--uwsgi-log", str(FIXTURE)) == LOG_TABLE.format(fixture=FIXTURE)


def test_uwsgi_log_json_and_stdin(monkeypatch: pytest.MonkeyPatch) -> None:
    stdin = io.TextIOWrapper(io.BufferedReader(io.BytesIO(FIXTURE.read_bytes())))  # type: ignore[arg-type]
    monkeypatch.setattr(sys, "stdin", stdin)
    data = json.loads(run("--uwsgi-log", "-", "--format", "json", "--group-by", "pattern"))
    assert data["source"] == "uwsgi-log"
    assert data["since"] is None
    assert data["heap_available"] is False
    assert data["ranked_by"] == "rss"
    assert [row["key"] for row in data["rows"]] == [
        "/leak/retain/",
        "/leak/cache/<uuid>/",
        "/products/<int>/",
        "/nowhere/<int>/",
        "/spike/",
    ]
    assert data["rows"][0]["heap_growth_bytes"] is None
    assert data["rows"][0]["rss_growth_bytes"] == 917504
    log = data["log"]
    assert log["files"] == ["-"]
    assert (log["lines"], log["request_lines"], log["skipped_lines"], log["respawns"]) == (
        23,
        13,
        10,
        1,
    )
    assert log["group_by"] == "pattern"


def test_uwsgi_log_jobs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    log = tmp_path / "uwsgi.log"
    mixed_log(log, 2000)
    monkeypatch.setattr(uwsgi_parallel, "PARALLEL_MIN_SIZE", 100_000)
    monkeypatch.setattr(uwsgi_parallel, "RANGE_SIZE", 20_000)
    monkeypatch.setattr(uwsgi_log, "CHUNK_SIZE", 1 << 14)
    split: list[int] = []
    feed_split = uwsgi_parallel.feed_split

    def spy(*args: Any) -> None:
        split.append(args[3].jobs)
        feed_split(*args)

    monkeypatch.setattr(uwsgi_parallel, "feed_split", spy)
    for fmt in ("table", "json"):
        serial = run("--uwsgi-log", str(log), "--format", fmt, "--jobs", "1")
        assert split == []
        assert run("--uwsgi-log", str(log), "--format", fmt, "--jobs", "2") == serial
        assert split.pop() == 2
        # auto: the CPUs this process may use (at least 2 for a pool, else no split).
        assert run("--uwsgi-log", str(log), "--format", fmt) == serial
        assert split == (
            [uwsgi_parallel.default_jobs()] if uwsgi_parallel.default_jobs() > 1 else []
        )
        split.clear()


def killed(*args: object) -> None:
    """A worker process that dies (say, killed by the OOM killer)."""
    os._exit(1)


def test_uwsgi_log_worker_killed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    log = tmp_path / "uwsgi.log"
    mixed_log(log, 2000)
    monkeypatch.setattr(uwsgi_parallel, "PARALLEL_MIN_SIZE", 0)
    monkeypatch.setattr(uwsgi_log, "CHUNK_SIZE", 1 << 14)
    monkeypatch.setattr(uwsgi_parallel, "_parse_range", killed)
    with pytest.raises(CommandError, match=r"ended abruptly .*Run again with --jobs 1"):
        run("--uwsgi-log", str(log), "--jobs", "2")


@override_settings(LEAKGUARD={"WORKER_MAX_MEMORY": "64MiB", "MAX_REQUESTS": 0})
def test_recommendation_with_worker_max_memory() -> None:
    fill()
    data = json.loads(run("--format", "json"))
    assert data["recommendation"]["memory_per_worker_source"] == "WORKER_MAX_MEMORY 64.0 MiB"
    assert data["recommendation"]["suggested_max_requests"] == 409
    output = run()
    assert "MAX_REQUESTS is 0: workers are never recycled by request count." in output
    assert "409; set MAX_REQUESTS to at most that." in output


def test_reset(monkeypatch: pytest.MonkeyPatch) -> None:
    fill()
    monkeypatch.setattr("builtins.input", lambda prompt: "no")
    with pytest.raises(CommandError, match="Reset cancelled"):
        run("--reset")
    assert Growth.objects.count() == 5
    monkeypatch.setattr("builtins.input", lambda prompt: "yes")
    assert run("--reset") == "Deleted 5 growth rows and 2 worker rows.\n"
    fill()
    assert run("--reset", "--no-input") == "Deleted 5 growth rows and 2 worker rows.\n"
    assert not Worker.objects.exists()


def test_prune() -> None:
    fill()
    Growth.objects.filter(key="/old/").update(hour=timezone.now() - dt.timedelta(days=20))
    assert run("--prune") == "Deleted 1 rows older than 14 days.\n"
    assert Growth.objects.count() == 4


# Traced keys: the retained column, --sort retained, --detail (issue 8) ----------------------


def site(
    lineno: int, size: int, line: str = "", frames: tuple[str, ...] = ()
) -> dict[str, object]:
    return {
        "filename": "shop/views.py",
        "lineno": lineno,
        "line": line,
        "size": size,
        "count": 2,
        "frames": list(frames),
    }


def fill_traced() -> None:
    """/leak/retain/ traced twice an hour; /spike/ and the task untraced."""
    fill()
    hour = timezone.now().replace(minute=0, second=0, microsecond=0)
    retain = site(
        38,
        2 * 65536,
        "_retained.append(os.urandom(RETAIN_BYTES))",
        ("shop/views.py:38", "django/core/handlers/base.py:197", "a.py:1", "b.py:2", "c.py:3"),
    )
    for offset, other in ((0, site(39, 1000, "return HttpResponse()")), (1, site(40, 10))):
        Growth.objects.filter(key="/leak/retain/", hour=hour - dt.timedelta(hours=offset)).update(
            traced_calls=2, traced_retained=2 * 65536 + other["size"], traced_sites=[retain, other]
        )
    Growth.objects.create(
        kind="request",
        key="/leak/small/",
        hour=hour,
        calls=10,
        heap_calls=10,
        heap_growth=10 * 3500,
        traced_calls=1,
        traced_retained=80_000,
        traced_sites=[site(59, 80_000, "_small.append(...)"), {"not": "a site"}],
    )


def test_retained_column_and_json_fields() -> None:
    fill_traced()
    output = run()
    header = next(line for line in output.splitlines() if line.startswith("#"))
    assert header.endswith("retained/call (traced)")
    retain = next(line for line in output.splitlines() if "/leak/retain/" in line)
    assert retain.endswith("64.2 KiB")  # (4 x 64 KiB + 1,010 B) / 4
    assert next(line for line in output.splitlines() if "/spike/" in line).endswith("n/a")
    rows = {row["key"]: row for row in json.loads(run("--format", "json"))["rows"]}
    assert rows["/leak/retain/"]["traced_calls"] == 4
    assert rows["/leak/retain/"]["retained_bytes"] == 4 * 65536 + 1010
    assert rows["/leak/retain/"]["retained_per_call_bytes"] == round((4 * 65536 + 1010) / 4)
    assert (rows["/spike/"]["retained_bytes"], rows["/spike/"]["retained_per_call_bytes"]) == (
        None,
        None,
    )


def test_untraced_reports_have_no_retained_column() -> None:
    fill()
    assert "retained" not in run()


def test_sort_retained_ranks_traced_keys_by_estimated_memory_kept() -> None:
    fill_traced()
    data = json.loads(run("--sort", "retained", "--format", "json"))
    assert data["ranked_by"] == "retained"
    keys = [row["key"] for row in data["rows"]]
    # 200 calls x 64.2 KiB, then 10 calls x 80,000 B; untraced keys last.
    assert keys[:2] == ["/leak/retain/", "/leak/small/"]
    assert data["rows"][0]["share"] == round(200 * 65788.5 / (200 * 65788.5 + 10 * 80000), 4)
    assert data["notes"] == []
    assert "Ranked by memory retained per traced call times calls" in run("--sort", "retained")


def test_sort_retained_without_traces_says_so() -> None:
    fill()
    data = json.loads(run("--sort", "retained", "--format", "json"))
    assert data["notes"][0].startswith("No call was traced in this window")


def test_detail_prints_the_top_sites() -> None:
    fill_traced()
    output = run("--detail", "/leak/retain/")
    lines = output.splitlines()
    assert lines[0].startswith("Allocation sites of request /leak/retain/ since ")
    assert lines[0].endswith(": 4 traced of 200 calls, 64.2 KiB retained per traced call.")
    assert lines[2:7] == [
        " 1. shop/views.py:38  64.0 KiB per traced call (256.0 KiB in all; 4 blocks)",
        "      _retained.append(os.urandom(RETAIN_BYTES))",
        "      from django/core/handlers/base.py:197",
        "      from a.py:1",
        "      from b.py:2",
    ]
    assert lines[7:] == [
        " 2. shop/views.py:39  250 B per traced call (1000 B in all; 2 blocks)",
        "      return HttpResponse()",
        " 3. shop/views.py:40  2 B per traced call (10 B in all; 2 blocks)",
    ]


def test_detail_takes_a_url_name_or_a_view_as_well_as_a_key() -> None:
    fill_traced()
    by_key = run("--detail", "/leak/retain/")
    assert run("--detail", "shop:leak-retain") == by_key
    assert run("--detail", "shop.views.leak_retain") == by_key
    data = json.loads(run("--detail", "shop:leak-retain", "--format", "json"))
    assert (data["key"], data["details"][0]["key"]) == ("shop:leak-retain", "/leak/retain/")
    with pytest.raises(CommandError, match="a URL name \\(shop:product\\)"):
        run("--detail", "shop:no-such-name")


def test_table_shows_each_key_s_view() -> None:
    fill_traced()
    Growth.objects.filter(key="/spike/").update(view="project.apps." + "x" * 40 + ".views.spike")
    lines = run().splitlines()
    header = next(line for line in lines if line.startswith("#"))
    assert header.split()[:5] == ["#", "kind", "key", "view", "calls"]
    assert "shop.views.leak_retain" in next(line for line in lines if "/leak/retain/" in line)
    assert "  …" + ("x" * 27) + ".views.spike  " in next(
        line for line in lines if "/spike/" in line
    )


def test_detail_json_and_csv() -> None:
    fill_traced()
    data = json.loads(run("--detail", "/leak/small/", "--format", "json"))
    assert data["version"] == 1
    assert data["key"] == "/leak/small/"
    [detail] = data["details"]
    assert detail == {
        "kind": "request",
        "key": "/leak/small/",
        "calls": 10,
        "traced_calls": 1,
        "retained_bytes": 80000,
        "retained_per_call_bytes": 80000,
        "sites": [
            {
                "filename": "shop/views.py",
                "lineno": 59,
                "line": "_small.append(...)",
                "size_bytes": 80000,
                "per_call_bytes": 80000,
                "count": 2,
                "frames": [],
            }
        ],
    }
    lines = run("--detail", "/leak/retain/", "--format", "csv").splitlines()
    assert lines[0] == "rank,kind,key,filename,lineno,line,size_bytes,per_call_bytes,count"
    assert lines[1] == (
        "1,request,/leak/retain/,shop/views.py,38,_retained.append(os.urandom(RETAIN_BYTES)),"
        "262144,65536,4"
    )
    assert len(lines) == 4


def test_detail_of_an_untraced_key() -> None:
    fill_traced()
    output = run("--detail", "/spike/")
    assert "No traced call of request /spike/ since " in output
    assert "TRACE_SAMPLE_RATE" in output
    data = json.loads(run("--detail", "/spike/", "--format", "json"))
    assert data["details"][0]["retained_bytes"] is None
    assert data["details"][0]["retained_per_call_bytes"] is None
    assert data["details"][0]["sites"] == []


def test_detail_of_a_key_recorded_as_request_and_task() -> None:
    fill_traced()
    hour = timezone.now().replace(minute=0, second=0, microsecond=0)
    Growth.objects.create(kind="task", key="/leak/small/", hour=hour, calls=3)
    output = run("--detail", "/leak/small/")
    assert "Allocation sites of request /leak/small/" in output
    assert "\n\nNo traced call of task /leak/small/" in output
    only = json.loads(run("--detail", "/leak/small/", "--kind", "task", "--format", "json"))
    assert [detail["kind"] for detail in only["details"]] == ["task"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--detail", "/nothing/"), "Nothing recorded for '/nothing/' since "),
        (("--detail", "/a/", "--uwsgi-log", str(FIXTURE)), "uWSGI logs have none"),
        (("--detail", "/a/", "--since", "soon"), "--since should be a duration"),
    ],
)
def test_detail_errors(args: tuple[str, ...], message: str) -> None:
    with pytest.raises(CommandError, match=message):
        run(*args)


@pytest.mark.django_db(transaction=True)
def test_detail_without_tables(monkeypatch: pytest.MonkeyPatch) -> None:
    from django.db import DatabaseError

    def missing(*args: object) -> None:
        raise DatabaseError("no such table: django_leakguard_growth")

    # Dropping the tables would disturb the other tests' database; the query is made to fail.
    monkeypatch.setattr(detail, "details_from_database", missing)
    with pytest.raises(CommandError, match=r"Run `python manage\.py migrate django_leakguard`\."):
        run("--detail", "/a/")


# Input robustness (issue 14, items 7 and 8) --------------------------------------------------


def test_uwsgi_log_paths_never_print_control_characters(tmp_path: Path) -> None:
    from tests.test_uwsgi_log import line

    log = tmp_path / "uwsgi.log"
    hostile = "/x%1b]title;pwned%07/%0d/"
    log.write_bytes(b"".join(line(1, req, 1000 * req, hostile) for req in range(1, 202)))
    for fmt in ("table", "csv"):
        output = run("--uwsgi-log", str(log), "--group-by", "pattern", "--format", fmt)
        assert "/x\\x1b]title;pwned\\x07/\\x0d/" in output
        assert not {"\x1b", "\x07", "\r"} & set(output)


def test_uwsgi_log_from_a_pipe() -> None:
    from tests.test_uwsgi_log import pipe_of

    with pipe_of(FIXTURE.read_bytes()) as name:
        output = run("--uwsgi-log", name, "--format", "json", "--jobs", "2")
    assert json.loads(output)["rows"][0]["key"] == "/leak/retain/"


def test_reset_without_a_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    fill()
    monkeypatch.setattr(sys, "stdin", io.StringIO(""))
    with pytest.raises(CommandError, match=r"no terminal to answer on .* Pass --no-input"):
        run("--reset")
    assert Growth.objects.count() == 5


@pytest.mark.parametrize(
    ("leakguard", "message"),
    [
        ({"DATABASE": "stats"}, "DATABASE should be the alias of a database in DATABASES"),
        ({"FLUSH_INTERVAL": 10**400}, "FLUSH_INTERVAL should be a positive number"),
        (
            {"WORKER_MAX_MEMORY": "1" + "0" * 400 + "MB", "MAX_REQUEST": 1},
            r"WORKER_MAX_MEMORY is invalid: .* \(1 more: run manage.py check\)$",
        ),
    ],
)
def test_invalid_settings_are_one_line_errors(leakguard: dict[str, object], message: str) -> None:
    with (
        override_settings(LEAKGUARD=leakguard),
        pytest.raises(CommandError, match=message) as info,
    ):
        run("--reset", "--no-input")
    assert "\n" not in str(info.value)


def test_missing_tables_in_another_database(monkeypatch: pytest.MonkeyPatch) -> None:
    from django.db import DatabaseError

    from tests.test_checks import stats_alias

    def missing(*args: object, **kwargs: object) -> None:
        raise DatabaseError("no such table: django_leakguard_growth")

    stats_alias(monkeypatch)
    monkeypatch.setattr(pages, "rows_from_database", missing)
    with override_settings(LEAKGUARD={"DATABASE": "stats"}), pytest.raises(CommandError) as info:
        run()
    assert str(info.value).endswith(
        "Run `python manage.py migrate django_leakguard --database stats`."
    )


# --format html and --output


def test_html_to_a_file(tmp_path: Path) -> None:
    fill()
    target = tmp_path / "report.html"
    out, err = io.StringIO(), io.StringIO()
    call_command(
        "leakreport",
        "--format",
        "html",
        "-o",
        str(target),
        "--since",
        "3h",
        stdout=out,
        stderr=err,
    )
    assert out.getvalue() == ""
    assert err.getvalue() == f"Wrote {target}\n"
    text = target.read_text()
    assert text.startswith("<!DOCTYPE html>")
    assert 'data-key="/leak/retain/"' in text


def test_html_to_standard_output() -> None:
    fill()
    assert run("--format", "html").startswith("<!DOCTYPE html>")


def test_output_of_other_formats(tmp_path: Path) -> None:
    fill()
    target = tmp_path / "report.json"
    call_command("leakreport", "--format", "json", "--output", str(target), stderr=io.StringIO())
    assert json.loads(target.read_text())["rows"][0]["key"] == "/leak/retain/"


def test_output_to_an_unwritable_place(tmp_path: Path) -> None:
    fill()
    with pytest.raises(CommandError, match=r"^Cannot write .*missing/report\.html: "):
        run("--format", "html", "-o", str(tmp_path / "missing" / "report.html"))


def test_html_from_a_uwsgi_log_is_an_error() -> None:
    with pytest.raises(CommandError, match="--format html draws the hourly rows stored"):
        run("--uwsgi-log", str(FIXTURE), "--format", "html")
