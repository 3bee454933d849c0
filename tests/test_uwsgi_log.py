from __future__ import annotations

import _thread
import atexit
import contextlib
import functools
import gc
import gzip
import http.client
import io
import os
import random
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import tracemalloc
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, BinaryIO

import pytest
from django.conf.urls.i18n import i18n_patterns
from django.test import override_settings
from django.urls import path, re_path
from shop import views

from django_leakguard.records import Counts
from django_leakguard.reporting import logs, model, uwsgi_lines, uwsgi_log, uwsgi_parallel
from django_leakguard.reporting.logs import parse_logs
from django_leakguard.reporting.uwsgi_lines import path_shape, pattern_key
from django_leakguard.reporting.uwsgi_log import LogParser

FIXTURE = Path(__file__).parent / "fixtures" / "uwsgi-memory-report.log"
KIB = 1024

PATTERN_GROUPS = {
    "/leak/retain/": Counts(4, 896 * KIB, 896 * KIB, 4, 384 * KIB),
    "/spike/": Counts(2, -128 * KIB, 0, 0, 0),
    "/products/<int>/": Counts(2, 136 * KIB, 136 * KIB, 2, 128 * KIB),
    "/leak/cache/<uuid>/": Counts(1, 256 * KIB, 256 * KIB, 1, 256 * KIB),
    "/nowhere/<int>/": Counts(1, 64 * KIB, 64 * KIB, 1, 64 * KIB),
}


def test_fixture_grouped_by_pattern() -> None:
    summary = parse_logs([str(FIXTURE)], "pattern")
    assert summary.groups == PATTERN_GROUPS
    assert (summary.lines, summary.request_lines, summary.skipped_lines) == (23, 13, 10)
    assert summary.respawns == 1
    assert summary.workers == 3
    assert summary.worker_calls == 10
    assert summary.worker_rss_growth == 925696 + 65536 + 262144
    assert summary.worker_rss_first_total == 12353536 + 11534336 + 12517376
    assert summary.workers_at_once == 2
    assert summary.files == [str(FIXTURE)]
    assert summary.last_date is not None
    assert summary.first_date is not None
    assert summary.last_date - summary.first_date == 3


def test_fixture_grouped_by_urlconf_automatically() -> None:
    summary = parse_logs([str(FIXTURE)])
    assert summary.group_by == "urlconf"
    assert summary.group_by_reason == "92% of the first 13 paths resolved against the URLconf"
    assert set(summary.groups) == {
        "/leak/retain/",
        "/spike/",
        "/products/<int:pk>/",
        "/leak/cache/<str:key>/",
        "<unmatched>",
    }
    assert summary.groups["/products/<int:pk>/"] == PATTERN_GROUPS["/products/<int>/"]


def test_auto_falls_back_to_pattern_when_the_urlconf_does_not_match() -> None:
    summary = parse_logs([str(FIXTURE)], key_for_urlconf=lambda path: None)
    assert summary.group_by == "pattern"
    assert summary.group_by_reason.startswith("0% of the first 13 paths")
    assert summary.groups == PATTERN_GROUPS


def test_auto_resolves_paths_that_differ_only_in_digits_once() -> None:
    resolved: list[str] = []

    def key(path: str) -> str | None:
        resolved.append(path)
        return "/products/<int:pk>/" if path.startswith("/products/") else None

    paths = ["/products/1/", "/products/22/", "/products/7/", "/api/v1/", "/api/v2/", "/a%31/"]
    parser = LogParser(key_for_urlconf=key, digits_that_matter=lambda: (b"api/v0/",))
    parser.feed_bytes(b"".join(line(1, n, 1000, path) for n, path in enumerate(paths, 1)))
    summary = parser.summary()
    assert summary.group_by_reason == "50% of the first 6 paths resolved against the URLconf"
    # /products/22/ has another length; a route's digits and %-escapes are resolved as they are.
    assert resolved[:5] == ["/products/1/", "/products/22/", "/api/v1/", "/api/v2/", "/a1/"]
    assert summary.groups["/products/<int:pk>/"].calls == 2


def test_paths_resolve_alike_only_where_digits_never_matter() -> None:
    paths = [b"/a/1/", b"/a/2/", b"/a/1/", b"/a/10/"]
    assert uwsgi_log.resolving_alike(paths, None) == {b"/a/1/": 2, b"/a/2/": 1, b"/a/10/": 1}
    assert uwsgi_log.resolving_alike(paths, ()) == {b"/a/1/": 3, b"/a/10/": 1}


def test_gzip_and_stdin_give_the_same_result(tmp_path: Path) -> None:
    gz = tmp_path / "log.gz"
    gz.write_bytes(gzip.compress(FIXTURE.read_bytes()))
    plain = parse_logs([str(FIXTURE)], "pattern")
    assert parse_logs([str(gz)], "pattern").groups == plain.groups
    stdin = io.BufferedReader(io.BytesIO(FIXTURE.read_bytes()))  # type: ignore[arg-type]
    assert parse_logs(["-"], "pattern", stdin=stdin).groups == plain.groups
    zipped = io.BufferedReader(io.BytesIO(gz.read_bytes()))  # type: ignore[arg-type]
    assert parse_logs(["-"], "pattern", stdin=zipped).groups == plain.groups


def test_chunk_boundaries_do_not_matter() -> None:
    whole = parse_logs([str(FIXTURE)], "pattern")
    for size in (1, 7, 100, 333):
        parser = LogParser("pattern")
        with FIXTURE.open("rb") as stream:
            parser.feed(stream, chunk_size=size)
        summary = parser.summary()
        assert summary.groups == whole.groups
        assert summary.lines == whole.lines


def test_last_line_without_newline_is_parsed() -> None:
    parser = LogParser("pattern")
    lines = FIXTURE.read_bytes().splitlines()[5:7]
    parser.feed_bytes(b"\n".join(lines))
    summary = parser.summary()
    assert summary.groups == {"/leak/retain/": Counts(1, 384 * KIB, 384 * KIB, 1, 384 * KIB)}
    assert summary.lines == 2


