from __future__ import annotations

import gc
import json
import os
import random
import sys
import threading
import tracemalloc
import weakref
from collections.abc import Iterator
from pathlib import Path

import pytest
from django.core.handlers.wsgi import WSGIHandler
from django.http import HttpRequest, HttpResponse
from django.test import Client, RequestFactory
from django.urls import path
from shop import views

from django_leakguard import memory, tracing, tracing_baseline, tracing_sites
from django_leakguard.tracing import Site, TraceResult, TraceTotals

VIEWS_SOURCE = Path(views.__file__).read_text().splitlines()


def line_of(text: str) -> int:
    """Return the line number in shop/views.py of the first line containing text."""
    return next(number for number, line in enumerate(VIEWS_SOURCE, 1) if text in line)


@pytest.fixture(autouse=True)
def _no_trace_left() -> Iterator[None]:
    assert not tracemalloc.is_tracing()
    yield
    left = tracemalloc.is_tracing()
    tracing._stop_after_fork()  # cleans up after a failed test
    if tracemalloc.is_tracing():
        tracemalloc.stop()
    assert not left, "a test left tracemalloc running"


@pytest.fixture
def client() -> Iterator[Client]:
    client = Client()
    yield client
    views._retained.clear()
    views._small.clear()


def site(location: str, size: int, count: int = 1, line: str = "x = 1", **kw: object) -> Site:
    filename, lineno = location.rsplit(":", 1)
    frames = kw.get("frames", (location,))
    assert isinstance(frames, tuple)
    return Site(filename, int(lineno), line, size, count, frames)


# Tracing one call.


def test_retain_view_traced_within_ten_percent_and_blamed_on_its_line(client: Client) -> None:
    for _ in range(3):  # first calls fill caches (URL resolving, lazy imports)
        client.get("/leak/retain/")
    # The leak is 64 KiB plus, now and then, the list's own pointer array when it grows (it
    # holds every block earlier tests kept): that growth is retained too. So is the test
    # client's own: each request connects Django's close_old_connections again, and each
    # connection leaves a weakref.finalize in a registry that grows now and then (75 KiB once).
    list_before = sys.getsizeof(views._retained)
    registry_before = sys.getsizeof(weakref.finalize._registry)  # type: ignore[attr-defined]
    trace = tracing.start_trace()
    assert trace is not None
    assert tracemalloc.is_tracing()
    response = client.get("/leak/retain/")
    assert response.status_code == 200
    del response
    result = trace.stop(top_n=5)
    assert not tracemalloc.is_tracing()
    leak = views.RETAIN_BYTES + sys.getsizeof(views._retained) - list_before
    leak += sys.getsizeof(weakref.finalize._registry) - registry_before  # type: ignore[attr-defined]

    assert result is not None
    assert abs(result.retained - leak) <= 0.10 * views.RETAIN_BYTES, result
    top = result.sites[0]
    assert top.filename == "shop/views.py"
    assert top.lineno == line_of("_retained.append(os.urandom(RETAIN_BYTES))")
    assert top.line == "_retained.append(os.urandom(RETAIN_BYTES))"
    assert top.location == f"shop/views.py:{top.lineno}"
    assert top.size >= views.RETAIN_BYTES
    assert top.frames[0] == top.location
    assert any(frame.startswith("django/core/handlers/") for frame in top.frames)
    assert len(result.sites) <= 5
    assert result.blocks >= top.count


