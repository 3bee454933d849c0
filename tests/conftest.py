from __future__ import annotations

import os
import socket
from collections.abc import Iterator
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


@pytest.fixture
def postgres_url() -> str:
    """The PostgreSQL URL for service-backed tests."""
    return _service_url("LEAKGUARD_TEST_POSTGRES_URL", "PostgreSQL")


@pytest.fixture
def redis_url() -> str:
    """The Redis URL for service-backed tests."""
    return _service_url("LEAKGUARD_TEST_REDIS_URL", "Redis")


@pytest.fixture(autouse=True)
def _fresh_recorder() -> Iterator[None]:
    """Start every test with an empty recorder and leave nothing pending for the exit flush."""
    from django_leakguard.recorder import get_recorder

    get_recorder().discard()
    yield
    get_recorder().discard()
