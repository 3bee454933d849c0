"""leakhunt: replay a request many times under tracemalloc and name the lines that keep memory."""

from __future__ import annotations

import contextlib
import gc
import re
import sys
import time
import tracemalloc
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from django.apps import apps
from django.conf import settings
from django.contrib.auth import get_user_model
from django.core.signals import got_request_exception, request_finished, request_started
from django.db import close_old_connections, connections, transaction
from django.http import HttpResponseBase
from django.http.request import validate_host
from django.test import Client
from django.urls import Resolver404, resolve

from django_leakguard.linewatch import LineWatch
from django_leakguard.recorder_process import suspended
from django_leakguard.replay import ReplayHandler
from django_leakguard.text import escape_controls
from django_leakguard.tracing_records import Site
from django_leakguard.tracing_sites import short_filename, site_lines, source_line
from django_leakguard.tracing_snapshot import site_statistics
from django_leakguard.units import format_bytes

DEFAULT_REQUESTS = 200
DEFAULT_WARMUP = 20
DEFAULT_TOP = 10
# More frames than sampled tracing: leakhunt is for local debugging, precision over speed.
HUNT_FRAMES = 10
PLACEHOLDER = "{n}"
# C-heap bytes per request a line must keep, beyond what tracemalloc traced there, to be named:
# glibc's accounting moves by a few dozen bytes as its free lists change.
C_THRESHOLD = 64
# Bytes per request a line whose block count did not grow must keep to be named.
MIN_GROWTH = 64
# Requests per block kept, at most, for a line to be named on its blocks alone: a leak keeps
# something every few requests; a few blocks over a hundred requests are objects that other
# code (an earlier test, a cache of the framework) happened to hold at the snapshot.
MAX_REQUESTS_PER_BLOCK = 10
# Progress lines on stderr: one per this share of the requests, none in the first seconds.
PROGRESS_STEPS = 10
PROGRESS_AFTER = 2.0


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
    c_memory: bool = False  # kept in the C heap (malloc), which tracemalloc does not see


@dataclass(frozen=True)
class HuntResult:
    method: str
    path: str  # as given, with its {n} placeholder
    requests: int
    warmup: int
    statuses: dict[int, int]  # status code -> responses, warm-up included
    retained: int  # bytes still held after the measured requests that they allocated
    growing: tuple[GrowingSite, ...]
    c_watched: bool = False  # whether the C heap was watched line by line

    @property
    def retained_per_request(self) -> float:
        return self.retained / self.requests


def unsuccessful_warning(
    result: HuntResult, logged_in: bool, with_headers: bool = False
) -> str | None:
    """Return a warning when replayed responses were not 2xx (the view may not have run)."""
    failed = {code: count for code, count in result.statuses.items() if not 200 <= code < 300}
    if not failed:
        return None
    total = sum(result.statuses.values())
    codes = ", ".join(f"{code} x{count}" for code, count in failed.items())
    hint = "Check the path, the method and the view's logs."
    host = replay_host()
    if 400 in failed and not with_headers and not validate_host(host, _allowed_hosts()):
        hint = (
            f"The requests were for the host {host!r}, which ALLOWED_HOSTS does not "
            "allow (Django answers 400): add it to ALLOWED_HOSTS, or pass another with "
            "--header 'Host: name'."
        )
    elif not (logged_in or with_headers) and any(code in (301, 302, 401, 403) for code in failed):
        hint = (
            "If the view needs a logged-in user, pass --user USERNAME; if it needs an API key "
            "or a token, pass it with --header 'Name: value'; otherwise check the path and "
            "the method."
        )
    return (
        f"Warning: {sum(failed.values()):,} of {total:,} responses were not successful "
        f"({codes}): the view may not have done its usual work, so what it keeps was not "
        f"measured. {hint}"
    )


# A header's name: an HTTP token (RFC 9110).
_HEADER_NAME = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")


