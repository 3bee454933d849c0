"""Fault injection: the database stalls, hangs, refuses or vanishes while real servers serve.

Each run starts a real server (Gunicorn sync, Gunicorn gthread, uWSGI with enable-threads,
Gunicorn with Uvicorn workers) whose LeakGuard database is PostgreSQL behind a loopback proxy
of this module's, sends a paced load, injects one fault, stops the server with SIGTERM and checks:

- requests do not wait on the database: no request takes a second, and the 99th percentile of
  the latencies during the fault is at most 50 ms above the one before it, in the same run;
- nothing is lost without a word: calls stored + calls the servers logged as lost ("N calls of
  K keys lost.") == calls served;
- the servers' LeakGuard log lines stay few, however long the fault lasts;
- a worker's exit takes at most EXIT_TIMEOUT seconds more than usual.

Marked servers too, so that tox leaves it out and `make test` (CI) runs it once.
"""

from __future__ import annotations

import contextlib
import re
import socket
import statistics
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import pytest

from django_leakguard.flusher import EXIT_TIMEOUT
from tests import servers

pytestmark = [pytest.mark.servers, pytest.mark.faults, pytest.mark.postgres]

CLIENTS = 3
PAUSE = 0.02  # between two requests of one client: a load the two workers serve easily
BASELINE = 2.0  # seconds of load before the fault
FAULT = 5.0  # seconds of load during the fault
P99_SLACK = 0.050
LOST = re.compile(r"([\d,]+) calls? of [\d,]+ keys? lost\.")
SERVERS = ["gunicorn-sync", "gunicorn-gthread", "uwsgi", "uvicorn-workers"]


