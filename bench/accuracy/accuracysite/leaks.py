"""What each kind of call keeps, shared by the views and the tasks.

Leaks keep memory for the life of the process, each the way real projects do it; non-leaks
allocate and free (a transient spike) or keep a bounded amount (caches that level off). Sizes
come from the run's plan (ACCURACY_PLAN, drawn by bench/accuracy/workload.py): bytes kept per
call per leak kind, and the bounds and entry sizes of the caches.
"""

from __future__ import annotations

import asyncio
import collections
import ctypes
import ctypes.util
import functools
import json
import logging
import os
import secrets
import time
from collections.abc import Callable
from typing import Any

PLAN: dict[str, Any] = json.loads(os.environ.get("ACCURACY_PLAN") or "{}")
SIZES: dict[str, int] = PLAN.get("sizes", {})
CACHE_SIZE: int = PLAN.get("cache_size", 16)
RECENT_SIZE: int = PLAN.get("recent_size", 16)
ENTRY_BYTES: int = PLAN.get("entry_bytes", 4096)
SPIKE_BYTES = 30 * 1024 * 1024

# What one unit of each kind keeps, measured with tracemalloc (CPython 3.11, 64-bit): a size
# is reached by keeping that many units, within about 10 % from 1 KiB to 50 KiB. Below,
# each kind keeps at least its own floor (one logger, one receiver, one payload: 0.5 to 1 KiB).
TUPLE_BYTES = 153  # (int, "row-12345") and its list slot
LOGGER_BYTES = 720  # a Logger, its name, its place in the manager's dict
TENANT_BYTES = 300  # the placeholder of a tenant's parent logger
RECEIVER_BYTES = 650  # a closure, its cell, its context and the signal's receiver entry
PROFILE_BYTES = 350  # a dict of two items and its key
TAG_BYTES = 71  # a short str and its list slot
PAYLOAD_BYTES = 320  # the dict around an event's body


def size_of(kind: str) -> int:
    return int(SIZES.get(kind, 1024))


# Leaks ---------------------------------------------------------------------------------------

_rows: list[tuple[int, str]] = []


def keep_rows(size: int) -> int:
    """A module-level list of small tuples that only grows (an import log kept "for later")."""
    start = len(_rows)
    _rows.extend((start + i, f"row-{start + i}") for i in range(max(1, round(size / TUPLE_BYTES))))
    return len(_rows)


def keep_loggers(tenant: int, size: int) -> int:
    """A logger per new tenant and subsystem: logging's manager keeps every one forever."""
    parts = max(1, round((size - TENANT_BYTES) / LOGGER_BYTES))
    for part in range(parts):
        logging.getLogger(f"accuracy.tenant.{tenant}.part{part}").debug("tenant seen")
    return parts


def keep_receiver(connect: Callable[..., object], size: int) -> None:
    """Connect a fresh closure, strongly referenced, at every call: receivers pile up."""
    context = {"started": time.time(), "state": os.urandom(max(0, size - RECEIVER_BYTES))}

    def on_done(sender: object = None, **kwargs: object) -> None:
        context["finished"] = time.time()

    connect(on_done, weak=False)


_libc = ctypes.CDLL(ctypes.util.find_library("c"))
_libc.malloc.restype = ctypes.c_void_p
_libc.malloc.argtypes = [ctypes.c_size_t]


def keep_native(size: int) -> None:
    """malloc() from C and never free(): what a C extension with a missing free() does."""
    address = _libc.malloc(size)
    if not address:
        raise MemoryError(size)
    # Touch every page so the memory is really in use, as a real buffer would be.
    ctypes.memset(address, 0x5A, size)


_events: list[dict[str, object]] = []


async def keep_event(size: int) -> int:
    """An async handler appending every payload it receives to a list."""
    await asyncio.sleep(0)
    body = secrets.token_hex(max(1, (size - PAYLOAD_BYTES) // 2))
    _events.append({"received": time.time(), "body": body})
    return len(_events)


_exports: list[bytes] = []


def keep_export(rows: list[tuple[object, ...]], size: int) -> None:
    """Keep an export built from database rows (a 'last exports' list nobody trims)."""
    text = repr(rows).encode() or b"-"
    _exports.append((text * (size // len(text) + 1))[:size])


_profiles: dict[str, dict[str, object]] = {}


def keep_profile(user: int, size: int) -> None:
    """A dict entry per new user id, never evicted."""
    tags = max(0, round((size - PROFILE_BYTES) / TAG_BYTES))
    _profiles[f"user-{user}"] = {"id": user, "tags": [f"tag-{user}-{i}" for i in range(tags)]}


# Non-leaks -----------------------------------------------------------------------------------


def transient_export() -> int:
    """Build a 30 MiB report (a third in small objects) and drop it: a spike, not a leak."""
    rows = [(i, f"line-{i}") for i in range(SPIKE_BYTES // 3 // TUPLE_BYTES)]
    blob = os.urandom(SPIKE_BYTES - len(rows) * TUPLE_BYTES)
    return len(rows) + len(blob)


@functools.lru_cache(maxsize=CACHE_SIZE)
def cached_fragment(n: int) -> bytes:
    """A bounded cache: at most CACHE_SIZE fragments, the least recently used evicted."""
    return os.urandom(ENTRY_BYTES) + str(n).encode()


_recent: collections.deque[bytes] = collections.deque(maxlen=RECENT_SIZE)


def remember_recent() -> int:
    """A bounded history of the last RECENT_SIZE entries."""
    _recent.append(os.urandom(ENTRY_BYTES))
    return len(_recent)
