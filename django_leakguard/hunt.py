"""leakhunt: replay a request many times under tracemalloc and name the lines that keep memory."""

from __future__ import annotations

import contextlib
import gc
import tracemalloc
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from django.contrib.auth import get_user_model
from django.core.signals import got_request_exception, request_finished, request_started
from django.db import close_old_connections, connections, transaction
from django.http import HttpResponseBase
from django.test import Client
from django.urls import Resolver404, resolve

from django_leakguard.recorder import suspended
from django_leakguard.replay import ReplayHandler
from django_leakguard.tracing import Site, site_statistics

DEFAULT_REQUESTS = 200
DEFAULT_WARMUP = 20
DEFAULT_TOP = 10
# More frames than sampled tracing: leakhunt is for local debugging, precision over speed.
HUNT_FRAMES = 10
PLACEHOLDER = "{n}"


class HuntError(Exception):
    """A user error: the message says what is wrong, the hint what to do."""

    def __init__(self, message: str, hint: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return f"{self.message} {self.hint}".strip()


@dataclass(frozen=True)
class GrowingSite:
    """A line whose retained memory grew in both halves of the measured requests."""

    site: Site  # size and count: the growth over all measured requests
    first_half: int  # bytes
    second_half: int
    per_request: float


@dataclass(frozen=True)
class HuntResult:
    method: str
    path: str  # as given, with its {n} placeholder
    requests: int
    warmup: int
    statuses: dict[int, int]  # status code -> responses, warm-up included
    retained: int  # bytes still held after the measured requests that they allocated
    growing: tuple[GrowingSite, ...]

    @property
    def retained_per_request(self) -> float:
        return self.retained / self.requests


def request_path(template: str, number: int) -> str:
    """Return the path of request number (from 1): {n} in the template becomes the number."""
    return template.replace(PLACEHOLDER, str(number))


def _check_resolves(path: str) -> None:
    try:
        resolve(urlsplit(path).path)
    except Resolver404:
        raise HuntError(
            f"No URL pattern matches {path!r}.",
            "Pass a path your URLconf serves, starting with / and with its trailing slash, "
            "e.g. /products/1/.",
        ) from None


@contextlib.contextmanager
def _writes_rolled_back(rollback: bool) -> Iterator[None]:
    if not rollback:
        yield
        return
    aliases = list(connections)
    with contextlib.ExitStack() as stack:
        for alias in aliases:
            stack.enter_context(transaction.atomic(using=alias))
        yield
        for alias in aliases:
            transaction.set_rollback(True, using=alias)


def _log_in(client: Client, username: str) -> None:
    user_model = get_user_model()
    try:
        user = user_model._default_manager.get_by_natural_key(username)
    except user_model.DoesNotExist:
        raise HuntError(
            f"No user has {user_model.USERNAME_FIELD} {username!r}.",
            "Pass an existing user to --user, or create one first.",
        ) from None
    client.force_login(user)


def _snapshot() -> tracemalloc.Snapshot:
    gc.collect()  # garbage cycles are not leaks
    return tracemalloc.take_snapshot()


def _sites(snapshot: tracemalloc.Snapshot) -> tuple[int, dict[tuple[str, int], Site]]:
    size, _, sites = site_statistics(snapshot)
    return size, {(site.filename, site.lineno): site for site in sites}


class ReplayClient(Client):
    """A test client that replays thousands of requests without growing itself.

    Client.request and ClientHandler connect signal receivers for every request, and each
    connection of a long-lived receiver leaves a weakref.finalize behind (with DEBUG, also a
    cache entry): a few hundred bytes per request that leakhunt would report as a leak.
    This client connects its receivers once, inside receivers_connected().
    """

    def __init__(self) -> None:
        super().__init__()
        self.handler = ReplayHandler(enforce_csrf_checks=False)

    def request(self, **request: Any) -> Any:
        environ = self._base_environ(**request)  # type: ignore[attr-defined]
        response: HttpResponseBase = self.handler(environ)
        self.check_exception(response)  # re-raises what a view raised
        if response.cookies:
            self.cookies.update(response.cookies)
        return response

    @contextlib.contextmanager
    def receivers_connected(self) -> Iterator[None]:
        # close_old_connections would close a connection inside our atomic block (and an
        # in-memory SQLite database with it); the test client also keeps it away.
        started = request_started.disconnect(close_old_connections)
        finished = request_finished.disconnect(close_old_connections)
        uid = f"leakhunt-{id(self)}"
        got_request_exception.connect(self.store_exc_info, dispatch_uid=uid)
        try:
            yield
        finally:
            got_request_exception.disconnect(dispatch_uid=uid)
            if started:
                request_started.connect(close_old_connections)
            if finished:
                request_finished.connect(close_old_connections)


class _Replayer:
    def __init__(self, client: Client, method: str, template: str) -> None:
        self.client = client
        self.method = method
        self.template = template
        self.number = 0
        self.statuses: Counter[int] = Counter()

    def replay(self, count: int) -> None:
        for _ in range(count):
            self.number += 1
            path = request_path(self.template, self.number)
            try:
                response = self.client.generic(self.method, path)
            except Exception as exc:
                raise HuntError(
                    f"{self.method} {path} raised {type(exc).__name__}: {exc}",
                    "leakhunt needs a request that succeeds; fix the view or pick another path.",
                ) from exc
            self.statuses[response.status_code] += 1
            if self.number == 1 and response.status_code == 404:
                raise HuntError(
                    f"{self.method} {path} returned 404 Not Found.",
                    "Pass a path that finds an object, e.g. the pk of an existing row.",
                )


def hunt(
    path: str,
    *,
    requests: int = DEFAULT_REQUESTS,
    method: str = "GET",
    username: str | None = None,
    warmup: int = DEFAULT_WARMUP,
    top: int = DEFAULT_TOP,
    commit: bool = False,
    frames: int = HUNT_FRAMES,
) -> HuntResult:
    """Replay method path in-process and return the lines whose retained memory grows."""
    if requests < 2:
        raise HuntError(f"--requests should be at least 2, got {requests}.")
    if warmup < 1:
        raise HuntError(f"--warmup should be at least 1, got {warmup}.")
    if top < 1:
        raise HuntError(f"--top should be at least 1, got {top}.")
    method = method.upper()
    _check_resolves(request_path(path, 1))
    half = requests // 2
    client = ReplayClient()
    replayer = _Replayer(client, method, path)
    # The replayed requests are not traffic: LeakGuardMiddleware (and sampled tracing, which
    # would fight leakhunt for tracemalloc) must not record them.
    with suspended(), client.receivers_connected(), _writes_rolled_back(not commit):
        if username is not None:
            _log_in(client, username)
        # Warm-up fills what is allocated once: imports, caches, connections, lazy settings.
        replayer.replay(warmup)
        started = not tracemalloc.is_tracing()
        if started:
            tracemalloc.start(frames)
        try:
            base = _snapshot()
            replayer.replay(half)
            middle = _snapshot()
            replayer.replay(requests - half)
            end = _snapshot()
        finally:
            if started:
                tracemalloc.stop()
    (size_at_base, at_base), (_, at_middle), (size_at_end, at_end) = map(
        _sites, (base, middle, end)
    )
    growing: list[GrowingSite] = []
    for key, site in at_end.items():
        before = at_base.get(key)
        between = at_middle.get(key)
        size_base = before.size if before else 0
        size_middle = between.size if between else 0
        first, second = size_middle - size_base, site.size - size_middle
        # A leak grows in both halves, at a similar pace; what grew once (a pool opened) or
        # less and less (a bounded cache filling up) is not.
        if first > 0 and second > 0 and second * 4 >= first:
            grown = Site(
                site.filename,
                site.lineno,
                site.line,
                site.size - size_base,
                site.count - (before.count if before else 0),
                site.frames,
            )
            growing.append(GrowingSite(grown, first, second, grown.size / requests))
    growing.sort(key=lambda g: (-g.site.size, g.site.filename, g.site.lineno))
    return HuntResult(
        method=method,
        path=path,
        requests=requests,
        warmup=warmup,
        statuses=dict(sorted(replayer.statuses.items())),
        retained=size_at_end - size_at_base,
        growing=tuple(growing[:top]),
    )


def format_size(size: float) -> str:
    """Return a size in bytes as "812 B", "64.0 KiB", "1.5 MiB"."""
    if abs(size) < 1024:
        return f"{size:,.0f} B"
    if abs(size) < 1024**2:
        return f"{size / 1024:,.1f} KiB"
    return f"{size / 1024**2:,.1f} MiB"


def render(result: HuntResult, callers: int = 3) -> str:
    """Return the report leakhunt prints."""
    statuses = ", ".join(f"{code} x{count}" for code, count in result.statuses.items())
    lines = [
        f"Replayed {result.method} {result.path} {result.requests} times after "
        f"{result.warmup} warm-up requests (responses: {statuses}).",
        f"Retained by the measured requests: {format_size(result.retained)} in all, "
        f"{format_size(result.retained_per_request)} per request.",
        "",
    ]
    if not result.growing:
        lines.append(
            "No line's retained memory grew in both halves of the run: no leak found here."
        )
        return "\n".join(lines)
    lines.append("Lines whose retained memory grows with the number of requests, largest first:")
    for rank, growing in enumerate(result.growing, 1):
        site = growing.site
        half_a = result.requests // 2
        half_b = result.requests - half_a
        lines.append("")
        lines.append(
            f"{rank:>2}. {site.location}  {format_size(growing.per_request)} per request "
            f"({format_size(growing.first_half / half_a)} then "
            f"{format_size(growing.second_half / half_b)}; {site.count:,} blocks kept)"
        )
        if site.line:
            lines.append(f"      {site.line}")
        # frames run innermost first: the callers are those after the site's own frame.
        own = site.frames.index(site.location) if site.location in site.frames else -1
        lines.extend(f"      from {frame}" for frame in site.frames[own + 1 : own + 1 + callers])
    return "\n".join(lines)