@pytest.mark.skipif(not memory.heap_available(), reason="the heap signal needs glibc mallinfo2")
def test_many_small_objects_caught_by_tracing_but_mostly_missed_by_the_heap(
    client: Client,
) -> None:
    calls = 20
    for _ in range(3):
        client.get("/leak/small/")
    gc.collect()
    heap_before = memory.heap()
    for _ in range(calls):
        client.get("/leak/small/")
    gc.collect()
    heap_after = memory.heap()
    assert heap_before is not None
    assert heap_after is not None
    heap_per_call = (heap_after - heap_before) / calls

    trace = tracing.start_trace()
    assert trace is not None
    client.get("/leak/small/")
    result = trace.stop(top_n=3)
    assert result is not None

    # The dicts live in pymalloc's arenas, which mallinfo2 does not count; the heap sees
    # little more than the list holding them.
    print(f"traced retained per call {result.retained} B, heap growth per call {heap_per_call} B")
    dicts_at_least = views.SMALL_OBJECTS * 100
    assert result.retained >= dicts_at_least
    assert heap_per_call < result.retained / 4, (heap_per_call, result.retained)
    top = result.sites[0]
    assert top.location == f"shop/views.py:{line_of('_small.append(')}"
    assert top.count >= views.SMALL_OBJECTS


def test_garbage_cycles_are_not_retained() -> None:
    trace = tracing.start_trace()
    assert trace is not None
    for _ in range(50):
        cycle: list[object] = [bytes(1000)]
        cycle.append(cycle)
    del cycle
    result = trace.stop(top_n=3)
    assert result is not None
    assert result.retained < 10_000


class _JoinRecorder(threading.Thread):
    """A thread named as executors name theirs, whose joins are recorded."""

    joined: list[str] = []
    release = threading.Event()  # set by the first join: the thread ends once waited for

    def join(self, timeout: float | None = None) -> None:
        self.joined.append(self.name)
        self.release.set()
        super().join(timeout)


def test_the_end_waits_for_threads_the_call_started_not_the_applications() -> None:
    stop_app = threading.Event()
    # An executor thread of the application's, busy for the whole call: its end is not waited
    # for (it used to cost every traced call THREAD_WAIT).
    app = _JoinRecorder(target=stop_app.wait, name="ThreadPoolExecutor-90_0")
    app.start()
    _JoinRecorder.joined = []
    try:
        trace = tracing.start_trace()
        assert trace is not None
        # One the call started (asgiref's, for an async view), winding down at the call's end.
        _JoinRecorder.release = threading.Event()
        started = _JoinRecorder(target=_JoinRecorder.release.wait, name="ThreadPoolExecutor-91_0")
        started.start()
        assert trace.stop(top_n=3) is not None
        assert _JoinRecorder.joined == ["ThreadPoolExecutor-91_0"]
        assert not started.is_alive()
        # A call that started no thread waits for none.
        _JoinRecorder.joined = []
        trace = tracing.start_trace()
        assert trace is not None
        assert trace.stop(top_n=3) is not None
        assert _JoinRecorder.joined == []
    finally:
        stop_app.set()
        app.join()


def test_top_n_bounds_the_sites_but_not_the_total() -> None:
    trace = tracing.start_trace()
    assert trace is not None
    first = [bytes(3000)]
    second = [bytes(2000)]
    third = [bytes(1000)]
    result = trace.stop(top_n=2)
    assert result is not None
    assert [s.size >= 2000 for s in result.sites] == [True, True]
    assert len(result.sites) == 2
    assert result.sites[0].size > result.sites[1].size
    assert result.retained >= 6000
    assert [first, second, third]


def test_library_allocation_is_blamed_on_the_callers_line() -> None:
    payload = json.dumps(["x" * 50 + str(i) for i in range(200)])
    trace = tracing.start_trace()
    assert trace is not None
    kept = json.loads(payload)  # the strings are allocated in json's decoder
    result = trace.stop(top_n=1)
    assert result is not None
    top = result.sites[0]
    assert top.filename.endswith("test_tracing.py")
    assert top.line == "kept = json.loads(payload)  # the strings are allocated in json's decoder"
    assert any("json/" in frame for frame in top.frames)
    assert len(kept) == 200


def test_without_a_user_frame_the_innermost_frame_is_blamed() -> None:
    payload = json.dumps(["y" * 50 + str(i) for i in range(200)])
    trace = tracing.start_trace(frames=1)
    assert trace is not None
    kept = json.loads(payload)
    result = trace.stop(top_n=1)
    assert result is not None
    assert result.sites[0].filename.startswith("json/")
    assert len(kept) == 200


