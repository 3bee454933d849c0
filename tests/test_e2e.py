"""End to end: real servers recycle under a mixed load, storage counts every call, and
leakreport names the leak.

Each test starts a real server (Gunicorn sync, Gunicorn gthread, uWSGI, a Celery prefork
worker) on a free loopback port, sends a mixed load over ordinary, leaking and transient
endpoints or tasks, stops the server, then checks (a) that the stored counts equal exactly what
was sent although workers were recycled during the load, (b) that a leaking key ranks first in
`leakreport --format json` and the transient one is not in the top three, and (c) that no worker
served more than its limit plus its jitter. Storage is PostgreSQL when
LEAKGUARD_TEST_POSTGRES_URL is set (CI), else a SQLite file.
"""

from __future__ import annotations

import json
import os
import random
import re
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import pytest

from tests import servers

pytestmark = pytest.mark.servers

MAX_REQUESTS = 40
JITTER = 0.25  # up to 10 more requests per worker
JITTER_ABSOLUTE = round(MAX_REQUESTS * JITTER)

# (path template, weight, URL pattern the middleware stores); {n} is the request number.
LOAD = [
    ("/", 14, "/"),
    ("/products/{n}/", 16, "/products/<int:pk>/"),
    ("/search/?q=user{n}@example.com", 10, "/search/"),
    ("/leak/retain/", 30, "/leak/retain/"),
    ("/leak/cache/k{n}/", 20, "/leak/cache/<str:key>/"),
    ("/leak/small/", 15, "/leak/small/"),
    ("/spike/", 10, "/spike/"),
]
LEAKS = {"/leak/retain/", "/leak/cache/<str:key>/", "/leak/small/"}
TRANSIENT = "/spike/"
TASK_LEAKS = {"shop.tasks.leak_retain", "shop.tasks.leak_cache", "shop.tasks.leak_history"}
TASK_TRANSIENT = "shop.tasks.spike"


@pytest.fixture
def database(tmp_path: Path) -> Iterator[str]:
    """A migrated database for one test: a fresh PostgreSQL database in CI, else SQLite."""
    url = os.environ.get("LEAKGUARD_TEST_POSTGRES_URL", "")
    if not url:
        path = tmp_path / "db.sqlite3"
        servers.migrate(servers.project_env(path))
        yield str(path)
        return
    import psycopg

    name = f"leakguard_e2e_{uuid.uuid4().hex[:12]}"
    parts = urlsplit(url)
    admin = urlunsplit(parts._replace(path="/postgres"))
    with psycopg.connect(admin, autocommit=True) as connection:
        connection.execute(f'CREATE DATABASE "{name}"')
    test_url = urlunsplit(parts._replace(path=f"/{name}"))
    try:
        servers.migrate(servers.project_env(test_url))
        yield test_url
    finally:
        with psycopg.connect(admin, autocommit=True) as connection:
            connection.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def plan(total: int, seed: int = 3) -> tuple[list[str], Counter[str]]:
    """Return the paths of a mixed load and the count each URL pattern should get."""
    rng = random.Random(seed)
    templates = [(template, pattern) for template, _, pattern in LOAD]
    weights = [weight for _, weight, _ in LOAD]
    paths: list[str] = []
    expected: Counter[str] = Counter()
    for n, (template, pattern) in enumerate(rng.choices(templates, weights, k=total)):
        paths.append(template.replace("{n}", str(n)))
        expected[pattern] += 1
    return paths, expected


def send(server: servers.Server, paths: list[str], clients: int) -> None:
    """GET every path from clients threads; every request must succeed."""
    assert servers.get_all(server, paths, clients) == []


def report(env: dict[str, str]) -> dict[str, object]:
    output = servers.manage(
        env, "leakreport", "--format", "json", "--since", "1h", "--limit", "50"
    )
    return json.loads(output)  # type: ignore[no-any-return]


