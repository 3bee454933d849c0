"""How many calls recycling gives this process, as its server or queue really set it.

The report tells a cache that fills up from a leak by the halves of a process's life (see
Recorder._is_late). LEAKGUARD's MAX_REQUESTS and CELERY_MAX_TASKS_PER_CHILD are what our own
Gunicorn config and Celery bootstep apply, but a server configured elsewhere (a Gunicorn config
or command line that sets max_requests, a uWSGI ini file) recycles its workers after its own
count: where this process can tell it, that count decides the halves.
"""

from __future__ import annotations

import signal
import sys
from collections.abc import Mapping
from typing import Any

from django_leakguard.records import TASK

# Set in a Celery worker's parent process before it forks its pool (celery.apply_limits), so
# that its children inherit it: tasks a child runs before it is replaced (0: no limit).
_celery_max_tasks: int | None = None


def set_celery_max_tasks(limit: int | None) -> None:
    """Note the pool's tasks per child (None or 0: the pool replaces no child for it)."""
    global _celery_max_tasks
    _celery_max_tasks = limit or 0


def recycled_after(kind: str) -> int | None:
    """Return after how many calls of kind this process is recycled (0: never), or None when
    its server or queue does not say (LEAKGUARD's settings decide then)."""
    if kind == TASK:
        return _celery_max_tasks
    try:
        limit = _gunicorn_max_requests()
        return limit if limit is not None else _uwsgi_max_requests()
    except Exception:  # an unexpected server version: the settings decide
        return None


def _gunicorn_max_requests() -> int | None:
    """The limit Gunicorn drew for this worker (with its jitter), if this is a Gunicorn worker.

    Every Gunicorn worker class (sync, gthread, gevent, Uvicorn's) reopens its logs on SIGUSR1
    with a method of the worker object, which holds the limit: sys.maxsize where there is none.
    """
    workers = sys.modules.get("gunicorn.workers.base")
    if workers is None:
        return None
    worker = getattr(signal.getsignal(signal.SIGUSR1), "__self__", None)
    if not isinstance(worker, workers.Worker):
        return None
    limit = getattr(worker, "max_requests", None)
    if not isinstance(limit, int) or limit <= 0:
        return None
    return 0 if limit >= sys.maxsize else limit


def _uwsgi_max_requests() -> int | None:
    """uWSGI's max-requests for this worker (with max-requests-delta), if this is uWSGI."""
    uwsgi = sys.modules.get("uwsgi")
    if uwsgi is None:
        return None
    return _uwsgi_worker_limit(uwsgi.opt, int(uwsgi.worker_id()))


def _uwsgi_worker_limit(opt: Mapping[Any, object], worker_id: int) -> int:
    """The max-requests uWSGI's options opt (as uwsgi.opt holds them) give worker worker_id;
    0 where they set none."""
    # Only under uWSGI: the config reader is not loaded in every process.
    from django_leakguard.server_configs import UwsgiConfig, uwsgi_options

    config = UwsgiConfig("uwsgi.opt", uwsgi_options(opt))
    limit = config.number("max-requests") or 0
    if limit <= 0:
        return 0
    # uWSGI gives worker i (from 1) max-requests + (i - 1) x delta: they restart apart.
    delta = max(config.number("max-requests-delta") or 0, 0)
    return limit + delta * max(worker_id - 1, 0)
