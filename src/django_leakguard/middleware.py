"""LeakGuardMiddleware: record each request's memory growth under its URL pattern."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
import tracemalloc
import weakref
from collections.abc import Awaitable, Callable, Mapping
from contextvars import ContextVar, Token
from typing import Any

from asgiref.sync import SyncToAsync, iscoroutinefunction, markcoroutinefunction
from django.apps import apps
from django.core.exceptions import MiddlewareNotUsed
from django.core.signals import request_started
from django.db import connections, reset_queries
from django.http import HttpRequest, HttpResponseBase

from django_leakguard import conf, memory, refine
from django_leakguard.recorder import EarlyReading, Recorder
from django_leakguard.recorder_calls import Call
from django_leakguard.recorder_process import get_recorder, recording
from django_leakguard.records import REQUEST, UNMATCHED, route_key

logger = logging.getLogger("django_leakguard")

# Django's ASGI handler serves each request inside an asgiref ThreadSensitiveContext (its own
# thread for sync code, joined at the end) and keeps what the request set in its context (the
# database connection wrappers of CONN_MAX_AGE = 0, thread-sensitive locals) until the
# handler returns, after the response is closed. The context is freed then: a call served
# inside one ends when it is, so that this teardown is not counted as kept (see _Teardown).
_REQUEST_CONTEXT: ContextVar[object] | None = getattr(
    SyncToAsync, "thread_sensitive_context", None
)
# A call whose request context outlives its response (a task the view started inherits the
# context) ends at most this many seconds after the close, at a later request's close.
TEARDOWN_WAIT = 2.0
# Calls waiting for their request context to be freed, oldest first (bounded: see _Teardown).
TEARDOWN_WAITING_MAX = 1000
# Where the request's executor is not freed once the handler returns, its call ends this many
# seconds after the executor's shutdown.
TEARDOWN_FALLBACK = 0.01
# A call about to read the heap under LeakGuardASGI waits at most this many seconds for the
# calls in flight, when all were answered (their teardown under way), to end; polling every
# TEARDOWN_POLL seconds.
TEARDOWN_YIELD = 0.002
TEARDOWN_POLL = 0.0001


# The heap reading taken before Django made a request (see read_heap_early), with whom it is
# for (the thread under WSGI, a weak reference to the asgiref request context under ASGI):
# one at a time, since it is taken only while no call is in flight; a module global, which
# the request path reads far faster than a thread-local. And which URL pattern a path had
# (bounded).
_early: tuple[object, EarlyReading | None, str] | None = None
_EARLY_UID = "django_leakguard.middleware.read_heap_early"
# Under ASGI, the decision LeakGuardASGI took before Django's handler began (see
# read_heap_before_asgi): the reading, if any, and the URL pattern it decided for. In the
# request's asyncio context, which the handler's tasks copy.
_asgi_early: ContextVar[tuple[EarlyReading | None, str] | None] = ContextVar(
    "django_leakguard_asgi_early", default=None
)
_path_keys: dict[int, str] = {}
PATH_KEYS_MAX = 1024
# Paths that differ only in their numbers or hex digits are usually one URL pattern
# (/items/17/ and /items/42/, a UUID and another): they are remembered as one. A guess that
# lumps two patterns together (/bad/ and /fee/) only decides whether the call reads early.
_HEX_ALIKE = bytes.maketrans(b"123456789abcdefABCDEF", b"0" * 21)


def _path_hash(path: str) -> int:
    """A hash of a WSGI PATH_INFO, its hex digits made alike (see _HEX_ALIKE).

    A hash, not the path: raw paths are never kept (they can carry personal data). Through
    bytes: bytes.translate() takes a third of the time of str.translate() here.
    """
    return hash(path.encode("utf-8", "surrogatepass").translate(_HEX_ALIKE))


def read_heap_early(
    sender: object,
    environ: dict[str, Any] | None = None,
    scope: dict[str, Any] | None = None,
    **kwargs: Any,
) -> None:
    """request_started receiver: read the heap before Django makes the request, where the
    URL pattern the path had last time needs readings (Recorder.read_heap_early).

    Under WSGI the signal comes in the thread that runs the request's middleware; under ASGI
    in the request's own thread, inside its asgiref context, which the middleware's
    coroutine shares: each takes the reading meant for it (see _take_early).
    """
    global _early
    if not _path_keys or tracemalloc.is_tracing():
        # No path is known yet; or an allocation trace runs around the request (leakhunt's
        # replays, a profiler): the reading's collection would move what the trace's caller
        # made before the request to the oldest generation, where the trace's own collection
        # would no longer free it.
        return
    try:
        if environ is not None:
            owner: object = threading.get_ident()
            path = environ.get("PATH_INFO", "")
        elif scope is not None and _REQUEST_CONTEXT is not None:
            if _asgi_early.get() is not None:
                return  # LeakGuardASGI decided before Django's handler began
            context = _REQUEST_CONTEXT.get(None)
            if context is None:
                return  # not inside Django's ASGI handler: no call could take it
            owner = weakref.ref(context)
            path = _asgi_path_info(scope)
        else:
            return
        key = _path_keys.get(_path_hash(path))
        if key is not None and recording():
            # Also when it reads nothing: the call's decision is made (see process_view).
            # Django's reset_queries() frees the queries logged with DEBUG at request_started
            # too, maybe after this receiver: done first, so they are not freed in the call.
            reading = get_recorder().read_heap_early(REQUEST, key, reset_queries)
            _early = (owner, reading, key)
    except Exception:  # never fails a request
        logger.debug("LeakGuard could not read the heap before a request", exc_info=True)


async def read_heap_before_asgi(scope: Mapping[str, Any]) -> Token[Any] | None:
    """LeakGuardASGI's part of read_heap_early, before Django's ASGI handler begins.

    Read there, on the event loop, the heap does not yet hold what the handler makes for the
    request and frees by the call's end: the request's thread and its executor (glibc's cache
    of that thread's freed chunks, counted as in use, is let go as the thread ends), the
    request, its body, the handler's tasks. Read in request_started's receiver, inside the
    request's thread, every call counted them as freed: about 100 pymalloc blocks and 6 to
    9 KiB. The call served in this asyncio context takes the decision (see __acall__).

    A client that sends its next request as soon as it has the answer (most do) finds the
    previous call in flight: answered, its response being closed and its request torn down,
    which the handler does on this loop. A call that would read the heap waits for it, at most
    TEARDOWN_YIELD seconds, rather than read nothing.
    """
    if not _path_keys or tracemalloc.is_tracing() or scope.get("type") != "http":
        return None
    try:
        key = _path_keys.get(_path_hash(_asgi_path_info(scope)))
        if key is None or not recording():
            return None
        recorder = get_recorder()
        decided = False
        if recorder.in_flight and recorder.in_flight <= recorder.answered:
            if not recorder.heap_wanted(REQUEST, key):
                return _asgi_early.set((None, key))
            decided = True
            deadline = time.monotonic() + TEARDOWN_YIELD
            while recorder.in_flight and time.monotonic() < deadline:
                await asyncio.sleep(TEARDOWN_POLL)
        reading = recorder.read_heap_early(REQUEST, key, reset_queries, decided=decided)
        return _asgi_early.set((reading, key))
    except Exception:  # never fails a request
        logger.debug("LeakGuard could not read the heap before a request", exc_info=True)
    return None


def _asgi_path_info(scope: Mapping[str, Any]) -> str:
    """The PATH_INFO Django's ASGIRequest will have for scope (its path less root_path)."""
    path: str = scope.get("path", "")
    root: str = scope.get("root_path", "")
    return path[len(root) :] if root and path.startswith(root) else path


def _take_early(context: object | None = None) -> tuple[EarlyReading | None, str | None]:
    """Take what read_heap_early decided for this call: its reading if it took one, and the
    URL pattern it decided for. context: the call's asgiref request context, under ASGI."""
    global _early
    early, _early = _early, None
    if early is None:
        return None, None
    owner = early[0]
    if context is None:
        mine = owner == threading.get_ident()
    else:
        mine = isinstance(owner, weakref.ref) and owner() is context
    if not mine:
        return None, None  # another call's: stale by now (see Recorder.begin_rss)
    return early[1], early[2]


def _remember_key(request: HttpRequest, key: str) -> None:
    """Note which URL pattern request's path has, for read_heap_early at its next request."""
    try:
        # The WSGI environ's PATH_INFO (META), as read_heap_early sees it (path_info is decoded).
        path = _path_hash(request.META.get("PATH_INFO", ""))
    except Exception:  # pragma: no cover - a WSGI request's PATH_INFO is a str
        return
    if _path_keys.get(path) != key:
        if len(_path_keys) >= PATH_KEYS_MAX:
            _path_keys.clear()  # many distinct paths (slugs): start again, bounded
        _path_keys[path] = key


def request_key(request: HttpRequest) -> tuple[str, str]:
    """Return (URL pattern with a leading slash, view's dotted name); never the raw path.

    The key of the URL pattern, as the view starts: ended_key() refines it once it has run.
    """
    try:
        match = request.resolver_match
        if match is None:
            return UNMATCHED, ""
        return route_key(match), match._func_path
    except Exception:
        return UNMATCHED, ""


def ended_key(request: HttpRequest) -> tuple[str, str]:
    """Return the key and view a request ends with: request_key() refined (refine.py)."""
    # The key process_view found, unless the request never reached a view.
    key, view = getattr(request, "_leakguard_key", None) or request_key(request)
    return (refine.refine(request, key) if refine.enabled() else key), view


class _EndAtClose:
    """Stands in for a response's close(): the call ends once the server has closed it.

    Every server closes the response when it has sent it (WSGI servers call close(), Django's
    ASGI handler too, and the file wrapper of a FileResponse calls it as well); Django's
    close() closes the response's files and sends request_finished, which closes database
    connections. Ending the measurement afterwards means that what a request allocates and
    frees at teardown is not counted as kept, and a streaming response counts what producing
    its content kept.

    A response dropped without close() (an ASGI client that disconnects while Django logs the
    response) ends its call when it is freed: no call stays in flight for ever.
    """

    __slots__ = ("_call", "_close", "_context", "_key", "_loop", "_recorder", "_view")

    def __init__(
        self,
        recorder: Recorder,
        call: Call,
        close: Callable[[], None],
        key: str,
        view: str,
        context: object | None,
        loop: asyncio.AbstractEventLoop | None,
    ) -> None:
        self._recorder = recorder
        self._loop = loop
        self._call: Call | None = call
        self._close = close
        self._key = key
        self._view = view
        # The ASGI request context the call runs in, if any: the call ends once it is freed.
        self._context = context

    def __call__(self) -> None:
        try:
            self._close()
        finally:
            # The server still holds the response (and through it the request) while it
            # closes it: a traced call does not count them as retained.
            response = getattr(self._close, "__self__", None)
            # The bound close() refers to the response, which refers to this object: let go of
            # it so that the response is freed by reference counting, not by the collector.
            self._close = _closed
            call, self._call = self._call, None
            context, self._context = self._context, None
            if call is not None:
                # Only a call that reads the heap or traces looks at them.
                held: tuple[object, ...] = ()
                if call.heap_share is not None or call.trace is not None:
                    held = logged_queries() if response is None else (response, *logged_queries())
                if context is None or not _Teardown(
                    self._recorder, call, self._key, self._view, self._loop, held
                ).wait_for(context):
                    self._recorder.end(call, REQUEST, self._key, self._view, held, server_heap)

    def __del__(self) -> None:
        call = self._call
        if call is not None:
            self._call = None
            # A finaliser may run anywhere, even while the recorder holds its lock: only queue.
            self._recorder.end_later(call, REQUEST, self._key, self._view)


def _closed() -> None:
    return None


# C heap bytes the WSGI server holds for each request at its response's close and frees right
# after, whatever the view did: uWSGI's buffer for the response's headers (set by
# uwsgi.install, see uwsgi.server_heap). Not kept by the call.
server_heap = 0


def logged_queries() -> tuple[object, ...]:
    """Return the queries Django has logged on this thread's connections (DEBUG = True).

    With DEBUG (or while a test captures queries) Django keeps each query's SQL and duration
    until the next request starts: a view running 40 queries seemed to keep 100 blocks a call.
    They are held anyway, not kept by the call (taken off like the response being closed).
    """
    try:
        return tuple(
            query
            for connection in connections.all(initialized_only=True)
            if connection.queries_logged
            for query in connection.queries_log
        )
    except Exception:  # a broken backend never fails the request
        return ()


class _Teardown:
    """A closed call that ends once Django's ASGI handler has torn its request down.

    The handler runs a request's sync code (its views, the response's close()) in the
    executor of the request's asgiref ThreadSensitiveContext, shuts that executor down once it
    has returned, and lets go of it as the handler returns. The call ends then: on the event
    loop the request was served from, once the executor is freed (a weakref finaliser, which
    may run in any thread, even while the recorder holds its lock, so it only schedules the
    end), or TEARDOWN_FALLBACK seconds after the executor's shutdown where something still
    refers to it then; where that loop is not known (the middleware running in the request's
    thread), right after the shutdown. A request whose executor outlives it ends its call at
    a later request's close, once TEARDOWN_WAIT has passed; at most TEARDOWN_WAITING_MAX calls
    wait.
    """

    __slots__ = (
        "__weakref__", "_call", "_closed_at", "_held", "_key", "_loop", "_recorder", "_view",
    )  # fmt: skip
    _waiting: dict[int, _Teardown] = {}

    def __init__(
        self,
        recorder: Recorder,
        call: Call,
        key: str,
        view: str,
        loop: asyncio.AbstractEventLoop | None,
        held: tuple[object, ...] = (),
    ) -> None:
        self._recorder = recorder
        self._call: Call | None = call
        self._key = key
        self._view = view
        self._loop = loop
        # The closed response (and the queries logged), held until the end, which takes off
        # what they free: under ASGI a REST framework response's reference cycle (its view,
        # request, serializer) is often in the collector's oldest generation by then, which
        # the end does not collect, so it would count as kept.
        self._held = held
        self._closed_at = time.monotonic()

    def wait_for(self, context: object) -> bool:
        """End the call once context's executor is done with; False when it has none."""
        executors = getattr(SyncToAsync, "context_to_thread_executor", None)
        executor = None if executors is None else executors.get(context)
        if executor is None:
            return False
        _Teardown.end_overdue(self._closed_at)
        loop = self._loop
        if loop is not None:
            weakref.finalize(executor, self._freed)
        # Neither the executor nor its bound method: the executor must not refer to itself.
        executor_ref = weakref.ref(executor)
        shutdown = type(executor).shutdown

        def shutdown_then_end(*args: Any, **kwargs: Any) -> None:
            try:
                target = executor_ref()
                if target is not None:
                    shutdown(target, *args, **kwargs)
            finally:
                if loop is None:
                    self.end()
                else:
                    # Where the executor outlives the handler (a reference cycle in some
                    # asgiref releases' frames, freed by the collector later): end anyway.
                    self._schedule(loop.call_later, TEARDOWN_FALLBACK, self.end)

        executor.shutdown = shutdown_then_end
        _Teardown._waiting[id(self)] = self
        return True

    def _freed(self) -> None:
        self._schedule(self.end)

    def _schedule(self, callback: Callable[..., object], *args: object) -> None:
        """Run callback(*args) on the request's loop from any thread, else end at the next call."""
        try:
            self._loop.call_soon_threadsafe(callback, *args)  # type: ignore[union-attr]
        except RuntimeError:  # the loop is closed: end with the next call
            call, self._call = self._call, None
            self._held = ()
            _Teardown._waiting.pop(id(self), None)
            if call is not None:
                self._recorder.end_later(call, REQUEST, self._key, self._view)

    @staticmethod
    def end_overdue(now: float) -> None:
        """End the calls waiting longer than TEARDOWN_WAIT, or past TEARDOWN_WAITING_MAX."""
        waiting = _Teardown._waiting
        for teardown in list(waiting.values()):
            if now - teardown._closed_at < TEARDOWN_WAIT and len(waiting) < TEARDOWN_WAITING_MAX:
                break
            teardown.end()

    def end(self) -> None:
        _Teardown._waiting.pop(id(self), None)
        call, self._call = self._call, None
        # Let go of the response here, whatever happens: the executor's finaliser refers to
        # this object for as long as the executor lives.
        held, self._held = self._held, ()
        if call is not None:
            self._recorder.end(call, REQUEST, self._key, self._view, held)


class LeakGuardMiddleware:
    """Sample memory around each request and attribute the growth to its URL pattern.

    Put it first in MIDDLEWARE so that it measures the whole request.
    """

    sync_capable = True
    async_capable = True

    def __init__(self, get_response: Callable[[HttpRequest], Any]) -> None:
        if not apps.is_installed("django_leakguard"):
            # Without the app there are no tables to write to (leakguard.E002): step aside.
            logger.warning(
                "django-leakguard: LeakGuardMiddleware is in MIDDLEWARE but 'django_leakguard' "
                "is not in INSTALLED_APPS, so nothing is recorded. Add it to INSTALLED_APPS and "
                "run `%s`.",
                conf.migrate_command(conf.get_settings().DATABASE),
            )
            raise MiddlewareNotUsed("'django_leakguard' is not in INSTALLED_APPS")
        self.get_response = get_response
        self.is_async = iscoroutinefunction(get_response)
        if self.is_async:
            markcoroutinefunction(self)
            # Django would run a sync process_view in a thread: give it a coroutine.
            self.process_view = self._aprocess_view  # type: ignore[method-assign, assignment]
        if memory.heap_available():
            request_started.connect(read_heap_early, dispatch_uid=_EARLY_UID)

    def process_view(
        self, request: HttpRequest, view: Callable[..., Any], args: Any, kwargs: Any
    ) -> None:
        """The URL is resolved: read the heap signals if this pattern needs readings."""
        measured = getattr(request, "_leakguard", None)
        if measured is not None:
            key = request._leakguard_key = request_key(request)  # type: ignore[attr-defined]
            recorder, call, decided = measured
            if decided == key[0] and call.heap_share is None and call.trace is None:
                return  # read_heap_early decided for this pattern: no reading this time
            early = call.collect
            recorder.measure_heap(call, REQUEST, key[0])
            if not early and call.heap_share is not None:
                # Read here, not before the request: its path's pattern was not known then.
                _remember_key(request, key[0])

    async def _aprocess_view(
        self, request: HttpRequest, view: Callable[..., Any], args: Any, kwargs: Any
    ) -> None:
        LeakGuardMiddleware.process_view(self, request, view, args, kwargs)

    def __call__(self, request: HttpRequest) -> HttpResponseBase | Awaitable[HttpResponseBase]:
        if self.is_async:
            return self.__acall__(request)
        if not recording():
            response: HttpResponseBase = self.get_response(request)
            return response
        recorder = get_recorder()
        early, decided = (None, None) if _early is None else _take_early()
        call = recorder.begin_rss(early)
        request._leakguard = (recorder, call, decided)  # type: ignore[attr-defined]
        try:
            response = self.get_response(request)
        except BaseException:
            recorder.end(call, REQUEST, *ended_key(request))
            raise
        return _end_at_close(recorder, call, request, response)

    async def __acall__(self, request: HttpRequest) -> HttpResponseBase:
        if not recording():
            response: HttpResponseBase = await self.get_response(request)
            return response
        recorder = get_recorder()
        early, decided = (None, None)
        before = _asgi_early.get()
        if before is not None:
            early, decided = before  # read before Django's handler began: no dispatch then
            _asgi_early.set(None)
        elif _early is not None and _REQUEST_CONTEXT is not None:
            early, decided = _take_early(_REQUEST_CONTEXT.get(None))
            if early is not None:
                early = recorder.read_again(early)
        call = recorder.begin_rss(early)
        request._leakguard = (recorder, call, decided)  # type: ignore[attr-defined]
        try:
            response = await self.get_response(request)
        except BaseException:  # CancelledError too: the client disconnected during the view
            recorder.end(call, REQUEST, *ended_key(request))
            raise
        return _end_at_close(recorder, call, request, response, asyncio.get_running_loop())


def _end_at_close(
    recorder: Recorder,
    call: Call,
    request: HttpRequest,
    response: HttpResponseBase,
    loop: asyncio.AbstractEventLoop | None = None,
) -> HttpResponseBase:
    key, view = ended_key(request)
    context = None if _REQUEST_CONTEXT is None else _REQUEST_CONTEXT.get(None)
    try:
        response.close = _EndAtClose(  # type: ignore[method-assign]
            recorder,
            call,
            response.close,
            key,
            view,
            context,
            loop,
        )
    except Exception:  # a response object that does not take attributes: end the call now
        recorder.end(call, REQUEST, key, view)
    else:
        recorder.awaiting_close(call, REQUEST, key, view)
    return response
