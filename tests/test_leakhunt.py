from __future__ import annotations

import tracemalloc
from collections.abc import Iterator
from io import StringIO
from pathlib import Path

import pytest
from django.contrib.auth.models import Group, User
from django.core.management import CommandError, call_command
from django.core.signals import request_finished, request_started
from django.db import close_old_connections
from django.http import Http404, HttpRequest, HttpResponse, StreamingHttpResponse
from django.test import override_settings
from django.urls import include, path
from shop import views

from django_leakguard import hunt
from django_leakguard.tracing import Site

VIEWS_SOURCE = Path(views.__file__).read_text().splitlines()

pytestmark = pytest.mark.django_db(databases="__all__")


def line_of(text: str) -> int:
    """Return the line number in shop/views.py of the first line containing text."""
    return next(number for number, line in enumerate(VIEWS_SOURCE, 1) if text in line)


# Views for the cases shop does not have; @pytest.mark.urls(__name__) serves them.


def not_found(request: HttpRequest) -> HttpResponse:
    raise Http404("no such product")


def broken(request: HttpRequest) -> HttpResponse:
    raise RuntimeError("the view is broken")


def write_row(request: HttpRequest, n: str) -> HttpResponse:
    Group.objects.create(name=f"leakhunt {n}")
    return HttpResponse("written", status=201)


def whoami(request: HttpRequest) -> HttpResponse:
    if not request.user.is_authenticated:
        return HttpResponse("anonymous", status=403)
    return HttpResponse(request.user.get_username())


cookie_seen: list[bool] = []


def cookie(request: HttpRequest) -> HttpResponse:
    cookie_seen.append("visited" in request.COOKIES)
    response = HttpResponse("ok")
    response.set_cookie("visited", "1")
    return response


def streaming(request: HttpRequest) -> StreamingHttpResponse:
    return StreamingHttpResponse(iter([b"a", b"b"]))


urlpatterns = [
    path("missing/", not_found),
    path("broken/", broken),
    path("write/<str:n>/", write_row),
    path("whoami/", whoami),
    path("cookie/", cookie),
    path("stream/", streaming),
    path("", include("shop.urls")),
]


@pytest.fixture(autouse=True)
def _forget_leaks() -> Iterator[None]:
    views._render_fragment.cache_clear()
    yield
    views._retained.clear()
    views._small.clear()
    views._render_fragment.cache_clear()
    cookie_seen.clear()
    assert not tracemalloc.is_tracing()


def leakhunt(*args: str) -> str:
    out = StringIO()
    call_command("leakhunt", *args, stdout=out)
    return out.getvalue()


# Finding leaks.


def test_names_the_line_that_retains_64_kib_per_request() -> None:
    output = leakhunt("/leak/retain/", "--requests", "40", "--warmup", "5", "--force")
    line = line_of("_retained.append(os.urandom(RETAIN_BYTES))")
    assert "Replayed GET /leak/retain/ 40 times after 5 warm-up requests (responses: 200 x45)" in (
        output
    )
    first = output.split(" 1. ", 1)[1]
    assert first.startswith(f"shop/views.py:{line}  64.0 KiB per request")
    assert "_retained.append(os.urandom(RETAIN_BYTES))" in first
    assert "from django/core/handlers/base.py" in first


def test_result_measures_the_leak_per_request() -> None:
    result = hunt.hunt("/leak/retain/", requests=40, warmup=5, top=3)
    top = result.growing[0]
    assert top.site.location == f"shop/views.py:{line_of('_retained.append(')}"
    assert abs(top.per_request - views.RETAIN_BYTES) < 0.02 * views.RETAIN_BYTES
    assert top.first_half > 0
    assert top.second_half > 0
    assert abs(result.retained_per_request - views.RETAIN_BYTES) < 0.10 * views.RETAIN_BYTES
    assert len(result.growing) <= 3
    assert result.statuses == {200: 45}


