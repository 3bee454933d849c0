"""Durable storage: race-safe batched increments of hourly rows, worker rows, retention.

Traced allocation sites cannot be added up by an upsert: they are a bounded JSON list per row.
The upsert inserts new rows with no sites; then, in the same transaction, the sites of each
traced row are read, merged with the batch's in Python (tracing_records.merge_sites, keeping the
TRACE_TOP_SITES largest) and written back. The upsert has locked those rows (PostgreSQL's and
InnoDB's row locks, SQLite's database write lock) until the commit, so a concurrent flush of the
same row waits and then merges into the result: no update is lost.

Flushes lock rows in one order, through the unique key or the primary key only; InnoDB can still
end one in a deadlock with another transaction (a prune's range delete, a statement of the
project's own) or a lock wait timeout. The write is then run again, for at most
WRITE_RETRY_SECONDS.

A write that opens its own transaction bounds its waits on the server: LOCK_TIMEOUT for a lock
(PostgreSQL's lock_timeout, InnoDB's innodb_lock_wait_timeout), STATEMENT_TIMEOUT for a
statement (PostgreSQL's statement_timeout, MariaDB's max_statement_time; MySQL bounds only
SELECTs). A table locked by a migration or a long report then fails the write within about a
second, and the recorder keeps the batch for the next flush, instead of the flush thread waiting
for as long as the lock is held. SQLite waits for its busy timeout (DATABASES' OPTIONS timeout).
A write inside the caller's transaction runs under the caller's settings. Connecting is bounded
only by the alias's own OPTIONS (connect_timeout); the flusher bounds the rest (see flusher).
"""

from __future__ import annotations

import random
import time
from collections.abc import Sequence
from datetime import datetime, timedelta, timezone
from typing import TYPE_CHECKING, Any

from django.conf import settings
from django.db import DatabaseError, IntegrityError, connections, transaction
from django.db.backends.base.base import BaseDatabaseWrapper
from django.db.models import F, Field, Model, Value
from django.db.models.functions import Greatest
from django.utils import timezone as dj_timezone

from django_leakguard import conf
from django_leakguard.models import Growth, Worker
from django_leakguard.records import COUNTERS, SUM, Batch, Counter, WorkerState

if TYPE_CHECKING:
    from django_leakguard.tracing_records import Site

# The growth counters added up by the upserts, and those that keep their largest value.
GROWTH_SUMS = tuple(spec.name for spec in COUNTERS if spec.merge == SUM)
GROWTH_MAXIMA = tuple(spec for spec in COUNTERS if spec.merge != SUM)
GROWTH_COLUMNS = (
    "kind",
    "key",
    "hour",
    "view",
    *(spec.name for spec in COUNTERS),
    "traced_sites",  # inserted empty; merged by _merge_traced_sites
)
WORKER_COLUMNS = (
    "host",
    "pid",
    "started_at",
    "kind",
    "rss_first",
    "rss_last",
    "heap_first",
    "heap_last",
    "calls",
    "last_seen",
    # Inserted with the row, never updated: a process starts and serves its first call once.
    "process_started_at",
    "first_call_at",
)
# Vendors whose INSERT ... ON CONFLICT DO UPDATE we use, with their two-argument maximum.
UPSERT_MAX = {"postgresql": "GREATEST", "sqlite": "MAX"}
# MySQL's and MariaDB's errors after which the whole write runs again: 1213, a deadlock (InnoDB
# has rolled the transaction back), and 1205, a lock wait timeout.
RETRY_MYSQL_ERRORS = frozenset({1205, 1213})
# No retry starts later than this many seconds after a write's first attempt.
WRITE_RETRY_SECONDS = 3.0
# The longest a write waits for a lock, and the longest one of its statements runs, in seconds.
LOCK_TIMEOUT = 1.0
STATEMENT_TIMEOUT = 5.0


def alias() -> str:
    """The database alias LeakGuard writes to (LEAKGUARD["DATABASE"])."""
    return conf.get_settings().DATABASE


def in_transaction() -> bool:
    """Return whether this thread is inside an atomic block on LeakGuard's database."""
    return connections[alias()].in_atomic_block


def discard_broken_connection() -> None:
    """After a failed write, close this thread's connection if it is no longer usable."""
    connection = connections[alias()]
    if not connection.in_atomic_block:
        connection.close_if_unusable_or_obsolete()