def test_own_allocations_are_left_out() -> None:
    many = [site(f"app.py:{i}", i) for i in range(300)]
    trace = tracing.start_trace()
    assert trace is not None
    merged = tracing.merge_sites(many, many, top_n=300)  # allocated by django_leakguard
    lines = [tracing_sites.source_line(__file__, n) for n in range(1, 50)]  # linecache, for us
    result = trace.stop(top_n=5)
    assert result is not None
    assert result.retained < 2000, result
    assert not any(s.filename.startswith(("django_leakguard/", "linecache")) for s in result.sites)
    assert len(merged) == 300
    assert lines


# Ending a trace.


def test_discard_stops_tracing_without_a_result() -> None:
    trace = tracing.start_trace()
    assert trace is not None
    kept = bytes(10_000)
    trace.discard()
    assert not tracemalloc.is_tracing()
    assert trace.stop(top_n=5) is None
    again = tracing.start_trace()
    assert again is not None
    again.discard()
    assert kept


def test_stop_twice_gives_none_the_second_time() -> None:
    trace = tracing.start_trace()
    assert trace is not None
    assert trace.stop(top_n=5) is not None
    assert trace.stop(top_n=5) is None
    trace.discard()  # harmless too


def test_a_users_own_tracemalloc_is_left_alone() -> None:
    tracemalloc.start()
    try:
        assert tracing.start_trace() is None
        assert tracemalloc.is_tracing()
    finally:
        tracemalloc.stop()


def test_only_one_trace_at_a_time() -> None:
    trace = tracing.start_trace()
    assert trace is not None
    assert tracing.start_trace() is None
    trace.discard()