def assert_boot_times(env: dict[str, str]) -> None:
    """Every worker row knows when its process started and served its first call (jitter.py)."""
    output = servers.manage(
        env,
        "shell",
        "-c",
        "import json\n"
        "from django_leakguard.models import Worker\n"
        "print(json.dumps([(w.first_call_at - w.process_started_at).total_seconds()"
        " for w in Worker.objects.filter(kind='request')]))",
    )
    boots = json.loads(output.strip().splitlines()[-1])
    assert len(boots) >= 2, boots
    # A worker boots (Django set up, or forked from a preloaded master) in well under 30 s.
    assert all(0 < boot < 30 for boot in boots), boots


def assert_leak_ranked_first(env: dict[str, str], kind: str, top: int = 3) -> list[dict[str, Any]]:
    """Check leakreport's JSON: a leak first, the transient key not in the top `top`."""
    data = report(env)
    rows = [row for row in data["rows"] if row["kind"] == kind]  # type: ignore[attr-defined]
    keys = [row["key"] for row in rows]
    assert keys, data
    summary = [
        (row["key"], row["calls"], row["heap_calls"], row["heap_growth_per_call_bytes"])
        for row in rows
    ]
    assert keys[0] in LEAKS | TASK_LEAKS, summary
    transient = TRANSIENT if kind == "request" else TASK_TRANSIENT
    assert transient not in keys[:top], summary
    return rows


@pytest.mark.parametrize(
    ("worker_class", "threads", "clients"), [("sync", 1, 2), ("gthread", 4, 2)]
)
def test_gunicorn(
    tmp_path: Path, database: str, worker_class: str, threads: int, clients: int
) -> None:
    env = servers.project_env(
        database,
        LEAKGUARD_MAX_REQUESTS=MAX_REQUESTS,
        LEAKGUARD_MAX_REQUESTS_JITTER=JITTER,
        LEAKGUARD_FLUSH_INTERVAL=3600,  # rows are written as each worker exits
    )
    paths, expected = plan(400)
    port = servers.free_port()
    command = servers.gunicorn_command(
        "testproject.wsgi", port, worker_class=worker_class, threads=threads, workers=2
    )
    with servers.running(
        f"gunicorn-{worker_class}",
        command,
        env=env,
        log_path=tmp_path / "gunicorn.log",
        port=port,
        ready=lambda server: server.wait_for_log(r"django-leakguard: worker \d+", count=2),
    ) as server:
        # The spikes go one at a time. Memory is process-wide: a 20 MiB allocation freed while
        # other threads' requests are in flight is split among them (docs/recording, "Threads
        # and async"), noise far above a 64 KiB leak. Everything else runs concurrently.
        send(server, [path for path in paths if path != TRANSIENT], clients)
        send(server, [path for path in paths if path == TRANSIENT], 1)
        server.wait_for_log(r"ACCESS pid", count=len(paths))
        log = server.log()
    assert "Autorestarting worker after current request" in log

    # (a) Every request is stored exactly once, although workers were recycled.
    assert servers.stored_calls(env, "request") == expected
    assert_boot_times(env)

    # (b) A leak ranks first; the transient spike is not in the top three. Under gthread,
    # where few of a leak's calls run alone (2 readings of 59 calls in one CI run), issue 12's
    # target allows one non-leak above a leak: the spike not in the top two.
    assert_leak_ranked_first(env, "request", 3 if worker_class == "sync" else 2)

    # (c) No worker served more than its limit plus its jitter. A gthread worker also finishes
    # the requests its other threads had already accepted when it decided to stop.
    served = servers.runs(servers.access_pids(log))
    assert len(served) >= 6, served
    in_hand = threads - 1
    assert max(served.values()) <= MAX_REQUESTS + JITTER_ABSOLUTE + in_hand, served