def to_datetime(value: datetime) -> datetime:
    """Return an aware UTC datetime as the project stores datetimes (naive when USE_TZ=False)."""
    if settings.USE_TZ:
        return value
    return dj_timezone.make_naive(value, dj_timezone.get_default_timezone())


def hour_start(hour: int) -> datetime:
    """The start of an hour given as Unix time // 3600."""
    return to_datetime(datetime.fromtimestamp(hour * 3600, tz=timezone.utc))


def write(batch: Batch) -> None:
    """Add a batch to the stored totals in one transaction; raise on failure."""
    using = alias()
    connection = connections[using]
    rows = growth_rows(batch)
    deadline = time.monotonic() + WRITE_RETRY_SECONDS
    attempt = 0
    while True:
        try:
            _write_once(connection, using, rows, batch)
            return
        except DatabaseError as exc:
            pause = retry_pause(connection, exc, attempt)
            if pause is None or time.monotonic() + pause > deadline:
                raise
        time.sleep(pause)
        attempt += 1


def _write_once(
    connection: BaseDatabaseWrapper, using: str, rows: list[tuple[Any, ...]], batch: Batch
) -> None:
    if connection.in_atomic_block:  # the caller's transaction, under the caller's settings
        _write_rows(connection, using, rows, batch)
    elif connection.vendor == "mysql":
        _bound_mysql_session(connection)
        try:
            _write_rows(connection, using, rows, batch)
        finally:
            _restore_mysql_session(connection)
    else:
        _write_rows(connection, using, rows, batch, bound=connection.vendor == "postgresql")


def _write_rows(
    connection: BaseDatabaseWrapper,
    using: str,
    rows: list[tuple[Any, ...]],
    batch: Batch,
    bound: bool = False,
) -> None:
    with transaction.atomic(using=using):
        if bound:
            with connection.cursor() as cursor:
                # SET LOCAL: the transaction's own, gone at its end.
                cursor.execute(
                    "SELECT set_config('lock_timeout', %s, true),"
                    " set_config('statement_timeout', %s, true)",
                    [f"{LOCK_TIMEOUT * 1000:.0f}ms", f"{STATEMENT_TIMEOUT * 1000:.0f}ms"],
                )
        if rows:
            if connection.vendor in UPSERT_MAX:
                _upsert_growth(connection, rows)
            elif connection.vendor == "mysql":
                _upsert_growth_mysql(connection, rows)
            else:
                _increment_growth_portably(using, rows)
            _merge_traced_sites(using, batch)
        if batch.worker.calls and batch.worker.rss_first is not None:
            _write_worker(connection, using, batch.worker)


def _bound_mysql_session(connection: BaseDatabaseWrapper) -> None:
    """Bound the session's lock waits (and statements, on MariaDB), saving the values it had."""
    # Session variables outlive the transaction: an explicit flush() from a request thread
    # writes on the request's connection, so they are given back afterwards.
    seconds = max(1, round(LOCK_TIMEOUT))
    # Row locks (innodb_lock_wait_timeout), and table locks such as LOCK TABLES' or a running
    # ALTER TABLE's (lock_wait_timeout, a year by default).
    assignments = [
        "@leakguard_lock_wait = @@SESSION.innodb_lock_wait_timeout",
        f"SESSION innodb_lock_wait_timeout = {seconds}",
        "@leakguard_table_lock_wait = @@SESSION.lock_wait_timeout",
        f"SESSION lock_wait_timeout = {seconds}",
    ]
    if connection.mysql_is_mariadb:  # type: ignore[attr-defined]
        assignments += [
            "@leakguard_statement_time = @@SESSION.max_statement_time",
            f"SESSION max_statement_time = {STATEMENT_TIMEOUT:g}",
        ]
    with connection.cursor() as cursor:
        cursor.execute("SET " + ", ".join(assignments))


def _restore_mysql_session(connection: BaseDatabaseWrapper) -> None:
    assignments = [
        "SESSION innodb_lock_wait_timeout = @leakguard_lock_wait",
        "SESSION lock_wait_timeout = @leakguard_table_lock_wait",
    ]
    if connection.mysql_is_mariadb:  # type: ignore[attr-defined]
        assignments.append("SESSION max_statement_time = @leakguard_statement_time")
    try:
        with connection.cursor() as cursor:
            cursor.execute("SET " + ", ".join(assignments))
    except DatabaseError:
        pass  # a broken connection, which the recorder discards: nothing left to restore