def test_names_the_unbounded_cache_with_a_key_per_request() -> None:
    output = leakhunt("/leak/cache/{n}/", "--requests", "40", "--warmup", "5", "--force")
    line = line_of("return os.urandom(16 * 1024) + key.encode()")
    first = output.split(" 1. ", 1)[1]
    assert first.startswith(f"shop/views.py:{line}  16.0 KiB per request")
    assert f"from shop/views.py:{line_of('fragment = _render_fragment(key)')}" in first
    # Five warm-up keys and forty measured ones: {n} made each request's key new.
    assert views._render_fragment.cache_info().currsize == 45


def test_many_small_objects() -> None:
    result = hunt.hunt("/leak/small/", requests=20, warmup=2)
    assert result.growing[0].site.location == f"shop/views.py:{line_of('_small.append(')}"
    assert result.growing[0].site.count >= 20 * views.SMALL_OBJECTS


def test_finds_nothing_on_a_view_that_does_not_leak() -> None:
    output = leakhunt("/products/1/", "--requests", "60", "--force")
    assert "no leak found here" in output


def test_request_path_replaces_the_placeholder() -> None:
    assert hunt.request_path("/cache/{n}/?page={n}", 7) == "/cache/7/?page=7"
    assert hunt.request_path("/plain/", 7) == "/plain/"


# Safety.


def test_refuses_to_run_with_debug_false() -> None:
    with pytest.raises(CommandError, match=r"DEBUG = False.*pass --force"):
        leakhunt("/products/1/")


@override_settings(DEBUG=True)
def test_runs_with_debug_true_without_force() -> None:
    assert "Replayed GET /products/1/ 4 times" in leakhunt("/products/1/", "--requests", "4")


@pytest.mark.urls(__name__)
def test_database_writes_are_rolled_back() -> None:
    result = hunt.hunt("/write/{n}/", method="post", requests=4, warmup=2)
    assert result.method == "POST"
    assert result.statuses == {201: 6}
    assert not Group.objects.exists()


@pytest.mark.urls(__name__)
def test_commit_keeps_database_writes() -> None:
    leakhunt(
        "/write/{n}/",
        "--method",
        "POST",
        "--requests",
        "4",
        "--warmup",
        "2",
        "--commit",
        "--force",
    )
    assert Group.objects.count() == 6


@pytest.mark.urls(__name__)
def test_request_signals_are_restored() -> None:
    started, finished = len(request_started.receivers), len(request_finished.receivers)
    with pytest.raises(CommandError):
        leakhunt("/broken/", "--force")
    hunt.hunt("/cookie/", requests=2, warmup=1)
    assert (len(request_started.receivers), len(request_finished.receivers)) == (
        started,
        finished,
    )


def test_close_old_connections_stays_disconnected_when_it_was() -> None:
    assert request_started.disconnect(close_old_connections)
    assert request_finished.disconnect(close_old_connections)
    try:
        hunt.hunt("/products/1/", requests=2, warmup=1)
        assert not request_started.disconnect(close_old_connections)
        assert not request_finished.disconnect(close_old_connections)
    finally:
        request_started.connect(close_old_connections)
        request_finished.connect(close_old_connections)


def test_a_users_own_tracemalloc_is_left_running() -> None:
    tracemalloc.start(10)
    try:
        result = hunt.hunt("/leak/retain/", requests=10, warmup=2)
        assert tracemalloc.is_tracing()
    finally:
        tracemalloc.stop()
    assert result.growing[0].site.filename == "shop/views.py"


# Logging in.


@pytest.mark.urls(__name__)
@override_settings(
    SESSION_ENGINE="django.contrib.sessions.backends.signed_cookies",
    MIDDLEWARE=[
        "django.contrib.sessions.middleware.SessionMiddleware",
        "django.contrib.auth.middleware.AuthenticationMiddleware",
    ],
)
def test_user_logs_in_first() -> None:
    User.objects.create_user("alice")
    assert hunt.hunt("/whoami/", requests=2, warmup=1).statuses == {403: 3}
    assert hunt.hunt("/whoami/", requests=2, warmup=1, username="alice").statuses == {200: 3}
    output = leakhunt("/whoami/", "--user", "alice", "--requests", "2", "--force")
    assert "(responses: 200 x22)" in output


def test_unknown_user() -> None:
    with pytest.raises(CommandError, match=r"No user has username 'nobody'\. Pass an existing"):
        leakhunt("/products/1/", "--user", "nobody", "--force")


# Clear errors.


