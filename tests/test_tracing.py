from __future__ import annotations

import gc
import json
import random
import sys
import threading
import tracemalloc
from collections.abc import Iterator
from pathlib import Path

import pytest
from django.test import Client
from shop import views

from django_leakguard import memory, tracing
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
    # holds every block earlier tests kept): that growth is retained too.
    list_before = sys.getsizeof(views._retained)
    trace = tracing.start_trace()
    assert trace is not None
    assert tracemalloc.is_tracing()
    response = client.get("/leak/retain/")
    assert response.status_code == 200
    del response
    result = trace.stop(top_n=5)
    assert not tracemalloc.is_tracing()
    leak = views.RETAIN_BYTES + sys.getsizeof(views._retained) - list_before

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
    lines = [tracing.source_line(__file__, n) for n in range(1, 50)]  # linecache, for us
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


OWN = tracing._OWN_DIR
LIBRARY = tracing._LIBRARY_DIRS[0]


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
    frame = tracing.site_frame(traceback(*frames))
    assert (frame and (frame.filename, frame.lineno)) == expected


def test_is_user_file() -> None:
    assert tracing.is_user_file(__file__)
    assert not tracing.is_user_file(json.__file__)
    assert not tracing.is_user_file(tracing.__file__)
    assert not tracing.is_user_file("<frozen importlib._bootstrap>")


def test_short_filename_uses_the_longest_sys_path_entry(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("sys.path", ["/srv", "/srv/project", ""])
    assert tracing.short_filename("/srv/project/shop/views.py") == "shop/views.py"
    assert tracing.short_filename("/srv/lib.py") == "lib.py"
    assert tracing.short_filename("/elsewhere/x.py") == "/elsewhere/x.py"


def test_source_line() -> None:
    assert tracing.source_line(views.__file__, 1).startswith('"""')
    assert tracing.source_line("/no/such/file.py", 3) == ""
    long_line = tracing.source_line(__file__, 1)
    assert len(long_line) <= tracing.MAX_LINE_LENGTH


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