def retry_pause(connection: BaseDatabaseWrapper, exc: DatabaseError, attempt: int) -> float | None:
    """Seconds to wait before running a failed write again, or None if it must not run again."""
    if connection.vendor != "mysql" or not exc.args or exc.args[0] not in RETRY_MYSQL_ERRORS:
        return None
    if connection.in_atomic_block:
        # The write was a savepoint of the caller's transaction, which InnoDB has rolled back.
        return None
    # Randomized, so that the flushes that collided do not collide again.
    ceiling = min(0.25, 0.01 * 2**attempt)
    return random.uniform(ceiling / 2, ceiling)


def growth_rows(batch: Batch) -> list[tuple[Any, ...]]:
    """Rows in GROWTH_COLUMNS order, sorted so that concurrent flushes lock rows in one order."""
    rows: list[tuple[Any, ...]] = []
    for hour in sorted(batch.pending):
        start = hour_start(hour)
        for (kind, key), aggregate in sorted(batch.pending[hour].items()):
            rows.append((kind, key, start, aggregate.view, *aggregate.values(), []))
    return rows


def _merge_traced_sites(using: str, batch: Batch) -> None:
    """Merge the batch's allocation sites into the rows' (the rows are locked by now)."""
    from django_leakguard.tracing_records import merge_sites

    top_n = conf.get_settings().TRACE_TOP_SITES
    for hour in sorted(batch.pending):
        start = hour_start(hour)
        for (kind, key), aggregate in sorted(batch.pending[hour].items()):
            if not aggregate.traced_sites:
                continue
            rows = Growth.objects.using(using).filter(kind=kind, key=key, hour=start)
            # By primary key, with no ORDER BY: InnoDB may otherwise scan another index (hour,
            # or the primary key for .first()) and wait for rows that other flushes are
            # inserting: 12 threads flushing 8 times at once deadlocked some 240 times.
            [(pk, stored)] = rows.select_for_update().values_list("pk", "traced_sites")
            merged = merge_sites(stored_sites(stored), aggregate.traced_sites, top_n)
            Growth.objects.using(using).filter(pk=pk).update(
                traced_sites=[site.as_dict() for site in merged]
            )


def stored_sites(stored: Any) -> list[Site]:
    """Return the stored sites, leaving out any entry that is not one (hand-edited rows)."""
    from django_leakguard.tracing_records import Site

    sites = []
    for data in stored if isinstance(stored, list) else []:
        try:
            sites.append(Site.from_dict(data))
        except ValueError:
            continue
    return sites


def _prepared(
    connection: BaseDatabaseWrapper, model: Any, columns: Sequence[str], row: Sequence[Any]
) -> list[Any]:
    return [
        model._meta.get_field(name).get_db_prep_value(value, connection)
        for name, value in zip(columns, row, strict=True)
    ]


def _column(model: type[Model], name: str) -> str:
    field = model._meta.get_field(name)
    assert isinstance(field, Field)
    return str(field.column)


def _upsert_growth(connection: BaseDatabaseWrapper, rows: list[tuple[Any, ...]]) -> None:
    """INSERT ... ON CONFLICT DO UPDATE: atomic increments, a statement per chunk of rows."""
    table, col = _quoted_growth(connection)
    greatest = UPSERT_MAX[connection.vendor]
    updates = [f"{col['view']} = excluded.{col['view']}"]
    updates += [
        f"{col[name]} = {table}.{col[name]} + excluded.{col[name]}" for name in GROWTH_SUMS
    ]
    updates += [_upsert_maximum(spec, table, col, greatest) for spec in GROWTH_MAXIMA]
    conflict = ", ".join(col[name] for name in ("kind", "key", "hour"))
    _insert_growth_chunks(
        connection, rows, f"ON CONFLICT ({conflict}) DO UPDATE SET {', '.join(updates)}"
    )


def _quoted_growth(connection: BaseDatabaseWrapper) -> tuple[str, dict[str, str]]:
    """The growth table's quoted name, and its quoted columns by GROWTH_COLUMNS name."""
    qn = connection.ops.quote_name
    columns = [qn(_column(Growth, name)) for name in GROWTH_COLUMNS]
    return qn(Growth._meta.db_table), dict(zip(GROWTH_COLUMNS, columns, strict=True))


