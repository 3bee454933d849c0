from __future__ import annotations

import gc
import gzip
import http.client
import io
import os
import signal
import socket
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path

import pytest
from django.test import override_settings

from django_leakguard import uwsgi_log
from django_leakguard.uwsgi_log import Group, LogParser, parse_logs, path_shape, pattern_key

FIXTURE = Path(__file__).parent / "fixtures" / "uwsgi-memory-report.log"
KIB = 1024

PATTERN_GROUPS = {
    "/leak/retain/": Group(4, 896 * KIB, 896 * KIB, 4, 384 * KIB),
    "/spike/": Group(2, -128 * KIB, 0, 0, 0),
    "/products/<int>/": Group(2, 136 * KIB, 136 * KIB, 2, 128 * KIB),
    "/leak/cache/<uuid>/": Group(1, 256 * KIB, 256 * KIB, 1, 256 * KIB),
    "/nowhere/<int>/": Group(1, 64 * KIB, 64 * KIB, 1, 64 * KIB),
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
    assert summary.groups == {"/leak/retain/": Group(1, 384 * KIB, 384 * KIB, 1, 384 * KIB)}
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


def test_counter_far_behind_is_a_respawn() -> None:
    summary = parse(line(1, 500, 9000), line(1, 300, 1000), line(1, 301, 1100))
    assert summary.respawns == 1
    assert summary.groups["/a/"] == Group(1, 100, 100, 1, 100)
    assert summary.workers == 2


def test_unknown_counter_and_other_app_never_look_like_a_respawn() -> None:
    summary = parse(line(1, 5, 1000), line(1, -1, 900), line(1, 1, 1000, app=1))
    assert summary.respawns == 0
    assert summary.groups["/a/"] == Group(2, 0, 100, 1, 100)


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
    assert uwsgi_log.urlconf_key("/products/5/") == "/products/<int:pk>/"
    assert uwsgi_log.urlconf_key("/") == "/"
    assert uwsgi_log.urlconf_key("/missing/") is None


def test_urlconf_ignores_digits() -> None:
    assert uwsgi_log.urlconf_ignores_digits()
    assert not uwsgi_log.urlconf_ignores_digits("tests.urls_digits")
    assert not uwsgi_log.urlconf_ignores_digits("tests.urls_regex")
    assert not uwsgi_log.urlconf_ignores_digits("tests.urls_converter")


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
    assert uwsgi_log.parse_log_date(b"Sat Nov  1 09:05:00 2025") is not None
    assert uwsgi_log.parse_log_date(b"yesterday") is None
    assert uwsgi_log.parse_log_date(b"\xff") is None


def test_most_at_once() -> None:
    assert uwsgi_log.most_at_once([]) == 0
    assert uwsgi_log.most_at_once([(1.0, 1.0)]) == 1
    assert uwsgi_log.most_at_once([(1.0, 5.0), (2.0, 3.0), (3.0, 6.0), (7.0, 8.0)]) == 3
    assert uwsgi_log.most_at_once([(1.0, 2.0), (3.0, 4.0)]) == 1


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
    uwsgi_log.FAST_LINE = uwsgi_log.re.compile(rb"\{rss usage: ()()()()()()")
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
