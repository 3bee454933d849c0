from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from django.db import connections, transaction
from django.test import override_settings
from django.utils import timezone as dj_timezone

from django_leakguard import storage
from django_leakguard.models import Growth, Worker
from django_leakguard.recorder import Aggregate, Batch, WorkerState

ROOT = Path(__file__).resolve().parent.parent
# The "postgres" alias exists only with the URL; without it the postgres_url fixture skips
# (or fails when services are required), but pytest-django would error first.
needs_postgres_alias = pytest.mark.skipif(
    not os.environ.get("LEAKGUARD_TEST_POSTGRES_URL")
    and os.environ.get("LEAKGUARD_REQUIRE_SERVICES") != "1",
    reason="PostgreSQL tests need LEAKGUARD_TEST_POSTGRES_URL",
)
HOUR = 1_800_000_000 // 3600


def aggregate(
    calls: int, rss: int, heap: int | None = None, view: str = "tests.view"
) -> Aggregate:
    result = Aggregate(view)
    for _ in range(calls):
        result.add(rss, heap)
    return result


def batch(
    pending: dict[int, dict[tuple[str, str], Aggregate]], calls: int = 0, pid: int = 4242
) -> Batch:
    worker = WorkerState(
        host="test-host",
        pid=pid,
        started_at=datetime(2027, 1, 1, tzinfo=timezone.utc),
        kind="request",
        rss_first=100,
        heap_first=10,
        rss_last=200,
        heap_last=20,
        calls=calls,
    )
    return Batch(pending=pending, worker=worker)


def row(key: str = "/a/") -> Growth:
    return Growth.objects.get(kind="request", key=key)


