"""Serve one run of the accuracy project under a real server and read back the ranking.

Each run migrates a fresh database (PostgreSQL at 127.0.0.1:5432 when reachable, else SQLite),
starts the server on a free loopback port (always stopped, also on failure), sends the plan's
calls, stops the server (each worker flushes as it exits), then reads
``leakreport --format json --limit 0``.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import socket
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from bench.accuracy import workload
from bench.accuracy.workload import Plan
from tests import servers

PROJECT = Path(__file__).resolve().parent
POSTGRES_URL = "postgresql://postgres@127.0.0.1:5432/postgres"
REDIS_URL = "redis://127.0.0.1:6379/11"
WORKERS = 2
KiB = 1024


@dataclass(frozen=True)
class Setup:
    """A server and how the load reaches it."""

    name: str
    about: str
    clients: int
    tasks: bool = False
    threads: int = 1


SETUPS = {
    setup.name: setup
    for setup in (
        Setup("gunicorn-sync", "Gunicorn sync, 2 workers, 2 clients", 2),
        Setup("gunicorn-gthread", "Gunicorn gthread, 2 workers x 4 threads, 4 clients", 4,
              threads=4),
        Setup("uwsgi", "uWSGI, 2 processes, enable-threads, 2 clients", 2),
        Setup("uwsgi-router", "uWSGI behind its HTTP router (--http), as uwsgi, 2 clients", 2),
        Setup("uvicorn", "Gunicorn with uvicorn_worker.UvicornWorker, 2 workers, 2 clients", 2),
        Setup("celery", "Celery prefork, concurrency 2, tasks sent through Redis", 0,
              tasks=True),
    )
}  # fmt: skip


@dataclass
class Outcome:
    """One run: the plan, where it ran, and leakreport's rows (best first)."""

    setup: str
    plan: Plan
    database: str
    rows: list[dict[str, Any]]
    sent: int
    seconds: float
    kind: str = "request"
    workers: int | None = None  # worker processes started (recycling replaces them)
    kept_log: Path | None = None  # the server's log, kept when calls went unrecorded

    def _kind_names(self) -> list[str]:
        names = [
            kind.name for kind in workload.KINDS if kind.leak and kind.name in self.plan.sizes
        ]
        names += [kind.name for kind in workload.NON_LEAKS]
        if self.kind == "task":
            names = [name for name in names if name != "plain"]
        return names

    def row(self, name: str) -> dict[str, Any] | None:
        key = workload.BY_NAME[name].key(self.kind)
        return next((row for row in self.rows if row["key"] == key), None)

    def rank(self, name: str) -> int | None:
        row = self.row(name)
        return int(row["rank"]) if row else None

    def heap_readings(self, name: str) -> int:
        row = self.row(name)
        return int(row["heap_calls"]) if row else 0

    def heap_per_call(self, name: str) -> float | None:
        row = self.row(name)
        if row is None or row["heap_growth_per_call_bytes"] is None:
            return None
        return float(row["heap_growth_per_call_bytes"])

    def calls(self, name: str) -> int:
        row = self.row(name)
        return int(row["calls"]) if row else 0

    @property
    def stored(self) -> int:
        return sum(int(row["calls"]) for row in self.rows)

    @property
    def worst_leak_rank(self) -> int:
        """The rank of the lowest-ranked leak; a leak missing from the report ranks last."""
        last = len(self.rows) + 1
        return max((self.rank(name) or last) for name in self.plan.leaks())

    def non_leaks_above(self, name: str | None = None) -> list[str]:
        """Non-leaks ranked above the leak name (above any leak when name is None)."""
        limit = self.worst_leak_rank if name is None else self.rank(name) or len(self.rows) + 1
        found = []
        for kind in self._kind_names():
            rank = self.rank(kind)
            if not workload.BY_NAME[kind].leak and rank is not None and rank < limit:
                found.append(kind)
        return sorted(found, key=lambda kind: self.rank(kind) or 0)

    @property
    def clean(self) -> bool:
        """Every leak ranks above every non-leak."""
        return not self.non_leaks_above()


def redis_url() -> str:
    """The Celery broker: ACCURACY_REDIS_URL, else a database of the local Redis."""
    return os.environ.get("ACCURACY_REDIS_URL", REDIS_URL)


