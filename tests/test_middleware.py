from __future__ import annotations

import logging
import os
import random
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from asgiref.sync import async_to_sync
from django.db import connection
from django.http import HttpRequest, HttpResponse
from django.test import AsyncClient, Client, override_settings
from django.urls import include, path, re_path

from django_leakguard import memory, recorder
from django_leakguard.middleware import LeakGuardMiddleware, request_key
from django_leakguard.models import Growth
from django_leakguard.recorder import UNMATCHED, Aggregate, Recorder, get_recorder

ROOT = Path(__file__).resolve().parent.parent


def nested_view(request: HttpRequest, **kwargs: object) -> HttpResponse:
    return HttpResponse("ok")


# A URLconf with includes and a regex route, to check the key is the full joined route.
urlpatterns = [
    path(
        "api/<int:version>/",
        include(
            [path("items/<slug:slug>/", nested_view), re_path(r"^old/(?P<n>\d+)$", nested_view)]
        ),
    ),
    path("", include("testproject.urls")),
]


@pytest.fixture
def rec(monkeypatch: pytest.MonkeyPatch) -> Iterator[Recorder]:
    monkeypatch.setattr(recorder, "HEAP_PROBE_BUDGET", float("inf"))
    instance = get_recorder()
    instance.discard()
    yield instance
    instance.discard()


def totals(rec: Recorder) -> dict[tuple[str, str], Aggregate]:
    merged: dict[tuple[str, str], Aggregate] = {}
    for bucket in rec.pending().values():
        for name, aggregate in bucket.items():
            merged.setdefault(name, Aggregate(aggregate.view)).merge(aggregate)
    return merged


@override_settings(ROOT_URLCONF=__name__)
def test_keys_are_full_routes_never_paths(rec: Recorder) -> None:
    client = Client()
    assert client.get("/api/2/items/blue-shoe/?q=secret").status_code == 200
    assert client.get("/api/3/old/17").status_code == 200
    assert client.get("/products/5/").status_code == 200
    assert client.get("/no/such/page/?token=secret").status_code == 404
    assert client.get("/").status_code == 200
    assert {key: a.view for (_, key), a in totals(rec).items()} == {
        "/api/<int:version>/items/<slug:slug>/": "tests.test_middleware.nested_view",
        "/api/<int:version>/old/(?P<n>\\d+)": "tests.test_middleware.nested_view",
        "/products/<int:pk>/": "shop.views.product",
        UNMATCHED: "",
        "/": "shop.views.home",
    }


def test_request_key_survives_odd_resolver_matches() -> None:
    request = HttpRequest()
    assert request_key(request) == (UNMATCHED, "")
    request.resolver_match = object()  # type: ignore[assignment]
    assert request_key(request) == (UNMATCHED, "")


@pytest.mark.django_db
def test_requests_that_do_not_flush_run_no_query(
    rec: Recorder, django_assert_num_queries: object
) -> None:
    client = Client()
    with django_assert_num_queries(0):  # type: ignore[operator]
        for _ in range(20):
            client.get("/products/1/")
    assert totals(rec)["request", "/products/<int:pk>/"].calls == 20


def test_serial_requests_keep_known_memory(rec: Recorder) -> None:
    client = Client()
    client.get("/leak/retain/")  # warm up: first-call imports and caches
    rec.discard()
    for _ in range(40):
        assert client.get("/leak/retain/").status_code == 200
    aggregate = totals(rec)["request", "/leak/retain/"]
    assert aggregate.calls == 40
    if memory.heap_available():
        # 64 KiB kept per request, plus the list's growth and allocator headers.
        assert 40 * 64 * 1024 <= aggregate.heap_growth <= 40 * 66 * 1024