@pytest.fixture(params=["upsert", "portable"])
def backend_path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Run a test through INSERT ... ON CONFLICT and through the portable fallback."""
    if request.param == "portable":
        # The fallback serves backends without ON CONFLICT (MySQL, Oracle...), absent here:
        # SQLite is made to take it.
        monkeypatch.setattr(storage, "UPSERT_MAX", {})
    return str(request.param)


@pytest.mark.django_db(transaction=True)
def test_write_adds_to_existing_rows(backend_path: str) -> None:
    storage.write(batch({HOUR: {("request", "/a/"): aggregate(2, 100, 50)}}, calls=2))
    storage.write(batch({HOUR: {("request", "/a/"): aggregate(3, -10, 70)}}, calls=3))
    got = row()
    assert got.hour == datetime.fromtimestamp(HOUR * 3600, tz=timezone.utc)
    assert (got.calls, got.rss_growth, got.rss_growth_positive, got.rss_grew_calls) == (
        5,
        170,
        200,
        2,
    )
    assert (got.rss_growth_max, got.heap_calls, got.heap_growth, got.heap_growth_max) == (
        100,
        5,
        310,
        70,
    )
    worker = Worker.objects.get()
    assert (worker.calls, worker.rss_first, worker.rss_last, worker.heap_last) == (5, 100, 200, 20)


@pytest.mark.django_db(transaction=True)
def test_heap_maximum_ignores_batches_without_heap_readings(backend_path: str) -> None:
    storage.write(batch({HOUR: {("request", "/a/"): aggregate(1, 5, None)}}))
    assert (row().heap_calls, row().heap_growth_max) == (0, 0)
    storage.write(batch({HOUR: {("request", "/a/"): aggregate(1, 5, -30)}}))
    assert row().heap_growth_max == -30  # the first real reading, not the placeholder 0
    storage.write(batch({HOUR: {("request", "/a/"): aggregate(1, 5, None)}}))
    storage.write(batch({HOUR: {("request", "/a/"): aggregate(1, 5, -40)}}))
    assert (row().heap_calls, row().heap_growth_max) == (2, -30)


@pytest.mark.django_db(transaction=True)
def test_many_keys_and_hours_in_chunks() -> None:
    pending = {
        hour: {("request", f"/k/{i}/"): aggregate(1, i) for i in range(300)}
        for hour in (HOUR, HOUR + 1)
    }
    pending[HOUR][("task", "shop.tasks.x")] = aggregate(4, 1)
    storage.write(batch(pending))
    assert Growth.objects.count() == 601
    assert Growth.objects.get(kind="task").calls == 4
    assert Worker.objects.count() == 0  # no calls: no worker row


@pytest.mark.django_db(transaction=True)
def test_portable_insert_race_adds_to_the_row_another_process_created(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The race (another process inserts between our UPDATE and INSERT) is simulated by
    # making the first UPDATE miss a row that exists.
    monkeypatch.setattr(storage, "UPSERT_MAX", {})
    storage.write(batch({HOUR: {("request", "/a/"): aggregate(1, 10)}}))
    real = storage._update_growth
    misses = [True]

    def update_missing_once(using: str, values: dict[str, Any]) -> bool:
        if misses.pop() if misses else False:
            return False
        return real(using, values)

    monkeypatch.setattr(storage, "_update_growth", update_missing_once)
    storage.write(batch({HOUR: {("request", "/a/"): aggregate(2, 10)}}))
    assert row().calls == 3


@pytest.mark.django_db(transaction=True)
def test_write_is_one_transaction() -> None:
    Worker.objects.create(
        host="x",
        pid=1,
        started_at=dj_timezone.now(),
        rss_first=1,
        rss_last=1,
        last_seen=dj_timezone.now(),
    )
    # The growth rows are written first; a worker row that fails must undo them, or a retry
    # would count them twice.
    broken = batch({HOUR: {("request", "/a/"): aggregate(1, 10)}}, calls=1)
    broken.worker.pid = "not a number"  # type: ignore[assignment]
    with pytest.raises(ValueError, match="not a number"):
        storage.write(broken)
    assert not Growth.objects.exists()


def test_to_datetime_follows_use_tz() -> None:
    aware = datetime(2027, 1, 1, 12, tzinfo=timezone.utc)
    assert storage.to_datetime(aware) is aware
    with override_settings(USE_TZ=False, TIME_ZONE="Europe/Paris"):
        assert storage.to_datetime(aware) == datetime(2027, 1, 1, 13)


@pytest.mark.django_db(transaction=True)
def test_write_with_use_tz_false() -> None:
    with override_settings(USE_TZ=False):
        storage.write(batch({HOUR: {("request", "/a/"): aggregate(1, 10)}}, calls=1))
        assert row().hour == datetime(2027, 1, 15, 8)  # 1_800_000_000 s, UTC, naive
        assert Worker.objects.get().started_at == datetime(2027, 1, 1)


@pytest.mark.django_db(transaction=True)
def test_prune_deletes_old_rows() -> None:
    now = dj_timezone.now()
    for days in (1, 13, 15, 40):
        Growth.objects.create(kind="request", key=f"/{days}/", hour=now - timedelta(days=days))
        Worker.objects.create(
            host="h",
            pid=days,
            started_at=now - timedelta(days=days),
            rss_first=1,
            rss_last=1,
            last_seen=now - timedelta(days=days),
        )
    assert storage.prune() == 4
    assert sorted(Growth.objects.values_list("key", flat=True)) == ["/1/", "/13/"]
    assert storage.prune(retention_days=1) == 4
    assert storage.prune() == 0


@pytest.mark.django_db(transaction=True)
def test_in_transaction_and_discard_broken_connection() -> None:
    assert storage.in_transaction() is False
    with transaction.atomic():
        assert storage.in_transaction() is True
        storage.discard_broken_connection()  # never closes a connection inside a transaction
        assert connections["default"].connection is not None
    storage.discard_broken_connection()


@needs_postgres_alias
@pytest.mark.postgres
@pytest.mark.django_db(transaction=True, databases=["default", "postgres"])
def test_postgres_upsert(postgres_url: str) -> None:
    with override_settings(LEAKGUARD={"DATABASE": "postgres"}):
        storage.write(batch({HOUR: {("request", "/a/"): aggregate(2, 100, 50)}}, calls=2))
        storage.write(batch({HOUR: {("request", "/a/"): aggregate(3, -10, 70)}}, calls=3))
        got = Growth.objects.using("postgres").get()
        assert (got.calls, got.rss_growth, got.rss_growth_max, got.heap_growth_max) == (
            5,
            170,
            100,
            70,
        )
        assert Worker.objects.using("postgres").get().calls == 5
        assert storage.prune(retention_days=100_000) == 0
    assert not Growth.objects.using("default").exists()


# Concurrent processes ---------------------------------------------------------------------

# What every child process starts with: Django on the database and LEAKGUARD it is given.
SETUP = r"""
import json, os, sys
config = json.loads(sys.argv[1])
import django
from django.conf import settings
settings.configure(
    DATABASES={"default": config["db"]},
    INSTALLED_APPS=["django_leakguard"],
    USE_TZ=True,
    LEAKGUARD={"FLUSH_INTERVAL": 3600, **config.get("leakguard", {})},
)
django.setup()
"""

SCRIPT = (
    SETUP
    + r"""