def test_uwsgi(tmp_path: Path, database: str) -> None:
    env = servers.project_env(
        database,
        LEAKGUARD_MAX_REQUESTS=MAX_REQUESTS,
        LEAKGUARD_MAX_REQUESTS_JITTER=JITTER,
        LEAKGUARD_FLUSH_INTERVAL=3600,
    )
    snippet = servers.manage(env, "leakguard_config", "uwsgi", "--processes", "2")
    delta = int(re.search(r"^max-requests-delta = (\d+)", snippet, re.MULTILINE).group(1))  # type: ignore[union-attr]
    ini = tmp_path / "uwsgi.ini"
    # uWSGI never recycles a worker younger than min-worker-lifetime (10 s by default).
    ini.write_text(snippet + "processes = 2\nmin-worker-lifetime = 0\n")
    paths, expected = plan(400, seed=5)
    port = servers.free_port()
    command = servers.uwsgi_command("testproject.wsgi:application", port, ini=ini)
    with servers.running(
        "uwsgi",
        command,
        env=env,
        log_path=tmp_path / "uwsgi.log",
        port=port,
        ready=lambda server: server.wait_for_http("/"),
    ) as server:
        send(server, paths[:1], 1)  # the readiness probe counted one "/" too
        send(server, paths[1:], 2)
        server.wait_for_log(r"\[pid: \d+\|app: ", count=len(paths) + 1)
        log = server.log()
    # The readiness probe's "/": once, or more where a probe timed out on a worker still
    # starting and was answered all the same (once in CI); the server's log says how many.
    probes = len(re.findall(r"\] GET / =>", server.log())) - expected["/"]
    assert probes >= 1
    expected["/"] += probes
    assert "The work of process" in log  # uWSGI recycled workers (max-requests)
    assert servers.stored_calls(env, "request") == expected
    assert_leak_ranked_first(env, "request")
    served = servers.runs(servers.uwsgi_request_pids(log))
    assert len(served) >= 4, served
    # Worker i recycles after max-requests + (i - 1) x delta: at most + delta with 2 workers.
    assert max(served.values()) <= MAX_REQUESTS + delta, served


def test_celery_prefork(tmp_path: Path, database: str) -> None:
    broker: dict[str, str]
    redis = os.environ.get("LEAKGUARD_TEST_REDIS_URL", "")
    if redis:
        broker = {"CELERY_BROKER_URL": re.sub(r"/\d*$", "", redis) + "/13"}
    else:
        broker = {"TESTPROJECT_BROKER_DIR": str(tmp_path / "broker")}
    max_tasks = 5
    env = servers.project_env(
        database,
        LEAKGUARD_CELERY_MAX_TASKS_PER_CHILD=max_tasks,
        LEAKGUARD_FLUSH_INTERVAL=3600,
        **broker,
    )
    note = tmp_path / "pids"
    # Eight of each, shuffled: a child's first call of a task is warm-up, left out of the heap
    # signal, so each leaking task needs calls enough for some child to run it twice.
    calls = ["leak_retain", "leak_cache", "leak_history", "spike", "add"] * 8
    random.Random(11).shuffle(calls)
    expected = Counter(f"shop.tasks.{name}" for name in calls)
    lines = []
    for n, name in enumerate(calls):
        args = {"add": f"{n}, {n}, ", "leak_cache": f"{n}, "}.get(name, "")
        lines.append(f"tasks.{name}.delay({args}note={str(note)!r})")
    with servers.running(
        "celery",
        servers.celery_worker_command(concurrency=2),
        env=env,
        log_path=tmp_path / "celery.log",
        ready=lambda server: server.wait_for_log(r"celery@\S+ ready", timeout=40),
    ) as server:
        if redis:
            # Start from an empty queue: the test's own Redis database.
            servers.manage(
                env,
                "shell",
                "-c",
                "from testproject.celery import app; app.control.purge()",
            )
        script = "\n".join(
            ["from testproject.celery import app", "from shop import tasks", *lines]
        )
        servers.manage(env, "shell", "-c", script)
        deadline = time.monotonic() + 50
        while True:
            done = note.read_text().split() if note.exists() else []
            if len(done) >= len(calls) or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert len(done) == len(calls), server.log()
        time.sleep(1.5)  # the last children finish their task bookkeeping
    assert servers.stored_calls(env, "task") == expected
    rows = assert_leak_ranked_first(env, "task")
    assert rows[0]["key"] == "shop.tasks.leak_retain"
    served = servers.runs([int(pid) for pid in done])
    assert len(served) >= 8, served
    assert max(served.values()) <= max_tasks, served
