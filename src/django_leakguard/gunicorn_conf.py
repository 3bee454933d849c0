"""Gunicorn hooks that apply LEAKGUARD's limits.

Use it as the whole config::

    gunicorn -c python:django_leakguard.gunicorn_conf myproject.wsgi

or end your own gunicorn.conf.py with::

    from django_leakguard.gunicorn_conf import leakguard_settings
    globals().update(leakguard_settings(globals()))

which adds hooks that chain the ones the file already defines. A plain
``from django_leakguard.gunicorn_conf import *`` also works in a file that defines none of those
hooks.

Nothing here reads Django's settings at import: Gunicorn loads its config before the
application, and a project laid out as startproject does sets DJANGO_SETTINGS_MODULE in its
wsgi.py. Each worker reads LEAKGUARD when it boots (post_worker_init, after Gunicorn has loaded
the application), and sets its own max_requests from it, with jitter, as Gunicorn would have:
so a HUP, which starts new workers, picks up changed settings.
"""

from __future__ import annotations

import inspect
import logging
import os
import random
import shlex
import signal
import sys
from collections.abc import Awaitable, Callable, Mapping, MutableMapping
from types import FrameType
from typing import Any

from django.utils.module_loading import import_string

from django_leakguard import conf, memory
from django_leakguard.recycling import GunicornLimits, gunicorn_limits
from django_leakguard.units import format_bytes

__all__ = ["leakguard_settings", "post_request", "post_worker_init", "worker_exit"]

logger = logging.getLogger("django_leakguard")

# Gunicorn passes its own objects; they are untyped, so hooks take Any.
Hook = Callable[..., Any]
_MARK = "_leakguard_hook"


def _resolve(hook: object) -> Hook | None:
    if hook is None:
        return None
    if isinstance(hook, str):
        # Gunicorn also accepts hooks as dotted paths.
        hook = import_string(hook)
    if not callable(hook):
        raise TypeError(f"a Gunicorn hook should be callable, got {hook!r}")
    return hook


