"""Polling helper shared by the tests that wait for a background flush."""

from __future__ import annotations

import time
from collections.abc import Callable

from django.db import OperationalError


def wait_for(predicate: Callable[[], object], timeout: float = 10.0) -> None:
    """Poll ``predicate`` until it is true, or fail after ``timeout`` seconds.

    The test database for SQLite is an in-memory database in shared-cache mode: while the flush
    thread writes through its own connection, a read from the test's connection fails at once with
    "database table is locked" (shared-cache locks do not wait for the busy timeout). Such a read
    is polled again; any other error fails the test.
    """
    deadline = time.monotonic() + timeout
    while True:
        try:
            if predicate():
                return
        except OperationalError as exc:
            if "locked" not in str(exc):
                raise
        if time.monotonic() > deadline:
            raise AssertionError(f"not true within {timeout} s: {predicate}")
        time.sleep(0.02)