def line(pid: int, req: int, rss: int, path: str = "/a/", app: int = 0) -> bytes:
    return (
        f"{{address space usage: 1 bytes/0MB}} {{rss usage: {rss} bytes/0MB}} "
        f"[pid: {pid}|app: {app}|req: {req}/{abs(req)}] 10.0.0.1 (alice) {{20 vars in 200 bytes}} "
        f"[Sat Nov  1 09:05:00 2025] GET {path} => generated 1 bytes in 1 msecs "
        "(HTTP/1.1 200) 1 headers in 1 bytes (1 switches on core 0)\n"
    ).encode()


def parse(*lines: bytes, **kwargs: int) -> uwsgi_log.LogSummary:
    parser = LogParser("pattern", **kwargs)
    parser.feed_bytes(b"".join(lines))
    return parser.summary()


def test_threads_finishing_out_of_order_are_not_a_respawn() -> None:
    summary = parse(line(1, 100, 1000), line(1, 102, 1100), line(1, 101, 1300))
    assert summary.respawns == 0
    assert summary.groups["/a/"].calls == 2
    assert summary.groups["/a/"].rss_growth == 300


def test_threads_logging_the_same_counter_are_not_a_respawn() -> None:
    # Threads read the counter when they log: two lines often show the same one (issue 16.5).
    summary = parse(line(1, 3, 1000), line(1, 3, 1100), line(1, 4, 1300), line(1, 4, 1200))
    assert (summary.respawns, summary.workers) == (0, 1)
    assert summary.groups["/a/"] == Counts(3, 200, 300, 2, 200)


def test_a_thread_late_with_a_low_counter_is_not_a_respawn() -> None:
    # A thread preempted between reading the counter and writing its line, early in a worker's
    # life: the counter goes back a little, below RESPAWN_WINDOW (issue 16.5, seen in CI).
    summary = parse(line(1, 5, 1000), line(1, 8, 1100), line(1, 6, 1300), line(1, 9, 1200))
    assert (summary.respawns, summary.workers) == (0, 1)
    assert summary.groups["/a/"].calls == 3


@pytest.mark.parametrize(
    ("last", "first"),
    [(7, 1), (40, 2), (500, 300)],
    ids=["back-to-1", "far-back-low", "far-back"],
)
def test_a_counter_back_to_a_new_workers_is_a_respawn(last: int, first: int) -> None:
    summary = parse(line(1, last - 1, 1000), line(1, last, 1100), line(1, first, 900))
    assert (summary.respawns, summary.workers) == (1, 2)
    assert summary.groups["/a/"].calls == 1


def test_counter_far_behind_is_a_respawn() -> None:
    summary = parse(line(1, 500, 9000), line(1, 300, 1000), line(1, 301, 1100))
    assert summary.respawns == 1
    assert summary.groups["/a/"] == Counts(1, 100, 100, 1, 100)
    assert summary.workers == 2


def test_unknown_counter_and_other_app_never_look_like_a_respawn() -> None:
    summary = parse(line(1, 5, 1000), line(1, -1, 900), line(1, 1, 1000, app=1))
    assert summary.respawns == 0
    assert summary.groups["/a/"] == Counts(2, 0, 100, 1, 100)


def test_unlogged_path_and_absolute_uri() -> None:
    summary = parse(
        line(1, 1, 1000),
        line(1, 2, 1100, path="-"),
        line(1, 3, 1200, path="http://example.com/b/%7E1?x=1"),
        line(1, 4, 1300, path="/b/%2E1"),
        line(1, 5, 1400, path="/b/%7E2"),
    )
    assert set(summary.groups) == {"<path not logged>", "/b/~<int>", "/b/.<int>"}
    assert summary.groups["/b/~<int>"].calls == 2


def test_groups_are_capped_and_the_rest_folded() -> None:
    lines = [line(1, n, 1000 + n, path=f"/p{chr(97 + n)}/") for n in range(1, 10)]
    summary = parse(*lines, max_groups=3)
    assert len(summary.groups) == 4
    assert summary.groups["<other>"].calls == 8 - 3
    assert summary.folded_groups == 5
    # Folded keys are counted once each.
    again = parse(*lines, line(1, 10, 2000, path="/pi/"), line(2, 1, 0), max_groups=3)
    assert again.groups["<other>"].calls == 8 - 3 + 1
    assert again.folded_groups == 5


