"""LeakGuardASGI: requests pass through, lifespan is answered for Django, shutdown flushes.

The server tests stop a real standalone Uvicorn, Hypercorn, Granian and Daphne with SIGTERM after
a load and count what was stored: every call served, although no worker recycled. (Without the
wrapper Uvicorn and Granian store none; Hypercorn's workers and Daphne exit normally, and the
atexit flush stores them.)
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
from django.core.asgi import get_asgi_application

from django_leakguard import asgi, recorder_process
from tests import servers

Message = dict[str, Any]


@pytest.fixture
def flushes(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    calls: list[str] = []
    monkeypatch.setattr(recorder_process, "flush_at_exit", lambda: calls.append("flush") or True)
    return calls


def lifespan(app: Any, log: list[str]) -> list[Message]:
    """Run the server's side of lifespan against app: startup, then shutdown."""
    incoming: asyncio.Queue[Message] | None = None
    sent: list[Message] = []

    async def receive() -> Message:
        assert incoming is not None
        message = await incoming.get()
        log.append(message["type"])
        return message

    async def send(message: Message) -> None:
        log.append(message["type"])
        sent.append(message)

    async def main() -> None:
        nonlocal incoming
        incoming = asyncio.Queue()
        for kind in ("lifespan.startup", "lifespan.shutdown"):
            incoming.put_nowait({"type": kind})
        await asyncio.wait_for(
            app({"type": "lifespan", "asgi": {"version": "3.0"}}, receive, send), 10
        )

    asyncio.run(main())
    return sent


def test_lifespan_is_answered_for_django_and_shutdown_flushes(flushes: list[str]) -> None:
    # Django's ASGIHandler raises for a lifespan scope before reading any message.
    lifespan(asgi.LeakGuardASGI(get_asgi_application()), log=flushes)
    assert flushes == [
        "lifespan.startup",
        "lifespan.startup.complete",
        "lifespan.shutdown",
        "flush",
        "lifespan.shutdown.complete",
    ]


def test_an_application_that_speaks_lifespan_keeps_it(flushes: list[str]) -> None:
    async def app(scope: Any, receive: Any, send: Any) -> None:
        assert (await receive())["type"] == "lifespan.startup"
        await send({"type": "lifespan.startup.complete"})
        assert (await receive())["type"] == "lifespan.shutdown"
        assert flushes == []
        await send({"type": "lifespan.shutdown.complete"})

    log: list[str] = []
    sent = lifespan(asgi.LeakGuardASGI(app), log)
    assert [message["type"] for message in sent] == [
        "lifespan.startup.complete",
        "lifespan.shutdown.complete",
    ]
    assert flushes == ["flush"]


def test_an_application_failing_during_lifespan_is_not_masked(flushes: list[str]) -> None:
    async def app(scope: Any, receive: Any, send: Any) -> None:
        await receive()
        raise RuntimeError("startup failed")

    with pytest.raises(RuntimeError, match="startup failed"):
        lifespan(asgi.LeakGuardASGI(app), [])
    assert flushes == []


def test_other_scopes_pass_through_unchanged() -> None:
    seen: list[tuple[object, ...]] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        seen.append((scope, receive, send))

    async def receive() -> Message:
        raise AssertionError("not called")

    async def send(message: Message) -> None:
        raise AssertionError("not called")

    scope = {"type": "http", "path": "/"}
    asyncio.run(asgi.LeakGuardASGI(app)(scope, receive, send))
    assert seen == [(scope, receive, send)]


# Real servers -------------------------------------------------------------------------------

REQUESTS = 300


def asgi_command(server: str, port: int) -> list[str]:
    app = "testproject.asgi:application"
    if server == "uvicorn":
        return [
            servers.PYTHON,
            "-m",
            "uvicorn",
            app,
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "2",
        ]
    if server == "hypercorn":
        return [
            servers.PYTHON,
            "-m",
            "hypercorn",
            "--bind",
            f"127.0.0.1:{port}",
            "--workers",
            "2",
            app,
        ]
    if server == "daphne":  # one process, no lifespan: its atexit flush writes
        return [str(servers.BIN / "daphne"), "-b", "127.0.0.1", "-p", str(port), app]
    return [
        str(servers.BIN / "granian"),
        "--interface",
        "asgi",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--workers",
        "2",
        app,
    ]


@pytest.fixture
def database(tmp_path: Path) -> Path:
    path = tmp_path / "db.sqlite3"
    servers.migrate(servers.project_env(path))
    return path


@pytest.mark.servers
@pytest.mark.parametrize("server", ["uvicorn", "hypercorn", "granian", "daphne"])
def test_a_graceful_stop_flushes_every_call(server: str, tmp_path: Path, database: Path) -> None:
    port = servers.free_port()
    env = servers.project_env(database)  # FLUSH_INTERVAL 30: only the stop writes
    with servers.running(
        server,
        asgi_command(server, port),
        env=env,
        log_path=tmp_path / f"{server}.log",
        port=port,
        ready=lambda s: s.wait_for_http("/"),
    ) as running:
        paths = [f"/products/{n}/" for n in range(REQUESTS - 1)]
        assert servers.get_all(running, paths, clients=4) == []
        running.stop()
        log = running.log()
    stored = servers.stored_calls(env, "request")
    assert sum(stored.values()) == REQUESTS, log  # the readiness probe's "/" counts too
    assert "lost" not in log
