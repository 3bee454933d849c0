from __future__ import annotations

import os
from datetime import datetime, timezone
from io import StringIO

import pytest
from django.core.management import call_command
from django.db import connections
from django.db.migrations.executor import MigrationExecutor

from django_leakguard import records
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


KEY_COLUMNS = [
    ("django_leakguard_growth", "key"),
    ("django_leakguard_growth", "kind"),
    ("django_leakguard_worker", "host"),
]


def key_collations(using: str) -> list[tuple[str, str]]:
    """Each text column of the unique constraints: its collation and its table's."""
    found = []
    with connections[using].cursor() as cursor:
        for table, column in KEY_COLUMNS:
            cursor.execute(
                "SELECT c.collation_name, t.table_collation FROM information_schema.columns c"
                " JOIN information_schema.tables t USING (table_schema, table_name)"
                " WHERE c.table_schema = DATABASE() AND c.table_name = %s AND c.column_name = %s",
                [table, column],
            )
            found.append(cursor.fetchone())
    return found


@pytest.mark.parametrize(
    "using",
    [
        pytest.param("default", marks=pytest.mark.django_db(transaction=True)),
        pytest.param(
            "mysql",
            marks=[
                pytest.mark.skipif(
                    not os.environ.get("LEAKGUARD_TEST_MYSQL_URL")
                    and os.environ.get("LEAKGUARD_REQUIRE_SERVICES") != "1",
                    reason="MySQL tests need LEAKGUARD_TEST_MYSQL_URL",
                ),
                pytest.mark.mysql,
                pytest.mark.django_db(transaction=True, databases=["default", "mysql"]),
            ],
        ),
    ],
)
def test_binary_key_migration_applies_to_mysql_only_and_reverses(using: str) -> None:
    connection = connections[using]
    for target in ("0002_traced", "0003_mysql_binary_keys"):
        MigrationExecutor(connection).migrate([("django_leakguard", target)])
        if connection.vendor != "mysql":
            continue  # nothing to see: SQLite compares bytes already
        binary = "utf8mb4_nopad_bin" if connection.mysql_is_mariadb else "utf8mb4_0900_bin"
        for column, table in key_collations(using):
            assert column == (binary if target == "0003_mysql_binary_keys" else table)
    # Leave the database as the other tests expect it: every migration applied.
    executor = MigrationExecutor(connection)
    executor.migrate(executor.loader.graph.leaf_nodes("django_leakguard"))


def index_columns(using: str) -> dict[str, list[str]]:
    """The growth table's indexes that are not unique: their columns, by name."""
    connection = connections[using]
    with connection.cursor() as cursor:
        found = connection.introspection.get_constraints(cursor, Growth._meta.db_table)
    return {
        name: list(details["columns"])
        for name, details in found.items()
        if details["index"] and not details["unique"] and not details["primary_key"]
    }


@pytest.mark.parametrize(
    "using",
    [
        pytest.param("default", marks=pytest.mark.django_db(transaction=True)),
        pytest.param(
            "postgres",
            marks=[
                pytest.mark.skipif(
                    not os.environ.get("LEAKGUARD_TEST_POSTGRES_URL")
                    and os.environ.get("LEAKGUARD_REQUIRE_SERVICES") != "1",
                    reason="PostgreSQL tests need LEAKGUARD_TEST_POSTGRES_URL",
                ),
                pytest.mark.postgres,
                pytest.mark.django_db(transaction=True, databases=["default", "postgres"]),
            ],
        ),
        pytest.param(
            "mysql",
            marks=[
                pytest.mark.skipif(
                    not os.environ.get("LEAKGUARD_TEST_MYSQL_URL")
                    and os.environ.get("LEAKGUARD_REQUIRE_SERVICES") != "1",
                    reason="MySQL tests need LEAKGUARD_TEST_MYSQL_URL",
                ),
                pytest.mark.mysql,
                pytest.mark.django_db(transaction=True, databases=["default", "mysql"]),
            ],
        ),
    ],
)
def test_ranking_index_holds_the_ranking_sums_and_reverses(using: str) -> None:
    connection = connections[using]
    ranking = ["kind", "key", "hour", *records.RANKING_SUMS, *records.TRACED_SUMS]
    assert index_columns(using).get("leakguard_growth_ranking") == ranking
    try:
        MigrationExecutor(connection).migrate(
            [("django_leakguard", "0004_counts_for_small_objects_and_levelling_off")]
        )
        assert "leakguard_growth_ranking" not in index_columns(using)
        assert index_columns(using).get("leakguard_growth_hour") == ["hour"]
    finally:
        # Leave the database as the other tests expect it: every migration applied.
        executor = MigrationExecutor(connection)
        executor.migrate(executor.loader.graph.leaf_nodes("django_leakguard"))
    assert index_columns(using).get("leakguard_growth_ranking") == ranking
