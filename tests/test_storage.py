from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path
from types import SimpleNamespace
from typing import Any
from unittest import mock

import pytest
from django.db import DatabaseError, OperationalError, connections, transaction
from django.test import override_settings
from django.utils import timezone as dj_timezone

from django_leakguard import storage
from django_leakguard.models import Growth, Worker
from django_leakguard.records import Aggregate, Batch, WorkerState

ROOT = Path(__file__).resolve().parent.parent
HOUR = 1_800_000_000 // 3600


def on_server(alias: str, variable: str, what: str) -> Any:
    """A database parameter for a server's alias, which exists only when variable is set.

    Without the alias the server's URL fixture skips (or fails when services are required), but
    pytest-django would error first.
    """
    return pytest.param(
        alias,
        marks=[
            pytest.mark.skipif(
                not os.environ.get(variable)
                and os.environ.get("LEAKGUARD_REQUIRE_SERVICES") != "1",
                reason=f"{what} tests need {variable}",
            ),
            getattr(pytest.mark, alias),
            pytest.mark.django_db(transaction=True, databases=["default", alias]),
        ],
        id=alias,
    )


@pytest.fixture(
    params=[
        pytest.param("default", marks=pytest.mark.django_db(transaction=True), id="sqlite"),
        pytest.param(
            "portable", marks=pytest.mark.django_db(transaction=True), id="sqlite-portable"
        ),
        on_server("postgres", "LEAKGUARD_TEST_POSTGRES_URL", "PostgreSQL"),
        on_server("mysql", "LEAKGUARD_TEST_MYSQL_URL", "MySQL"),
    ]
)
def database(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """The alias LeakGuard writes to, on each backend: the test reads rows from it."""
    alias = str(request.param)
    if alias == "portable":
        # The fallback serves backends with no upsert of ours (Oracle...), absent here: SQLite
        # is made to take it.
        monkeypatch.setattr(storage, "UPSERT_MAX", {})
        alias = "default"
    elif alias != "default":
        request.getfixturevalue(f"{alias}_url")
    with override_settings(LEAKGUARD={"DATABASE": alias}):
        yield alias


def aggregate(
    calls: int, rss: int, heap: int | None = None, view: str = "tests.view"
) -> Aggregate:
    result = Aggregate(view)
    for _ in range(calls):
        result.add(rss, heap)
    return result


def batch(
    pending: dict[int, dict[tuple[str, str], Aggregate]],
    calls: int = 0,
    pid: int = 4242,
    host: str = "test-host",
) -> Batch:
    worker = WorkerState(
        host=host,
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


def row(using: str = "default", key: str = "/a/") -> Growth:
    return Growth.objects.using(using).get(kind="request", key=key)


def test_write_adds_to_existing_rows(database: str) -> None:
    storage.write(batch({HOUR: {("request", "/a/"): aggregate(2, 100, 50)}}, calls=2))
    storage.write(batch({HOUR: {("request", "/a/"): aggregate(3, -10, 70)}}, calls=3))
    got = row(database)
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
    worker = Worker.objects.using(database).get()
    assert (worker.calls, worker.rss_first, worker.rss_last, worker.heap_last) == (5, 100, 200, 20)
    assert abs(worker.last_seen - dj_timezone.now()) < timedelta(minutes=1)


def test_worker_rows_keep_when_the_process_started_and_served_its_first_call(
    database: str,
) -> None:
    started = datetime(2027, 1, 1, 0, 0, 1, 250_000, tzinfo=timezone.utc)
    first_call = started + timedelta(seconds=4.5)
    first = batch({HOUR: {("request", "/a/"): aggregate(1, 100, 50)}}, calls=1)
    first.worker.process_started_at, first.worker.first_call_at = started, first_call
    storage.write(first)
    storage.write(batch({HOUR: {("request", "/a/"): aggregate(1, 100, 50)}}, calls=1))
    worker = Worker.objects.using(database).get()
    # Inserted with the row, kept as they were by later writes; to the microsecond.
    assert (worker.process_started_at, worker.first_call_at) == (started, first_call)
    assert worker.calls == 2


def test_heap_maximum_ignores_batches_without_heap_readings(database: str) -> None:
    storage.write(batch({HOUR: {("request", "/a/"): aggregate(1, 5, None)}}))
    assert (row(database).heap_calls, row(database).heap_growth_max) == (0, 0)
    storage.write(batch({HOUR: {("request", "/a/"): aggregate(1, 5, -30)}}))
    assert row(database).heap_growth_max == -30  # the first real reading, not the placeholder
    storage.write(batch({HOUR: {("request", "/a/"): aggregate(1, 5, None)}}))
    storage.write(batch({HOUR: {("request", "/a/"): aggregate(1, 5, -40)}}))
    assert (row(database).heap_calls, row(database).heap_growth_max) == (2, -30)
    storage.write(batch({HOUR: {("request", "/a/"): aggregate(1, 5, -10)}}))
    assert (row(database).heap_calls, row(database).heap_growth_max) == (3, -10)


def test_keys_are_compared_byte_for_byte(database: str) -> None:
    # MySQL's and MariaDB's default collations would merge these (migration 0003).
    keys = ["/About/", "/about/", "/about/ ", "/abo\u00fct/"]
    storage.write(batch({HOUR: {("request", key): aggregate(1, 10) for key in keys}}))
    storage.write(batch({HOUR: {("request", key): aggregate(1, 10) for key in keys}}))
    stored = Growth.objects.using(database).values_list("key", "calls")
    assert sorted(stored) == sorted((key, 2) for key in keys)
    for host in ("Web-1", "web-1", "web-1 "):
        storage.write(batch({}, calls=1, host=host))
    assert Worker.objects.using(database).count() == 3


def test_many_keys_and_hours_in_chunks(database: str) -> None:
    pending = {
        hour: {("request", f"/k/{i}/"): aggregate(1, i) for i in range(300)}
        for hour in (HOUR, HOUR + 1)
    }
    pending[HOUR][("task", "shop.tasks.x")] = aggregate(4, 1)
    storage.write(batch(pending))
    storage.write(batch(pending))
    assert Growth.objects.using(database).count() == 601
    assert Growth.objects.using(database).get(kind="task").calls == 8
    later = Growth.objects.using(database).get(key="/k/299/", hour=storage.hour_start(HOUR + 1))
    assert later.calls == 2
    assert not Worker.objects.using(database).exists()  # no calls: no worker row


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


def test_write_is_one_transaction(database: str) -> None:
    Worker.objects.using(database).create(
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
    assert not Growth.objects.using(database).exists()


def test_to_datetime_follows_use_tz() -> None:
    aware = datetime(2027, 1, 1, 12, tzinfo=timezone.utc)
    assert storage.to_datetime(aware) is aware
    with override_settings(USE_TZ=False, TIME_ZONE="Europe/Paris"):
        assert storage.to_datetime(aware) == datetime(2027, 1, 1, 13)


def test_write_with_use_tz_false(database: str) -> None:
    with override_settings(USE_TZ=False, LEAKGUARD={"DATABASE": database}):
        storage.write(batch({HOUR: {("request", "/a/"): aggregate(1, 10)}}, calls=1))
        assert row(database).hour == datetime(2027, 1, 15, 8)  # 1_800_000_000 s, UTC, naive
        assert Worker.objects.using(database).get().started_at == datetime(2027, 1, 1)


def test_prune_deletes_old_rows(database: str) -> None:
    now = dj_timezone.now()
    for days in (1, 13, 15, 40):
        Growth.objects.using(database).create(
            kind="request", key=f"/{days}/", hour=now - timedelta(days=days)
        )
        Worker.objects.using(database).create(
            host="h",
            pid=days,
            started_at=now - timedelta(days=days),
            rss_first=1,
            rss_last=1,
            last_seen=now - timedelta(days=days),
        )
    assert storage.prune() == 4
    assert sorted(Growth.objects.using(database).values_list("key", flat=True)) == ["/1/", "/13/"]
    assert storage.prune(retention_days=1) == 4
    assert storage.prune() == 0


def test_reset_deletes_every_row(database: str) -> None:
    now = dj_timezone.now()
    for n in (1, 2):
        Growth.objects.using(database).create(kind="request", key=f"/{n}/", hour=now)
    Worker.objects.using(database).create(
        host="h", pid=1, started_at=now, rss_first=1, rss_last=1, last_seen=now
    )
    assert storage.reset(database) == (2, 1)
    assert not Growth.objects.using(database).exists()
    assert not Worker.objects.using(database).exists()
    assert storage.reset(database) == (0, 0)


@pytest.mark.django_db(transaction=True)
def test_in_transaction_and_discard_broken_connection() -> None:
    assert storage.in_transaction() is False
    with transaction.atomic():
        assert storage.in_transaction() is True
        storage.discard_broken_connection()  # never closes a connection inside a transaction
        assert connections["default"].connection is not None
    storage.discard_broken_connection()


# Bounded waits ----------------------------------------------------------------------------


@pytest.fixture(
    params=[
        on_server("postgres", "LEAKGUARD_TEST_POSTGRES_URL", "PostgreSQL"),
        on_server("mysql", "LEAKGUARD_TEST_MYSQL_URL", "MySQL"),
    ]
)
def server_database(request: pytest.FixtureRequest) -> Iterator[str]:
    """PostgreSQL and MySQL/MariaDB, which bound a write's waits themselves."""
    alias = str(request.param)
    request.getfixturevalue(f"{alias}_url")
    with override_settings(LEAKGUARD={"DATABASE": alias}):
        yield alias


def lock_growth_table(cursor: Any, vendor: str) -> None:
    """Hold the whole growth table as a migration or a long report could."""
    if vendor == "postgresql":
        cursor.execute("BEGIN")
        cursor.execute("LOCK TABLE django_leakguard_growth IN ACCESS EXCLUSIVE MODE")
    else:
        cursor.execute("LOCK TABLES django_leakguard_growth WRITE")


def test_a_locked_table_fails_the_write_within_the_lock_timeout(
    server_database: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from django_leakguard.recorder import Recorder

    monkeypatch.setattr(storage, "WRITE_RETRY_SECONDS", 0.0)  # MySQL's retries, tested apart
    rec = Recorder()
    rec._flusher.stop()  # flushed here, not by its thread
    for _ in range(3):
        rec.end(rec.begin(), "request", "/locked/")
    other = connections.create_connection(server_database)
    try:
        with other.cursor() as cursor:
            lock_growth_table(cursor, other.vendor)
            started = time.monotonic()
            assert rec.flush() is False
            elapsed = time.monotonic() - started
    finally:
        other.close()  # releases the lock
    assert storage.LOCK_TIMEOUT * 0.8 < elapsed < storage.LOCK_TIMEOUT + 1.0
    assert "could not write memory measurements" in caplog.text
    assert rec.totals()["request", "/locked/"].calls == 3  # given back
    assert rec.flush() is True
    assert row(server_database, "/locked/").calls == 3
    connections[server_database].close()


def test_a_lock_held_past_the_retries_fails_the_write_in_bounded_time(
    server_database: str,
) -> None:
    other = connections.create_connection(server_database)
    try:
        with other.cursor() as cursor:
            lock_growth_table(cursor, other.vendor)
            started = time.monotonic()
            with pytest.raises(OperationalError):
                storage.write(batch({HOUR: {("request", "/a/"): aggregate(1, 10)}}, calls=1))
            elapsed = time.monotonic() - started
    finally:
        other.close()
    # PostgreSQL does not run the write again; MySQL does, for WRITE_RETRY_SECONDS.
    assert elapsed < storage.WRITE_RETRY_SECONDS + storage.LOCK_TIMEOUT + 1.0
    connections[server_database].close()


def session_timeouts(alias: str) -> tuple[str, ...]:
    connection = connections[alias]
    with connection.cursor() as cursor:
        if connection.vendor == "postgresql":
            cursor.execute(
                "SELECT current_setting('lock_timeout'), current_setting('statement_timeout')"
            )
        else:
            cursor.execute(
                "SELECT @@SESSION.innodb_lock_wait_timeout, @@SESSION.lock_wait_timeout"
            )
        return tuple(str(value) for value in cursor.fetchone())


def test_the_bounds_are_the_writes_own(server_database: str) -> None:
    # A write on a connection the project uses (an explicit flush() in a request) leaves its
    # settings as they were, inside the caller's transaction or not.
    before = session_timeouts(server_database)
    storage.write(batch({HOUR: {("request", "/a/"): aggregate(1, 10)}}, calls=1))
    assert session_timeouts(server_database) == before
    with transaction.atomic(using=server_database):
        storage.write(batch({HOUR: {("request", "/a/"): aggregate(1, 10)}}, calls=1))
        assert session_timeouts(server_database) == before
    assert row(server_database).calls == 2


class RecordingCursor:
    def __init__(self, statements: list[str], fail: bool = False) -> None:
        self.statements = statements
        self.fail = fail

    def __enter__(self) -> RecordingCursor:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def execute(self, sql: str, params: object = None) -> None:
        if self.fail:
            raise OperationalError(2013, "Lost connection to server during query")
        self.statements.append(sql)


@pytest.mark.parametrize("mariadb", [True, False], ids=["mariadb", "mysql"])
def test_mysql_session_bounds_are_set_and_restored(mariadb: bool) -> None:
    statements: list[str] = []
    connection: Any = SimpleNamespace(
        mysql_is_mariadb=mariadb, cursor=lambda: RecordingCursor(statements)
    )
    storage._bound_mysql_session(connection)
    storage._restore_mysql_session(connection)
    bound, restored = statements
    assert "SESSION innodb_lock_wait_timeout = 1" in bound
    assert "SESSION lock_wait_timeout = 1" in bound
    assert ("SESSION max_statement_time = 5" in bound) is mariadb
    assert ("max_statement_time = @leakguard_statement_time" in restored) is mariadb
    # A connection lost meanwhile has nothing to restore; the recorder discards it.
    connection.cursor = lambda: RecordingCursor(statements, fail=True)
    storage._restore_mysql_session(connection)


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
from django_leakguard.recorder_process import get_recorder
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
    with contextlib.closing(sqlite3.connect(path)) as conn:
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


def test_traced_calls_add_up_and_sites_merge(database: str) -> None:
    storage.write(batch({HOUR: {("request", "/a/"): traced_aggregate(2, {"v.py:1": 100})}}))
    storage.write(batch({HOUR: {("request", "/a/"): aggregate(3, 0)}}))  # untraced calls
    storage.write(
        batch({HOUR: {("request", "/a/"): traced_aggregate(1, {"v.py:1": 50, "v.py:2": 70})}})
    )
    got = row(database)
    assert (got.calls, got.traced_calls, got.traced_retained) == (6, 3, 320)
    assert stored(got) == {"v.py:1": 250, "v.py:2": 70}
    assert [site["lineno"] for site in got.traced_sites] == [1, 2]  # largest first


def test_untraced_rows_have_no_sites(database: str) -> None:
    storage.write(batch({HOUR: {("request", "/a/"): aggregate(2, 10)}}))
    got = row(database)
    assert (got.traced_calls, got.traced_retained, got.traced_sites) == (0, 0, [])


def test_stored_sites_stay_bounded(database: str) -> None:
    with override_settings(LEAKGUARD={"DATABASE": database, "TRACE_TOP_SITES": 2}):
        for line in range(1, 6):
            sites = {f"v.py:{line}": line * 10}
            storage.write(batch({HOUR: {("request", "/a/"): traced_aggregate(1, sites)}}))
    assert stored(row(database)) == {"v.py:5": 50, "v.py:4": 40}


def test_stored_sites_skip_what_is_not_a_site() -> None:
    good = {"filename": "v.py", "lineno": 1, "line": "", "size": 5, "count": 1, "frames": []}
    assert [site.location for site in storage.stored_sites([good, {"x": 1}, 3])] == ["v.py:1"]
    assert storage.stored_sites(None) == []
    assert storage.stored_sites({"filename": "v.py"}) == []


SITES_SCRIPT = (
    SETUP
    + r"""
from django.db import OperationalError
from django_leakguard import storage
from django_leakguard.records import Aggregate, Batch, WorkerState
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
    with contextlib.closing(sqlite3.connect(path)) as conn:
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


# Deadlocks and lock wait timeouts (MySQL, MariaDB) ----------------------------------------

DEADLOCK = "Deadlock found when trying to get lock; try restarting transaction"


def test_retry_pause_only_for_mysql_deadlocks_and_lock_timeouts_outside_a_transaction() -> None:
    mysql = SimpleNamespace(vendor="mysql", in_atomic_block=False)
    first = storage.retry_pause(mysql, OperationalError(1213, DEADLOCK), 0)  # type: ignore[arg-type]
    assert first is not None
    assert 0.005 <= first <= 0.01
    late = storage.retry_pause(mysql, OperationalError(1205, "Lock wait timeout"), 20)  # type: ignore[arg-type]
    assert late is not None
    assert 0.125 <= late <= 0.25
    for connection, exc in [
        (mysql, OperationalError(1062, "Duplicate entry")),
        (mysql, OperationalError()),
        (SimpleNamespace(vendor="postgresql", in_atomic_block=False), OperationalError(1213)),
        (SimpleNamespace(vendor="mysql", in_atomic_block=True), OperationalError(1213)),
    ]:
        assert storage.retry_pause(connection, exc, 0) is None  # type: ignore[arg-type]


def deadlock_on_worker_row(monkeypatch: pytest.MonkeyPatch, times: int) -> list[int]:
    """Fail the worker row's write of the next times writes as InnoDB would; count attempts.

    The growth rows are written first, so each failure has rows to roll back. Every backend
    retries as MySQL does, with retry_pause's own rules.
    """
    attempts: list[int] = []
    real_pause, real_write_worker = storage.retry_pause, storage._write_worker

    def pause(connection: Any, exc: DatabaseError, attempt: int) -> float | None:
        mysql = SimpleNamespace(vendor="mysql", in_atomic_block=connection.in_atomic_block)
        return real_pause(mysql, exc, attempt)

    def write_worker(*args: Any) -> None:
        attempts.append(1)
        if len(attempts) <= times:
            raise OperationalError(1213, DEADLOCK)
        real_write_worker(*args)

    monkeypatch.setattr(storage, "retry_pause", pause)
    monkeypatch.setattr(storage, "_write_worker", write_worker)
    return attempts


def test_deadlocked_write_runs_again_and_counts_once(
    database: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    attempts = deadlock_on_worker_row(monkeypatch, times=3)
    storage.write(batch({HOUR: {("request", "/a/"): traced_aggregate(2, {"v.py:1": 5})}}, 2))
    assert len(attempts) == 4
    got = row(database)
    assert (got.calls, got.traced_calls, stored(got)) == (2, 2, {"v.py:1": 10})
    assert Worker.objects.using(database).get().calls == 2


def test_deadlock_retries_stop_after_the_time_bound(
    database: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    attempts = deadlock_on_worker_row(monkeypatch, times=1000)
    monkeypatch.setattr(storage, "WRITE_RETRY_SECONDS", 0.2)
    started = time.monotonic()
    with pytest.raises(OperationalError, match="Deadlock"):
        storage.write(batch({HOUR: {("request", "/a/"): aggregate(1, 10)}}, calls=1))
    assert time.monotonic() - started < 2
    assert 2 <= len(attempts) < 30
    assert not Growth.objects.using(database).exists()


def test_deadlock_inside_the_callers_transaction_is_not_retried(
    database: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # InnoDB has rolled back the caller's whole transaction: it is the caller's to run again.
    attempts = deadlock_on_worker_row(monkeypatch, times=1)
    with pytest.raises(OperationalError, match="Deadlock"), transaction.atomic(using=database):
        storage.write(batch({HOUR: {("request", "/a/"): aggregate(1, 10)}}, calls=1))
    assert len(attempts) == 1


@pytest.mark.skipif(
    not os.environ.get("LEAKGUARD_TEST_MYSQL_URL")
    and os.environ.get("LEAKGUARD_REQUIRE_SERVICES") != "1",
    reason="MySQL tests need LEAKGUARD_TEST_MYSQL_URL",
)
@pytest.mark.mysql
@pytest.mark.django_db(transaction=True, databases=["default", "mysql"])
def test_concurrent_flushes_on_mysql_lose_nothing(mysql_url: str) -> None:
    # The case: 12 processes flushing the same keys at once, rows new and existing.
    threads, rounds, keys = 12, 8, 30
    barrier = threading.Barrier(threads, timeout=60)
    errors: list[BaseException] = []
    retries: list[int] = []
    real_pause = storage.retry_pause

    def counted_pause(*args: Any) -> float | None:
        retries.append(1)
        return real_pause(*args)

    def flush_rounds(pid: int) -> None:
        try:
            for flush in range(rounds):
                pending = {
                    hour: {("request", f"/k/{i}/"): aggregate(1, 10, 5) for i in range(keys)}
                    for hour in (HOUR, HOUR + 1 + flush)  # existing rows, then new ones
                }
                pending[HOUR][("request", "/k/0/")] = traced_aggregate(1, {"v.py:1": 3})
                barrier.wait()
                storage.write(batch(pending, calls=2, pid=pid))
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)
            barrier.abort()
        finally:
            connections["mysql"].close()

    with (
        override_settings(LEAKGUARD={"DATABASE": "mysql"}),
        mock.patch.object(storage, "retry_pause", counted_pause),
    ):
        workers = [threading.Thread(target=flush_rounds, args=(pid,)) for pid in range(threads)]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join(120)
    assert errors == []
    rows = Growth.objects.using("mysql")
    assert rows.filter(hour=storage.hour_start(HOUR)).count() == keys
    assert {got.calls for got in rows.filter(hour=storage.hour_start(HOUR))} == {threads * rounds}
    assert rows.count() == keys * (1 + rounds)
    assert {got.calls for got in rows.exclude(hour=storage.hour_start(HOUR))} == {threads}
    traced = rows.get(key="/k/0/", hour=storage.hour_start(HOUR))
    assert (traced.traced_calls, stored(traced)) == (
        threads * rounds,
        {"v.py:1": 3 * threads * rounds},
    )
    assert sorted(Worker.objects.using("mysql").values_list("pid", "calls")) == [
        (pid, 2 * rounds) for pid in range(threads)
    ]
    print(f"{len(retries)} deadlocks or lock timeouts retried")


@pytest.mark.skipif(
    not os.environ.get("LEAKGUARD_TEST_MYSQL_URL")
    and os.environ.get("LEAKGUARD_REQUIRE_SERVICES") != "1",
    reason="MySQL tests need LEAKGUARD_TEST_MYSQL_URL",
)
@pytest.mark.mysql
@pytest.mark.django_db(transaction=True, databases=["default", "mysql"])
def test_a_real_deadlock_on_mysql_is_retried(mysql_url: str) -> None:
    # Another transaction holds /b/ and then asks for /a/, which the flush holds while it waits
    # for /b/. That transaction has changed more rows, so InnoDB rolls the flush back instead:
    # the flush runs again once the other has committed.
    others = [f"/{letter}/" for letter in "bcdefgh"]
    with override_settings(LEAKGUARD={"DATABASE": "mysql"}):
        storage.write(
            batch({HOUR: {("request", key): aggregate(1, 1) for key in ["/a/", *others]}})
        )
        other = connections.create_connection("mysql")
        retries: list[int] = []
        real_pause = storage.retry_pause

        def counted_pause(*args: Any) -> float | None:
            retries.append(1)
            return real_pause(*args)

        def flush() -> None:
            try:
                storage.write(
                    batch({HOUR: {("request", key): aggregate(1, 1) for key in ("/a/", "/b/")}})
                )
            finally:
                connections["mysql"].close()

        try:
            with (
                other.cursor() as cursor,
                mock.patch.object(storage, "retry_pause", counted_pause),
            ):
                cursor.execute("BEGIN")
                cursor.execute(
                    "UPDATE django_leakguard_growth SET calls = calls + 10 WHERE `key` <> %s",
                    ["/a/"],
                )
                flusher = threading.Thread(target=flush)
                flusher.start()
                deadline = time.monotonic() + 10
                while time.monotonic() < deadline and not waiting_inserts(cursor):
                    time.sleep(0.01)
                time.sleep(0.2)  # the flush has locked /a/ and waits for /b/
                cursor.execute(
                    "UPDATE django_leakguard_growth SET calls = calls + 100 WHERE `key` = %s",
                    ["/a/"],
                )
                cursor.execute("COMMIT")
                flusher.join(30)
        finally:
            other.close()
    calls = dict(Growth.objects.using("mysql").values_list("key", "calls"))
    assert calls == {"/a/": 102, "/b/": 12, **dict.fromkeys(others[1:], 11)}
    assert len(retries) == 1


def waiting_inserts(cursor: Any) -> int:
    """How many statements are inserting into the growth table on the server now."""
    cursor.execute(
        "SELECT COUNT(*) FROM information_schema.processlist"
        " WHERE info LIKE 'INSERT INTO `django_leakguard_growth`%%'"
    )
    return int(cursor.fetchone()[0])
