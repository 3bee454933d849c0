"""Heap signals per key: enough readings, small objects seen, bounded growth told from leaks."""

from __future__ import annotations

import gc
import time
from collections.abc import Iterator
from typing import Any

import pytest
from django.test import Client

from django_leakguard import dropped, memory, recorder, recorder_heap
from django_leakguard.recorder import EarlyReading, Recorder
from django_leakguard.recorder_process import get_recorder
from django_leakguard.records import REQUEST, TASK
from django_leakguard.reporting.model import BLOCK_BYTES, Row, Workers
from django_leakguard.reporting.ranking import build_report

pytestmark = pytest.mark.django_db
_small: list[str] = []
_cache: dict[int, bytes] = {}


@pytest.fixture
def rec(monkeypatch: pytest.MonkeyPatch, settings: Any) -> Iterator[Recorder]:
    if not memory.heap_available():  # pragma: no cover - CI has glibc >= 2.33
        pytest.skip("glibc mallinfo2 is not available here")
    # Readings cost more than the budget: past its quota a key reads the heap on no call.
    monkeypatch.setattr(recorder_heap, "HEAP_PROBE_BUDGET", 0.0)
    # Workers recycled after 100 requests: a process's calls are late from its 51st on.
    settings.LEAKGUARD = {**getattr(settings, "LEAKGUARD", {}), "MAX_REQUESTS": 100}
    instance = get_recorder()
    instance.discard()
    yield instance
    instance.discard()


def call(rec: Recorder, key: str, work: object = None) -> None:
    c = rec.begin(read_heap=False)
    rec.measure_heap(c, REQUEST, key)
    if callable(work):
        work()
    rec.end(c, REQUEST, key)


def _report_rows(totals: dict[tuple[str, str], Any]) -> dict[str, Row]:
    """The report's rows of the recorder's totals (one process, one hour), by key."""
    return {
        key: Row(REQUEST, key, **{name: getattr(a, name) for name in a.__dataclass_fields__})
        for (_, key), a in totals.items()
    }


def test_every_call_reads_until_the_key_has_enough_readings(rec: Recorder) -> None:
    for _ in range(200):
        call(rec, "/hot/")
    for _ in range(10):
        call(rec, "/rare/")
    totals = rec.totals()
    # The first call is warm-up; then MIN_READINGS early and MIN_READINGS late readings.
    assert totals[REQUEST, "/hot/"].heap_calls == 2 * recorder.MIN_READINGS
    assert totals[REQUEST, "/hot/"].late_calls == recorder.MIN_READINGS
    assert totals[REQUEST, "/rare/"].heap_calls == 9  # a rare key reads at every call