def test_folded_keys_are_counted_up_to_a_bound(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(uwsgi_log, "MAX_FOLDED_KEYS", 2)
    lines = [line(1, n, 1000 + n, path=f"/p{chr(97 + n)}/") for n in range(1, 10)]
    summary = parse(*lines, line(1, 10, 2000, path="/pf/"), max_groups=3)
    assert summary.groups["<other>"].calls == 6
    assert summary.folded_groups == 2


def test_live_workers_are_capped() -> None:
    lines = [line(pid, 1, 1000) for pid in range(1, 11)]
    summary = parse(*lines, max_live_workers=4)
    assert summary.workers == 10


def test_a_huge_line_is_dropped() -> None:
    parser = LogParser("pattern")
    parser.feed_bytes(b"x" * (uwsgi_log.MAX_LINE + 1))
    parser.feed_bytes(b"y\n" + line(1, 1, 10) + line(1, 2, 20))
    summary = parser.summary()
    assert summary.lines == 4
    assert summary.request_lines == 2


def test_empty_input() -> None:
    summary = LogParser().summary()
    assert summary.group_by == "pattern"
    assert summary.group_by_reason == "no paths to resolve against the URLconf"
    assert summary.groups == {}
    assert summary.workers_at_once == 0


def test_invalid_grouping() -> None:
    with pytest.raises(ValueError, match="group_by should be"):
        LogParser("path")


@pytest.mark.parametrize(
    ("path", "key"),
    [
        ("/products/12/", "/products/<int>/"),
        ("/u/3fa85f64-5717-4562-b3fc-2c963f66afa6/x", "/u/<uuid>/x"),
        ("/u/3fa85f6457174562b3fc2c963f66afa6", "/u/<uuid>"),
        ("/c/deadbeef12/", "/c/<hex>/"),
        ("/static/app.3fa2b1c0.js", "/static/app.<hex>.js"),
        ("/c/deadbeef/", "/c/deadbeef/"),
        ("/api/v2/item-12345", "/api/v<int>/item-<int>"),
        ("/", "/"),
    ],
)
def test_pattern_key(path: str, key: str) -> None:
    assert pattern_key(path) == key
    assert path_shape(path.encode()) == key.encode()


def test_urlconf_key_matches_the_middleware() -> None:
    assert uwsgi_lines.urlconf_key("/products/5/") == "/products/<int:pk>/"
    assert uwsgi_lines.urlconf_key("/") == "/"
    assert uwsgi_lines.urlconf_key("/missing/") is None


def test_urlconf_ignores_digits() -> None:
    assert uwsgi_lines.urlconf_ignores_digits()
    assert not uwsgi_lines.urlconf_ignores_digits("tests.urls_digits")
    assert not uwsgi_lines.urlconf_ignores_digits("tests.urls_regex")
    assert not uwsgi_lines.urlconf_ignores_digits("tests.urls_converter")


class I18nRoutes:
    urlpatterns = i18n_patterns(path("items/<int:pk>/", views.product))


class I18nRegex:
    urlpatterns = i18n_patterns(re_path(r"^items/(?P<pk>[0-9]+)/$", views.product))


def test_urlconf_ignores_digits_of_i18n_patterns_unless_a_language_has_some() -> None:
    with override_settings(LANGUAGES=[("en", "English"), ("fr", "French")]):
        assert uwsgi_lines.urlconf_ignores_digits(I18nRoutes)  # type: ignore[arg-type]
        assert not uwsgi_lines.urlconf_ignores_digits(I18nRegex)  # type: ignore[arg-type]
    with override_settings(LANGUAGES=[("en", "English"), ("es-419", "Latin American Spanish")]):
        assert not uwsgi_lines.urlconf_ignores_digits(I18nRoutes)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("regex", "ignores"),
    [
        (r"^static/(?P<path>.*)$", True),
        (r"^items/(?P<pk>\d+)/$", True),
        (r"^(?P<slug>[-\w]+)/$", True),
        (r"^year/(?P<year>[12]\d{3})/$", False),
        (r"^v[0-9]/$", False),
        (r"^\x35/$", False),
        (r"^\N{DIGIT FIVE}/$", False),
        (r"^(?P<a>\d)/(?P=a)/$", False),
    ],
)
def test_a_regex_ignores_digits_when_it_names_none(regex: str, ignores: bool) -> None:
    assert uwsgi_lines.regex_ignores_digits(regex) is ignores


class RegexRoutes:
    urlpatterns = [
        re_path(r"^static/(?P<path>.*)$", views.product),
        re_path(r"^items/(?P<pk>\d+)/$", views.product),
    ]


class DigitRegexRoutes:
    urlpatterns = [re_path(r"^items/(?P<pk>\d)/(?P=pk)/$", views.product)]


def test_regex_routes_that_name_no_digit_ignore_them() -> None:
    assert uwsgi_lines.urlconf_ignores_digits(RegexRoutes)  # type: ignore[arg-type]
    assert not uwsgi_lines.urlconf_ignores_digits(DigitRegexRoutes)  # type: ignore[arg-type]


@override_settings(ROOT_URLCONF=RegexRoutes)
def test_regex_routes_group_alike_with_digits_zeroed_or_not() -> None:
    lines = [
        line(1, n, 1000 + 37 * n, path)
        for n, path in enumerate(
            ["/static/app.1.js", "/items/12/", "/static/app.90.js", "/items/7/", "/nowhere/3/"]
            * 3,
            1,
        )
    ]
    zeroed = LogParser("urlconf")
    zeroed.feed_bytes(b"".join(lines))
    apart = LogParser("urlconf", digits_that_matter=lambda: None)
    apart.feed_bytes(b"".join(lines))
    assert zeroed._zero_digits
    assert not apart._zero_digits
    summary = zeroed.summary()
    assert summary == apart.summary()
    assert set(summary.groups) == {"/static/<path>", "/items/<pk>/", "<unmatched>"}


class AdminLikeRoutes:
    # The admin's jsi18n/ has digits in its own text; the other routes tell no digit apart.
    urlpatterns = [
        path("admin/jsi18n/", views.product),
        path("items/<int:pk>/", views.product),
        re_path(r"^static/(?P<path>.*)$", views.product),
    ]


def test_digits_that_matter_are_the_routes_texts_with_digits() -> None:
    assert uwsgi_lines.digits_that_matter() == ()
    assert uwsgi_lines.digits_that_matter(AdminLikeRoutes) == (b"admin/jsi00n/",)  # type: ignore[arg-type]
    assert uwsgi_lines.digits_that_matter("tests.urls_digits") == (b"api/v0/items/",)
    assert uwsgi_lines.digits_that_matter("tests.urls_regex") is None
    assert uwsgi_lines.digits_that_matter("tests.urls_converter") is None
    assert not uwsgi_lines.urlconf_ignores_digits(AdminLikeRoutes)  # type: ignore[arg-type]


@override_settings(ROOT_URLCONF=AdminLikeRoutes)
def test_paths_holding_a_routes_digits_are_resolved_as_they_are() -> None:
    paths = [
        "/admin/jsi18n/",
        "/admin/jsi99n/",
        "/admin/jsi%31%38n/",
        "/items/12/",
        "/items/7/?page=2",
        "/static/a.1.js",
        "/admin/jsi18n/?v=3",
        "/admin/jsi00n/",
    ]
    lines = b"".join(line(1, n, 1000 + 37 * n, path) for n, path in enumerate(paths * 3, 1))
    zeroed = LogParser("urlconf")
    zeroed.feed_bytes(lines)
    apart = LogParser("urlconf", digits_that_matter=lambda: None)
    apart.feed_bytes(lines)
    assert zeroed._zero_digits
    assert not apart._zero_digits
    summary = zeroed.summary()
    assert summary == apart.summary()
    assert summary.groups["/admin/jsi18n/"].calls == 8  # 9 lines, the first a baseline
    assert summary.groups["<unmatched>"].calls == 6
    assert summary.groups["/items/<int:pk>/"].calls == 6