def reachable(url: str) -> bool:
    """Whether the service at url (postgresql:// or redis://) accepts connections."""
    parts = urlsplit(url)
    try:
        with socket.create_connection((parts.hostname or "127.0.0.1", parts.port or 0), 2):
            return True
    except OSError:
        return False


@contextlib.contextmanager
def fresh_database(workdir: Path, postgres: str | None) -> Iterator[tuple[str, str]]:
    """Yield (DATABASE_URL, description) of an empty database, dropped afterwards."""
    if not postgres:
        path = workdir / "accuracy.sqlite3"
        yield f"sqlite://{path}", "SQLite"
        return
    import psycopg

    name = f"leakguard_accuracy_{uuid.uuid4().hex[:12]}"
    parts = urlsplit(postgres)
    admin = urlunsplit(parts._replace(path="/postgres"))
    with psycopg.connect(admin, autocommit=True) as connection:
        connection.execute(f'CREATE DATABASE "{name}"')
    try:
        yield urlunsplit(parts._replace(path=f"/{name}")), "PostgreSQL"
    finally:
        with psycopg.connect(admin, autocommit=True) as connection:
            connection.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def project_env(database_url: str, plan: Plan, **extra: str) -> dict[str, str]:
    """The environment of the project's processes: its settings, the database, the plan."""
    # Coverage's switches stay out too: its tracer allocates as lines run, which a memory
    # measurement would see. The package is covered by the other end-to-end tests.
    env = {
        name: value
        for name, value in os.environ.items()
        if name not in ("DJANGO_SETTINGS_MODULE", "DATABASE_URL", "PYTHONPATH")
        and not name.startswith(("LEAKGUARD_", "ACCURACY_", "COV_", "COVERAGE_"))
    }
    # BENCH_SRC: another checkout's src/ for the servers to import django_leakguard from (to
    # compare a change against the code before it in the same run).
    path = [str(PROJECT), *filter(None, [os.environ.get("BENCH_SRC")])]
    env.update(
        PYTHONPATH=os.pathsep.join(path),
        DJANGO_SETTINGS_MODULE="accuracysite.settings",
        PYTHONUNBUFFERED="1",
        DATABASE_URL=database_url,
        LEAKGUARD_MAX_REQUESTS=str(plan.max_requests),
        LEAKGUARD_MAX_REQUESTS_JITTER="0.1",
        LEAKGUARD_FLUSH_INTERVAL="2",
        **plan.environ(),
        **extra,
    )
    return env


def manage(env: dict[str, str], *args: str, timeout: float = 120) -> str:
    return servers.manage(env, *args, timeout=timeout, project=PROJECT)


def run(
    setup_name: str,
    plan: Plan,
    *,
    postgres: str | None,
    workdir: Path | None = None,
    extra_env: dict[str, str] | None = None,
    after: Callable[[dict[str, str]], object] | None = None,
) -> Outcome:
    """Serve plan under the named setup in a fresh database; return leakreport's ranking.

    extra_env: more variables for the project (e.g. LEAKGUARD_TRACE_SAMPLE_RATE); after: called
    with the project's environment once the ranking is read, before the database is dropped.
    """
    setup = SETUPS[setup_name]
    with contextlib.ExitStack() as stack:
        if workdir is None:
            workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="accuracy-")))
        url, database = stack.enter_context(fresh_database(workdir, postgres))
        env = project_env(url, plan, **(extra_env or {}))
        manage(env, "migrate", "--noinput", "-v", "0")
        started = time.monotonic()
        if setup.tasks:
            sent, workers = _run_celery(env, plan, workdir), None
        else:
            sent, workers = _run_http(setup, env, plan, workdir)
        seconds = time.monotonic() - started
        kind = "task" if setup.tasks else "request"
        output = manage(
            env, "leakreport", "--format", "json", "--limit", "0", "--kind", kind, "--since", "1d"
        )
        rows = json.loads(output)["rows"]
        if after is not None:
            after(env)
        outcome = Outcome(setup_name, plan, database, rows, sent, seconds, kind, workers)
        if outcome.stored != outcome.sent:
            outcome.kept_log = _keep_log(workdir, f"{setup_name}-{plan.seed}")
    return outcome