def test_calls_that_never_run_alone_stop_reading(
    rec: Recorder, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Another call stays in flight throughout (a long request in another thread): no reading
    # counts, and the key's readings stop at MAX_ATTEMPTS per band, then the budgeted share.
    reads = []
    time_heap = rec._time_heap

    def counted(spent: float = 0.0, collect: int = 0) -> tuple[int, int] | None:
        reads.append(1)
        return time_heap(spent, collect)

    monkeypatch.setattr(rec, "_time_heap", counted)
    holder = rec.begin(read_heap=False)
    for _ in range(300):
        call(rec, "/busy/")
    rec.end(holder, REQUEST, "/holder/")
    busy = rec.totals()[REQUEST, "/busy/"]
    assert (busy.calls, busy.heap_calls) == (300, 0)
    # Another call was in flight at each one's start: none read (its reading could not count).
    assert reads == []
    # Each begins alone and another call comes and goes before it ends (gthread under load).
    for _ in range(300):
        c = rec.begin(read_heap=False)
        rec.measure_heap(c, REQUEST, "/overlapped/")
        call(rec, "/other/")
        rec.end(c, REQUEST, "/overlapped/")
    overlapped = rec.totals()[REQUEST, "/overlapped/"]
    assert (overlapped.calls, overlapped.heap_calls) == (300, 0)
    # All late (the process has served more than half its 100 requests): MAX_ATTEMPTS tries
    # in the band, each a reading at the call's heap reading and one at its end (the calls
    # of /other/ began with /overlapped/ in flight: they read nothing).
    assert len(reads) == 2 * recorder.MAX_ATTEMPTS


def test_the_middleware_reads_per_key_once_the_url_is_resolved(
    rec: Recorder, settings: Any
) -> None:
    settings.LEAKGUARD = {**settings.LEAKGUARD, "MAX_REQUESTS": 1000}  # all 80 calls early
    client = Client()
    for _ in range(40):
        client.get("/products/1/")
        client.get("/health/")
    totals = rec.totals()
    # 39 calls past the warm-up, all early: the key's quota of early readings.
    assert totals[REQUEST, "/products/<int:pk>/"].heap_calls == recorder.MIN_READINGS
    assert totals[REQUEST, "/health/"].heap_calls == recorder.MIN_READINGS


def test_a_reading_before_the_request_counts_for_the_key_the_call_had(rec: Recorder) -> None:
    # The middleware guesses the key from the path's last call (before the URL is resolved):
    # the reading counts for the key the call turns out to have.
    call(rec, "/a/")  # warm-up calls
    call(rec, "/b/")
    enabled = gc.isenabled()
    gc.disable()  # a full collection between the two readings would not count the call
    try:
        reading = rec.read_heap_early(REQUEST, "/a/")
        assert reading is not None
        c = rec.begin_rss(reading)
        assert c.heap_share is not None
        assert c.collect == 1
        rec.measure_heap(c, REQUEST, "/b/")
        rec.end(c, REQUEST, "/b/")
    finally:
        if enabled:
            gc.enable()
    assert rec.totals()[REQUEST, "/b/"].heap_calls == 1
    readings = rec._readings_in(int(time.time()) // 3600)
    assert readings[REQUEST, "/b/"] == [1, 0, 1, 0]  # early band: one reading, one try
    assert (REQUEST, "/a/") not in readings


def test_an_early_reading_is_dropped_when_another_call_came_between(rec: Recorder) -> None:
    call(rec, "/a/")
    reading = rec.read_heap_early(REQUEST, "/a/")
    assert reading is not None
    call(rec, "/other/")  # began and ended after the reading: it is not this call's alone
    c = rec.begin_rss(reading)
    assert c.heap_share is None
    assert c.collect == 0
    rec.measure_heap(c, REQUEST, "/a/")  # read once the URL is resolved instead
    assert c.heap_share is not None
    assert c.collect == 0
    rec.end(c, REQUEST, "/a/")
    assert rec.totals()[REQUEST, "/a/"].heap_calls == 1


def test_no_early_reading_for_a_warm_up_call_or_beside_another_call(rec: Recorder) -> None:
    assert rec.read_heap_early(REQUEST, "/new/") is None  # a key's first call reads nothing
    call(rec, "/a/")
    holder = rec.begin(read_heap=False)
    assert rec.read_heap_early(REQUEST, "/a/") is None  # it would not run alone
    rec.end(holder, REQUEST, "/holder/")
    for _ in range(recorder.LATE_AFTER + recorder.MIN_READINGS):
        call(rec, "/a/")
    assert rec.read_heap_early(REQUEST, "/a/") is None  # enough readings (no budget here)
    rec.discard()  # a fork or a discard() makes a reading taken before it stale
    assert rec.begin_rss(reading_before_discard(rec)).heap_share is None


def reading_before_discard(rec: Recorder) -> EarlyReading:
    call(rec, "/c/")
    reading = rec.read_heap_early(REQUEST, "/c/")
    assert reading is not None
    rec.discard()
    return reading


def test_a_call_decided_before_its_request_is_not_decided_again(
    rec: Recorder, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Once a path's pattern is known, the decision to read is made at request_started: a
    # call it decided against reads nothing at process_view either (one draw of the budget).
    client = Client()
    for _ in range(40):
        client.get("/health/")
    totals = rec.totals()[REQUEST, "/health/"]
    assert totals.heap_calls == recorder.MIN_READINGS  # the early band's quota, as before
    decided_at_view: list[str] = []
    measure_heap = rec.measure_heap

    def counted(call: object, kind: str, key: str) -> None:
        decided_at_view.append(key)
        measure_heap(call, kind, key)  # type: ignore[arg-type]

    monkeypatch.setattr(rec, "measure_heap", counted)
    for _ in range(5):
        client.get("/health/")
    assert decided_at_view == []
    assert rec.totals()[REQUEST, "/health/"].heap_calls == recorder.MIN_READINGS


def test_small_objects_are_seen_as_blocks(rec: Recorder) -> None:
    def keep_small() -> None:
        # Short strings: new pymalloc blocks every time (tuples and floats may come from
        # CPython's free lists, whose blocks are counted as allocated already).
        _small.extend(f"item-{i}-{len(_small)}" for i in range(100))

    for _ in range(20):
        call(rec, "/small/", keep_small)
        call(rec, "/plain/")
    small = rec.totals()[REQUEST, "/small/"]
    plain = rec.totals()[REQUEST, "/plain/"]
    # 100 strings a call (and the list's growth, in the C heap once large): about 100 blocks.
    assert 90 * 19 <= small.blocks_growth <= 160 * 19
    assert abs(plain.blocks_growth) <= 5 * 19
    _small.clear()


def test_young_cyclic_garbage_is_not_kept(rec: Recorder) -> None:
    def cycles() -> None:
        for _ in range(200):
            node: list[object] = []
            node.append(node)

    gc.collect()
    for _ in range(20):
        call(rec, "/cycles/", cycles)
    # Kept, the cycles would be 200 blocks a reading (3,800); noise is a few blocks a reading.
    assert abs(rec.totals()[REQUEST, "/cycles/"].blocks_growth) <= 10 * 19


# Nodes of 200 types, as a query's expressions are: each type has its own slots in CPython's
# type attribute cache.
_NODES = [type(f"Node{i}", (), {"vendor": "sqlite"})() for i in range(200)]


def test_names_only_the_type_cache_refers_to_are_not_kept(rec: Recorder) -> None:
    def compile_nodes() -> None:
        for node in _NODES:
            # A name made at run time, as Django's SQL compiler looks up for every node it
            # compiles: the type cache refers to it until a later lookup takes its slot.
            getattr(node, "as_" + node.vendor, None)

    for _ in range(20):
        call(rec, "/compile/", compile_nodes)
    # Kept by the cache, the names would be 40 to 150 blocks a reading (over 1,000 in all).
    assert abs(rec.totals()[REQUEST, "/compile/"].blocks_growth) <= 5 * 19


_PAGE = (
    "{% for row in rows %}<li>{{ row.name }} "
    "{% for tag in row.tags %}{{ tag }}{% endfor %}{% endfor %}"
)


def test_a_rendered_template_response_s_context_is_not_kept(rec: Recorder) -> None:
    from django.template import engines
    from django.template.response import TemplateResponse
    from django.test import RequestFactory

    template = engines["django"].from_string(_PAGE)

    def page(key: str, count: int) -> None:
        # Read before the request exists, as the middleware does once it knows the path.
        c = rec.begin_rss(rec.read_heap_early(REQUEST, key))
        rec.measure_heap(c, REQUEST, key)
        request = RequestFactory().get(key)
        rows = [{"name": f"row {i}", "tags": [f"t{i}", f"u{i}"]} for i in range(count)]
        response = TemplateResponse(request, template, {"rows": rows})
        response.render()
        del rows
        # The server still holds the response, and with it the context, at its close; the
        # template's rendering context (a reference cycle) refers to the rows as well.
        rec.end(c, REQUEST, key, held=(response,))

    gc.collect()
    for _ in range(20):
        page("/page/", 300)
        page("/empty/", 0)
    totals = rec.totals()
    per_reading = {
        key: totals[REQUEST, key].blocks_growth / totals[REQUEST, key].heap_calls
        for key in ("/page/", "/empty/")
    }
    # Counted as kept, the page's 300 rows (1,512 objects) made 1,900 blocks a reading more
    # than the empty page; now about 400 (what rendering them left in CPython's free lists).
    assert abs(per_reading["/page/"] - per_reading["/empty/"]) < 800, per_reading


class _View:
    request: object
    response: object
    rows: list[dict[str, object]]


class _ApiRequest:
    parser_context: dict[str, object]


def _api_response(count: int) -> object:
    """A response as Django REST framework returns it: its view, request and renderer
    context refer to each other and to the response (reference cycles)."""
    from django.http import JsonResponse

    view, request = _View(), _ApiRequest()
    view.request = request
    view.rows = [{"name": f"row {i}", "tags": [f"t{i}", f"u{i}"]} for i in range(count)]
    request.parser_context = {"view": view, "request": request}
    response = JsonResponse({"count": count})
    response.renderer_context = {"view": view, "request": request}  # type: ignore[attr-defined]
    view.response = response
    return response


def _api_call(rec: Recorder, key: str, count: int, registry: object = None) -> None:
    """One call of a REST framework view returning count rows (see _api_response); its view
    also refers to registry, when given."""
    c = rec.begin_rss(rec.read_heap_early(REQUEST, key))
    rec.measure_heap(c, REQUEST, key)
    response = _api_response(count)
    if registry is not None:
        response.renderer_context["view"].registry = registry  # type: ignore[attr-defined]
    # The server holds the response at its close, and drops it right after: the view's
    # rows are freed then, by the collector (the view is in a reference cycle).
    rec.end(c, REQUEST, key, held=(response,))


def _api_blocks_difference(rec: Recorder, registry: object = None) -> float:
    """Blocks a reading of a view returning 200 rows minus one returning none, over 20 each."""
    gc.collect()
    for _ in range(20):
        _api_call(rec, "/api/", 200, registry)
        _api_call(rec, "/empty/", 0, registry)
    gc.collect()
    totals = rec.totals()
    api, empty = (
        totals[REQUEST, key].blocks_growth / totals[REQUEST, key].heap_calls
        for key in ("/api/", "/empty/")
    )
    return api - empty


def test_a_response_s_reference_cycles_are_not_kept(rec: Recorder) -> None:
    difference = _api_blocks_difference(rec)
    # Counted as kept, the view's 200 rows (1,000 blocks) made a reading of /api/ 1,000
    # blocks more than one of /empty/ (a response the collector found in a cycle at the
    # call's end went to its oldest generation, to be freed by a full collection).
    assert abs(difference) < 100, difference


def test_a_response_leading_to_an_old_registry_still_frees_its_cycles(
    rec: Recorder, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A request's objects lead to structures made long before it (its resolver match to the
    # URL resolver's patterns: in NetBox, 68,000 objects), past the walk's limit, where the
    # response's own cycle then looked referred to from outside and counted as kept. The walk
    # goes no further than what is young: what the call made (see defer_promotion).
    monkeypatch.setattr(recorder_heap, "HELD_MEMORY_PARTS", 2_000)
    registry = [{"entry": [n]} for n in range(3_000)]  # 6,000 objects

    def difference() -> float:
        rec.discard()
        return _api_blocks_difference(rec, registry)

    gc.enable()  # the deferral is the collector's
    gc.collect()  # the registry is old from now on
    monkeypatch.setattr(dropped, "walks_cut", 0)
    for _ in range(2):  # a warm-up call, then a reading whose walk is cut short at its limit:
        _api_call(rec, "/api/", 200, registry)  # the readings note what is young from then on
    assert dropped.walks_cut
    walked_past = difference()
    with monkeypatch.context() as patch:
        patch.setattr(recorder, "still_young", lambda: False)  # the walk as it was
        limited = difference()
    # The view's 200 rows are about 1,000 blocks.
    assert abs(walked_past) < 100, (walked_past, limited)
    assert limited > 500, (walked_past, limited)


def test_what_a_response_s_cycles_free_with_it() -> None:
    from django_leakguard.dropped import dropped_parts

    outside = ["a list something else refers to as well"]
    response = _api_response(3)
    response.renderer_context["view"].rows.append(outside)  # type: ignore[attr-defined]
    parts = dropped_parts(response, (), 1000)
    ids = {id(part) for part in parts}
    context = response.renderer_context  # type: ignore[attr-defined]
    for freed in (context, context["view"], context["request"], context["view"].rows):
        assert id(freed) in ids
    assert id(outside) not in ids
    # What an object outside refers to is not freed with the response, nor what it refers to.
    keep = context["request"]
    parts = dropped_parts(response, (), 1000)
    assert id(keep) not in {id(part) for part in parts}
    assert id(keep.parser_context) not in {id(part) for part in parts}
    assert id(context["view"].rows) not in {id(part) for part in parts}  # via parser_context
    # At most limit objects are walked: what lies beyond counts as referred to from outside.
    assert len(dropped_parts(response, (), 3)) < 3
    # An object many others refer to (a registry) is not walked into, nor counted.
    registry = {"entries": ["only the registry refers to this list"]}
    holders = [registry] * dropped.SHARED_REFS
    response.renderer_context["registry"] = registry  # type: ignore[attr-defined]
    ids = {id(part) for part in dropped_parts(response, (), 1000)}
    assert id(registry) not in ids
    assert id(registry["entries"]) not in ids
    assert id(response.headers) in ids
    del holders


def test_a_dict_s_string_keys_made_with_it_are_freed_with_it() -> None:
    from django_leakguard.dropped import dropped_parts

    # The collector is shown a dict's values only when all its keys are strings.
    data = {f"row {n}": f"value {n}" for n in range(20)}
    shared = f"shared {1}"
    data[shared] = "x"
    also = [shared]  # something else refers to this key
    ids = {id(part) for part in dropped_parts(data, (), 1000)}
    assert all(id(key) in ids for key in data if key is not shared)
    assert all(id(value) in ids for key, value in data.items() if key is not shared)
    assert id(shared) not in ids
    # A dict with other keys shows them all: none counted twice (a key held by another
    # object, seen twice, would look freed with the dict).
    mixed = {1: "one", shared: "x"}
    assert id(shared) not in {id(part) for part in dropped_parts(mixed, (), 1000)}
    del also


def test_a_request_a_lazy_user_s_closure_refers_to_is_freed_with_the_response() -> None:
    from django.http import HttpResponse
    from django.utils.functional import SimpleLazyObject

    from django_leakguard.dropped import dropped_parts

    def page() -> tuple[HttpResponse, int]:
        request = _ApiRequest()
        # As Django's AuthenticationMiddleware does: the closure refers to the request.
        request.user = SimpleLazyObject(lambda: request)  # type: ignore[attr-defined]
        response = HttpResponse(b"page")
        response._request = request  # type: ignore[attr-defined]  # as a TemplateResponse's
        return response, id(request)

    response, request_id = page()
    assert request_id in {id(part) for part in dropped_parts(response, (), 1000)}


def test_a_class_made_per_call_is_not_kept_by_the_walk() -> None:
    import weakref

    from django.http import HttpResponse

    from django_leakguard.dropped import dropped_parts

    def page() -> tuple[HttpResponse, weakref.ref[type]]:
        # As django-filter makes its filter form: a class per request.
        form_class = type("FilterForm", (), {"fields": ["a field list"]})
        response = HttpResponse(b"page")
        response.form = form_class()  # type: ignore[attr-defined]
        return response, weakref.ref(form_class)

    response, form_class = page()
    dropped_parts(response, (), 1000)
    del response
    gc.collect()
    assert form_class() is None  # remembered by the walk's cache of types, it stayed alive
    # The same for the walk of what only the response refers to (sampled tracing).
    from django_leakguard.tracing_baseline import owned_parts

    response, form_class = page()
    list(owned_parts(response, (), 1000))
    del response
    gc.collect()
    assert form_class() is None


def test_a_reading_that_saw_a_full_collection_does_not_count(rec: Recorder) -> None:
    for _ in range(10):
        call(rec, "/full/", gc.collect)
        call(rec, "/young/", lambda: gc.collect(0))
    totals = rec.totals()
    # A full collection frees other calls' garbage (cycles the collector moved to its oldest
    # generation while they were in use): it is not this call's.
    assert totals[REQUEST, "/full/"].calls == 10
    assert totals[REQUEST, "/full/"].heap_calls == 0
    assert totals[REQUEST, "/young/"].heap_calls == 9


def test_what_two_of_a_response_s_own_objects_share_is_its_own() -> None:
    from django_leakguard.dropped import dropped_parts

    outside = ["a list something else refers to as well"]
    root = {"context": {"rows": ["a list both refer to"], "other": outside}}
    root["view"] = {"rows": root["context"]["rows"]}  # no other reference to it
    parts = dropped_parts(root, (), 1000)
    assert any(part is root["context"]["rows"] for part in parts)  # reached from both
    assert not any(part is outside for part in parts)


def test_a_filling_cache_levels_off_and_a_leak_grows(
    rec: Recorder, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(recorder, "MIN_READINGS", 1000)
    kept: list[bytes] = []
    n = [0]

    def leak() -> None:
        kept.append(bytes(4096))

    def cache() -> None:
        n[0] += 1
        if len(_cache) < 40:
            _cache[n[0]] = bytes(4096)

    for _ in range(200):
        call(rec, "/leak/", leak)
        call(rec, "/cache/", cache)
    rows = _report_rows(rec.totals())
    assert rows["/leak/"].trend == "grows"
    assert rows["/cache/"].trend == "levels off"
    built = build_report(list(rows.values()), Workers(), source="database", since=None, until=None)
    assert [row.key for row in built.rows] == ["/leak/", "/cache/"]
    _cache.clear()


def test_a_rare_key_s_cache_levels_off_within_a_short_process_life(rec: Recorder) -> None:
    # A key with half of a 100-request life (50 calls) whose cache is full after 8 calls:
    # counted in its own calls (late after its 50th, as before), it had no late calls at all,
    # and ranked with the leaks. Calls are late in the second half of their process's life.
    kept: list[bytes] = []
    for n in range(100):
        if n % 2:
            call(rec, "/leak/", lambda: kept.append(bytes(4096)))
        else:
            call(
                rec,
                "/cache/",
                lambda: _cache.setdefault(len(_cache), bytes(4096)) if len(_cache) < 8 else None,
            )
    totals = rec.totals()
    assert totals[REQUEST, "/cache/"].late_calls >= 20
    assert totals[REQUEST, "/cache/"].heap_calls - totals[REQUEST, "/cache/"].late_calls >= 20
    rows = _report_rows(totals)
    assert rows["/cache/"].trend == "levels off"
    assert rows["/leak/"].trend == "grows"
    _cache.clear()


@pytest.mark.parametrize(
    ("settings_value", "late_from"),
    [({"MAX_REQUESTS": 1000}, 500), ({"MAX_REQUESTS": 0}, recorder.LATE_AFTER), ({}, 500)],
)
def test_late_from_half_the_life_recycling_gives(
    settings: Any, settings_value: dict[str, int], late_from: int
) -> None:
    settings.LEAKGUARD = settings_value
    assert recorder._half_life(REQUEST) == late_from
    settings.LEAKGUARD = {"CELERY_MAX_TASKS_PER_CHILD": 40}
    assert recorder._half_life(TASK) == 20  # tasks: Celery's limit
    settings.LEAKGUARD = {"MAX_REQUESTS": "many"}  # invalid (the checks say so): the default
    assert recorder._half_life(REQUEST) == recorder.LATE_AFTER


def test_tasks_read_at_every_call_are_late_in_the_second_half_of_their_life(
    rec: Recorder, settings: Any
) -> None:
    # Celery's tasks read the heap at every call (begin(read_heap=True)); they were never
    # late, so no task had a trend.
    settings.LEAKGUARD = {**settings.LEAKGUARD, "CELERY_MAX_TASKS_PER_CHILD": 40}
    for _ in range(40):
        c = rec.begin(read_heap=True, kind=TASK)
        rec.end(c, TASK, "app.tasks.job")
    job = rec.totals()[TASK, "app.tasks.job"]
    assert (job.calls, job.heap_calls, job.late_calls) == (40, 39, 20)  # late from the 21st


def test_confidence_and_no_extrapolation_from_a_handful() -> None:
    few = Row(REQUEST, "/few/", calls=1000, heap_calls=3, heap_growth=3000)
    some = Row(REQUEST, "/some/", calls=1000, heap_calls=10, heap_growth=1000)
    many = Row(REQUEST, "/many/", calls=1000, heap_calls=100, heap_growth=100)
    assert (few.confidence, some.confidence, many.confidence) == ("low", "low", "high")
    assert Row(REQUEST, "/none/", calls=5).confidence == "none"
    assert few.heap_kept == 3000  # what the readings kept, not scaled to 1,000 calls
    assert some.heap_kept == 100_000
    built = build_report([few, some, many], Workers(), source="database", since=None, until=None)
    # Three readings rank by what they kept (3,000 B, not scaled to 1,000 calls) among the
    # others: below 100,000 B scaled from 10 readings, above 1,000 B scaled from 100.
    assert [row.key for row in built.rows] == ["/some/", "/few/", "/many/"]
    few.heap_growth = 300
    built = build_report([few, some, many], Workers(), source="database", since=None, until=None)
    assert [row.key for row in built.rows] == ["/some/", "/many/", "/few/"]


def test_ties_are_ordered_by_rss_then_calls() -> None:
    rows = [
        Row(REQUEST, "/a/", calls=10, heap_calls=10),
        Row(REQUEST, "/b/", calls=10, heap_calls=10, rss_growth=4096),
        Row(REQUEST, "/c/", calls=50, heap_calls=10),
    ]
    built = build_report(rows, Workers(), source="database", since=None, until=None)
    assert [row.key for row in built.rows] == ["/b/", "/c/", "/a/"]


def test_small_objects_count_in_the_heap_figures() -> None:
    row = Row(REQUEST, "/s/", calls=10, heap_calls=10, heap_growth=100, blocks_growth=10)
    assert row.heap_per_call == (100 + 10 * BLOCK_BYTES) / 10


def test_rss_rankings_say_what_rss_blames() -> None:
    rows = [Row(REQUEST, "/a/", calls=10)]
    built = build_report(rows, Workers(), source="database", since=None, until=None, sort="rss")
    assert any("a transient spike" in note for note in built.notes)


def test_what_a_reading_spent_beforehand_counts_in_its_cost(rec: Recorder) -> None:
    # The walk over the response a call's end takes off (held_memory) is part of the reading.
    rec._heap_cost = 0.0
    rec._time_heap(0.25)
    assert rec._heap_cost >= 0.25


def test_a_call_s_end_reads_the_heap_twice_around_the_walk_of_its_response(
    rec: Recorder, monkeypatch: pytest.MonkeyPatch
) -> None:
    from django.http import HttpResponse

    from django_leakguard import memory

    reads = []
    heap = memory.heap

    def counted() -> int | None:
        reads.append(1)
        return heap()

    call(rec, "/page/")  # warm-up: reads nothing
    c = rec.begin(read_heap=False)
    rec.measure_heap(c, REQUEST, "/page/")
    response = HttpResponse(b"x" * 40_000)  # 40 KiB of C heap the server frees right after
    monkeypatch.setattr(memory, "heap", counted)
    rec.end(c, REQUEST, "/page/", held=(response,))
    # Before and after the walk (whatever it leaves behind is left out), not a third time.
    assert len(reads) == 2
    kept = rec.totals()[REQUEST, "/page/"]
    assert kept.heap_calls == 1
    assert kept.heap_growth < 20_000  # the page is not kept


def test_a_call_whose_readings_straddle_the_look_for_freed_tuples_does_not_count(
    rec: Recorder, monkeypatch: pytest.MonkeyPatch
) -> None:
    from django_leakguard import free_tuples

    call(rec, "/key/")  # the key's warm-up
    # The first look for the freed tuples' counts fails (another thread freed short tuples
    # meanwhile, say), at the start of a call's first reading; the next, at its end, finds
    # them: from then on thousands of freed tuples are counted out of the blocks.
    find = free_tuples._find_counts
    looks: list[object] = []

    def second_try() -> object:
        looks.append(None)
        return find() if len(looks) > 1 else None

    monkeypatch.setattr(free_tuples, "_counts", None)
    monkeypatch.setattr(free_tuples, "_tries", 0)
    monkeypatch.setattr(free_tuples, "_find_counts", second_try)
    held = [[(i,) for i in range(2100)], [(i, i) for i in range(2100)]]
    held.append([(i, i, i) for i in range(2100)])  # short tuples' free lists empty at first
    del held
    for _ in range(10):
        call(rec, "/key/")
    assert len(looks) == 2
    assert free_tuples._counts is not None
    totals = rec.totals()[REQUEST, "/key/"]
    assert totals.heap_calls == 9  # not the one that straddled the look
    assert abs(totals.blocks_growth) < 50 * 9, totals.blocks_growth


def test_whether_a_call_would_read_never_fails_a_request(
    rec: Recorder, monkeypatch: pytest.MonkeyPatch
) -> None:
    from django_leakguard.records import KEY_MAX_LENGTH

    rec.end(rec.begin(), "request", "/a/")  # the key's warm-up call: the next ones read
    assert rec.heap_wanted("request", "/a/")
    assert not rec.heap_wanted("request", "/" + "x" * KEY_MAX_LENGTH)  # a new key: warm-up

    def broken(*args: object) -> None:
        raise RuntimeError("bug")

    monkeypatch.setattr(rec, "_heap_band", broken)
    assert rec.heap_wanted("request", "/a/") is False