@override_settings(ROOT_URLCONF="tests.urls_digits")
def test_digits_that_matter_are_resolved_one_by_one() -> None:
    parser = LogParser("urlconf")
    parser.feed_bytes(
        line(1, 1, 1000, "/api/v1/items/")
        + line(1, 2, 1100, "/api/v1/items/")
        + line(1, 3, 1300, "/api/v2/items/")
    )
    summary = parser.summary()
    assert summary.groups["/api/v1/items/"].rss_growth == 100
    assert summary.groups["/api/v2/items/"].rss_growth == 200


def test_unreadable_file() -> None:
    with pytest.raises(OSError, match="No such file"):
        parse_logs(["/nonexistent/uwsgi.log"])


def test_parse_log_date() -> None:
    assert uwsgi_lines.parse_log_date(b"Sat Nov  1 09:05:00 2025") is not None
    assert uwsgi_lines.parse_log_date(b"yesterday") is None
    assert uwsgi_lines.parse_log_date(b"\xff") is None


def test_most_at_once() -> None:
    assert model.most_at_once([]) == 0
    assert model.most_at_once([(1.0, 1.0)]) == 1
    assert model.most_at_once([(1.0, 5.0), (2.0, 3.0), (3.0, 6.0), (7.0, 8.0)]) == 3
    assert model.most_at_once([(1.0, 2.0), (3.0, 4.0)]) == 1