def parse_headers(lines: Sequence[str]) -> dict[str, str]:
    """Return {name: value} of "Name: value" lines; raise HuntError on a malformed one.

    Nothing of a line is shown in the error: a header may carry a secret.
    """
    headers: dict[str, str] = {}
    for number, line in enumerate(lines, 1):
        name, colon, value = line.partition(":")
        name = name.strip()
        if not colon:
            problem = "it has no colon"
        elif not _HEADER_NAME.fullmatch(name):
            problem = "what comes before the colon is not a header name"
        else:
            headers[name] = value.strip()
            continue
        raise HuntError(
            f"--header number {number} should be 'Name: value', such as "
            f"'Authorization: Token ...': {problem}.",
            "Quote each header as one argument: --header 'X-Api-Key: ...'.",
        )
    return headers


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


# The session engines that store sessions with django.contrib.sessions' model.
_MODEL_SESSION_ENGINES = (
    "django.contrib.sessions.backends.db",
    "django.contrib.sessions.backends.cached_db",
)


def _log_in(client: Client, username: str) -> None:
    user_model = get_user_model()
    try:
        user = user_model._default_manager.get_by_natural_key(username)
    except user_model.DoesNotExist:
        raise HuntError(
            f"No user has {user_model.USERNAME_FIELD} {username!r}.",
            "Pass an existing user to --user, or create one first.",
        ) from None
    engine = settings.SESSION_ENGINE
    if engine in _MODEL_SESSION_ENGINES and not apps.is_installed("django.contrib.sessions"):
        raise HuntError(
            f"--user logs in with a session, and SESSION_ENGINE {engine!r} stores sessions with "
            "django.contrib.sessions, which is not in INSTALLED_APPS.",
            "Add 'django.contrib.sessions' to INSTALLED_APPS and migrate, or set "
            "SESSION_ENGINE = 'django.contrib.sessions.backends.signed_cookies'.",
        )
    client.force_login(user)


def _snapshot() -> tracemalloc.Snapshot:
    gc.collect()  # garbage cycles are not leaks
    # CPython's type attribute cache keeps the names it looked up (a string made by
    # import_string, say) until another lookup takes their slot: not the request's.
    sys._clear_type_cache()
    return tracemalloc.take_snapshot()


def _sites(snapshot: tracemalloc.Snapshot) -> tuple[int, dict[tuple[str, int], Site]]:
    size, _, sites = site_statistics(snapshot)
    return size, {(site.filename, site.lineno): site for site in sites}


def _allowed_hosts() -> list[str]:
    allowed = list(settings.ALLOWED_HOSTS)
    if settings.DEBUG and not allowed:
        allowed = [".localhost", "127.0.0.1", "[::1]"]  # what Django allows then
    return allowed


def replay_host() -> str:
    """The host replayed requests are for: the test client's "testserver" where ALLOWED_HOSTS
    allows it, else the first host it names (a pattern's domain for ".example.com")."""
    allowed = _allowed_hosts()
    if validate_host("testserver", allowed):
        return "testserver"
    for pattern in allowed:
        host = pattern.lstrip(".")
        if host and "*" not in host and validate_host(host, allowed):
            return host
    return "testserver"


class ReplayClient(Client):
    """A test client that replays thousands of requests without growing itself.

    Client.request and ClientHandler connect signal receivers for every request, and each
    connection of a long-lived receiver leaves a weakref.finalize behind (with DEBUG, also a
    cache entry): a few hundred bytes per request that leakhunt would report as a leak.
    This client connects its receivers once, inside receivers_connected().
    """

    def __init__(self) -> None:
        # A host the project allows: Django's test runner adds the test client's "testserver"
        # to ALLOWED_HOSTS, leakhunt does not, and every replay was a 400 where it is missing.
        super().__init__(SERVER_NAME=replay_host())
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


Progress = Callable[[str], None]