if config.get("mode") == "migrate":
    from django.core.management import call_command
    call_command("migrate", verbosity=0)
    sys.exit(0)
from django_leakguard.recorder import get_recorder
recorder = get_recorder()
for flush in range(config["flushes"]):
    for i in range(config["calls"]):
        recorder.end(recorder.begin(), "request", "/shared/" if i % 2 else "/other/")
    while not recorder.flush():  # a busy SQLite file: the aggregates are kept, try again
        pass
print("done")
"""
)


def run_children(db: dict[str, Any], processes: int, script: str, work: dict[str, Any]) -> None:
    """Migrate db, then run script with work in processes children at once; all must succeed."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "testproject")])}
    migrate = json.dumps({"db": db, "mode": "migrate"})
    subprocess.run([sys.executable, "-c", SCRIPT, migrate], check=True, env=env, timeout=60)
    payload = json.dumps({"db": db, **work})
    children = [
        subprocess.Popen(
            [sys.executable, "-c", script, payload], env=env, stdout=subprocess.PIPE, text=True
        )
        for _ in range(processes)
    ]
    try:
        for child in children:
            out, _ = child.communicate(timeout=60)
            assert child.returncode == 0
            assert out.strip() == "done"
    finally:
        for child in children:
            if child.poll() is None:  # pragma: no cover - only when a child hangs
                child.kill()
                child.wait()


def run_processes(db: dict[str, Any], processes: int, calls: int, flushes: int) -> None:
    work = {"mode": "work", "calls": calls, "flushes": flushes, "leakguard": {"MAX_KEYS": 10}}
    run_children(db, processes, SCRIPT, work)


def check_totals(
    rows: list[tuple[str, int]], workers: int, processes: int, calls: int, flushes: int
) -> None:
    per_key: dict[str, int] = {}
    for key, count in rows:
        per_key[key] = per_key.get(key, 0) + count  # rows of two hours if the hour turned
    assert per_key == {
        "/shared/": processes * flushes * calls // 2,
        "/other/": processes * flushes * calls // 2,
    }
    assert workers == processes * flushes * calls


@pytest.mark.servers
def test_concurrent_flushes_on_a_sqlite_file(tmp_path: Path) -> None:
    import sqlite3

    path = tmp_path / "db.sqlite3"
    db = {"ENGINE": "django.db.backends.sqlite3", "NAME": str(path), "OPTIONS": {"timeout": 30}}
    run_processes(db, processes=4, calls=400, flushes=10)
    with sqlite3.connect(path) as conn:
        rows = conn.execute("SELECT key, calls FROM django_leakguard_growth").fetchall()
        [(workers,)] = conn.execute("SELECT SUM(calls) FROM django_leakguard_worker").fetchall()
        [(count,)] = conn.execute("SELECT COUNT(*) FROM django_leakguard_worker").fetchall()
    check_totals(rows, workers, 4, 400, 10)
    assert count == 4


