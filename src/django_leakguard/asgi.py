"""An ASGI wrapper that flushes when the server stops gracefully (ASGI lifespan shutdown).

Standalone Uvicorn, Hypercorn and Granian tell the application that they stop through the ASGI
lifespan protocol, and not all of them let the process exit normally afterwards: Uvicorn catches
SIGTERM while it serves, and once it has shut down it restores the default handler and raises
the signal again, so the process dies of it and no atexit hook runs. Django's own ASGI handler
refuses lifespan, so this wrapper answers it for Django and flushes (bounded, like every exit
flush) at shutdown. Everything else goes to the application unchanged.

    from django.core.asgi import get_asgi_application
    from django_leakguard.asgi import LeakGuardASGI

    application = LeakGuardASGI(get_asgi_application())
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, MutableMapping
from contextvars import Token
from typing import Any

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

SHUTDOWN_ANSWERS = ("lifespan.shutdown.complete", "lifespan.shutdown.failed")


async def flush_at_shutdown() -> None:
    """Flush this process's measurements off the event loop, in at most EXIT_TIMEOUT seconds."""
    from django_leakguard.recorder_process import flush_at_exit

    await asyncio.to_thread(flush_at_exit)


class LeakGuardASGI:
    """Wrap an ASGI application: flush at lifespan shutdown, answering lifespan if it cannot."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self._read_early: Callable[[Scope], Awaitable[Token[Any] | None]] | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "lifespan":
            # The heap read before Django's handler makes anything for the request (see
            # middleware.read_heap_before_asgi); imported here, once Django is set up.
            token = None
            if scope["type"] == "http":
                read_early = self._read_early
                if read_early is None:
                    from django_leakguard.middleware import read_heap_before_asgi

                    read_early = self._read_early = read_heap_before_asgi
                token = await read_early(scope)
            try:
                await self.app(scope, receive, send)
            finally:
                if token is not None:
                    token.var.reset(token)
            return
        received: list[str] = []

        async def app_receive() -> Message:
            message = await receive()
            received.append(message["type"])
            return message

        async def app_send(message: Message) -> None:
            if message["type"] in SHUTDOWN_ANSWERS:
                await flush_at_shutdown()
            await send(message)

        try:
            # An application that speaks lifespan (a Starlette app mounting Django) keeps it.
            await self.app(scope, app_receive, app_send)
        except Exception:
            if received:
                raise
            # Refused before reading a message, as Django's ASGIHandler does: answer for it.
            await answer_lifespan(receive, send)


async def answer_lifespan(receive: Receive, send: Send) -> None:
    """Play an application's part of the lifespan protocol, flushing at shutdown."""
    while True:
        message = await receive()
        if message["type"] == "lifespan.shutdown":
            await flush_at_shutdown()
            await send({"type": "lifespan.shutdown.complete"})
            return
        await send({"type": "lifespan.startup.complete"})  # the protocol's only other message