class _Replayer:
    def __init__(
        self,
        client: Client,
        method: str,
        template: str,
        total: int,
        progress: Progress | None,
        headers: dict[str, str] | None = None,
    ) -> None:
        self.client = client
        self.method = method
        self.headers = headers or {}
        self.template = template
        self.number = 0
        self.statuses: Counter[int] = Counter()
        self.total = total
        self.progress = progress
        self.started = time.monotonic()
        self.step = max(1, total // PROGRESS_STEPS)

    def _report_progress(self) -> None:
        elapsed = time.monotonic() - self.started
        due = self.number % self.step == 0 and elapsed >= PROGRESS_AFTER
        if self.progress is not None and due:
            self.progress(
                f"leakhunt: {self.number:,} of {self.total:,} requests replayed ({elapsed:.0f} s)"
            )

    def replay(self, count: int, watch: LineWatch | None = None) -> None:
        for _ in range(count):
            self.number += 1
            self._report_progress()
            path = request_path(self.template, self.number)
            if watch is not None:
                watch.begin_request()
            try:
                response = self.client.generic(self.method, path, headers=self.headers)
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
            if watch is not None:
                del response  # closed already: its teardown is the request's
                watch.end_request()


def hunt(
    path: str,
    *,
    requests: int = DEFAULT_REQUESTS,
    method: str = "GET",
    username: str | None = None,
    headers: Sequence[str] = (),
    warmup: int = DEFAULT_WARMUP,
    top: int = DEFAULT_TOP,
    commit: bool = False,
    frames: int = HUNT_FRAMES,
    c_heap: bool = True,
    progress: Progress | None = None,
) -> HuntResult:
    """Replay method path in-process and return the lines whose retained memory grows.

    Python memory is traced with tracemalloc from before the warm-up (a bounded cache filled
    then shows no growth later); with c_heap and glibc, as many requests again are replayed
    watching the C heap line by line (see linewatch), for what tracemalloc cannot see.
    progress, when given, gets a line now and then on a long run.
    """
    if requests < 2:
        raise HuntError(f"--requests should be at least 2, got {requests}.")
    if warmup < 1:
        raise HuntError(f"--warmup should be at least 1, got {warmup}.")
    if top < 1:
        raise HuntError(f"--top should be at least 1, got {top}.")
    method = method.upper()
    sent = parse_headers(headers)
    _check_resolves(request_path(path, 1))
    half = requests // 2
    watch = LineWatch() if c_heap and LineWatch.available() else None
    client = ReplayClient()
    total = warmup + requests * (2 if watch is not None else 1)
    replayer = _Replayer(client, method, path, total, progress, sent)
    c_halves: list[dict[tuple[str, int], int]] = []
    c_total = 0
    # The replayed requests are not traffic: LeakGuardMiddleware (and sampled tracing, which
    # would fight leakhunt for tracemalloc) must not record them.
    with suspended(), client.receivers_connected(), _writes_rolled_back(not commit):
        if username is not None:
            _log_in(client, username)
        started = not tracemalloc.is_tracing()
        if started:
            # Before the warm-up: a cache the warm-up fills, entries later replaced, would look
            # like growth if its first entries were not traced.
            tracemalloc.start(frames)
        try:
            # Warm-up fills what is allocated once: imports, caches, connections, settings.
            replayer.replay(warmup)
            base = _snapshot()
            replayer.replay(half)
            middle = _snapshot()
            replayer.replay(requests - half)
            end = _snapshot()
        finally:
            if started:
                tracemalloc.stop()
        if watch is not None:
            with watch.watching():
                for count in (half, requests - half):
                    watch.kept = {}
                    replayer.replay(count, watch)
                    c_halves.append(watch.kept)
                c_total = watch.total
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
        kept_blocks = site.count - (before.count if before else 0)
        # A bounded cache replacing entries keeps as many blocks as before, give or take a few
        # bytes (a longer key): a leak keeps more blocks, or a sizeable amount more.
        sizeable = (
            kept_blocks * MAX_REQUESTS_PER_BLOCK >= requests
            or site.size - size_base >= MIN_GROWTH * requests
        )
        if _grows(first, second) and sizeable:
            grown = Site(
                site.filename,
                site.lineno,
                site.line,
                site.size - size_base,
                kept_blocks,
                site.frames,
            )
            growing.append(GrowingSite(grown, first, second, grown.size / requests))
    if c_halves:
        traced = {(g.site.filename, g.site.lineno): g.site.size for g in growing}
        # Beyond what tracemalloc traced, the C heap kept this much: no line is charged more
        # (a line where memory rose, freed later at another's, would be, now and then).
        budget = c_total - (size_at_end - size_at_base)
        growing.extend(_c_lines(c_halves, budget, requests, traced))
    growing.sort(key=lambda g: (-g.site.size, g.site.filename, g.site.lineno))
    return HuntResult(
        method=method,
        path=path,
        requests=requests,
        warmup=warmup,
        statuses=dict(sorted(replayer.statuses.items())),
        retained=size_at_end - size_at_base,
        growing=tuple(growing[:top]),
        c_watched=watch is not None,
    )


def _grows(first: int, second: int) -> bool:
    # A leak grows in both halves, at a similar pace; what grew once (a pool opened), less
    # and less (a bounded cache filling up) or only lately (responses that other code held
    # at the last snapshot) is not.
    return first > 0 and second > 0 and second * 4 >= first and first * 4 >= second


def _c_lines(
    halves: list[dict[tuple[str, int], int]],
    budget: int,
    requests: int,
    traced: dict[tuple[str, int], int],
) -> list[GrowingSite]:
    """The lines whose C-heap growth, beyond what tracemalloc traced there, is a leak.

    Largest first, each charged at most what is left of budget (the C heap's growth over the
    requests beyond what tracemalloc traced).
    """
    first_half, second_half = halves
    found = []
    lines = set(first_half) | set(second_half)
    for key in sorted(lines, key=lambda k: (-first_half.get(k, 0) - second_half.get(k, 0), k)):
        first, second = first_half.get(key, 0), second_half.get(key, 0)
        filename, lineno = key
        # What tracemalloc saw at this line is Python memory, reported as such; objects over
        # 512 bytes come from malloc and so show in the C heap as well.
        shown = traced.get((short_filename(filename), lineno), 0)
        kept = min(first + second - shown, budget)
        # The C heap also holds what tracemalloc saw, give or take the allocator's rounding:
        # only a remainder well beyond it is memory tracemalloc missed.
        if not _grows(first, second) or kept < max(C_THRESHOLD * requests, shown / 2):
            continue
        budget -= kept
        site = Site(short_filename(filename), lineno, source_line(filename, lineno), kept, 0)
        scale = kept / (first + second)
        found.append(
            GrowingSite(
                site, round(first * scale), round(second * scale), kept / requests, c_memory=True
            )
        )
    return found


_ID_SEGMENT = re.compile(r"(?<=/)\d+(?=/|$|\?)")


def placeholder_hint(path: str) -> str | None:
    """Suggest {n} for a path with one id: a leak per new id never grows on a repeated one."""
    if PLACEHOLDER in path:
        return None
    match = _ID_SEGMENT.search(path)
    if match is None:
        return None
    suggested = path[: match.start()] + PLACEHOLDER + path[match.end() :]
    return (
        f"Every request asked for the same id ({match.group()}): a leak that keeps something "
        f"per new id (a cache or a logger per object) grows only with new ids. Try "
        f"{escape_controls(suggested)!s} ({PLACEHOLDER} becomes 1, 2, 3, ...)."
    )


def render(result: HuntResult, callers: int = 3) -> str:
    """Return the report leakhunt prints."""
    statuses = ", ".join(f"{code} x{count}" for code, count in result.statuses.items())
    again = (
        f", then {result.requests} times more watching the C heap line by line"
        if result.c_watched
        else ""
    )
    lines = [
        f"Replayed {result.method} {escape_controls(result.path)} {result.requests} times after "
        f"{result.warmup} warm-up requests{again} (responses: {statuses}).",
        f"Retained by the measured requests: {format_bytes(result.retained)} in all, "
        f"{format_bytes(result.retained_per_request)} per request.",
        "",
    ]
    if not result.growing:
        lines.append(
            "No line's retained memory grew in both halves of the run: no leak found here."
        )
        hint = placeholder_hint(result.path)
        if hint is not None:
            lines.append(hint)
        return "\n".join(lines)
    lines.append("Lines whose retained memory grows with the number of requests, largest first:")
    for rank, growing in enumerate(result.growing, 1):
        site = growing.site
        half_a = result.requests // 2
        half_b = result.requests - half_a
        kept = (
            "C memory (malloc), which tracemalloc does not see"
            if growing.c_memory
            else f"{site.count:,} blocks kept"
        )
        lines.append("")
        lines.append(
            f"{rank:>2}. {escape_controls(site.location)}  "
            f"{format_bytes(growing.per_request)} per request "
            f"({format_bytes(growing.first_half / half_a)} then "
            f"{format_bytes(growing.second_half / half_b)}; {kept})"
        )
        lines.extend(site_lines(site, callers))
    return "\n".join(lines)