def test_heap_growth_ranks_the_retaining_view_above_the_transient_one(rec: Recorder) -> None:
    if not memory.heap_available():
        pytest.skip("glibc mallinfo2 is not available here")
    client = Client()
    for _ in range(30):
        client.get("/spike/")
        client.get("/leak/retain/")
        client.get("/products/3/")
    by_heap = sorted(totals(rec).items(), key=lambda item: item[1].heap_growth, reverse=True)
    assert by_heap[0][0] == ("request", "/leak/retain/")
    spike = totals(rec)["request", "/spike/"]
    assert spike.heap_growth < 30 * 64 * 1024 / 4
    assert spike.rss_growth_max >= 0


def test_async_views_and_async_middleware(rec: Recorder) -> None:
    async def get() -> int:
        client = AsyncClient()
        codes = [(await client.get("/health/")).status_code for _ in range(5)]
        codes.append((await client.get("/products/2/")).status_code)
        return sum(codes)

    assert async_to_sync(get)() == 6 * 200
    aggregates = totals(rec)
    assert aggregates["request", "/health/"].calls == 5
    assert aggregates["request", "/health/"].view == "shop.views.health"
    assert aggregates["request", "/products/<int:pk>/"].calls == 1
    assert rec.in_flight == 0


@pytest.mark.django_db(transaction=True)
def test_async_requests_flush_outside_the_event_loop(rec: Recorder) -> None:
    async def get() -> None:
        client = AsyncClient()
        with override_settings(LEAKGUARD={"FLUSH_INTERVAL": 1e-9}):
            await client.get("/health/")

    async_to_sync(get)()
    assert Growth.objects.get(key="/health/").calls == 1


@pytest.mark.django_db(transaction=True)
def test_sync_requests_flush_when_due(rec: Recorder) -> None:
    client = Client()
    client.get("/products/1/")
    with override_settings(LEAKGUARD={"FLUSH_INTERVAL": 1e-9}):
        client.get("/products/2/")
    assert Growth.objects.get().calls == 2


