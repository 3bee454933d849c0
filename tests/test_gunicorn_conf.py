from __future__ import annotations

import asyncio
import os
import re
import signal
import textwrap
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from django.core.exceptions import ImproperlyConfigured
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


def test_module_values_come_from_leakguard() -> None:
    # tests.settings keeps the defaults: 1000 requests, 5% jitter.
    assert gunicorn_conf.max_requests == 1000
    assert gunicorn_conf.max_requests_jitter == 50
    assert callable(gunicorn_conf.post_request)
    assert gunicorn_conf.worker_exit is gunicorn_conf.__dict__["worker_exit"]


@override_settings(LEAKGUARD={"MAX_REQUESTS": 200, "MAX_REQUESTS_JITTER": 0.1})
def test_leakguard_settings_values() -> None:
    values = leakguard_settings({})
    assert values["max_requests"] == 200
    assert values["max_requests_jitter"] == 20
    assert set(values) == {
        "max_requests",
        "max_requests_jitter",
        "post_worker_init",
        "post_request",
        "worker_exit",
    }


@override_settings(LEAKGUARD={"MAX_REQUESTS": 0, "MAX_REQUESTS_JITTER": 0.1})
def test_no_jitter_without_max_requests() -> None:
    values = leakguard_settings({})
    assert (values["max_requests"], values["max_requests_jitter"]) == (0, 0)


def test_values_in_the_file_win() -> None:
    values = leakguard_settings({"max_requests": 7, "max_requests_jitter": 1})
    assert "max_requests" not in values
    assert "max_requests_jitter" not in values


@override_settings(LEAKGUARD={"MAX_REQUESTS_JITTER": 3})
def test_bad_settings_raise() -> None:
    with pytest.raises(ImproperlyConfigured, match="MAX_REQUESTS_JITTER"):
        leakguard_settings({})


@override_settings(LEAKGUARD={"WORKER_MAX_MEMORY": "1MiB"})
def test_post_request_retires_a_worker_over_the_limit() -> None:
    hook = leakguard_settings({})["post_request"]
    worker = FakeWorker()
    hook(worker, None, {}, None)
    assert worker.alive is False
    assert "over WORKER_MAX_MEMORY 1.0 MiB" in worker.log.lines[0]
    # Once retiring, nothing more is logged.
    hook(worker, None, {}, None)
    assert len(worker.log.lines) == 1


@override_settings(LEAKGUARD={"WORKER_MAX_MEMORY": "1TiB"})
def test_post_request_keeps_a_worker_under_the_limit() -> None:
    worker = FakeWorker()
    leakguard_settings({})["post_request"](worker, None, {}, None)
    assert worker.alive is True
    assert worker.log.lines == []


def test_post_request_without_a_limit_does_nothing() -> None:
    worker = FakeWorker()
    leakguard_settings({})["post_request"](worker, None, {}, None)
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


def test_start_line_without_max_requests() -> None:
    worker = FakeWorker()
    worker.cfg.max_requests = 0
    leakguard_settings({})["post_worker_init"](worker)
    assert "no request-count limit, no WORKER_MAX_MEMORY" in worker.log.lines[0]


def test_worker_exit_flushes_only_in_the_worker(monkeypatch: pytest.MonkeyPatch) -> None:
    from django_leakguard import recorder

    flushed: list[float | None] = []

    def flush(*, timeout: float | None = None) -> bool:
        flushed.append(timeout)
        return True

    monkeypatch.setattr(recorder.get_recorder(), "flush", flush)
    worker = FakeWorker()
    gunicorn_conf.worker_exit(None, worker)
    assert flushed == [recorder.EXIT_LOCK_TIMEOUT]  # a bounded wait: never hangs the exit
    worker.pid = os.getpid() + 1  # the arbiter cleaning up after a vanished worker
    gunicorn_conf.worker_exit(None, worker)
    assert flushed == [recorder.EXIT_LOCK_TIMEOUT]


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
        _hammer(server, 6, path="/health/")
        # Uvicorn notices the signal on its next tick, so a worker may serve a few more.
        server.wait_for_log(r"user worker_exit ran in", count=2)
        server.wait_for_log(r"Booting worker with pid", count=4)
        log = server.log()
    assert log.count("retiring it after this request") >= 2
    # Retired workers exited normally (so worker_exit ran), not killed by their signal.
    assert "was sent SIGTERM" not in log
    booted = re.findall(r"Booting worker with pid: (\d+)", log)
    assert Counter(booted).most_common(1)[0][1] == 1


@pytest.mark.servers
def test_the_module_config_refuses_bad_settings(tmp_path: Path) -> None:
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
        assert server.process.wait(30) != 0
    finally:
        server.stop()
    assert "MAX_REQUESTS_JITTER should be a fraction of MAX_REQUESTS from 0 to 1, got 2.0" in (
        server.log()
    )