def synthetic_log(path: Path, lines: int) -> None:
    with path.open("wb") as out:
        for n in range(lines):
            out.write(line(1000 + n % 8, n // 8 + 1, 10_000 + n, f"/item/{n}/"))


def peak_memory(path: Path) -> int:
    tracemalloc.start()
    try:
        parse_logs([str(path)], "pattern")
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_memory_does_not_grow_with_the_log(tmp_path: Path) -> None:
    small, big = tmp_path / "small.log", tmp_path / "big.log"
    synthetic_log(small, 30_000)
    synthetic_log(big, 120_000)
    assert peak_memory(big) < peak_memory(small) * 1.5


# A real uWSGI -------------------------------------------------------------------------------

APP = """
retained = []

def application(environ, start_response):
    if environ["PATH_INFO"].startswith("/leak/retain/"):
        retained.append(bytearray(1024 * 1024))
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [b"ok"]
"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.mark.servers
def test_a_real_uwsgi_log_is_parsed(tmp_path: Path) -> None:
    uwsgi = Path(sys.executable).with_name("uwsgi")
    if not uwsgi.exists():  # pragma: no cover - the test extra installs uWSGI
        pytest.skip("uWSGI is not installed in this virtualenv")
    (tmp_path / "app.py").write_text(APP)
    log = tmp_path / "uwsgi.log"
    port = free_port()
    process = subprocess.Popen(
        [
            str(uwsgi),
            "--http-socket",
            f"127.0.0.1:{port}",
            "--wsgi-file",
            "app.py",
            "--master",
            "--processes",
            "1",
            "--memory-report",
            "--logto",
            str(log),
            "--die-on-term",
        ],
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 20
        requests = [("GET", "/health/")] + [
            (method, f"/leak/retain/?n={n}")
            for n, method in enumerate(["GET", "POST", "PUT", "DELETE", "PATCH"] * 4)
        ]
        requests += [("HEAD", f"/products/{n}/") for n in range(5)]
        sent = 0
        while sent < len(requests):
            method, path = requests[sent]
            try:
                connection = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
                connection.request(method, path)
                connection.getresponse().read()
                connection.close()
                sent += 1
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
        deadline = time.monotonic() + 10
        while log.read_bytes().count(b"{rss usage:") < len(requests):
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.05)
    finally:
        os.kill(process.pid, signal.SIGINT)
        try:
            process.wait(15)
        except subprocess.TimeoutExpired:  # pragma: no cover - only when uWSGI hangs
            os.kill(process.pid, signal.SIGKILL)
            process.wait(5)
    summary = parse_logs([str(log)])
    assert summary.request_lines == len(requests)
    assert summary.skipped_lines > 0  # uWSGI's start-up banner
    assert summary.group_by == "urlconf"
    retain = summary.groups["/leak/retain/"]
    assert retain.calls == 20
    # Each call keeps 1 MiB; allow for the allocator's slack.
    assert retain.rss_growth > 15 * 1024 * 1024
    assert summary.groups["/products/<int:pk>/"].calls == 5
    assert summary.workers == 1


def get_retrying(port: int, path: str, deadline: float) -> int:
    """GET path, retrying while the server starts or recycles; return the status."""
    while True:
        try:
            connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
            connection.request("GET", path)
            status = connection.getresponse().status
            connection.close()
            return status
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


THREADED_APP = """
import random, time

def application(environ, start_response):
    if environ["PATH_INFO"].startswith("/slow/"):
        time.sleep(random.random() / 10)
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [b"ok"]
"""


@pytest.mark.servers
def test_a_real_threaded_uwsgi_log_gives_the_workers_uwsgi_ran(tmp_path: Path) -> None:
    # Issue 16.5: threads read the request counter when they log, so two lines of a worker
    # often carry the same counter; each such line was taken for a respawn.
    uwsgi = Path(sys.executable).with_name("uwsgi")
    if not uwsgi.exists():  # pragma: no cover - the test extra installs uWSGI
        pytest.skip("uWSGI is not installed in this virtualenv")
    (tmp_path / "app.py").write_text(THREADED_APP)
    (tmp_path / "uwsgi.ini").write_text(
        "[uwsgi]\nwsgi-file = app.py\nmaster = true\nprocesses = 2\nthreads = 4\n"
        "memory-report = true\nmax-requests = 150\nmin-worker-lifetime = 0\n"
    )
    log = tmp_path / "uwsgi.log"
    port = free_port()
    process = subprocess.Popen(
        [
            str(uwsgi),
            "--ini",
            "uwsgi.ini",
            "--http-socket",
            f"127.0.0.1:{port}",
            "--logto",
            log,
            "--die-on-term",
        ],
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    paths = [f"/slow/{n}/" if n % 2 else f"/fast/{n}/" for n in range(800)]
    try:
        get = functools.partial(get_retrying, port, deadline=time.monotonic() + 30)
        with ThreadPoolExecutor(8) as pool:
            assert set(pool.map(get, paths)) == {200}
        deadline = time.monotonic() + 10
        while log.read_bytes().count(b"{rss usage:") < len(paths):
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.05)
    finally:
        process.terminate()
        try:
            process.wait(20)
        except subprocess.TimeoutExpired:  # pragma: no cover - a master stuck in a respawn
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(5)
    text = log.read_text()
    # What uWSGI did: the workers it spawned (a pid it gave a worker twice would be a respawn).
    spawned = re.findall(
        r"(?:spawned uWSGI worker \d+ \(pid|Respawned uWSGI worker \d+ \(new pid): (\d+)", text
    )
    assert len(spawned) >= 4, text  # max-requests recycled workers during the load
    counters = re.findall(r"\[pid: (\d+)\|app: 0\|req: (\d+)/", text)
    serving = {pid for pid, _ in counters}
    assert serving <= set(spawned)
    last: dict[str, str] = {}
    repeats = 0
    for pid, counter in counters:
        repeats += last.get(pid) == counter
        last[pid] = counter
    assert repeats > 0  # what misled the parser
    reused = len(spawned) - len(set(spawned))
    first_rss: dict[str, int] = {}
    for rss, pid in re.findall(r"\{rss usage: (\d+) bytes/\d+MB\} \[pid: (\d+)\|", text):
        first_rss.setdefault(pid, int(rss))
    summary = parse_logs([str(log)], "pattern")
    assert summary.request_lines == len(paths)
    assert (summary.workers, summary.respawns) == (len(serving) + reused, reused)
    assert summary.worker_calls == len(paths) - summary.workers
    assert summary.worker_rss_first_total == sum(first_rss.values())
    assert summary.groups["/slow/<int>/"].calls + summary.groups["/fast/<int>/"].calls == (
        len(paths) - summary.workers
    )
    parallel = parse_in_parallel([str(log)], group_by="pattern", jobs=2, range_size=4096)
    assert_same(parallel, summary)


def test_tiny_caches_give_the_same_groups(monkeypatch: pytest.MonkeyPatch) -> None:
    lines = [
        line(1, 1, 1000, "/a%20b/1/"),
        line(1, 2, 1100, "/a%20b/1/"),
        line(1, 3, 1300, "/files/0123abcd99/"),
        line(1, 4, 1200, "/files/feed4567aa/"),
        line(1, 5, 1700, "/a%20b/2/"),
        line(1, 6, 1800, "/items/7/?page=2"),
        line(2, 1, 5000, "/items/8/"),
    ]
    escaped = line(1, 7, 1900, "/a%20b/3/")
    expected = parse(*lines, *lines[1:6], escaped).groups
    monkeypatch.setattr(uwsgi_log, "PATH_CACHE_SIZE", 1)
    parser = LogParser("pattern")
    parser.feed_bytes(b"".join(lines))
    # Every URI is cached by now (or the tiny caches were cleared): the second chunk too.
    parser.feed_bytes(b"".join(lines[1:6]))
    parser.feed_bytes(escaped)  # a chunk whose only miss has %-escapes
    assert parser.summary().groups == expected
    assert set(expected) == {"/a b/<int>/", "/files/<hex>/", "/items/<int>/"}


# The fast path (FAST_LINE) and the full regular expression must agree ---------------------

ODD_LINES = [
    # Shapes the fast path reads.
    line(1, 1, 1000),
    line(1, 2, 1100, "/a/?x=1"),
    # Whitespace other than spaces in the client, method or URI: REQUEST_LINE's \S differs.
    line(1, 3, 1300).replace(b"10.0.0.1", b"10.0.0.1\t"),
    line(1, 4, 1400, "/a/\x0bb/"),
    line(1, 5, 1500).replace(b"GET", b"G\x0cET"),
    # A user name with spaces and brackets, a date with a carriage return.
    line(1, 6, 1700).replace(b"(alice)", b"(al ice [x] {y})"),
    line(1, 7, 1800).replace(b"Sat Nov", b"Sat\rNov"),
    # Shapes only REQUEST_LINE reads: negative counters, memory-report = 2.
    line(2, 1, 5000, app=-1),
    line(2, -1, 5100),
    line(2, 3, 5300).replace(
        b"} [pid", b"} {uss usage: 1 bytes/0MB} {pss usage: 2 bytes/0MB} [pid"
    ),
    # Not request lines at all, or broken ones.
    line(1, 8, 1900).replace(b" bytes/0MB} [pid", b" bytes/xMB} [pid"),
    b"{rss usage: 12 bytes/0MB} and nothing else\n",
    b"spawned uWSGI worker 1 (pid: 1, cores: 1)\n",
]


def reference(*lines: bytes) -> uwsgi_log.LogSummary:
    """Parse with REQUEST_LINE alone (a FAST_LINE that never reads a line)."""
    original = uwsgi_log.FAST_LINE
    uwsgi_log.FAST_LINE = re.compile(rb"\{rss usage: ()()()()()()")
    try:
        return parse(*lines)
    finally:
        uwsgi_log.FAST_LINE = original


@pytest.mark.parametrize("odd", ODD_LINES)
def test_fast_path_agrees_with_the_regular_expression(odd: bytes) -> None:
    lines = [line(1, 100, 900, "/b/"), odd, line(1, 101, 950, "/c/1/"), line(3, 1, 10)]
    fast, slow = parse(*lines), reference(*lines)
    assert fast == slow
    assert slow.lines == 4


def test_pieces_of_a_chunk_give_its_result(monkeypatch: pytest.MonkeyPatch) -> None:
    lines = [line(1, 1, 1000), *ODD_LINES, line(1, 50, 2000, "/b/" + "x" * 400), line(3, 2, 30)]
    lines += [line(1, 51 + n, 2000 + n * 4096, f"/c/{n}/") for n in range(20)]
    whole = parse(*lines)
    monkeypatch.setattr(uwsgi_log, "PIECE_SIZE", 300)  # about a line; one is longer
    assert parse(*lines) == whole
    assert parse(*lines) == reference(*lines)


def test_fast_path_reads_plain_lines() -> None:
    lines = [line(1, 1, 1000), line(1, 2, 1100, "/a/?x=1"), ODD_LINES[5]]
    parser = LogParser("pattern")
    assert len(uwsgi_log.FAST_LINE.findall(b"".join(lines))[0]) == 6
    parser.feed_bytes(b"".join(lines))
    assert parser.summary() == reference(*lines)


def test_fallback_is_taken_for_the_whole_chunk(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    findall = uwsgi_log.REQUEST_LINE.findall

    class Spy:
        def findall(self, data: bytes, start: int, end: int) -> list[tuple[bytes, ...]]:
            calls.append(end - start)
            return findall(data, start, end)

    monkeypatch.setattr(uwsgi_log, "REQUEST_LINE", Spy())
    parse(line(1, 1, 1000), line(1, 2, 1100))
    assert calls == []
    summary = parse(line(1, 1, 1000), line(1, 2, 1100, "/a\t/"), line(1, 3, 1200))
    assert len(calls) == 1
    assert summary.groups["/a/"].calls == 1


def test_parse_logs_leaves_a_disabled_collector_disabled() -> None:
    gc.disable()
    try:
        parse_logs([str(FIXTURE)], "pattern")
        assert not gc.isenabled()
    finally:
        gc.enable()
    parse_logs([str(FIXTURE)], "pattern")
    assert gc.isenabled()


def test_intervals_and_dates_are_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(uwsgi_log, "MAX_INTERVALS", 2)
    monkeypatch.setattr(uwsgi_log, "PATH_CACHE_SIZE", 1)
    lines = [
        line(pid, 1, 1000).replace(b"09:05:00", f"09:05:0{pid}".encode()) for pid in range(1, 6)
    ]
    undated = line(9, 1, 1000).replace(b"Sat Nov  1 09:05:00 2025", b"yesterday")
    summary = parse(*lines, undated)
    assert summary.workers == 6
    # The oldest intervals were dropped: only the last workers are counted at once.
    assert summary.workers_at_once == 1
    assert summary.first_date is not None
    assert summary.last_date is not None
    assert summary.last_date - summary.first_date == 4


# Parallel parsing (--jobs) must give the serial result --------------------------------------

CLIENTS = [b"10.0.0.1", b"::1", b"2001:db8::8a2e:370:7334", b""]
PATHS = [
    "/products/{n}/",
    "/leak/retain/",
    "/leak/cache/3fa85f64-5717-4562-b3fc-{n:012d}/",
    "/search/?q=hats&page={n}",
    "/static/app.{n:08x}.js",
    "/p{n}/",
    "-",
    "http://example.com/products/{n}/",
    "/a%20b/{n}/",
    "/",
]


def mixed_line(rng: random.Random, pids: dict[int, list[int]], n: int) -> bytes:
    """Return a request line (now and then an odd one) of one of the workers in pids."""
    pid = rng.choice(list(pids))
    state = pids[pid]
    roll = rng.random()
    if roll < 0.01:
        state[:] = [10_000_000, 0]  # a respawn that reuses the pid
    state[0] += rng.choice((0, 0, 4096, -4096, 65536))
    state[1] += 1
    req = state[1]
    if roll > 0.95:
        req = max(1, req - 3)  # threads finishing out of order
    path = rng.choice(PATHS).format(n=rng.randrange(10 if roll < 0.5 else 1000))
    text = line(pid, req, state[0], path).replace(b"10.0.0.1", rng.choice(CLIENTS))
    text = text.replace(b"09:05:00", f"09:{n // 600 % 60:02d}:{n // 10 % 60:02d}".encode())
    if roll > 0.99:
        text = text.replace(
            b"/0MB} [pid", b"/0MB} {uss usage: 1 bytes/0MB} {pss usage: 2 bytes/0MB} [pid"
        )
    elif roll > 0.98:
        text = text.replace(b"(alice)", b"(al\tice)")  # read by the full regular expression
    elif roll > 0.975:
        text = text.replace(b"app: 0", b"app: -1")
    return text


def mixed_log(path: Path, lines: int, *, seed: int = 1, pids: int = 40) -> None:
    """Write a log of many workers, respawns, odd and broken lines; the last one unterminated."""
    rng = random.Random(seed)
    workers = {1000 + n: [10_000_000, 0] for n in range(pids)}
    junk = [
        b"spawned uWSGI worker 3 (pid: 1003, cores: 1)\n",
        b"{rss usage: 12 bytes/0MB} and nothing else\n",
        b"\n",
    ]
    with path.open("wb") as out:
        for n in range(lines):
            if rng.random() < 0.03:
                out.write(rng.choice(junk))
            else:
                out.write(mixed_line(rng, workers, n))
        out.write(mixed_line(rng, workers, lines).rstrip(b"\n"))


def parse_in_parallel(names: list[str], **kwargs: Any) -> uwsgi_log.LogSummary:
    kwargs.setdefault("jobs", 3)
    kwargs.setdefault("parallel_min_size", 0)
    return parse_logs(names, **kwargs)


@pytest.fixture
def merges(monkeypatch: pytest.MonkeyPatch) -> list[bool]:
    """What each merge of a range parsed by a worker process returned."""
    results: list[bool] = []
    merge = uwsgi_parallel.merge

    def spy(parser: LogParser, result: uwsgi_parallel.RangeResult) -> bool:
        results.append(merge(parser, result))
        return results[-1]

    monkeypatch.setattr(uwsgi_parallel, "merge", spy)
    return results


def assert_same(parallel: uwsgi_log.LogSummary, serial: uwsgi_log.LogSummary) -> None:
    assert parallel == serial
    # Groups are created in the same order (it decides which are folded into <other>).
    assert list(parallel.groups) == list(serial.groups)


@pytest.fixture(scope="module")
def mixed_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    log = tmp_path_factory.mktemp("logs") / "mixed.log"
    mixed_log(log, 3000)
    return log


@pytest.fixture
def mixed(mixed_file: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A mixed log of 700 kB, read in chunks of 16 KiB (the parent parses the first one)."""
    monkeypatch.setattr(uwsgi_log, "CHUNK_SIZE", 1 << 14)
    return mixed_file


@pytest.mark.parametrize(
    "limits",
    [
        {"group_by": "pattern"},
        {"group_by": "urlconf"},
        {},  # auto
        {"group_by": "pattern", "max_groups": 6},
        {"group_by": "urlconf", "max_groups": 3},
    ],
)
@pytest.mark.parametrize(("jobs", "range_size"), [(2, 40_000), (3, 4_099), (4, 1_000)])
def test_parallel_gives_the_serial_result(
    mixed: Path, merges: list[bool], limits: dict[str, Any], jobs: int, range_size: int
) -> None:
    serial = parse_logs([str(mixed)], **limits)
    assert serial.respawns > 5
    assert serial.skipped_lines > 50
    parallel = parse_in_parallel([str(mixed)], jobs=jobs, range_size=range_size, **limits)
    assert_same(parallel, serial)
    assert len(merges) >= 4
    assert all(merges)
    if "max_groups" in limits:
        assert serial.folded_groups > 0


def test_parallel_retires_the_oldest_workers_as_serial_does(
    mixed: Path, merges: list[bool]
) -> None:
    # Ranges that bring the live workers over the cap are parsed by the parent itself.
    serial = parse_logs([str(mixed)], "pattern", max_live_workers=8)
    parallel = parse_in_parallel(
        [str(mixed)], group_by="pattern", max_live_workers=8, range_size=3000
    )
    assert_same(parallel, serial)
    assert False in merges
    assert True in merges


def test_parallel_with_tiny_caches(
    mixed: Path, merges: list[bool], monkeypatch: pytest.MonkeyPatch
) -> None:
    # A worker keeps its caches and groups from range to range, and drops them when full.
    serial = parse_logs([str(mixed)], "pattern")
    monkeypatch.setattr(uwsgi_log, "PATH_CACHE_SIZE", 2)
    parallel = parse_in_parallel([str(mixed)], group_by="pattern", jobs=2, range_size=5000)
    assert_same(parallel, serial)
    assert len(merges) > 20


def test_parallel_fixture(merges: list[bool], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(uwsgi_log, "CHUNK_SIZE", 100)
    for group_by in ("auto", "pattern"):
        serial = parse_logs([str(FIXTURE)], group_by)
        assert_same(parse_in_parallel([str(FIXTURE)], group_by=group_by, range_size=1), serial)
    assert len(merges) > 10


def test_parallel_over_several_files(tmp_path: Path, mixed: Path) -> None:
    gz = tmp_path / "log.gz"
    gz.write_bytes(gzip.compress(FIXTURE.read_bytes()))
    small = tmp_path / "small.log"
    mixed_log(small, 100, seed=2)
    names = [str(gz), str(small), str(mixed), str(FIXTURE), str(mixed)]
    serial = parse_logs(names)
    parallel = parse_in_parallel(names, parallel_min_size=50_000, range_size=20_000)
    assert_same(parallel, serial)
    assert parallel.files == names


def test_parallel_reads_long_lines_as_serial_does(tmp_path: Path, merges: list[bool]) -> None:
    # Lines longer than MAX_LINE across CHUNK_SIZE boundaries are dropped where feed()'s reads
    # end; the first straddles the end of the lines the parent parses (its first chunk), and
    # each ends in a request line (read from the part after the boundary).
    rng = random.Random(3)
    workers = {1000 + n: [10_000_000, 0] for n in range(6)}
    log = tmp_path / "long.log"
    with log.open("wb") as out:
        n = 0
        for boundary in (1, 2, 3):
            while out.tell() < boundary * uwsgi_log.CHUNK_SIZE - 100_000:
                out.write(mixed_line(rng, workers, n))
                n += 1
            out.write(b"x" * 200_000 + mixed_line(rng, workers, n))
    serial = parse_logs([str(log)], "pattern")
    parallel = parse_in_parallel([str(log)], group_by="pattern", range_size=50_000)
    assert_same(parallel, serial)
    assert all(merges)


@pytest.mark.parametrize(
    "head",
    [
        b"not a request line\n" * 150_000,  # the first request line is in the third chunk
        b"x" * (uwsgi_log.CHUNK_SIZE + 10),  # an unterminated first line: all one chunk
    ],
)
def test_parallel_with_a_late_first_request_line(tmp_path: Path, head: bytes) -> None:
    log = tmp_path / "late.log"
    log.write_bytes(head + b"\n" + b"".join(line(1, n, 1000 * n) for n in range(1, 400)))
    serial = parse_logs([str(log)])
    assert_same(parse_in_parallel([str(log)], range_size=2000), serial)


@pytest.mark.parametrize(
    "content",
    [
        b"",
        b"no request line\n" * 10,
        b"no request line\n" * 10 + line(1, 1, 1000) + line(1, 2, 1500).rstrip(b"\n"),
        line(1, 1, 1000) + line(1, 2, 1100),
    ],
)
def test_parallel_on_short_files(tmp_path: Path, content: bytes) -> None:
    log = tmp_path / "short.log"
    log.write_bytes(content)
    assert_same(parse_in_parallel([str(log)], range_size=10), parse_logs([str(log)]))


def test_parallel_memory_does_not_grow_with_the_log(
    tmp_path: Path, merges: list[bool], monkeypatch: pytest.MonkeyPatch
) -> None:
    # The parent's: results wait in a bounded queue (each worker's is bounded by its range).
    def peak(path: Path) -> int:
        tracemalloc.start()
        try:
            parse_in_parallel([str(path)], group_by="pattern", range_size=50_000)
            return tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()

    monkeypatch.setattr(uwsgi_log, "CHUNK_SIZE", 1 << 16)
    small, big = tmp_path / "small.log", tmp_path / "big.log"
    synthetic_log(small, 20_000)
    synthetic_log(big, 80_000)
    assert peak(big) < peak(small) * 1.5
    assert len(merges) > 100


def test_a_file_replaced_while_it_is_read(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    log, other = tmp_path / "uwsgi.log", tmp_path / "other.log"
    synthetic_log(log, 2000)
    synthetic_log(other, 2000)
    open_log = logs.open_log

    @contextlib.contextmanager
    def rotating(name: str, stdin: Any = None) -> Iterator[BinaryIO]:
        with open_log(name, stdin) as stream:
            os.replace(other, log)  # log rotation: the name is another file now
            yield stream

    monkeypatch.setattr(logs, "open_log", rotating)
    monkeypatch.setattr(uwsgi_log, "CHUNK_SIZE", 1 << 14)
    with pytest.raises(OSError, match="was replaced while it was being read"):
        parse_in_parallel([str(log)], range_size=10_000)


def test_a_worker_checks_it_reads_the_parent_s_file(monkeypatch: pytest.MonkeyPatch) -> None:
    # What the worker did in the test above, here (a terminated worker saves no coverage).
    settings = uwsgi_parallel.RangeSettings("pattern", zero_digits=True, key_for_urlconf=len)
    monkeypatch.setattr(uwsgi_parallel, "_parser", uwsgi_parallel.RangeParser(settings))
    status = FIXTURE.stat()
    result = uwsgi_parallel._parse_range(str(FIXTURE), (status.st_dev, status.st_ino), 0, None)
    assert (result.lines, result.request_lines) == (23, 13)
    with pytest.raises(OSError, match="was replaced"):
        uwsgi_parallel._parse_range(str(FIXTURE), (status.st_dev, status.st_ino + 1), 0, None)


def test_workers_skip_exit_hooks(tmp_path: Path) -> None:
    ran = tmp_path / "ran"

    def hook() -> None:  # pragma: no cover - must not run in the workers
        ran.touch()

    atexit.register(hook)
    try:
        parse_in_parallel([str(FIXTURE)], range_size=100)
    finally:
        atexit.unregister(hook)
    assert not ran.exists()


def test_no_workers_beside_other_threads(monkeypatch: pytest.MonkeyPatch) -> None:
    split = []
    monkeypatch.setattr(uwsgi_parallel, "feed_split", lambda *args: split.append(args))
    stop = threading.Event()
    thread = threading.Thread(target=stop.wait)
    thread.start()
    try:
        assert not uwsgi_parallel.can_fork()
        parse_in_parallel([str(FIXTURE)])
    finally:
        stop.set()
        thread.join()
    assert split == []
    assert uwsgi_parallel.can_fork()


def test_no_workers_beside_threads_python_did_not_start() -> None:
    lock = _thread.allocate_lock()
    lock.acquire()
    started = _thread.allocate_lock()
    started.acquire()

    def run() -> None:
        started.release()
        lock.acquire()

    _thread.start_new_thread(run, ())
    started.acquire()
    try:
        assert threading.active_count() == 1
        assert not uwsgi_parallel.can_fork()
    finally:
        lock.release()
    assert uwsgi_parallel.can_fork()


def test_parallel_runs_one_after_another(
    merges: list[bool], monkeypatch: pytest.MonkeyPatch
) -> None:
    # The threads of one run's pool are gone, or about to go, when the next run looks.
    monkeypatch.setattr(uwsgi_log, "CHUNK_SIZE", 100)
    for _ in range(5):
        count = len(merges)
        parse_in_parallel([str(FIXTURE)], range_size=100)
        assert len(merges) > count


def test_default_jobs() -> None:
    assert uwsgi_parallel.default_jobs() == min(
        len(os.sched_getaffinity(0)), uwsgi_parallel.MAX_JOBS
    )


# Input robustness (issue 14, item 8) ---------------------------------------------------------


def test_a_number_too_long_for_int_is_a_skipped_line() -> None:
    huge = "9" * 5000
    corrupt = line(1, 2, 1100).replace(b"1100 bytes", f"{huge} bytes".encode())
    counter = line(1, 3, 1200).replace(b"req: 3/3", f"req: {huge}/3".encode())
    summary = parse(line(1, 1, 1000), corrupt, counter, line(1, 4, 1300))
    assert (summary.lines, summary.request_lines, summary.skipped_lines) == (4, 2, 2)
    assert summary.groups["/a/"].rss_growth == 300


@contextlib.contextmanager
def pipe_of(data: bytes) -> Iterator[str]:
    """Yield a /dev/fd/N name that reads data from a pipe, as `<(zcat ...)` gives."""
    read_fd, write_fd = os.pipe()

    def feed() -> None:
        with os.fdopen(write_fd, "wb") as writer:
            writer.write(data)

    writer = threading.Thread(target=feed)
    writer.start()
    try:
        yield f"/dev/fd/{read_fd}"
    finally:
        writer.join()
        os.close(read_fd)


@pytest.mark.parametrize("compress", [False, True])
def test_a_pipe_is_read_serially(compress: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(uwsgi_parallel, "can_fork", lambda: True)
    data = FIXTURE.read_bytes()
    with pipe_of(gzip.compress(data) if compress else data) as name:
        summary = parse_logs([name], "pattern", jobs=4, parallel_min_size=1)
    assert summary.groups == PATTERN_GROUPS
    assert summary.files == [name]


@override_settings(ROOT_URLCONF=AdminLikeRoutes)
def test_parallel_resolves_paths_holding_a_routes_digits_as_serial_does(
    tmp_path: Path, merges: list[bool], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(uwsgi_log, "CHUNK_SIZE", 1000)
    paths = ["/admin/jsi18n/", "/admin/jsi99n/", "/items/12/", "/items/7/", "/static/a.1.js"]
    log = tmp_path / "admin.log"
    log.write_bytes(
        b"".join(line(1 + n % 3, n, 1000 + 37 * n, paths[n % len(paths)]) for n in range(1, 600))
    )
    serial = parse_logs([str(log)], "urlconf")
    assert_same(parse_in_parallel([str(log)], group_by="urlconf", range_size=2000), serial)
    assert serial.groups["/admin/jsi18n/"].calls > 100
    assert len(merges) > 4
