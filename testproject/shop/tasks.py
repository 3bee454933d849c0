"""Celery tasks with known memory behaviour (docs, demo and tests use them)."""

from __future__ import annotations

import functools
import os
from pathlib import Path

from celery import shared_task

RETAIN_BYTES = 1024 * 1024
SPIKE_BYTES = 20 * 1024 * 1024

# leak_retain appends here and never removes anything: the leak.
_retained: list[bytes] = []


def _note_pid(note: str | None) -> None:
    # Tests pass a file to learn which pool child ran each task (results are ignored).
    if note:
        with Path(note).open("a") as file:
            file.write(f"{os.getpid()}\n")


@shared_task
def leak_retain(mib: int = 1, note: str | None = None) -> int:
    """Keep `mib` MiB for the life of the process."""
    for _ in range(mib):
        # os.urandom touches every page, so the kept memory is resident.
        _retained.append(os.urandom(RETAIN_BYTES))
    _note_pid(note)
    return len(_retained)


@functools.lru_cache(maxsize=None)  # noqa: UP033  (the unbounded cache is the point)
def _report_for(day: int) -> bytes:
    return os.urandom(64 * 1024)


@shared_task
def leak_cache(day: int, note: str | None = None) -> int:
    """Fill an lru_cache without maxsize: 64 KiB kept per new day."""
    size = len(_report_for(day))
    _note_pid(note)
    return size


_history: list[bytes] = []


@shared_task
def leak_history(note: str | None = None) -> int:
    """Keep 16 KiB of history per call: a slower leak."""
    _history.append(os.urandom(16 * 1024))
    _note_pid(note)
    return len(_history)


@shared_task
def spike(note: str | None = None) -> int:
    """Allocate 20 MiB and free it: transient, not a leak."""
    data = os.urandom(SPIKE_BYTES)
    size = len(data)
    del data
    _note_pid(note)
    return size


@shared_task
def add(x: int, y: int, note: str | None = None) -> int:
    """An ordinary task."""
    _note_pid(note)
    return x + y