@pytest.mark.django_db(transaction=True)
def test_flush_runs_outside_the_views_transaction(
    rec: Recorder, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(connection.settings_dict, "ATOMIC_REQUESTS", True)
    seen: list[bool] = []
    real = recorder.Recorder._flush_locked

    def spy(self: Recorder) -> bool:
        seen.append(connection.in_atomic_block)
        return real(self)

    monkeypatch.setattr(recorder.Recorder, "_flush_locked", spy)
    with override_settings(LEAKGUARD={"FLUSH_INTERVAL": 1e-9}):
        assert Client().get("/products/1/").status_code == 200
    assert seen == [False]
    assert Growth.objects.get().calls == 1


def test_view_exceptions_propagate_unchanged(rec: Recorder) -> None:
    with pytest.raises(RuntimeError, match="boom: a view that fails"):
        Client().get("/boom/")
    assert Client(raise_request_exception=False).get("/boom/").status_code == 500
    assert totals(rec)["request", "/boom/"].calls == 2
    assert rec.in_flight == 0


def test_exceptions_from_inner_middleware_propagate_and_are_recorded(rec: Recorder) -> None:
    def failing(request: HttpRequest) -> HttpResponse:
        raise KeyError("inner")

    with pytest.raises(KeyError, match="inner"):
        LeakGuardMiddleware(failing)(HttpRequest())
    assert totals(rec)["request", UNMATCHED].calls == 1


def test_record_false_records_nothing(rec: Recorder) -> None:
    with override_settings(LEAKGUARD={"RECORD": False}):
        assert Client().get("/products/1/").status_code == 200

        async def get() -> int:
            return int((await AsyncClient().get("/health/")).status_code)

        assert async_to_sync(get)() == 200
    assert rec.pending() == {}


def test_invalid_settings_never_break_a_request(rec: Recorder) -> None:
    with override_settings(LEAKGUARD={"FLUSH_INTERVAL": "soon"}):
        assert Client().get("/products/1/").status_code == 200
    assert rec.pending() == {}


def test_ten_thousand_random_urls_keep_the_keys_bounded(rec: Recorder) -> None:
    client = Client()
    chance = random.Random(3)
    for _ in range(5_000):
        client.get(f"/{chance.getrandbits(64):x}/{chance.random()}?q={chance.random()}")
        client.get(f"/products/{chance.getrandbits(30)}/?utm={chance.random()}")
    aggregates = totals(rec)
    assert set(aggregates) == {("request", UNMATCHED), ("request", "/products/<int:pk>/")}
    assert sum(a.calls for a in aggregates.values()) == 10_000


@pytest.mark.django_db(transaction=True)
def test_database_failure_keeps_requests_and_data(
    rec: Recorder, caplog: pytest.LogCaptureFixture
) -> None:
    client = Client()
    with connection.cursor() as cursor:
        cursor.execute("ALTER TABLE django_leakguard_growth RENAME TO leakguard_away")
    try:
        with (
            override_settings(LEAKGUARD={"FLUSH_INTERVAL": 1e-9}),
            caplog.at_level(logging.INFO, logger="django_leakguard"),
        ):
            for _ in range(5):
                assert client.get("/products/1/").status_code == 200
    finally:
        with connection.cursor() as cursor:
            cursor.execute("ALTER TABLE leakguard_away RENAME TO django_leakguard_growth")
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1  # one per failure streak
    assert "could not write memory measurements" in warnings[0].getMessage()
    with caplog.at_level(logging.INFO, logger="django_leakguard"):
        assert rec.flush() is True
    assert "wrote its pending memory measurements again" in caplog.text
    assert Growth.objects.get().calls == 5


DONE_SCRIPT = r"""
import os, sys
os.environ["DJANGO_SETTINGS_MODULE"] = "testproject.settings"
import django
django.setup()
from django.core.management import call_command
call_command("migrate", verbosity=0)
from django.test import Client
client = Client()
n, m = int(sys.argv[1]), int(sys.argv[2])
for i in range(max(n, m)):
    if i < n:
        assert client.get("/leak/retain/").status_code == 200
    if i < m:
        assert client.get("/products/%d/" % i).status_code == 200
    if i < 20:
        assert client.get("/spike/").status_code == 200
if len(sys.argv) > 3:
    # Point the database somewhere unreachable: the data must survive until it is back.
    from django.db import connections
    from django_leakguard import flush
    settings = connections["default"].settings_dict
    good, settings["NAME"] = settings["NAME"], "/nonexistent/dir/db.sqlite3"
    connections["default"].close()
    assert flush() is False
    assert client.get("/products/0/").status_code == 200
    assert flush() is False
    settings["NAME"] = good
    connections["default"].close()
# Exit normally: the atexit hook flushes.
"""


@pytest.mark.servers
@pytest.mark.parametrize("unreachable", [False, True])
def test_counts_are_exact_after_the_process_exits(tmp_path: Path, unreachable: bool) -> None:
    db = tmp_path / "db.sqlite3"
    env = {
        **os.environ,
        "DATABASE_URL": f"sqlite://{db}",
        "LEAKGUARD_FLUSH_INTERVAL": "3600",
        "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "testproject")]),
    }
    n, m = 150, 90
    args = [sys.executable, "-c", DONE_SCRIPT, str(n), str(m)]
    if unreachable:
        args.append("unreachable")
    result = subprocess.run(args, env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    if unreachable:
        assert result.stderr.count("could not write memory measurements") == 1
    with sqlite3.connect(db) as conn:
        rows = conn.execute(
            "SELECT key, SUM(calls), SUM(heap_growth), SUM(heap_calls) "
            "FROM django_leakguard_growth GROUP BY key ORDER BY SUM(heap_growth) DESC"
        ).fetchall()
    counts = {key: calls for key, calls, _, _ in rows}
    assert counts["/leak/retain/"] == n
    assert counts["/products/<int:pk>/"] == m + (1 if unreachable else 0)
    assert counts["/spike/"] == 20
    if memory.heap_available():
        assert rows[0][0] == "/leak/retain/"
        assert rows[0][3] > 0