@pytest.fixture
def postgres_database(postgres_url: str) -> Iterator[dict[str, Any]]:
    """A PostgreSQL database of this test's own, so that other test runs cannot collide."""
    import psycopg
    from testproject.dburl import database_from_url

    db = database_from_url(postgres_url)
    name = f"leakguard_concurrency_{uuid.uuid4().hex[:12]}"
    admin = {
        "host": db["HOST"],
        "port": db["PORT"] or 5432,
        "user": db["USER"],
        "dbname": "postgres",
    }
    if db["PASSWORD"]:  # pragma: no cover - the CI server trusts local connections
        admin["password"] = db["PASSWORD"]
    with psycopg.connect(**admin, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield {**db, "NAME": name}
    finally:
        with psycopg.connect(**admin, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.mark.servers
@pytest.mark.postgres
def test_concurrent_flushes_on_postgres(postgres_database: dict[str, Any]) -> None:
    import psycopg

    run_processes(postgres_database, processes=4, calls=400, flushes=10)
    db = postgres_database
    with psycopg.connect(
        host=db["HOST"],
        port=db["PORT"] or 5432,
        user=db["USER"],
        dbname=db["NAME"],
        password=db["PASSWORD"] or None,
    ) as conn:
        rows = conn.execute("SELECT key, calls FROM django_leakguard_growth").fetchall()
        [(workers,)] = conn.execute("SELECT SUM(calls) FROM django_leakguard_worker").fetchall()
    check_totals(rows, int(workers), 4, 400, 10)


# Traced allocation sites (issue 8) --------------------------------------------------------


def traced_aggregate(calls: int, sites: dict[str, int], retained: int | None = None) -> Aggregate:
    """An aggregate of calls traced calls, each keeping size bytes at each "file:line"."""
    from django_leakguard.tracing import Site, TraceResult

    result = aggregate(calls, 0)
    for _ in range(calls):
        found = tuple(
            Site(location.split(":")[0], int(location.split(":")[1]), "x = []", size, 1)
            for location, size in sites.items()
        )
        total = sum(sites.values()) if retained is None else retained
        result.add_trace(TraceResult(total, len(found), found), 10)
    return result


def stored(row: Growth) -> dict[str, int]:
    return {f"{site['filename']}:{site['lineno']}": site["size"] for site in row.traced_sites}


@pytest.mark.django_db(transaction=True)
def test_traced_calls_add_up_and_sites_merge(backend_path: str) -> None:
    storage.write(batch({HOUR: {("request", "/a/"): traced_aggregate(2, {"v.py:1": 100})}}))
    storage.write(batch({HOUR: {("request", "/a/"): aggregate(3, 0)}}))  # untraced calls
    storage.write(
        batch({HOUR: {("request", "/a/"): traced_aggregate(1, {"v.py:1": 50, "v.py:2": 70})}})
    )
    got = row()
    assert (got.calls, got.traced_calls, got.traced_retained) == (6, 3, 320)
    assert stored(got) == {"v.py:1": 250, "v.py:2": 70}
    assert [site["lineno"] for site in got.traced_sites] == [1, 2]  # largest first


@pytest.mark.django_db(transaction=True)
def test_untraced_rows_have_no_sites(backend_path: str) -> None:
    storage.write(batch({HOUR: {("request", "/a/"): aggregate(2, 10)}}))
    got = row()
    assert (got.traced_calls, got.traced_retained, got.traced_sites) == (0, 0, [])


@pytest.mark.django_db(transaction=True)
def test_stored_sites_stay_bounded() -> None:
    with override_settings(LEAKGUARD={"TRACE_TOP_SITES": 2}):
        for line in range(1, 6):
            sites = {f"v.py:{line}": line * 10}
            storage.write(batch({HOUR: {("request", "/a/"): traced_aggregate(1, sites)}}))
    assert stored(row()) == {"v.py:5": 50, "v.py:4": 40}


def test_stored_sites_skip_what_is_not_a_site() -> None:
    good = {"filename": "v.py", "lineno": 1, "line": "", "size": 5, "count": 1, "frames": []}
    assert [site.location for site in storage.stored_sites([good, {"x": 1}, 3])] == ["v.py:1"]
    assert storage.stored_sites(None) == []
    assert storage.stored_sites({"filename": "v.py"}) == []


@needs_postgres_alias
@pytest.mark.postgres
@pytest.mark.django_db(transaction=True, databases=["default", "postgres"])
def test_postgres_traced_sites(postgres_url: str) -> None:
    with override_settings(LEAKGUARD={"DATABASE": "postgres"}):
        for _ in range(2):
            storage.write(batch({HOUR: {("request", "/a/"): traced_aggregate(2, {"v.py:7": 9})}}))
        got = Growth.objects.using("postgres").get()
        assert (got.traced_calls, got.traced_retained, stored(got)) == (4, 36, {"v.py:7": 36})


SITES_SCRIPT = (
    SETUP
    + r"""
from django.db import OperationalError
from django_leakguard import storage
from django_leakguard.recorder import Aggregate, Batch, WorkerState
from django_leakguard.tracing import Site, TraceResult
from datetime import datetime, timezone
for flush in range(config["flushes"]):
    aggregate = Aggregate("v")
    aggregate.add(0, None)
    sites = (Site("v.py", 1, "", 100, 1), Site("v.py", 2, "", 10, 1))
    aggregate.add_trace(TraceResult(110, 2, sites), 3)
    worker = WorkerState(host="h", pid=flush, started_at=datetime.now(timezone.utc))
    while True:
        try:
            storage.write(Batch({config["hour"]: {("request", "/shared/"): aggregate}}, worker))
            break
        except OperationalError:  # a busy SQLite file: try again
            pass
print("done")
"""
)


def run_site_writers(db: dict[str, Any], processes: int, flushes: int) -> None:
    work = {"flushes": flushes, "hour": HOUR, "leakguard": {"TRACE_TOP_SITES": 3}}
    run_children(db, processes, SITES_SCRIPT, work)


def check_sites(traced_calls: int, retained: int, sites: Any, expected_calls: int) -> None:
    if isinstance(sites, str):
        sites = json.loads(sites)
    assert (traced_calls, retained) == (expected_calls, expected_calls * 110)
    assert {(s["lineno"], s["size"]) for s in sites} == {
        (1, expected_calls * 100),
        (2, expected_calls * 10),
    }


@pytest.mark.servers
def test_concurrent_site_merges_on_a_sqlite_file(tmp_path: Path) -> None:
    import sqlite3

    path = tmp_path / "db.sqlite3"
    db = {"ENGINE": "django.db.backends.sqlite3", "NAME": str(path), "OPTIONS": {"timeout": 30}}
    run_site_writers(db, processes=4, flushes=20)
    with sqlite3.connect(path) as conn:
        [(calls, retained, sites)] = conn.execute(
            "SELECT traced_calls, traced_retained, traced_sites FROM django_leakguard_growth"
        ).fetchall()
    check_sites(calls, retained, sites, 80)


@pytest.mark.servers
@pytest.mark.postgres
def test_concurrent_site_merges_on_postgres(postgres_database: dict[str, Any]) -> None:
    import psycopg

    run_site_writers(postgres_database, processes=4, flushes=20)
    db = postgres_database
    with psycopg.connect(
        host=db["HOST"],
        port=db["PORT"] or 5432,
        user=db["USER"],
        dbname=db["NAME"],
        password=db["PASSWORD"] or None,
    ) as conn:
        [(calls, retained, sites)] = conn.execute(
            "SELECT traced_calls, traced_retained, traced_sites FROM django_leakguard_growth"
        ).fetchall()
    check_sites(calls, retained, sites, 80)
