from __future__ import annotations

import asyncio
import logging
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from django.test import override_settings

from django_leakguard import gunicorn_conf
from django_leakguard.gunicorn_conf import RetireOverMemory, leakguard_settings
from tests import servers

# Unit tests use a small stand-in for Gunicorn's worker object (a plain attribute bag): the hooks
# only read and set attributes on it. The real-server tests below run the same hooks inside
# real Gunicorn workers.


class FakeLog:
    def __init__(self) -> None:
        self.lines: list[str] = []

    def info(self, message: str, *args: object) -> None:
        self.lines.append(message % args)


class FakeCfg:
    max_requests = 1000
    max_requests_jitter = 50


class FakeWorker:
    def __init__(self, alive: bool = True) -> None:
        self.alive = alive
        self.pid = os.getpid()
        self.log = FakeLog()
        self.cfg = FakeCfg()
        self.max_requests = 1020
        self.wsgi: Any = None


def booted(values: dict[str, Any] | None = None, max_requests: int = 0) -> FakeWorker:
    """Return a worker whose post_worker_init ran; Gunicorn was given max_requests (0: none)."""
    worker = FakeWorker()
    worker.cfg.max_requests = max_requests
    if not max_requests:
        worker.max_requests = sys.maxsize  # what Gunicorn draws without max_requests
    (values or leakguard_settings({}))["post_worker_init"](worker)
    return worker


def test_the_module_reads_no_settings_at_import() -> None:
    # Issue 16.7: Gunicorn loads its config before the application's wsgi.py has set
    # DJANGO_SETTINGS_MODULE.
    env = servers.project_env(DJANGO_SETTINGS_MODULE=None)
    code = (
        "import django_leakguard.gunicorn_conf as g; "
        "print(sorted(n for n in vars(g) if n in ('max_requests', 'post_request', "
        "'post_worker_init', 'worker_exit')))"
    )
    output = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    ).stdout
    assert output.strip() == "['post_request', 'post_worker_init', 'worker_exit']"


@override_settings(LEAKGUARD={"MAX_REQUESTS": 200, "MAX_REQUESTS_JITTER": 0.1})
def test_a_worker_takes_max_requests_from_leakguard_when_it_boots() -> None:
    values = leakguard_settings({})
    assert set(values) == {"post_worker_init", "post_request", "worker_exit"}
    limits = set()
    for _ in range(60):
        worker = booted(values)
        limits.add(worker.max_requests)
        assert worker.log.lines == [
            f"django-leakguard: worker {worker.pid} recycles after {worker.max_requests} "
            "requests (max_requests 200 + jitter up to 20), no WORKER_MAX_MEMORY"
        ]
    assert min(limits) >= 200
    assert max(limits) <= 220
    assert len(limits) > 1


@override_settings(LEAKGUARD={"MAX_REQUESTS": 0, "MAX_REQUESTS_JITTER": 0.1})
def test_no_limit_without_max_requests() -> None:
    worker = booted()
    assert worker.max_requests == sys.maxsize
    assert "no request-count limit, no WORKER_MAX_MEMORY" in worker.log.lines[0]


def test_values_gunicorn_was_given_win(monkeypatch: pytest.MonkeyPatch) -> None:
    # A config file's value, the command line's, GUNICORN_CMD_ARGS': Gunicorn's draw stands.
    worker = booted(max_requests=7)
    assert worker.max_requests == 1020
    assert "(max_requests 7 + jitter up to 50)" in worker.log.lines[0]
    assert booted(leakguard_settings({"max_requests": 0})).max_requests == sys.maxsize
    monkeypatch.setattr(sys, "argv", ["gunicorn", "--max-requests=0", "site.wsgi"])
    assert booted().max_requests == sys.maxsize
    monkeypatch.setattr(sys, "argv", ["gunicorn", "--max-requests-jitter", "5", "site.wsgi"])
    monkeypatch.setenv("GUNICORN_CMD_ARGS", "--max-requests 0")
    assert booted().max_requests == sys.maxsize
    monkeypatch.delenv("GUNICORN_CMD_ARGS")
    assert 1000 <= booted().max_requests <= 1050