def test_path_without_a_url_pattern() -> None:
    with pytest.raises(CommandError, match=r"No URL pattern matches '/nope/'\. Pass a path"):
        leakhunt("/nope/", "--force")


def test_path_without_its_trailing_slash_is_named() -> None:
    with pytest.raises(CommandError, match="No URL pattern matches '/leak/retain'"):
        leakhunt("/leak/retain", "--force")


@pytest.mark.urls(__name__)
def test_view_that_returns_404() -> None:
    with pytest.raises(CommandError, match=r"GET /missing/ returned 404 Not Found\."):
        leakhunt("/missing/", "--force")


@pytest.mark.urls(__name__)
def test_view_that_raises() -> None:
    with pytest.raises(CommandError, match="GET /broken/ raised RuntimeError: the view is broken"):
        leakhunt("/broken/", "--force")


@pytest.mark.parametrize(
    ("option", "message"),
    [
        (["--requests", "1"], "--requests should be at least 2, got 1."),
        (["--warmup", "0"], "--warmup should be at least 1, got 0."),
        (["--top", "0"], "--top should be at least 1, got 0."),
    ],
)
def test_bad_numbers(option: list[str], message: str) -> None:
    with pytest.raises(CommandError) as raised:
        leakhunt("/products/1/", "--force", *option)
    assert str(raised.value) == message


# The client.


@pytest.mark.urls(__name__)
def test_cookies_persist_and_streams_are_consumed() -> None:
    assert hunt.hunt("/cookie/", requests=2, warmup=1).statuses == {200: 3}
    assert cookie_seen == [False, True, True]
    assert hunt.hunt("/stream/", requests=2, warmup=1).statuses == {200: 3}


# The report.


def result(*growing: hunt.GrowingSite, requests: int = 10) -> hunt.HuntResult:
    return hunt.HuntResult("GET", "/x/", requests, 1, {200: 10, 302: 1}, 2048, growing)


def test_render_without_source_line_or_callers() -> None:
    site = Site("<string>", 1, "", 880, 10, ("urllib/parse.py:5",))
    text = hunt.render(result(hunt.GrowingSite(site, 440, 440, 88.0)))
    assert "(responses: 200 x10, 302 x1)" in text
    assert "2.0 KiB in all, 205 B per request" in text
    assert " 1. <string>:1  88 B per request (88 B then 88 B; 10 blocks kept)" in text
    assert "      from urllib/parse.py:5" in text


def test_render_shows_only_callers_of_the_site() -> None:
    frames = ("json/decoder.py:1", "app.py:3", "a.py:1", "b.py:2", "c.py:3", "d.py:4")
    site = Site("app.py", 3, "json.loads(x)", 5000, 10, frames)
    text = hunt.render(result(hunt.GrowingSite(site, 2500, 2500, 500.0)), callers=2)
    assert "json/decoder.py" not in text
    assert "from a.py:1\n      from b.py:2" in text
    assert "c.py:3" not in text


@pytest.mark.parametrize(
    ("size", "text"),
    [
        (0, "0 B"),
        (1023, "1,023 B"),
        (1024, "1.0 KiB"),
        (1536 * 1024, "1.5 MiB"),
        (2**40, "1,048,576.0 MiB"),
    ],
)
def test_format_size(size: int, text: str) -> None:
    assert hunt.format_size(size) == text


# Replayed requests are not traffic (issue 8).


def test_replayed_requests_are_not_recorded() -> None:
    from django.conf import settings

    from django_leakguard.recorder import get_recorder

    assert "django_leakguard.middleware.LeakGuardMiddleware" in settings.MIDDLEWARE
    recorder = get_recorder()
    recorder.discard()
    # Sampled tracing on too: it must neither record nor take tracemalloc from leakhunt.
    with override_settings(LEAKGUARD={"TRACE_SAMPLE_RATE": 1, "FLUSH_INTERVAL": 1e-9}):
        output = leakhunt("/leak/retain/", "--requests", "10", "--warmup", "2", "--force")
    assert f"shop/views.py:{line_of('_retained.append(')}" in output
    assert get_recorder() is recorder
    assert recorder.pending() == {}
    assert recorder.worker.calls == 0