def _keep_log(workdir: Path, name: str) -> Path:
    """Copy the server's log out of workdir (removed with the run) for a look afterwards."""
    folder = Path(tempfile.gettempdir()) / "leakguard-accuracy"
    folder.mkdir(exist_ok=True)
    target = folder / f"{name}-{uuid.uuid4().hex[:6]}.log"
    target.write_text("".join(log.read_text(errors="replace") for log in workdir.glob("*.log")))
    return target


_UNANSWERED = re.compile(r"ConnectionResetError|RemoteDisconnected")


def _run_http(setup: Setup, env: dict[str, str], plan: Plan, workdir: Path) -> tuple[int, int]:
    """Serve plan; return the calls sent and the worker processes started."""
    port = servers.free_port()
    log_path = workdir / f"{setup.name}.log"
    ready_gunicorn = lambda server: server.wait_for_log(  # noqa: E731
        r"django-leakguard: worker \d+", count=WORKERS
    )
    if setup.name in ("uwsgi", "uwsgi-router"):
        snippet = manage(env, "leakguard_config", "uwsgi", "--processes", str(WORKERS))
        ini = workdir / "uwsgi.ini"
        # uWSGI never recycles a worker younger than min-worker-lifetime (10 s by default).
        ini.write_text(
            f"{snippet}\nprocesses = {WORKERS}\nmin-worker-lifetime = 0\nenable-threads = true\n"
            "disable-logging = true\n"
        )
        # --http-socket: the workers parse HTTP; --http: uWSGI's router does, as a web server
        # speaking the uwsgi protocol (--socket) would.
        http = "--http" if setup.name == "uwsgi-router" else "--http-socket"
        command = servers.uwsgi_command("accuracysite.wsgi:application", port, ini=ini, http=http)
        ready = lambda server: server.wait_for_http("/api/ping/")  # noqa: E731
        probes = 1
        # "spawned uWSGI worker 1 (pid: 10)", "Respawned uWSGI worker 1 (new pid: 12)"
        booted = r"uWSGI worker \d+ \((?:new )?pid: (\d+)\)"
    else:
        app, worker_class = "accuracysite.wsgi", "sync"
        if setup.name == "gunicorn-gthread":
            worker_class = "gthread"
        elif setup.name == "uvicorn":
            app, worker_class = "accuracysite.asgi:application", "uvicorn_worker.UvicornWorker"
        command = servers.gunicorn_command(
            app, port, workers=WORKERS, worker_class=worker_class, threads=setup.threads
        )
        ready, probes = ready_gunicorn, 0
        booted = r"django-leakguard: worker (\d+)"
    paths = plan.paths()
    with servers.running(
        setup.name, command, env=env, log_path=log_path, cwd=PROJECT, port=port, ready=ready
    ) as server:
        failures = servers.get_all(server, paths, clients=setup.clients, join_timeout=600)
        # A worker exiting after MAX_REQUESTS may close a connection it had accepted without
        # answering (seen with Uvicorn's workers): the call never reached the view, so send
        # it again, once; "stored/sent" shows whether it had.
        lost = [failure for failure in failures if _UNANSWERED.search(failure)]
        failures = [failure for failure in failures if failure not in lost]
        failures += servers.get_all(server, [failure.split(": ")[0] for failure in lost])
    if failures:
        raise AssertionError(f"{len(failures)} calls failed, e.g. {failures[:3]}")
    return len(paths) + probes, len(set(re.findall(booted, server.log())))


def _run_celery(env: dict[str, str], plan: Plan, workdir: Path) -> int:
    env = dict(
        env,
        ACCURACY_BROKER_URL=redis_url(),
        ACCURACY_QUEUE=f"accuracy-{uuid.uuid4().hex[:12]}",
    )
    calls = plan.tasks()
    listing = workdir / "tasks.json"
    listing.write_text(json.dumps(calls))
    with servers.running(
        "celery",
        servers.celery_worker_command("accuracysite", concurrency=WORKERS),
        env=env,
        log_path=workdir / "celery.log",
        cwd=PROJECT,
        ready=lambda server: server.wait_for_log(r"celery@\S+ ready", timeout=60),
    ) as server:
        manage(env, "enqueue", str(listing))
        server.wait_for_log(r"\] succeeded in ", count=len(calls), timeout=600)
    return len(calls)
