"""Under Gunicorn's gevent worker, a database that makes the write wait holds up no request.

gevent patches `threading`: a flush "thread" would be a greenlet, and a write that waits in C
(SQLite's busy wait on a locked database, a driver that does not cooperate with gevent) would
stop every greenlet of the worker until it returned. LeakGuard's flush thread is a real thread
under gevent (django_leakguard.threads). Here LeakGuard writes to a SQLite database of its own
that the test locks for longer than SQLite's busy timeout while requests run.
"""

from __future__ import annotations

import contextlib
import importlib.util
import re
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests import servers

pytestmark = [pytest.mark.servers, pytest.mark.faults]

LOCK_SECONDS = 8.0  # longer than Django's default SQLite timeout (5 s)


PATCH = {
    "gevent": (
        "from gevent import monkey; monkey.patch_all()",
        "monkey.get_original('_thread', 'get_ident')",
    ),
    # Gunicorn dropped its eventlet worker (and eventlet is deprecated), but projects still
    # monkey-patch with it.
    "eventlet": (
        "import eventlet; eventlet.monkey_patch(); from eventlet import patcher",
        "patcher.original('_thread').get_ident",
    ),
}


@pytest.mark.parametrize("library", sorted(PATCH))
def test_threads_are_real_under_monkey_patching(library: str) -> None:
    # Not imported here: eventlet's import installs a fork hook that warns in every later fork.
    if importlib.util.find_spec(library) is None:
        pytest.skip(f"{library} is in the test extras; install them")
    patch, get_ident = PATCH[library]
    code = f"""
import os, time
{patch}
from django_leakguard import threads
assert threads.patched()
get_ident = {get_ident}
seen = []
wake = threads.Wake()
def run():
    seen.append(get_ident())
    wake.wait(5)
thread = threads.OSThread(run, "t")
tasks = len(os.listdir("/proc/self/task"))
thread.start()
while not seen:
    time.sleep(0.01)
assert len(os.listdir("/proc/self/task")) == tasks + 1, "not an operating-system thread"
assert thread.is_alive() and not thread.is_current()
wake.set()
thread.join(5)
assert not thread.is_alive()
lock = threads.allocate_lock()
assert type(lock).__module__ == "_thread", type(lock)
print("ok", seen[0] != get_ident())
"""
    out = subprocess.run(
        [sys.executable, "-W", "ignore", "-c", code],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok True"


def test_a_locked_sqlite_database_holds_up_no_request_under_the_gevent_worker(
    tmp_path: Path,
) -> None:
    if importlib.util.find_spec("gevent") is None:
        pytest.skip("gevent is in the test extras; install them")
    recorded = tmp_path / "leakguard.sqlite3"
    env = servers.project_env(
        tmp_path / "project.sqlite3",
        LEAKGUARD_DATABASE_URL=f"sqlite:///{recorded}",
        LEAKGUARD_FLUSH_INTERVAL=0.5,
        # No recycling: a worker that exits while the database is locked waits for its last
        # write, within its 5 s bound, and that is not what this test measures.
        LEAKGUARD_MAX_REQUESTS=10**6,
    )
    servers.migrate(env)
    servers.manage(env, "migrate", "--database", "leakguard", "--noinput", "-v", "0")
    port = servers.free_port()
    command = servers.gunicorn_command("testproject.wsgi", port, workers=1, worker_class="gevent")
    samples: list[tuple[float, float]] = []
    failures: list[str] = []
    stopping = threading.Event()

    def client(server: servers.Server) -> None:
        n = 0
        while not stopping.is_set():
            started = time.monotonic()
            try:
                status, _ = servers.get(server.url(f"/products/{n}/"), timeout=30)
            except Exception as exc:  # pragma: no cover - reported below
                failures.append(repr(exc))
            else:
                if status != 200:  # pragma: no cover - reported below
                    failures.append(f"status {status}")
                samples.append((started, time.monotonic() - started))
            n += 1
            time.sleep(0.01)

    with servers.running(
        "gunicorn-gevent",
        command,
        env=env,
        log_path=tmp_path / "gunicorn.log",
        port=port,
        ready=lambda s: s.wait_for_http("/"),
    ) as server:
        clients = [threading.Thread(target=client, args=(server,)) for _ in range(2)]
        for thread in clients:
            thread.start()
        try:
            time.sleep(2)
            locker = sqlite3.connect(recorded, isolation_level=None)
            try:
                locker.execute("BEGIN EXCLUSIVE")
                locked_at = time.monotonic()
                time.sleep(LOCK_SECONDS)
                unlocked_at = time.monotonic()
                locker.execute("COMMIT")
            finally:
                locker.close()
            time.sleep(2)
        finally:
            stopping.set()
            for thread in clients:
                thread.join(60)
        server.stop()
        log = server.log()
    assert failures == []
    during = [latency for began, latency in samples if locked_at <= began < unlocked_at]
    assert len(during) > 20, "too few requests during the lock to judge"
    assert max(during) < 1.0, f"a request waited {max(during):.2f} s while the database was locked"
    with contextlib.closing(sqlite3.connect(recorded)) as connection:
        (stored,) = connection.execute(
            "SELECT COALESCE(SUM(calls), 0) FROM django_leakguard_growth WHERE kind = 'request'"
        ).fetchone()
    # Every request served (the readiness probes' "/" included) is stored: the lock delayed the
    # writes, the flush after it and the one at exit wrote them.
    served = len(samples) + len(re.findall(r"path=/$", log, re.MULTILINE))
    assert stored == served, [line for line in log.splitlines() if "ACCESS" not in line]