def test_only_one_of_concurrent_starts_gets_the_trace() -> None:
    barrier = threading.Barrier(4)
    traces: list[tracing.Trace | None] = []

    def start() -> None:
        barrier.wait()
        traces.append(tracing.start_trace())

    threads = [threading.Thread(target=start) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    started = [trace for trace in traces if trace is not None]
    assert len(started) == 1
    started[0].discard()


def test_a_trace_whose_tracemalloc_was_stopped_by_someone_else_is_lost() -> None:
    trace = tracing.start_trace()
    assert trace is not None
    tracemalloc.stop()
    assert trace.stop(top_n=5) is None
    again = tracing.start_trace()
    assert again is not None
    again.discard()


def test_a_child_forked_during_a_trace_stops_tracing() -> None:
    # Called directly: it is what os.register_at_fork runs in the child.
    trace = tracing.start_trace()
    assert trace is not None
    tracing._stop_after_fork()
    assert not tracemalloc.is_tracing()
    assert trace.stop(top_n=5) is None
    tracing._stop_after_fork()  # nothing to do
    assert not tracemalloc.is_tracing()


def test_after_fork_with_tracemalloc_already_stopped() -> None:
    trace = tracing.start_trace()
    assert trace is not None
    tracemalloc.stop()
    tracing._stop_after_fork()
    assert trace.stop(top_n=5) is None


# Sampling.


def test_rate_zero_never_samples_and_never_draws(monkeypatch: pytest.MonkeyPatch) -> None:
    def fail() -> float:
        raise AssertionError("random.random() called at rate 0")

    monkeypatch.setattr(random, "random", fail)
    assert not any(tracing.should_sample(0) for _ in range(100))
    assert not tracing.should_sample(0.0)


def test_rate_one_always_samples() -> None:
    assert all(tracing.should_sample(1) for _ in range(100))


def test_rate_is_the_share_of_calls_sampled() -> None:
    random.seed(8)
    sampled = sum(tracing.should_sample(0.1) for _ in range(10_000))
    assert 800 < sampled < 1200


# Choosing the site.


def traceback(*frames: tuple[str, int]) -> tracemalloc.Traceback:
    """Return a traceback from frames given innermost first, as _tracemalloc gives them."""
    return tracemalloc.Traceback(frames)


OWN = tracing_sites._OWN_DIR
LIBRARY = tracing_sites._LIBRARY_DIRS[0]


@pytest.mark.parametrize(
    ("frames", "expected"),
    [
        pytest.param(
            [(LIBRARY + "json/decoder.py", 1), ("/app/views.py", 2)],
            ("/app/views.py", 2),
            id="library-called-by-user",
        ),
        pytest.param(
            [(LIBRARY + "a.py", 1), (LIBRARY + "b.py", 2)], (LIBRARY + "a.py", 1), id="library"
        ),
        pytest.param([(OWN + "recorder.py", 1), ("/app/views.py", 2)], None, id="ours"),
        pytest.param(
            [(LIBRARY + "django/db.py", 1), (OWN + "recorder.py", 2), ("/app/views.py", 3)],
            None,
            id="library-called-by-us",
        ),
        pytest.param(
            [(LIBRARY + "django/h.py", 1), (OWN + "middleware.py", 2), ("/srv/wsgi.py", 3)],
            (LIBRARY + "django/h.py", 1),
            id="boundary",
        ),
        pytest.param(
            [("/app/views.py", 5), (OWN + "replay.py", 2)], ("/app/views.py", 5), id="user-first"
        ),
        pytest.param([("<frozen x>", 1), ("<string>", 1)], ("<frozen x>", 1), id="frozen"),
        pytest.param(
            [(LIBRARY + "fnmatch.py", 1), (tracemalloc.__file__, 2), (OWN + "replay.py", 3)],
            None,
            id="snapshot",
        ),
    ],
)
def test_site_frame(frames: list[tuple[str, int]], expected: tuple[str, int] | None) -> None:
    frame = tracing_sites.site_frame(traceback(*frames))
    assert (frame and (frame.filename, frame.lineno)) == expected


def test_is_user_file() -> None:
    assert tracing_sites.is_user_file(__file__)
    assert not tracing_sites.is_user_file(json.__file__)
    assert not tracing_sites.is_user_file(tracing.__file__)
    assert not tracing_sites.is_user_file("<frozen importlib._bootstrap>")


def test_short_filename_uses_the_longest_sys_path_entry(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("sys.path", ["/srv", "/srv/project", ""])
    assert tracing_sites.short_filename("/srv/project/shop/views.py") == "shop/views.py"
    assert tracing_sites.short_filename("/srv/lib.py") == "lib.py"
    assert tracing_sites.short_filename("/elsewhere/x.py") == "/elsewhere/x.py"


def test_site_names_are_memoised_but_follow_sys_path(monkeypatch: pytest.MonkeyPatch) -> None:
    frames = (("/srv/project/shop/views.py", 3), ("/srv/lib.py", 9))
    monkeypatch.setattr("sys.path", ["/srv"])
    assert tracing_sites.site_names(frames[0][0], frames) == (
        "project/shop/views.py",
        ("project/shop/views.py:3", "lib.py:9"),
    )
    monkeypatch.setattr("sys.path", ["/srv", "/srv/project"])
    assert tracing_sites.site_names(frames[0][0], frames) == (
        "shop/views.py",
        ("shop/views.py:3", "lib.py:9"),
    )


def test_source_line() -> None:
    assert tracing_sites.source_line(views.__file__, 1).startswith('"""')
    assert tracing_sites.source_line("/no/such/file.py", 3) == ""
    long_line = tracing_sites.source_line(__file__, 1)
    assert len(long_line) <= tracing_sites.MAX_LINE_LENGTH


# Accumulating.


def test_merge_sites_adds_up_the_same_line_and_keeps_the_largest() -> None:
    a = site("app.py:1", 100, 2, line="a()", frames=("app.py:1", "x.py:1"))
    b = site("app.py:1", 300, 1, line="a()", frames=("app.py:1", "y.py:2"))
    c = site("app.py:2", 250)
    d = site("app.py:3", 50)
    merged = tracing.merge_sites([a, c], [b, d], top_n=2)
    assert merged == (
        Site("app.py", 1, "a()", 400, 3, ("app.py:1", "y.py:2")),
        Site("app.py", 2, "x = 1", 250, 1, ("app.py:2",)),
    )
    assert tracing.merge_sites([a], [b], top_n=0) == ()


def test_merge_sites_keeps_a_known_line() -> None:
    small = site("app.py:1", 10, line="known()")
    large = site("app.py:1", 20, line="")
    assert tracing.merge_sites([small], [large], top_n=1)[0].line == "known()"
    assert tracing.merge_sites([large], [small], top_n=1)[0].line == "known()"


def test_merge_sites_orders_ties_by_location() -> None:
    merged = tracing.merge_sites([site("b.py:1", 5), site("a.py:2", 5)], [site("a.py:1", 5)], 3)
    assert [s.location for s in merged] == ["a.py:1", "a.py:2", "b.py:1"]


def test_trace_totals_stay_bounded() -> None:
    totals = TraceTotals()
    assert totals.retained_per_call is None
    for n in range(50):
        sites = tuple(site(f"app.py:{n * 10 + i}", 1000 - n * 10 - i) for i in range(10))
        totals.add(TraceResult(retained=1000, blocks=10, sites=sites), top_n=5)
    assert totals.calls == 50
    assert totals.retained == 50_000
    assert totals.retained_per_call == 1000
    assert [s.location for s in totals.sites] == [f"app.py:{i}" for i in range(5)]

    other = TraceTotals(calls=2, retained=10, sites=(site("app.py:0", 5000),))
    totals.merge(other, top_n=3)
    assert (totals.calls, totals.retained) == (52, 50_010)
    assert totals.sites[0] == site("app.py:0", 6000, count=2)
    assert len(totals.sites) == 3


def test_site_round_trips_through_a_dict() -> None:
    original = Site("shop/views.py", 38, "x = 1", 65569, 1, ("shop/views.py:38", "b.py:2"))
    data = original.as_dict()
    assert json.loads(json.dumps(data)) == data
    assert Site.from_dict(data) == original
    assert Site.from_dict({"filename": "a.py", "lineno": 1, "size": 2, "count": 3}) == Site(
        "a.py", 1, "", 2, 3, ()
    )


@pytest.mark.parametrize(
    "data",
    [
        {"filename": "a.py", "lineno": 1, "size": 2},
        {"filename": "a.py", "lineno": True, "size": 2, "count": 1},
        {"filename": 5, "lineno": 1, "size": 2, "count": 1},
        {"filename": "a.py", "lineno": 1, "size": 2, "count": 1, "frames": "a.py:1"},
        {"filename": "a.py", "lineno": 1, "size": 2, "count": 1, "frames": [1]},
        ["not", "a", "mapping"],
        None,
    ],
)
def test_site_from_bad_data_raises_value_error(data: object) -> None:
    with pytest.raises(ValueError, match="not an allocation site"):
        Site.from_dict(data)  # type: ignore[arg-type]


# What every call holds at its end anyway (issue 13).

PAGE_BYTES = 32 * 1024
_orders: list[str] = []
_pairs: list[tuple[int, int]] = []


def big_page_small_leak(request: HttpRequest) -> HttpResponse:
    _orders.append(f"order-{len(_orders):06}" * 8)  # about 150 bytes kept per call
    return HttpResponse(os.urandom(PAGE_BYTES))  # a page the server still holds at close


def small_tuples(request: HttpRequest) -> HttpResponse:
    start = len(_pairs)
    _pairs.extend((start + i, i) for i in range(50))
    return HttpResponse("imported")


def transient_tuples(request: HttpRequest) -> HttpResponse:
    rows = [(i, -i) for i in range(20_000)]  # freed into the tuple free list at the end
    return HttpResponse(f"{len(rows)} rows")


class Vendor:
    pass


def type_cache_lookup(request: HttpRequest, n: int) -> HttpResponse:
    # A missed class attribute lookup leaves its (new) name in CPython's type cache.
    found = getattr(Vendor, "as_vendor_" + str(n), None)
    return HttpResponse(f"{found}")


def plain(request: HttpRequest, n: int) -> HttpResponse:
    return HttpResponse(f"<p>{n}</p>")


def headers_and_cookies(request: HttpRequest, n: int) -> HttpResponse:
    response = HttpResponse(f"<p>{n}</p>")  # a content type made per response
    response.headers["X-Request-Number"] = f"request number {n:08}"
    response.set_cookie("seen", f"cookie value {n:08}" * 4)
    return response


urlpatterns = [
    path("page/", big_page_small_leak),
    path("tuples/", small_tuples),
    path("transient/", transient_tuples),
    path("vendor/<int:n>/", type_cache_lookup),
    path("plain/<int:n>/", plain),
    path("headers/<int:n>/", headers_and_cookies),
]


def module_line(text: str) -> int:
    source = Path(__file__).read_text().splitlines()
    return next(number for number, line in enumerate(source, 1) if text in line)


@pytest.fixture
def leaks_cleared() -> Iterator[None]:
    yield
    _orders.clear()
    _pairs.clear()


def traced_get(client: Client, path_: str, held: bool = True) -> TraceResult:
    trace = tracing.start_trace()
    assert trace is not None
    response = client.get(path_)
    assert response.status_code == 200
    result = trace.stop(20, held=(response,) if held else ())
    assert result is not None
    return result


@pytest.mark.urls(__name__)
@pytest.mark.usefixtures("leaks_cleared")
def test_the_response_the_server_still_holds_is_not_retained(client: Client) -> None:
    for _ in range(3):
        client.get("/page/")
    leak_line = f"tests/test_tracing.py:{module_line('_orders.append(')}"
    page_line = f"tests/test_tracing.py:{module_line('return HttpResponse(os.urandom(')}"
    # The test client, like a server closing it, still holds the response: its page counts
    # unless the response is named as held.
    unheld = traced_get(client, "/page/", held=False)
    sizes = {s.location: s.size for s in unheld.sites}
    assert sizes[page_line] >= PAGE_BYTES
    held = traced_get(client, "/page/")
    sizes = {s.location: s.size for s in held.sites}
    assert sizes.get(page_line, 0) < 1024, held.sites
    assert sizes[leak_line] >= 150


def served(path_: str, held: bool = True) -> TraceResult:
    """Serve path_ as a WSGI server does (not the test client, which keeps the cookies) and
    trace the call, ended while the server still holds the response."""
    handler = WSGIHandler()
    trace = tracing.start_trace()
    assert trace is not None
    try:
        response = handler(RequestFactory().get(path_).environ, lambda *args: None)
        b"".join(response)
        response.close()  # request_finished: Django closes the database connections
    except BaseException:
        trace.discard()
        raise
    result = trace.stop(20, held=(response,) if held else ())
    assert result is not None
    return result


@pytest.mark.urls(__name__)
@pytest.mark.django_db
def test_what_the_response_owns_is_not_retained() -> None:
    # Its headers object, their values (a content type made per response), its cookies and
    # closers were made under the view's line that made the response, and live as long as
    # the response the server still holds. (Parts made on other lines are counted there.)
    served("/headers/1/")
    line = f"tests/test_tracing.py:{module_line('response = HttpResponse(f')}"
    kept = {s.location: s.size for s in served("/headers/2/").sites}
    assert kept.get(line, 0) < 64, kept
    unheld = {s.location: s.size for s in served("/headers/3/", held=False).sites}
    assert unheld[line] >= 200  # what held takes off


@pytest.mark.urls(__name__)
def test_small_objects_freed_into_free_lists_are_not_retained(client: Client) -> None:
    client.get("/transient/")
    result = traced_get(client, "/transient/")
    # 20,000 tuples were freed; CPython keeps up to 2,000 of them for reuse (112 KiB).
    line = f"tests/test_tracing.py:{module_line('rows = [(i, -i)')}"
    assert all(s.size < 1024 for s in result.sites if s.location == line), [
        (s.size, s.count) for s in result.sites if s.location == line
    ]
    # (Not the total: a global registry that grows during the call, such as weakref.finalize's
    # on Python 3.12, is a one-time resize kept by whichever call makes it.)
    here = sum(s.size for s in result.sites if s.filename == "tests/test_tracing.py")
    assert here < 16 * 1024, result.sites[:3]


@pytest.mark.urls(__name__)
def test_names_kept_by_the_type_cache_are_not_retained(client: Client) -> None:
    client.get("/vendor/1/")
    result = traced_get(client, "/vendor/2/")
    line = f"tests/test_tracing.py:{module_line('found = getattr(Vendor')}"
    assert line not in {s.location for s in result.sites}


def test_baseline_needs_two_keys_and_takes_what_every_call_keeps() -> None:
    baseline = tracing_baseline.Baseline(calls=4)
    common, only_a = ("django/x.py", 1), ("lib/y.py", 2)
    assert baseline.take("a", {common: 100, only_a: 50}) == {}
    assert baseline.take("a", {common: 120, only_a: 50}) == {}  # one key so far
    baseline.take("b", {common: 90})
    # Every recent call kept at least 90 B at common; only_a is missing from b's call.
    assert baseline.take("a", {common: 200, only_a: 50}) == {common: 90}
    for _ in range(4):  # older calls leave the window
        baseline.take("c", {common: 300})
    assert baseline.take("a", {common: 500}) == {}  # one key in the window again
    baseline.take("d", {common: 400})
    assert baseline.take("a", {common: 500}) == {common: 300}


def test_take_baseline_takes_from_the_largest_cell_first() -> None:
    place = ("django/http/response.py", 93)
    cells = {
        ("app/views.py", 1): {place: [300, 3]},
        ("app/views.py", 2): {place: [100, 1], ("app/views.py", 2): [50, 1]},
    }
    tracing_baseline.take_baseline(cells, {place: 350})
    assert cells[("app/views.py", 1)][place] == [0, 0]
    assert cells[("app/views.py", 2)][place] == [50, 1]
    assert cells[("app/views.py", 2)][("app/views.py", 2)] == [50, 1]


@pytest.mark.urls(__name__)
@pytest.mark.usefixtures("leaks_cleared")
def test_sampled_calls_name_a_small_leak_beside_a_large_page_and_plain_views() -> None:
    from django.test import override_settings

    from django_leakguard.recorder_process import get_recorder

    recorder = get_recorder()
    recorder.discard()
    client = Client()
    try:
        with override_settings(LEAKGUARD={"FLUSH_INTERVAL": 3600, "TRACE_SAMPLE_RATE": 1}):
            for n in range(12):
                client.get("/page/")
                client.get(f"/plain/{n}/")
                client.get("/tuples/")
        totals = recorder.totals()
    finally:
        recorder.discard()
    page, plain_view = totals["request", "/page/"], totals["request", "/plain/<int:n>/"]
    assert page.traced_calls == plain_view.traced_calls == 11  # the first is warm-up
    assert (
        page.traced_sites[0].location == f"tests/test_tracing.py:{module_line('_orders.append(')}"
    )
    per_call = page.traced_retained / page.traced_calls
    assert per_call < 1024, per_call  # about 150 B kept, not the 32 KiB page
    # What a request keeps until the next one (its URL match) is a few hundred bytes.
    assert plain_view.traced_retained / plain_view.traced_calls < 1024


def test_what_only_the_response_refers_to_is_its_own() -> None:
    shared = "".join(["x"] * 500)  # a cached value several responses refer to
    response = HttpResponse(b"body")
    response.headers["X-Own"] = "".join(["own value ", "1" * 300])  # made for this response
    response.headers["X-Shared"] = shared
    size, count = tracing_baseline._owned(response, set())
    own = sys.getsizeof(response.headers["X-Own"])
    assert size >= own + sys.getsizeof(b"body")
    shared_too = tracing_baseline._owned(response, set())
    assert shared_too == (size, count)  # the walk keeps nothing
    # The shared value is not counted: it outlives the response.
    assert size < own + sys.getsizeof(shared) + 4096
    del shared
    size_alone, _ = tracing_baseline._owned(response, set())
    assert size_alone == size + sys.getsizeof("x" * 500)  # now only the response holds it