@override_settings(LEAKGUARD={"MAX_REQUESTS_JITTER": 3, "MAX_REQUEST": 10})
def test_bad_settings_log_one_line_each_and_use_the_defaults(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level(logging.WARNING, logger="django_leakguard"):
        worker = booted()
    assert 1000 <= worker.max_requests <= 1050
    messages = [record.getMessage() for record in caplog.records]
    assert len(messages) == 2
    assert "MAX_REQUESTS_JITTER should be a fraction" in messages[0]
    assert "got 3." in messages[0]
    assert "Did you mean 'MAX_REQUESTS'?" in messages[1]
    assert all("\n" not in message for message in messages)


@override_settings(LEAKGUARD={"WORKER_MAX_MEMORY": "1MiB"})
def test_post_request_retires_a_worker_over_the_limit() -> None:
    values = leakguard_settings({})
    worker = booted(values)
    values["post_request"](worker, None, {}, None)
    assert worker.alive is False
    assert "over WORKER_MAX_MEMORY 1.0 MiB" in worker.log.lines[1]
    # Once retiring, nothing more is logged.
    values["post_request"](worker, None, {}, None)
    assert len(worker.log.lines) == 2


@override_settings(LEAKGUARD={"WORKER_MAX_MEMORY": "1TiB"})
def test_post_request_keeps_a_worker_under_the_limit() -> None:
    worker = booted()
    gunicorn_conf.post_request(worker, None, {}, None)
    assert worker.alive is True
    assert len(worker.log.lines) == 1


def test_post_request_without_a_limit_does_nothing() -> None:
    worker = FakeWorker()  # not booted through our hook: no limit known
    gunicorn_conf.post_request(worker, None, {}, None)
    assert worker.alive is True


@override_settings(LEAKGUARD={"WORKER_MAX_MEMORY": "1MiB"})
def test_user_hooks_are_chained_with_their_own_arity() -> None:
    calls: list[tuple[str, tuple[object, ...]]] = []

    def post_request(worker: object, req: object) -> None:  # Gunicorn allows 2 arguments
        calls.append(("post_request", (worker, req)))

    def post_worker_init(worker: object) -> None:
        calls.append(("post_worker_init", (worker,)))

    def worker_exit(server: object, worker: object) -> None:
        calls.append(("worker_exit", (server, worker)))

    values = leakguard_settings(
        {
            "post_request": post_request,
            "post_worker_init": post_worker_init,
            "worker_exit": worker_exit,
        }
    )
    worker = FakeWorker()
    values["post_worker_init"](worker)
    values["post_request"](worker, "req", {}, "resp")
    values["worker_exit"]("server", worker)
    assert calls == [
        ("post_worker_init", (worker,)),
        ("post_request", (worker, "req")),
        ("worker_exit", ("server", worker)),
    ]
    # And ours ran too: the start line was logged and the worker retired.
    assert "django-leakguard: worker" in worker.log.lines[0]
    assert worker.alive is False


def test_hooks_by_dotted_path_and_varargs_are_chained() -> None:
    values = leakguard_settings({"post_request": "tests.test_gunicorn_conf.record_anything"})
    worker = FakeWorker()
    values["post_request"](worker, "req", {}, "resp")
    assert RECORDED[-1] == (worker, "req", {}, "resp")


RECORDED: list[tuple[object, ...]] = []


def record_anything(*args: object) -> None:
    RECORDED.append(args)


def test_a_failing_user_hook_still_runs_ours() -> None:
    def post_worker_init(worker: object) -> None:
        raise RuntimeError("user hook failed")

    worker = FakeWorker()
    hook = leakguard_settings({"post_worker_init": post_worker_init})["post_worker_init"]
    with pytest.raises(RuntimeError, match="user hook failed"):
        hook(worker)
    assert worker.log.lines  # ours ran first


def test_a_non_callable_hook_is_an_error() -> None:
    with pytest.raises(TypeError, match="callable"):
        leakguard_settings({"post_request": 42})


def test_applying_twice_chains_once() -> None:
    seen: list[object] = []
    namespace: dict[str, Any] = {"post_worker_init": seen.append}
    namespace.update(leakguard_settings(namespace))
    first = namespace["post_worker_init"]
    namespace.update(leakguard_settings(namespace))
    assert namespace["post_worker_init"] is first
    worker = FakeWorker()
    namespace["post_worker_init"](worker)
    assert seen == [worker]
    assert len(worker.log.lines) == 1


def test_worker_exit_flushes_only_in_the_worker(monkeypatch: pytest.MonkeyPatch) -> None:
    from django_leakguard import recorder_flush, recorder_process

    flushed: list[float | None] = []

    def flush(*, timeout: float | None = None, exiting: bool = False) -> bool:
        flushed.append(timeout)
        return True

    monkeypatch.setattr(recorder_process.get_recorder(), "flush", flush)
    worker = FakeWorker()
    gunicorn_conf.worker_exit(None, worker)
    assert flushed == [recorder_flush.EXIT_LOCK_TIMEOUT]  # a bounded wait: never hangs the exit
    worker.pid = os.getpid() + 1  # the arbiter cleaning up after a vanished worker
    gunicorn_conf.worker_exit(None, worker)
    assert flushed == [recorder_flush.EXIT_LOCK_TIMEOUT]


# Uvicorn workers never call post_request: an ASGI wrapper retires them instead.


class UvicornLikeWorker(FakeWorker):
    pass


UvicornLikeWorker.__module__ = "uvicorn.workers"


@pytest.fixture
def restore_sigterm() -> Iterator[None]:
    previous = signal.getsignal(signal.SIGTERM)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@pytest.mark.usefixtures("restore_sigterm")
@override_settings(LEAKGUARD={"WORKER_MAX_MEMORY": "1MiB"})
def test_uvicorn_worker_gets_the_asgi_wrapper() -> None:
    async def app(scope: object, receive: object, send: object) -> None:
        pass

    worker = UvicornLikeWorker()
    worker.wsgi = app
    leakguard_settings({})["post_worker_init"](worker)
    assert isinstance(worker.wsgi, RetireOverMemory)
    assert worker.wsgi.app is app
    # SIGTERM now exits normally, so Gunicorn's worker_exit hook runs after Uvicorn's shutdown.
    handler = signal.getsignal(signal.SIGTERM)
    assert callable(handler)
    with pytest.raises(SystemExit) as exited:
        handler(signal.SIGTERM, None)
    assert exited.value.code == 0


@pytest.mark.usefixtures("restore_sigterm")
def test_uvicorn_worker_without_a_limit_is_not_wrapped() -> None:
    worker = UvicornLikeWorker()
    worker.wsgi = object()
    leakguard_settings({})["post_worker_init"](worker)
    assert not isinstance(worker.wsgi, RetireOverMemory)


@pytest.mark.usefixtures("restore_sigterm")
@override_settings(LEAKGUARD={"MAX_REQUESTS": 100, "MAX_REQUESTS_JITTER": 0})
def test_uvicorn_worker_enforces_the_limit_drawn_at_boot() -> None:
    class Config:
        limit_max_requests = None

    worker = UvicornLikeWorker()
    worker.cfg.max_requests = 0
    worker.config = Config()  # type: ignore[attr-defined]
    leakguard_settings({})["post_worker_init"](worker)
    assert worker.max_requests == worker.config.limit_max_requests == 100  # type: ignore[attr-defined]


def test_asgi_wrapper_signals_once_over_the_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    # os.kill is replaced: a real SIGTERM would end the test run. The real Uvicorn test below
    # lets the signal through.
    sent: list[tuple[int, int]] = []
    monkeypatch.setattr(os, "kill", lambda pid, sig: sent.append((pid, sig)))
    served: list[str] = []

    async def app(scope: dict[str, Any], receive: object, send: object) -> None:
        served.append(scope["type"])

    log = FakeLog()
    wrapper = RetireOverMemory(app, 1024 * 1024, log)

    async def run() -> None:
        await wrapper({"type": "lifespan"}, None, None)
        await wrapper({"type": "http"}, None, None)
        await wrapper({"type": "http"}, None, None)

    asyncio.run(run())
    assert served == ["lifespan", "http", "http"]
    assert sent == [(os.getpid(), signal.SIGTERM)]
    assert len(log.lines) == 1


def test_asgi_wrapper_under_the_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    sent: list[object] = []
    monkeypatch.setattr(os, "kill", lambda pid, sig: sent.append(pid))

    async def app(scope: object, receive: object, send: object) -> None:
        pass

    asyncio.run(RetireOverMemory(app, 1 << 50, FakeLog())({"type": "http"}, None, None))
    assert sent == []


# Real Gunicorn.


@pytest.fixture
def database(tmp_path: Path) -> Path:
    path = tmp_path / "db.sqlite3"
    servers.migrate(servers.project_env(path))
    return path


def _hammer(
    server: servers.Server, total: int, clients: int = 1, path: str = "/products/1/"
) -> None:
    """Send total GETs from clients threads; every one must succeed."""
    assert servers.get_all(server, [path] * total, clients, timeout=10, join_timeout=60) == []


def _lifetimes(log: str) -> dict[int, int]:
    return servers.runs(servers.access_pids(log))


@pytest.mark.servers
@pytest.mark.parametrize(
    ("worker_class", "threads", "clients"), [("sync", 1, 1), ("gthread", 2, 3)]
)
def test_workers_recycle_after_max_requests_with_jitter(
    tmp_path: Path, database: Path, worker_class: str, threads: int, clients: int
) -> None:
    port = servers.free_port()
    env = servers.project_env(
        database,
        LEAKGUARD_MAX_REQUESTS=15,
        LEAKGUARD_MAX_REQUESTS_JITTER=0.6,  # up to 9 more requests
        LEAKGUARD_FLUSH_INTERVAL=3600,
    )
    command = servers.gunicorn_command(
        "testproject.wsgi", port, worker_class=worker_class, threads=threads
    )
    with servers.running(
        worker_class,
        command,
        env=env,
        log_path=tmp_path / "gunicorn.log",
        port=port,
        ready=lambda server: server.wait_for_log(r"django-leakguard: worker \d+", count=2),
    ) as server:
        _hammer(server, 150, clients=clients)
        server.wait_for_log("Autorestarting worker after current request", count=4)
        # A retiring worker logs its exit a moment after it stops accepting requests.
        server.wait_for_log(r"Worker exiting \(pid: \d+\)", count=4)
        log = server.log()
    # Every worker announced its own limit, between max_requests and max_requests + jitter.
    limits = {
        int(pid): int(limit)
        for pid, limit in re.findall(
            r"django-leakguard: worker (\d+) recycles after (\d+) requests "
            r"\(max_requests 15 \+ jitter up to 9\), no WORKER_MAX_MEMORY",
            log,
        )
    }
    assert all(15 <= limit <= 24 for limit in limits.values()), limits
    retired = [pid for pid in limits if f"Worker exiting (pid: {pid})" in log]
    served = _lifetimes(log)
    assert len(retired) >= 4
    assert len(served) >= 6
    # Retired workers served their own limit (gthread may finish a few in hand).
    for pid in retired:
        if pid in served and served[pid] < 150:
            assert limits[pid] <= served[pid] <= limits[pid] + threads * 2, (pid, served, limits)
    # Jitter: the workers did not all stop at the same count.
    assert len({limits[pid] for pid in retired}) > 1


@pytest.mark.servers
@pytest.mark.parametrize(("worker_class", "threads"), [("sync", 1), ("gthread", 2)])
def test_worker_over_memory_limit_is_replaced_after_its_request_and_user_hooks_chain(
    tmp_path: Path, database: Path, worker_class: str, threads: int
) -> None:
    config = tmp_path / "gunicorn.conf.py"
    config.write_text(
        textwrap.dedent(
            """
            def post_request(worker, req, environ, resp):
                worker.log.info("user post_request ran in %s", worker.pid)

            def worker_exit(server, worker):
                worker.log.info("user worker_exit ran in %s", worker.pid)

            from django_leakguard.gunicorn_conf import leakguard_settings
            globals().update(leakguard_settings(globals()))
            """
        )
    )
    port = servers.free_port()
    # Any worker is over 1 MiB: each one is retired right after its first request.
    env = servers.project_env(
        database, LEAKGUARD_MAX_REQUESTS=0, LEAKGUARD_WORKER_MAX_MEMORY="1MiB"
    )
    command = servers.gunicorn_command(
        "testproject.wsgi", port, config=str(config), worker_class=worker_class, threads=threads
    )
    with servers.running(
        worker_class,
        command,
        env=env,
        log_path=tmp_path / "gunicorn.log",
        port=port,
        ready=lambda server: server.wait_for_log("WORKER_MAX_MEMORY 1.0 MiB", count=2),
    ) as server:
        _hammer(server, 8)
        # A client may have its response before the worker writes the access line.
        server.wait_for_log(r"ACCESS pid", count=8)
        # A gthread worker may have accepted the next connection before its post_request
        # hook ran (the hook runs after the response is sent), so it may serve a few more.
        retirements = 4 if worker_class == "sync" else 2
        server.wait_for_log(r"retiring it after this request", count=retirements)
        server.wait_for_log(r"user worker_exit ran in", count=retirements)
        # post_request runs after the access line is written.
        server.wait_for_log(r"user post_request ran in", count=8)
        log = server.log()
    served = _lifetimes(log)
    assert sum(served.values()) == 8
    assert len(served) >= retirements
    if worker_class == "sync":
        assert max(served.values()) == 1
    assert log.count("user post_request ran in") == 8


@pytest.mark.servers
def test_uvicorn_workers_recycle_and_flush(tmp_path: Path, database: Path) -> None:
    port = servers.free_port()
    env = servers.project_env(
        database,
        LEAKGUARD_MAX_REQUESTS=0,
        LEAKGUARD_WORKER_MAX_MEMORY="1MiB",
        PYTHONWARNINGS="ignore::DeprecationWarning",
    )
    config = tmp_path / "gunicorn.conf.py"
    config.write_text(
        textwrap.dedent(
            """
            def worker_exit(server, worker):
                worker.log.info("user worker_exit ran in %s", worker.pid)

            from django_leakguard.gunicorn_conf import leakguard_settings
            globals().update(leakguard_settings(globals()))
            """
        )
    )
    command = servers.gunicorn_command(
        "testproject.asgi:application",
        port,
        config=str(config),
        worker_class="uvicorn.workers.UvicornWorker",
    )
    with servers.running(
        "uvicorn",
        command,
        env=env,
        log_path=tmp_path / "gunicorn.log",
        port=port,
        ready=lambda server: server.wait_for_log("WORKER_MAX_MEMORY 1.0 MiB", count=2),
    ) as server:
        # The kernel may hand every request to one worker for a while: keep sending until two
        # workers were retired. Uvicorn notices the signal on its next tick, so a worker may
        # serve a few more.
        deadline = time.monotonic() + 30
        while server.log().count("user worker_exit ran in") < 2 and time.monotonic() < deadline:
            # A worker being retired may reset a connection: those are not counted here.
            servers.get_all(server, ["/health/"] * 4, 1, timeout=10, join_timeout=60)
            time.sleep(0.2)
        server.wait_for_log(r"user worker_exit ran in", count=2)
        server.wait_for_log(r"Booting worker with pid", count=4)
        log = server.log()
    assert log.count("retiring it after this request") >= 2
    # Retired workers exited normally (so worker_exit ran), not killed by their signal.
    assert "was sent SIGTERM" not in log
    booted = re.findall(r"Booting worker with pid: (\d+)", log)
    assert Counter(booted).most_common(1)[0][1] == 1


@pytest.mark.servers
def test_the_module_config_starts_with_bad_settings_and_says_so(tmp_path: Path) -> None:
    # Issue 14, item 9: an invalid LEAKGUARD never stops a server; the default stands in.
    env = servers.project_env(tmp_path / "db.sqlite3", LEAKGUARD_MAX_REQUESTS_JITTER=2)
    port = servers.free_port()
    server = servers.start(
        "bad",
        servers.gunicorn_command("testproject.wsgi", port),
        env=env,
        log_path=tmp_path / "gunicorn.log",
        port=port,
    )
    try:
        server.wait_for_http("/health/")
        assert servers.get(server.url("/health/"))[0] == 200
    finally:
        server.stop()
    log = server.log()
    assert "MAX_REQUESTS_JITTER should be a fraction of MAX_REQUESTS from 0 to 1, got 2" in log
    assert "Traceback" not in log


# A project laid out as startproject does: DJANGO_SETTINGS_MODULE is set in wsgi.py only
# (issue 16.7). Its settings read MAX_REQUESTS from a file, so a HUP can be shown to pick up
# a change.
WSGI_ONLY_SETTINGS = """
from pathlib import Path
from testproject.settings import *  # noqa: F403

MAX_REQUESTS = int(Path(__file__).with_name("max_requests").read_text())
LEAKGUARD = {**LEAKGUARD, "MAX_REQUESTS": MAX_REQUESTS}
"""
WSGI_ONLY_WSGI = """
import os

from django.core.wsgi import get_wsgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "site_settings")
application = get_wsgi_application()
"""
HINT_CONF = """
workers = 1

from django_leakguard.gunicorn_conf import leakguard_settings
globals().update(leakguard_settings(globals()))
"""


@pytest.fixture
def wsgi_only(tmp_path: Path) -> tuple[Path, dict[str, str]]:
    (tmp_path / "site_settings.py").write_text(WSGI_ONLY_SETTINGS)
    (tmp_path / "site_wsgi.py").write_text(WSGI_ONLY_WSGI)
    (tmp_path / "max_requests").write_text("15")
    (tmp_path / "gunicorn.conf.py").write_text(HINT_CONF)
    database = tmp_path / "db.sqlite3"
    servers.migrate(servers.project_env(database))
    env = servers.project_env(database, DJANGO_SETTINGS_MODULE=None, LEAKGUARD_FLUSH_INTERVAL=3600)
    env["PYTHONPATH"] = os.pathsep.join([str(tmp_path), env["PYTHONPATH"]])
    return tmp_path, env


@pytest.mark.servers
@pytest.mark.parametrize("config", ["python:django_leakguard.gunicorn_conf", "gunicorn.conf.py"])
def test_gunicorn_check_config_without_django_settings_module(
    wsgi_only: tuple[Path, dict[str, str]], config: str
) -> None:
    directory, env = wsgi_only
    result = subprocess.run(
        [servers.PYTHON, "-m", "gunicorn", "--check-config", "-c", config, "site_wsgi"],
        env=env,
        cwd=directory,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.servers
@pytest.mark.parametrize("config", ["python:django_leakguard.gunicorn_conf", "gunicorn.conf.py"])
def test_gunicorn_starts_without_django_settings_module_and_a_hup_reads_new_settings(
    wsgi_only: tuple[Path, dict[str, str]], config: str
) -> None:
    directory, env = wsgi_only
    port = servers.free_port()
    command = servers.gunicorn_command("site_wsgi", port, config=config, workers=1)
    limit = r"django-leakguard: worker (\d+) recycles after \d+ requests \(max_requests {}"
    with servers.running(
        "wsgi-only",
        command,
        env=env,
        cwd=directory,
        log_path=directory / "gunicorn.log",
        port=port,
        ready=lambda server: server.wait_for_log(limit.format(15)),
    ) as server:
        _hammer(server, 30)
        server.wait_for_log("Autorestarting worker after current request")
        (directory / "max_requests").write_text("40")
        os.kill(server.pid, signal.SIGHUP)
        server.wait_for_log(limit.format(40))
        log = server.log()
    assert "Traceback" not in log
    assert "ImproperlyConfigured" not in log
