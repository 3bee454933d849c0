from __future__ import annotations

import math
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import pytest

REQUIRE_SERVICES = os.environ.get("LEAKGUARD_REQUIRE_SERVICES", "") == "1"


def _service_url(env: str, what: str) -> str:
    """Return the service URL from env, or skip (fail when services are required)."""
    url = os.environ.get(env, "")
    if not url:
        message = f"{what} tests need {env} (e.g. set by .ci/run)"
        if REQUIRE_SERVICES:
            pytest.fail(f"LEAKGUARD_REQUIRE_SERVICES=1 but {message}")
        pytest.skip(message)
    parts = urlsplit(url)
    try:
        with socket.create_connection((parts.hostname or "127.0.0.1", parts.port or 0), 3):
            pass
    except OSError as exc:
        message = f"{what} at {parts.hostname}:{parts.port} is unreachable: {exc}"
        if REQUIRE_SERVICES:
            pytest.fail(message)
        pytest.skip(message)
    return url


_OWN_PROCESS = "LEAKGUARD_TEST_OWN_PROCESS"


@pytest.fixture
def in_own_process(request: pytest.FixtureRequest) -> bool:
    """Run the test again, alone, in a fresh interpreter; True there, where its body runs.

    For tests whose heap figures must not depend on what the rest of the suite left behind
    (its order is random): here the fixture waits for that run, fails with its output if it
    failed, and returns False, so that the test returns at once.
    """
    nodeid = request.node.nodeid
    if os.environ.get(_OWN_PROCESS) == nodeid:
        return True
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-s",
            "-p",
            "no:randomly",
            "-p",
            "no:cacheprovider",
            nodeid,
        ],
        cwd=Path(__file__).resolve().parent.parent,
        env={**os.environ, _OWN_PROCESS: nodeid},
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    print(result.stdout[-3000:])
    if result.returncode != 0:
        pytest.fail(f"in its own process:\n{result.stdout[-6000:]}\n{result.stderr[-3000:]}")
    return False


@pytest.fixture
def postgres_url() -> str:
    """The PostgreSQL URL for service-backed tests."""
    return _service_url("LEAKGUARD_TEST_POSTGRES_URL", "PostgreSQL")


@pytest.fixture
def mysql_url() -> str:
    """The MySQL or MariaDB URL for service-backed tests."""
    return _service_url("LEAKGUARD_TEST_MYSQL_URL", "MySQL")


@pytest.fixture
def redis_url() -> str:
    """The Redis URL for service-backed tests."""
    return _service_url("LEAKGUARD_TEST_REDIS_URL", "Redis")


@pytest.fixture(autouse=True)
def _fresh_recorder() -> Iterator[None]:
    """Start every test with an empty recorder and leave nothing pending for the exit flush;
    and forget the Celery pool a test configured (lifespan: a worker's parent notes it)."""
    from django_leakguard import lifespan
    from django_leakguard.recorder_process import get_recorder

    get_recorder().discard()
    yield
    get_recorder().discard()
    lifespan._celery_max_tasks = None


@pytest.fixture(autouse=True)
def _free_lists_always_emptied(request: pytest.FixtureRequest) -> Iterator[None]:
    """Let every traced call empty the free lists: full collections the tests run would
    otherwise spend the budget and stop the tracing (test_tracing_gc tests the budget)."""
    from django_leakguard import tracing_gc

    if request.module.__name__.endswith("test_tracing_gc"):
        yield
        return
    budget, tracing_gc.GC_BUDGET = tracing_gc.GC_BUDGET, math.inf
    tracing_gc._not_before = 0.0
    try:
        yield
    finally:
        tracing_gc.GC_BUDGET = budget
        tracing_gc._not_before = 0.0


@pytest.fixture(autouse=True)
def _default_language() -> Iterator[None]:
    """Leave no language active after a test: LocaleMiddleware activates the request's language
    in the thread and never deactivates it, and i18n_patterns() resolve by the active one."""
    from django.utils import translation

    yield
    translation.deactivate()


@pytest.fixture(autouse=True)
def _no_stray_threads(request: pytest.FixtureRequest) -> None:
    """Start the log parser's tests in a process that runs no other thread.

    The parser forks worker processes only where no other thread runs (uwsgi_log.can_fork):
    a thread another test left behind would silently turn its parallel tests serial. Wait a
    moment for such threads to end; name them if they do not.
    """
    if not request.module.__name__.endswith("test_uwsgi_log"):
        return
    deadline = time.monotonic() + 5
    while threading.active_count() > 1 and time.monotonic() < deadline:
        time.sleep(0.01)
    others = [
        thread.name for thread in threading.enumerate() if thread is not threading.main_thread()
    ]
    assert not others, f"threads left running by earlier tests: {others}"
