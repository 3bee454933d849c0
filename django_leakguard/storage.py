"""Durable storage: race-safe batched increments of hourly rows, worker rows, retention.

Traced allocation sites cannot be added up by an upsert: they are a bounded JSON list per row.
The upsert inserts new rows with no sites; then, in the same transaction, the sites of each
traced row are read, merged with the batch's in Python (tracing.merge_sites, keeping the
TRACE_TOP_SITES largest) and written back. The upsert has locked those rows (PostgreSQL's row
locks, SQLite's database write lock) until the commit, so a concurrent flush of the same row
waits and then merges into the result: no update is lost.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime, timedelta, timezone
from typing import TYPE_CHECKING, Any

from django.conf import settings
from django.db import IntegrityError, connections, transaction
from django.db.backends.base.base import BaseDatabaseWrapper
from django.db.models import F, Field, Model, Value
from django.db.models.functions import Greatest
from django.utils import timezone as dj_timezone

from django_leakguard import conf
from django_leakguard.models import Growth, Worker

if TYPE_CHECKING:
    from django_leakguard.recorder import Aggregate, Batch, WorkerState
    from django_leakguard.tracing import Site

GROWTH_SUMS = (
    "calls",
    "rss_growth",
    "rss_growth_positive",
    "rss_grew_calls",
    "heap_calls",
    "heap_growth",
    "traced_calls",
    "traced_retained",
)
GROWTH_COLUMNS = (
    "kind",
    "key",
    "hour",
    "view",
    *GROWTH_SUMS,
    "rss_growth_max",
    "heap_growth_max",
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
)
# Vendors whose INSERT ... ON CONFLICT DO UPDATE we use, with their two-argument maximum.
UPSERT_MAX = {"postgresql": "GREATEST", "sqlite": "MAX"}


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
    with transaction.atomic(using=using):
        if rows:
            if connection.vendor in UPSERT_MAX:
                _upsert_growth(connection, rows)
            else:
                _increment_growth_portably(using, rows)
            _merge_traced_sites(using, batch)
        if batch.worker.calls and batch.worker.rss_first is not None:
            _write_worker(connection, using, batch.worker)


def growth_rows(batch: Batch) -> list[tuple[Any, ...]]:
    """Rows in GROWTH_COLUMNS order, sorted so that concurrent flushes lock rows in one order."""
    rows: list[tuple[Any, ...]] = []
    for hour in sorted(batch.pending):
        start = hour_start(hour)
        for (kind, key), aggregate in sorted(batch.pending[hour].items()):
            rows.append((kind, key, start, aggregate.view, *_numbers(aggregate), []))
    return rows


def _merge_traced_sites(using: str, batch: Batch) -> None:
    """Merge the batch's allocation sites into the rows' (the rows are locked by now)."""
    from django_leakguard.tracing import merge_sites

    top_n = conf.get_settings().TRACE_TOP_SITES
    for hour in sorted(batch.pending):
        start = hour_start(hour)
        for (kind, key), aggregate in sorted(batch.pending[hour].items()):
            if not aggregate.traced_sites:
                continue
            rows = Growth.objects.using(using).filter(kind=kind, key=key, hour=start)
            stored = rows.select_for_update().values_list("traced_sites", flat=True).first()
            merged = merge_sites(stored_sites(stored), aggregate.traced_sites, top_n)
            rows.update(traced_sites=[site.as_dict() for site in merged])


def stored_sites(stored: Any) -> list[Site]:
    """Return the stored sites, leaving out any entry that is not one (hand-edited rows)."""
    from django_leakguard.tracing import Site

    sites = []
    for data in stored if isinstance(stored, list) else []:
        try:
            sites.append(Site.from_dict(data))
        except ValueError:
            continue
    return sites


def _numbers(aggregate: Aggregate) -> tuple[int, ...]:
    return (
        aggregate.calls,
        aggregate.rss_growth,
        aggregate.rss_growth_positive,
        aggregate.rss_grew_calls,
        aggregate.heap_calls,
        aggregate.heap_growth,
        aggregate.traced_calls,
        aggregate.traced_retained,
        aggregate.rss_growth_max,
        aggregate.heap_growth_max,
    )


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
    qn = connection.ops.quote_name
    table = qn(Growth._meta.db_table)
    greatest = UPSERT_MAX[connection.vendor]
    columns = [qn(_column(Growth, name)) for name in GROWTH_COLUMNS]
    col = dict(zip(GROWTH_COLUMNS, columns, strict=True))
    updates = [f"{col['view']} = excluded.{col['view']}"]
    updates += [
        f"{col[name]} = {table}.{col[name]} + excluded.{col[name]}" for name in GROWTH_SUMS
    ]
    updates.append(
        f"{col['rss_growth_max']} = "
        f"{greatest}({table}.{col['rss_growth_max']}, excluded.{col['rss_growth_max']})"
    )
    # A batch or row without heap readings has no meaningful heap maximum.
    updates.append(
        f"{col['heap_growth_max']} = CASE"
        f" WHEN excluded.{col['heap_calls']} = 0 THEN {table}.{col['heap_growth_max']}"
        f" WHEN {table}.{col['heap_calls']} = 0 THEN excluded.{col['heap_growth_max']}"
        f" ELSE {greatest}({table}.{col['heap_growth_max']}, excluded.{col['heap_growth_max']})"
        " END"
    )
    placeholder = "(" + ", ".join(["%s"] * len(columns)) + ")"
    conflict = ", ".join(col[name] for name in ("kind", "key", "hour"))
    per_statement = max(1, min(500, (connection.features.max_query_params or 999) // len(columns)))
    with connection.cursor() as cursor:
        for start in range(0, len(rows), per_statement):
            chunk = rows[start : start + per_statement]
            params: list[Any] = []
            for row in chunk:
                params += _prepared(connection, Growth, GROWTH_COLUMNS, row)
            cursor.execute(
                f"INSERT INTO {table} ({', '.join(columns)}) "
                f"VALUES {', '.join([placeholder] * len(chunk))} "
                f"ON CONFLICT ({conflict}) DO UPDATE SET {', '.join(updates)}",
                params,
            )


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
    changes["rss_growth_max"] = Greatest("rss_growth_max", Value(values["rss_growth_max"]))
    if values["heap_calls"]:
        rows.filter(heap_calls=0).update(heap_growth_max=values["heap_growth_max"])
        changes["heap_growth_max"] = Greatest("heap_growth_max", Value(values["heap_growth_max"]))
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


def prune(retention_days: int | None = None) -> int:
    """Delete rows older than RETENTION_DAYS (or retention_days); return how many."""
    days = conf.get_settings().RETENTION_DAYS if retention_days is None else retention_days
    cutoff = to_datetime(datetime.now(timezone.utc) - timedelta(days=days))
    using = alias()
    growth, _ = Growth.objects.using(using).filter(hour__lt=cutoff).delete()
    workers, _ = Worker.objects.using(using).filter(last_seen__lt=cutoff).delete()
    return growth + workers
