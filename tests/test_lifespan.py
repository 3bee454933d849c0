"""A worker's calls are early or late by the life its server really gives it (lifespan.py).

LEAKGUARD's MAX_REQUESTS (1,000 by default) is what our own Gunicorn config applies; a server
configured elsewhere recycles after its own count, and the halves of a worker's life that tell
a cache from a leak follow that count where the worker can read it.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from django_leakguard import lifespan, recorder
from django_leakguard.records import REQUEST, TASK
from tests import servers

LIFE = 40  # the server's max-requests; LEAKGUARD's MAX_REQUESTS stays at its default
CALLS = 30


def _early_and_late(tmp_path: Path, name: str, command: list[str], port: int) -> tuple[int, int]:
    """Serve CALLS product pages from the server command starts; return the readings of calls
    early and late in the worker's life, as stored at its stop."""
    env = servers.project_env(tmp_path / "db.sqlite3", LEAKGUARD_FLUSH_INTERVAL=3600)
    servers.migrate(env)
    with servers.running(
        name,
        command,
        env=env,
        log_path=tmp_path / f"{name}.log",
        port=port,
        ready=lambda server: server.wait_for_http("/"),
    ) as server:
        for n in range(1, CALLS + 1):
            assert servers.get(server.url(f"/products/{n}/"))[0] == 200
        server.stop()
    stored = servers.stored_sums(env, "request", ("heap_calls", "late_calls"))
    row = stored["/products/<int:pk>/"]
    return row["heap_calls"] - row["late_calls"], row["late_calls"]


def _assert_halves_by(life: int, early: int, late: int) -> None:
    # Late from the worker's (life / 2 + 1)th request (the readiness probe was its first):
    # by LEAKGUARD's MAX_REQUESTS, from its 501st, so none of these.
    assert late >= CALLS - life // 2 - 2, (early, late)
    assert early >= life // 2 - 3, (early, late)


@pytest.mark.servers
def test_gunicorn_s_own_max_requests_decides_the_halves(tmp_path: Path) -> None:
    port = servers.free_port()
    # Not our Gunicorn config: Gunicorn's own max_requests, which LEAKGUARD does not know.
    command = servers.gunicorn_command(
        "testproject.wsgi:application",
        port,
        config=None,
        workers=1,
        extra=["--max-requests", str(LIFE)],
    )
    _assert_halves_by(LIFE, *_early_and_late(tmp_path, "gunicorn", command, port))


@pytest.mark.servers
def test_uwsgi_s_own_max_requests_decides_the_halves(tmp_path: Path) -> None:
    port = servers.free_port()
    command = servers.uwsgi_command(
        "testproject.wsgi:application",
        port,
        extra=["--processes", "1", "--disable-logging", "--max-requests", str(LIFE)],
    )
    _assert_halves_by(LIFE, *_early_and_late(tmp_path, "uwsgi", command, port))


def test_outside_a_server_the_settings_decide(settings: object) -> None:
    settings.LEAKGUARD = {"MAX_REQUESTS": 300}  # type: ignore[attr-defined]
    assert lifespan.recycled_after(REQUEST) is None
    assert recorder._half_life(REQUEST) == 150


def test_a_celery_pool_s_tasks_per_child_decide_the_halves(
    monkeypatch: pytest.MonkeyPatch, settings: object
) -> None:
    settings.LEAKGUARD = {"CELERY_MAX_TASKS_PER_CHILD": 100}  # type: ignore[attr-defined]
    monkeypatch.setattr(lifespan, "_celery_max_tasks", None)
    assert recorder._half_life(TASK) == 50  # no pool seen: LEAKGUARD's setting
    lifespan.set_celery_max_tasks(16)  # the pool's own (--max-tasks-per-child 16)
    assert recorder._half_life(TASK) == 8
    lifespan.set_celery_max_tasks(None)  # no limit: children live on
    assert recorder._half_life(TASK) == recorder.LATE_AFTER


@pytest.mark.parametrize(
    ("value", "number"),
    [(b"40", 40), ([b"10", b"40"], 40), ("7", 7), (b"", 0), (b"many", 0), (None, 0), ([], 0)],
)
def test_uwsgi_option_values_are_read_as_numbers(value: object, number: int) -> None:
    assert lifespan._uwsgi_worker_limit({"max-requests": value}, 1) == number
    assert lifespan._uwsgi_worker_limit({"max_requests": value}, 1) == number  # ini spelling


def test_uwsgi_s_delta_spreads_the_workers_limits() -> None:
    opt = {"max-requests": b"40", "max-requests-delta": b"5"}
    assert [lifespan._uwsgi_worker_limit(opt, worker) for worker in (1, 2, 3)] == [40, 45, 50]
