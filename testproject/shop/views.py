"""Ordinary views, and three views with known memory behaviour (docs, demo and tests use them)."""

from __future__ import annotations

import asyncio
import functools
import os

from django.http import HttpRequest, HttpResponse, JsonResponse

RETAIN_BYTES = 64 * 1024
SPIKE_BYTES = 20 * 1024 * 1024

# /leak/retain/ appends here and never removes anything: the leak.
_retained: list[bytes] = []


def home(request: HttpRequest) -> HttpResponse:
    return HttpResponse("<h1>Shop</h1>")


def product(request: HttpRequest, pk: int) -> JsonResponse:
    return JsonResponse({"id": pk, "name": f"Product {pk}", "price": pk * 3 % 97})


def search(request: HttpRequest) -> JsonResponse:
    query = request.GET.get("q", "")
    return JsonResponse({"query": query, "results": [query.upper()] if query else []})


async def health(request: HttpRequest) -> HttpResponse:
    await asyncio.sleep(0)
    return HttpResponse("ok")


def leak_retain(request: HttpRequest) -> HttpResponse:
    # os.urandom touches every page; bytes of zeros could be mapped lazily and grow no RSS.
    _retained.append(os.urandom(RETAIN_BYTES))
    return HttpResponse(f"retained {len(_retained)} blocks")


@functools.lru_cache(maxsize=None)  # noqa: UP033  (the unbounded cache is the point)
def _render_fragment(key: str) -> bytes:
    return os.urandom(16 * 1024) + key.encode()


def leak_cache(request: HttpRequest, key: str) -> HttpResponse:
    fragment = _render_fragment(key)
    return HttpResponse(f"cached {len(fragment)} bytes for this key")


# /leak/small/ keeps many small objects: pymalloc serves them from its own arenas, which
# the C heap signal does not see; sampled tracing does.
SMALL_OBJECTS = 400
_small: list[list[dict[str, int]]] = []


def leak_small(request: HttpRequest) -> HttpResponse:
    _small.append([{"id": i, "stock": i % 7} for i in range(SMALL_OBJECTS)])
    return HttpResponse(f"kept {len(_small) * SMALL_OBJECTS} small dicts")


def spike(request: HttpRequest) -> HttpResponse:
    data = os.urandom(SPIKE_BYTES)
    size = len(data)
    del data
    return HttpResponse(f"allocated and freed {size} bytes")


def boom(request: HttpRequest) -> HttpResponse:
    raise RuntimeError("boom: a view that fails, to show errors propagate unchanged")