class Proxy:
    """A loopback TCP proxy to the database that can turn into a black hole or go down.

    forward: bytes pass both ways. black hole: new connections are accepted and never answered,
    and what the open ones send is swallowed. down: every connection is closed and new ones are
    refused.
    """

    def __init__(self, host: str, port: int) -> None:
        self.target = (host, port)
        self.mode = "forward"
        self.sockets: list[socket.socket] = []
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = int(self.listener.getsockname()[1])
        self.threads = [threading.Thread(target=self._accept, daemon=True)]
        self.threads[0].start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            self.sockets.append(client)
            if self.mode != "forward":
                continue  # accepted, never answered
            try:
                upstream = socket.create_connection(self.target, timeout=5)
            except OSError:  # pragma: no cover - the database itself went away
                client.close()
                continue
            upstream.settimeout(None)
            self.sockets.append(upstream)
            for source, sink in ((client, upstream), (upstream, client)):
                thread = threading.Thread(target=self._pipe, args=(source, sink), daemon=True)
                self.threads.append(thread)
                thread.start()

    def _pipe(self, source: socket.socket, sink: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := source.recv(65536):
                if self.mode == "forward":
                    sink.sendall(data)
        with contextlib.suppress(OSError):
            sink.shutdown(socket.SHUT_RDWR)

    def black_hole(self) -> None:
        self.mode = "black hole"

    def down(self) -> None:
        self.mode = "down"
        # close() alone does not wake a thread blocked in accept() on Linux; shutdown() does.
        for sock in [self.listener, *self.sockets]:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()

    def close(self) -> None:
        """Go down and wait for the proxy's threads: the test process is left with none (the
        uWSGI log parser forks workers only in a process that runs no other thread)."""
        self.down()
        for thread in self.threads:
            thread.join(5)
        alive = [thread.name for thread in self.threads if thread.is_alive()]
        assert not alive, f"the proxy's threads did not end: {alive}"


@dataclass
class Database:
    admin_url: str  # a superuser, on the test database
    role_url: str  # the servers' role: no superuser, privileges granted table by table
    role: str


@pytest.fixture(scope="module")
def database() -> Iterator[Database]:
    """A migrated PostgreSQL database, and a login role with ordinary privileges on it."""
    import os

    import psycopg

    url = os.environ.get("LEAKGUARD_TEST_POSTGRES_URL", "")
    if not url:
        if os.environ.get("LEAKGUARD_REQUIRE_SERVICES") == "1":
            pytest.fail("LEAKGUARD_REQUIRE_SERVICES=1 but the fault tests need PostgreSQL")
        pytest.skip("the fault tests need LEAKGUARD_TEST_POSTGRES_URL")
    suffix = uuid.uuid4().hex[:10]
    name, role = f"leakguard_faults_{suffix}", f"leakguard_faults_{suffix}"
    parts = urlsplit(url)
    admin = urlunsplit(parts._replace(path="/postgres"))
    with psycopg.connect(admin, autocommit=True) as connection:
        connection.execute(f'CREATE DATABASE "{name}"')
        connection.execute(f'CREATE ROLE "{role}" LOGIN')
    test_url = urlunsplit(parts._replace(path=f"/{name}"))
    netloc = f"{role}@{parts.hostname}:{parts.port or 5432}"
    try:
        servers.migrate(servers.project_env(test_url))
        with psycopg.connect(test_url, autocommit=True) as connection:
            connection.execute(f'GRANT CONNECT ON DATABASE "{name}" TO "{role}"')
            connection.execute(
                f'GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA public TO "{role}"'
            )
            connection.execute(f'GRANT USAGE ON ALL SEQUENCES IN SCHEMA public TO "{role}"')
        yield Database(test_url, urlunsplit(parts._replace(netloc=netloc, path=f"/{name}")), role)
    finally:
        with psycopg.connect(admin, autocommit=True) as connection:
            connection.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            connection.execute(f'DROP ROLE IF EXISTS "{role}"')


def execute(url: str, *statements: str) -> None:
    import psycopg

    with psycopg.connect(url, autocommit=True) as connection:
        for statement in statements:
            connection.execute(statement)


def stored(url: str) -> int:
    import psycopg

    with psycopg.connect(url) as connection:
        row = connection.execute(
            # The load's calls: not the readiness probe's "/", which may have been answered
            # more than once (an attempt the client gave up on while the server was busy).
            "SELECT COALESCE(SUM(calls), 0) FROM django_leakguard_growth "
            "WHERE kind = 'request' AND key <> '/'"
        ).fetchone()
    return int(row[0]) if row else 0


def command(server: str, port: int) -> list[str]:
    if server == "uwsgi":
        return servers.uwsgi_command(
            "testproject.wsgi:application",
            port,
            extra=["--processes", "2", "--enable-threads", "--disable-logging"],
        )
    worker_class, threads = {
        "gunicorn-sync": ("sync", 1),
        "gunicorn-gthread": ("gthread", 4),
        "uvicorn-workers": ("uvicorn.workers.UvicornWorker", 1),
    }[server]
    app = "testproject.asgi:application" if "uvicorn" in server else "testproject.wsgi"
    return servers.gunicorn_command(app, port, worker_class=worker_class, threads=threads)


class Load:
    """CLIENTS threads sending paced requests; latencies kept with the time they began."""

    def __init__(self, server: servers.Server) -> None:
        self.server = server
        self.samples: list[tuple[float, float]] = []  # (start, latency)
        self.failures: list[str] = []
        self.stopping = threading.Event()
        self.threads = [threading.Thread(target=self._client, args=(n,)) for n in range(CLIENTS)]

    def _client(self, n: int) -> None:
        count = 0
        while not self.stopping.is_set():
            started = time.monotonic()
            try:
                status, _ = servers.get(self.server.url(f"/products/{n}{count}/"), timeout=30)
                if status != 200:  # pragma: no cover - reported below
                    self.failures.append(f"status {status}")
            except Exception as exc:  # pragma: no cover - reported below
                self.failures.append(repr(exc))
            else:
                self.samples.append((started, time.monotonic() - started))
            count += 1
            time.sleep(PAUSE)

    def __enter__(self) -> Load:
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stopping.set()
        for thread in self.threads:
            thread.join(60)

    def latencies(self, start: float, end: float) -> list[float]:
        return [latency for began, latency in self.samples if start <= began < end]


def p99(values: list[float]) -> float:
    return statistics.quantiles(values, n=100)[98]


@dataclass
class Outcome:
    served: int
    stored: int
    lost: int
    baseline: list[float]
    during: list[float]
    exit_seconds: float
    log_lines: list[str]


def run(
    server: str,
    tmp_path: Path,
    db: Database,
    fault: Callable[[Proxy], Callable[[], None]],
    fault_seconds: float = FAULT,
    url: str | None = None,
    down_at_exit: bool = False,
) -> Outcome:
    """Serve a load, apply fault (which returns its undo) after BASELINE s, stop the server."""
    execute(db.admin_url, "TRUNCATE django_leakguard_growth, django_leakguard_worker")
    parts = urlsplit(url or db.role_url)
    proxy = Proxy(parts.hostname or "127.0.0.1", parts.port or 5432)
    proxied = urlunsplit(parts._replace(netloc=f"{parts.username}@127.0.0.1:{proxy.port}"))
    port = servers.free_port()
    env = servers.project_env(
        tmp_path / "unused.sqlite3",
        LEAKGUARD_DATABASE_URL=proxied,
        LEAKGUARD_FLUSH_INTERVAL=1,
    )
    try:
        with servers.running(
            server,
            command(server, port),
            env=env,
            log_path=tmp_path / f"{server}.log",
            port=port,
            ready=lambda s: s.wait_for_http("/"),
        ) as running:
            with Load(running) as load:
                time.sleep(BASELINE)
                begun = time.monotonic()
                undo = fault(proxy)
                time.sleep(fault_seconds)
                ended = time.monotonic()
                undo()
                time.sleep(0.5)
            assert load.failures == []
            if down_at_exit:
                proxy.down()
            started = time.monotonic()
            running.stop()
            exit_seconds = time.monotonic() - started
            log = running.log()
    finally:
        proxy.close()
    log_lines = [line for line in log.splitlines() if "LeakGuard" in line]
    return Outcome(
        served=len(load.samples),
        stored=stored(db.admin_url),
        lost=sum(int(match.replace(",", "")) for match in LOST.findall(log)),
        baseline=load.latencies(0, begun),
        during=load.latencies(begun, ended),
        exit_seconds=exit_seconds,
        log_lines=log_lines,
    )


def run_and_check(
    scenario: str,
    max_log_lines: int,
    server: str,
    tmp_path: Path,
    *args: Any,
    latency: bool = True,
    **kwargs: Any,
) -> Outcome:
    """run(), then check(); a p99 above the bound is measured again once (a noisy machine).

    Every other assertion must hold in every run. latency=False: the fault comes after the
    load, so the load's latencies have nothing to show and are not compared.
    """
    for attempt in (1, 2):
        folder = tmp_path / f"run{attempt}"
        folder.mkdir()
        outcome = run(server, folder, *args, **kwargs)
        check(outcome, scenario, server, max_log_lines, latency=latency and attempt == 2)
        if not latency or p99(outcome.during) <= p99(outcome.baseline) + P99_SLACK:
            break
    return outcome


def check(
    outcome: Outcome, scenario: str, server: str, max_log_lines: int, latency: bool = True
) -> None:
    base, during = p99(outcome.baseline), p99(outcome.during)
    print(
        f"\nFAULTS {scenario} {server}: served {outcome.served}, stored {outcome.stored}, "
        f"lost {outcome.lost}; p99 {base * 1000:.1f} ms before, {during * 1000:.1f} ms during "
        f"(max {max(outcome.during) * 1000:.1f} ms); exit {outcome.exit_seconds:.1f} s; "
        f"{len(outcome.log_lines)} LeakGuard log lines"
    )
    details = "\n".join(outcome.log_lines)
    # Nothing is lost without a word: every call served is stored or logged as lost. A write
    # whose answer never came (a database that stops answering after the commit) may be both
    # stored and logged as lost: its outcome is unknown to the process, which says so.
    assert outcome.stored <= outcome.served <= outcome.stored + outcome.lost, details
    if outcome.lost == 0:
        assert outcome.stored == outcome.served, details
    assert max(outcome.during) < 1.0
    if latency:
        assert during <= base + P99_SLACK
    assert len(outcome.log_lines) <= max_log_lines, details


@pytest.mark.parametrize("server", SERVERS)
def test_a_locked_table(server: str, tmp_path: Path, database: Database) -> None:
    # (a) A migration or a report holds ACCESS EXCLUSIVE on the growth table for 5 s.
    import psycopg

    holder: list[Any] = []

    def lock(proxy: Proxy) -> Callable[[], None]:
        connection = psycopg.connect(database.admin_url)
        connection.execute("LOCK TABLE django_leakguard_growth IN ACCESS EXCLUSIVE MODE")
        holder.append(connection)
        return connection.close  # rolls back: the lock is released

    outcome = run_and_check(
        "locked table", 4, server, tmp_path, database, lock
    )  # a warning, then "again", per worker
    assert outcome.lost == 0
    assert outcome.exit_seconds < 3


@pytest.mark.parametrize("server", SERVERS)
def test_a_database_that_never_answers(server: str, tmp_path: Path, database: Database) -> None:
    # (b) LEAKGUARD's database accepts connections and never answers, until the exit.
    outcome = run_and_check(
        "black hole",
        2,
        server,
        tmp_path,
        database,
        lambda proxy: proxy.black_hole() or (lambda: None),
    )  # what each worker lost, at exit
    assert outcome.lost > 0
    assert outcome.exit_seconds < EXIT_TIMEOUT + 3


@pytest.mark.parametrize("server", SERVERS)
def test_revoked_privileges(server: str, tmp_path: Path, database: Database) -> None:
    # (c) The servers' role loses INSERT and UPDATE on the tables for a while.
    tables = "django_leakguard_growth, django_leakguard_worker"

    def revoke(proxy: Proxy) -> Callable[[], None]:
        execute(database.admin_url, f'REVOKE INSERT, UPDATE ON {tables} FROM "{database.role}"')
        return lambda: execute(
            database.admin_url, f'GRANT INSERT, UPDATE ON {tables} TO "{database.role}"'
        )

    outcome = run_and_check(
        "revoked privileges", 4, server, tmp_path, database, revoke, fault_seconds=3.0
    )
    assert outcome.lost == 0


@pytest.mark.parametrize("server", SERVERS)
def test_the_database_down_at_exit(server: str, tmp_path: Path, database: Database) -> None:
    # (d) The database becomes unreachable (connections reset, new ones refused) just before
    # the server stops: what the last flushes could not write is logged, with its counts. No
    # request runs during the fault, so latencies are not compared (a 1 s window of load with
    # nothing injected once showed a 75 ms p99 against 19 ms before it on a busy machine).
    outcome = run_and_check(
        "down at exit",
        4,
        server,
        tmp_path,
        database,
        lambda proxy: lambda: None,
        fault_seconds=1.0,
        down_at_exit=True,
        latency=False,
    )
    assert outcome.exit_seconds < EXIT_TIMEOUT + 3