def _positional_arity(hook: Hook) -> int:
    parameters = inspect.signature(hook).parameters.values()
    if any(p.kind is inspect.Parameter.VAR_POSITIONAL for p in parameters):
        return 4
    return sum(
        p.kind in (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
        for p in parameters
    )


def _chain(user: object, ours: Hook, *, ours_first: bool) -> Hook:
    """Return a hook that runs the user's hook and ours; an error in one still runs the other."""
    hook = _resolve(user)
    if hook is None:
        return ours
    if getattr(hook, _MARK, False):
        # Already ours, or already chained: applying the settings twice changes nothing.
        return hook
    # post_request hooks may take 2, 3 or 4 arguments (Gunicorn adapts them the same way).
    arity = _positional_arity(hook)
    user_hook = hook

    def chained(*args: Any) -> None:
        first, second = (ours, user_hook) if ours_first else (user_hook, ours)
        try:
            _call(first, args, arity if first is user_hook else len(args))
        finally:
            _call(second, args, arity if second is user_hook else len(args))

    # Gunicorn checks a hook's arity, so the chain takes exactly as many arguments as ours.
    chained = _with_arity(_positional_arity(ours), chained)
    setattr(chained, _MARK, True)
    return chained


def _with_arity(arity: int, hook: Hook) -> Hook:
    if arity == 1:
        return lambda a: hook(a)
    if arity == 2:
        return lambda a, b: hook(a, b)
    return lambda a, b, c, d: hook(a, b, c, d)


def _call(hook: Hook, args: tuple[Any, ...], arity: int) -> None:
    hook(*args[: min(arity, len(args))])


# The hooks. They run in the worker process.


def _effective_max_requests(worker: Any, max_requests: int, jitter: int) -> str:
    if max_requests <= 0:
        return "no request-count limit"
    return (
        f"recycles after {worker.max_requests} requests (max_requests "
        f"{max_requests} + jitter up to {jitter})"
    )


def _is_uvicorn(worker: Any) -> bool:
    # Uvicorn's workers never call post_request; they need the ASGI wrapper below.
    return type(worker).__module__.split(".")[0] in ("uvicorn", "uvicorn_worker")


def _max_requests_given() -> bool:
    """Return whether Gunicorn's command line or GUNICORN_CMD_ARGS sets max_requests."""
    words = [*shlex.split(os.environ.get("GUNICORN_CMD_ARGS", "")), *sys.argv[1:]]
    return any(word == "--max-requests" or word.startswith("--max-requests=") for word in words)


def _apply_max_requests(
    worker: Any, limits: GunicornLimits, file_sets_them: bool
) -> tuple[int, int]:
    """Give the worker LEAKGUARD's request limit unless Gunicorn was given one; return the
    (max_requests, jitter) that stand.

    Gunicorn drew the worker's limit from its own max_requests when it created the worker, before
    Django's settings could be read: draw it again, the same way, from LEAKGUARD's.
    """
    cfg = worker.cfg
    if file_sets_them or cfg.max_requests > 0 or _max_requests_given():
        return cfg.max_requests, cfg.max_requests_jitter
    if limits.max_requests > 0:
        worker.max_requests = limits.max_requests + random.randint(0, limits.max_requests_jitter)
        config = getattr(worker, "config", None)
        if _is_uvicorn(worker) and config is not None:
            # Uvicorn enforces the limit itself, from the config Gunicorn's worker built.
            config.limit_max_requests = worker.max_requests
    return limits.max_requests, limits.max_requests_jitter


def _make_post_worker_init(file_sets_them: bool) -> Hook:
    def post_worker_init(worker: Any) -> None:
        # The application is loaded: its wsgi module has set DJANGO_SETTINGS_MODULE.
        limits = gunicorn_limits(conf.get_settings())
        max_requests, jitter = _apply_max_requests(worker, limits, file_sets_them)
        limit = limits.worker_max_memory
        worker._leakguard_max_memory = limit
        memory_text = (
            "no WORKER_MAX_MEMORY"
            if limit is None
            else (f"WORKER_MAX_MEMORY {format_bytes(limit)} (checked after each request)")
        )
        worker.log.info(
            "django-leakguard: worker %s %s, %s",
            worker.pid,
            _effective_max_requests(worker, max_requests, jitter),
            memory_text,
        )
        if _is_uvicorn(worker):
            _install_exit_on_sigterm()
            if limit is not None:
                worker.wsgi = RetireOverMemory(worker.wsgi, limit, worker.log)

    setattr(post_worker_init, _MARK, True)
    return post_worker_init


def post_request(worker: Any, req: Any, environ: Any, resp: Any) -> None:
    """Retire the worker after this request when its RSS is over WORKER_MAX_MEMORY."""
    # Set by post_worker_init, from LEAKGUARD as the worker booted.
    limit = getattr(worker, "_leakguard_max_memory", None)
    if limit is None or not worker.alive:
        return
    used = memory.rss()
    if used > limit:
        worker.log.info(
            "django-leakguard: worker %s RSS %s is over WORKER_MAX_MEMORY %s; "
            "retiring it after this request",
            worker.pid,
            format_bytes(used),
            format_bytes(limit),
        )
        # The same flag Gunicorn sets when max_requests is reached: the worker finishes the
        # requests in hand, stops accepting and exits; the arbiter starts another.
        worker.alive = False


setattr(post_request, _MARK, True)


def worker_exit(server: Any, worker: Any) -> None:
    """Write this worker's pending measurements before it exits."""
    # The arbiter also calls worker_exit for a worker that vanished; nothing to flush there.
    if getattr(worker, "pid", None) != os.getpid():
        return
    from django_leakguard.recorder_process import flush_at_exit

    try:
        flush_at_exit()
    except Exception:  # pragma: no cover - flush() never raises by contract
        logger.exception("django-leakguard: flush at worker exit failed")


setattr(worker_exit, _MARK, True)


def _exit_on_sigterm(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(0)


def _install_exit_on_sigterm() -> None:
    # Uvicorn shuts down gracefully on SIGTERM, then re-raises the signal with the handler it
    # found. Gunicorn left SIG_DFL there, which kills the process before Gunicorn's
    # worker_exit hook runs; exiting normally instead lets worker_exit flush.
    signal.signal(signal.SIGTERM, _exit_on_sigterm)


class RetireOverMemory:
    """ASGI wrapper for Uvicorn workers: SIGTERM itself once RSS passes the limit."""

    def __init__(self, app: Callable[..., Awaitable[None]], limit: int, log: Any) -> None:
        self.app = app
        self.limit = limit
        self.log = log
        self.retiring = False

    async def __call__(self, scope: MutableMapping[str, Any], receive: Any, send: Any) -> None:
        try:
            await self.app(scope, receive, send)
        finally:
            if scope["type"] == "http" and not self.retiring:
                used = memory.rss()
                if used > self.limit:
                    self.retiring = True
                    self.log.info(
                        "django-leakguard: worker %s RSS %s is over WORKER_MAX_MEMORY %s; "
                        "retiring it after this request",
                        os.getpid(),
                        format_bytes(used),
                        format_bytes(self.limit),
                    )
                    # Uvicorn's SIGTERM handler finishes the requests in flight, then exits.
                    os.kill(os.getpid(), signal.SIGTERM)


def leakguard_settings(namespace: Mapping[str, Any]) -> dict[str, Any]:
    """Return Gunicorn hooks that apply LEAKGUARD, chaining the hooks already in namespace.

    Reads no Django settings (the hooks do, in each worker). When namespace sets max_requests
    or max_requests_jitter, Gunicorn's values stand: a value written in the config file wins, as
    the command line wins over both.
    """
    file_sets_them = "max_requests" in namespace or "max_requests_jitter" in namespace
    return {
        "post_worker_init": _chain(
            namespace.get("post_worker_init"),
            _make_post_worker_init(file_sets_them),
            ours_first=True,
        ),
        "post_request": _chain(namespace.get("post_request"), post_request, ours_first=False),
        # Flush first, while the user's hook has not yet closed what the flush may need.
        "worker_exit": _chain(namespace.get("worker_exit"), worker_exit, ours_first=True),
    }


post_worker_init: Hook = _make_post_worker_init(False)
# post_request and worker_exit are defined above, as plain functions.