def _insert_growth_chunks(
    connection: BaseDatabaseWrapper, rows: list[tuple[Any, ...]], on_duplicate: str
) -> None:
    """INSERT rows in GROWTH_COLUMNS order, as many per statement as the backend takes."""
    table, col = _quoted_growth(connection)
    columns = list(col.values())
    placeholder = "(" + ", ".join(["%s"] * len(columns)) + ")"
    per_statement = max(1, min(500, (connection.features.max_query_params or 999) // len(columns)))
    with connection.cursor() as cursor:
        for start in range(0, len(rows), per_statement):
            chunk = rows[start : start + per_statement]
            params: list[Any] = []
            for row in chunk:
                params += _prepared(connection, Growth, GROWTH_COLUMNS, row)
            cursor.execute(
                f"INSERT INTO {table} ({', '.join(columns)}) "
                f"VALUES {', '.join([placeholder] * len(chunk))} {on_duplicate}",
                params,
            )


def _upsert_maximum(
    spec: Counter, table: str, col: dict[str, str], greatest: str, incoming: str = "excluded.{}"
) -> str:
    """The SET clause of a MAX counter: a side without readings has no meaningful maximum.

    incoming: how the row that was not inserted names a column ("VALUES({})" on MySQL).
    """
    name = col[spec.name]
    largest = f"{greatest}({table}.{name}, {incoming.format(name)})"
    if spec.count is None:
        return f"{name} = {largest}"
    count = col[spec.count]
    return (
        f"{name} = CASE WHEN {incoming.format(count)} = 0 THEN {table}.{name}"
        f" WHEN {table}.{count} = 0 THEN {incoming.format(name)} ELSE {largest} END"
    )


def _upsert_growth_mysql(connection: BaseDatabaseWrapper, rows: list[tuple[Any, ...]]) -> None:
    """INSERT ... ON DUPLICATE KEY UPDATE: MySQL's and MariaDB's atomic increments."""
    table, col = _quoted_growth(connection)
    # MySQL assigns left to right and each assignment sees the ones before it: the maxima read
    # the stored counts (heap_calls), so they come before the sums. VALUES(c) is the row not
    # inserted; MySQL 8.0.20 deprecates it for a row alias, which MariaDB does not have.
    updates = [
        _upsert_maximum(spec, table, col, "GREATEST", "VALUES({})") for spec in GROWTH_MAXIMA
    ]
    updates.append(f"{col['view']} = VALUES({col['view']})")
    updates += [f"{col[name]} = {table}.{col[name]} + VALUES({col[name]})" for name in GROWTH_SUMS]
    _insert_growth_chunks(connection, rows, f"ON DUPLICATE KEY UPDATE {', '.join(updates)}")


def _increment_growth_portably(using: str, rows: list[tuple[Any, ...]]) -> None:
    """UPDATE with F() increments, INSERT when missing: for backends without ON CONFLICT."""
    for row in rows:
        values = dict(zip(GROWTH_COLUMNS, row, strict=True))
        if not _update_growth(using, values):
            try:
                with transaction.atomic(using=using):
                    Growth.objects.using(using).create(**values)
            except IntegrityError:
                # Another process inserted the row first: add to it instead.
                _update_growth(using, values)


def _update_growth(using: str, values: dict[str, Any]) -> bool:
    rows = Growth.objects.using(using).filter(
        kind=values["kind"], key=values["key"], hour=values["hour"]
    )
    changes: dict[str, Any] = {name: F(name) + values[name] for name in GROWTH_SUMS}
    changes["view"] = values["view"]
    for spec in GROWTH_MAXIMA:
        if spec.count is not None:
            if not values[spec.count]:
                continue  # no readings in this batch: the stored maximum stands
            rows.filter(**{spec.count: 0}).update(**{spec.name: values[spec.name]})
        changes[spec.name] = Greatest(spec.name, Value(values[spec.name]))
    return rows.update(**changes) > 0


def _write_worker(connection: BaseDatabaseWrapper, using: str, worker: WorkerState) -> None:
    started_at = to_datetime(worker.started_at)
    row = (
        worker.host,
        worker.pid,
        started_at,
        worker.kind,
        worker.rss_first,
        worker.rss_last,
        worker.heap_first,
        worker.heap_last,
        worker.calls,
        to_datetime(datetime.now(timezone.utc)),
        None if worker.process_started_at is None else to_datetime(worker.process_started_at),
        None if worker.first_call_at is None else to_datetime(worker.first_call_at),
    )
    if connection.vendor in UPSERT_MAX:
        qn = connection.ops.quote_name
        table = qn(Worker._meta.db_table)
        col = {name: qn(_column(Worker, name)) for name in WORKER_COLUMNS}
        updates = ", ".join(
            [f"{col[name]} = excluded.{col[name]}" for name in ("rss_last", "heap_last")]
            + [f"{col['calls']} = {table}.{col['calls']} + excluded.{col['calls']}"]
            + [f"{col['last_seen']} = excluded.{col['last_seen']}"]
        )
        conflict = ", ".join(col[name] for name in ("host", "pid", "started_at"))
        with connection.cursor() as cursor:
            cursor.execute(
                f"INSERT INTO {table} ({', '.join(col.values())}) "
                f"VALUES ({', '.join(['%s'] * len(col))}) "
                f"ON CONFLICT ({conflict}) DO UPDATE SET {updates}",
                _prepared(connection, Worker, WORKER_COLUMNS, row),
            )
        return
    if connection.vendor == "mysql":
        _upsert_worker_mysql(connection, row)
        return
    values = dict(zip(WORKER_COLUMNS, row, strict=True))
    # Only this process writes its own worker row, so there is no race to guard against.
    updated = (
        Worker.objects.using(using)
        .filter(host=worker.host, pid=worker.pid, started_at=started_at)
        .update(
            rss_last=worker.rss_last,
            heap_last=worker.heap_last,
            calls=F("calls") + worker.calls,
            last_seen=values["last_seen"],
        )
    )
    if not updated:
        Worker.objects.using(using).create(**values)


class DatabaseWriter:
    """The recorder's writer: LEAKGUARD["DATABASE"], through this module's functions."""

    def write(self, batch: Batch) -> None:
        write(batch)

    def prune(self) -> int:
        return prune()

    def in_transaction(self) -> bool:
        return in_transaction()

    def discard_broken_connection(self) -> None:
        discard_broken_connection()

    def close(self) -> None:
        connection = connections[alias()]
        if connection.vendor == "sqlite" and connection.is_in_memory_db():  # type: ignore[attr-defined]
            # Django keeps in-memory SQLite connections open on close() (the database would be
            # gone); this is a flush thread's own connection to a shared one: really close it.
            BaseDatabaseWrapper.close(connection)
        else:
            connection.close()


def _upsert_worker_mysql(connection: BaseDatabaseWrapper, row: tuple[Any, ...]) -> None:
    qn = connection.ops.quote_name
    col = {name: qn(_column(Worker, name)) for name in WORKER_COLUMNS}
    updates = ", ".join(
        [f"{col[name]} = VALUES({col[name]})" for name in ("rss_last", "heap_last", "last_seen")]
        + [f"{col['calls']} = {col['calls']} + VALUES({col['calls']})"]
    )
    with connection.cursor() as cursor:
        cursor.execute(
            f"INSERT INTO {qn(Worker._meta.db_table)} ({', '.join(col.values())}) "
            f"VALUES ({', '.join(['%s'] * len(col))}) ON DUPLICATE KEY UPDATE {updates}",
            _prepared(connection, Worker, WORKER_COLUMNS, row),
        )


def prune(retention_days: int | None = None) -> int:
    """Delete rows older than RETENTION_DAYS (or retention_days); return how many."""
    days = conf.get_settings().RETENTION_DAYS if retention_days is None else retention_days
    cutoff = to_datetime(datetime.now(timezone.utc) - timedelta(days=days))
    using = alias()
    growth, _ = Growth.objects.using(using).filter(hour__lt=cutoff).delete()
    workers, _ = Worker.objects.using(using).filter(last_seen__lt=cutoff).delete()
    return growth + workers


def reset(using: str | None = None) -> tuple[int, int]:
    """Delete every growth and worker row; return how many of each were deleted."""
    using = alias() if using is None else using
    growth, _ = Growth.objects.using(using).all().delete()
    workers, _ = Worker.objects.using(using).all().delete()
    return growth, workers
