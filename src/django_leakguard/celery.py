"""Celery integration: recycle pool children by task count and memory; record tasks.

In the project's celery.py::

    from django_leakguard.celery import configure

    app = Celery("myproject")
    app.config_from_object("django.conf:settings", namespace="CELERY")
    configure(app)
"""

from __future__ import annotations

import logging
import sys
import threading
import weakref
from typing import Any

from celery import Celery, bootsteps, signals
from celery.utils.dispatch import Signal

from django_leakguard import conf, lifespan, memory
from django_leakguard.records import TASK
from django_leakguard.recycling import celery_limits
from django_leakguard.units import format_bytes

__all__ = ["configure", "is_configured"]

logger = logging.getLogger("django_leakguard.celery")
# The limits line goes where the worker's own lines go: a child of Celery's worker logger, which
# the worker's --loglevel and --logfile (or CELERY_WORKER_HIJACK_ROOT_LOGGER = False and your
# LOGGING for "celery") configure. Created when first used, after Django's LOGGING has run, so
# that "disable_existing_loggers" cannot silence it.
WORKER_LOGGER = "celery.worker.django_leakguard"

_configured: weakref.WeakSet[Celery] = weakref.WeakSet()
_connect_lock = threading.Lock()
_connected = False

# Tasks in flight in this process: task id -> the recorder's Call. postrun always follows
# prerun in Celery's tracer; the cap only guards against a broken tracer.
_calls: dict[str, Any] = {}
_MAX_IN_FLIGHT = 10_000


def configure(app: Celery) -> None:
    """Recycle app's pool children by LEAKGUARD and record its tasks; idempotent.

    Nothing is read from the settings here: the limits are computed when a worker starts,
    from its real concurrency (the -c option wins over worker_concurrency).
    """
    global _connected
    if app in _configured:
        return
    app.steps["worker"].add(LeakGuardStep)
    _configured.add(app)
    with _connect_lock:
        if not _connected:
            signals.task_prerun.connect(_task_prerun, weak=False, dispatch_uid=_uid("prerun"))
            signals.task_postrun.connect(_task_postrun, weak=False, dispatch_uid=_uid("postrun"))
            signals.worker_init.connect(
                _connect_postrun_last, weak=False, dispatch_uid=_uid("postrun_last")
            )
            signals.worker_process_shutdown.connect(
                _flush, weak=False, dispatch_uid=_uid("process_shutdown")
            )
            # solo and threads pools run tasks in the main process.
            signals.worker_shutdown.connect(_flush, weak=False, dispatch_uid=_uid("shutdown"))
            _connected = True


def is_configured(app: Celery) -> bool:
    """Return whether configure(app) was called."""
    return app in _configured


def _uid(name: str) -> str:
    return f"django_leakguard.celery.{name}"


class LeakGuardStep(bootsteps.Step):
    """Set the pool's per-child limits before the pool starts."""

    label = "LeakGuard"
    # After the Pool step's __init__ (which reads --autoscale) and before its create(): every
    # step's __init__ runs before any step creates its service.
    requires = ("celery.worker.components:Pool",)

    def __init__(self, parent: Any, **kwargs: Any) -> None:
        super().__init__(parent, **kwargs)
        apply_limits(parent)


def pool_size(worker: Any) -> int:
    """Return how many children the worker's pool may run: --autoscale's max, else -c."""
    return int(worker.max_concurrency or worker.concurrency)


def apply_limits(worker: Any) -> None:
    """Fill in the worker's per-child limits from LEAKGUARD, unless set explicitly."""
    settings = conf.get_settings()  # raises ImproperlyConfigured on bad settings
    concurrency = pool_size(worker)
    available = memory.available_memory()
    limits = celery_limits(settings, concurrency, available)
    app_conf = worker.app.conf
    # Explicit values (the command line, then the app's config) win over LEAKGUARD.
    tasks_source = "explicit"
    if worker.max_tasks_per_child is None and limits.max_tasks_per_child is not None:
        worker.max_tasks_per_child = limits.max_tasks_per_child
        app_conf.worker_max_tasks_per_child = limits.max_tasks_per_child
        tasks_source = "LEAKGUARD"
    # The pool's children inherit it: their calls are late by their real life (lifespan).
    lifespan.set_celery_max_tasks(worker.max_tasks_per_child)
    memory_source = "explicit"
    if worker.max_memory_per_child is None and limits.max_memory_per_child is not None:
        worker.max_memory_per_child = limits.max_memory_per_child
        app_conf.worker_max_memory_per_child = limits.max_memory_per_child
        memory_source = (
            f"LEAKGUARD: {format_bytes(available)} available x "
            f"{settings.CELERY_MEMORY_FRACTION} / {concurrency} children"
        )
    per_child = worker.max_memory_per_child
    logging.getLogger(WORKER_LOGGER).info(
        "django-leakguard: Celery pool children recycle after %s tasks (%s) and past %s of "
        "peak RSS (%s)",
        worker.max_tasks_per_child or "unlimited",
        tasks_source if worker.max_tasks_per_child else "no limit",
        f"{per_child} KiB" if per_child else "no limit",
        memory_source if per_child else "CELERY_MEMORY_FRACTION is None",
    )


def _task_prerun(task_id: str | None = None, task: Any = None, **kwargs: Any) -> None:
    from django_leakguard.recorder_process import get_recorder, recording

    if task_id is None or task is None or not recording():
        return

    if len(_calls) >= _MAX_IN_FLIGHT:
        _calls.pop(next(iter(_calls)), None)
    # A task lasts far longer than a heap reading (a few µs): always read it.
    _calls[task_id] = get_recorder().begin(read_heap=True, kind=TASK)


def _task_postrun(task_id: str | None = None, task: Any = None, **kwargs: Any) -> None:
    call = _calls.pop(task_id, None) if task_id is not None else None
    if call is None or task is None:
        return
    from django_leakguard.recorder_process import get_recorder

    get_recorder().end(call, TASK, str(task.name), held=_returned(kwargs))


# The references a task's return value has in _task_postrun when nothing else keeps it (see
# _unkept_refs); None until first needed. Fewer once seen (a tracer other than Celery 5's):
# the value is never taken off in this process again, since a kept one could look unkept.
_unkept: int | None = None
_retval_refs_ok = True


def _returned(kwargs: dict[str, Any]) -> tuple[object, ...]:
    """The task's return value, if Celery frees it once task_postrun is done, else nothing.

    Celery's tracer still refers to the value when it sends task_postrun, and lets go of it
    right after (a worker sends back its repr): what only the value refers to is freed then,
    not kept by the task, like a response being closed. A value something else refers to (a
    module-level list the task appends it to) has more references and stays counted: only
    what nothing outside refers to is taken off (see dropped.dropped_parts).
    """
    global _unkept, _retval_refs_ok
    if not _retval_refs_ok or "retval" not in kwargs:
        return ()
    if _unkept is None:
        _unkept = _unkept_refs()
    refs = _references(kwargs)
    if refs < _unkept:
        _retval_refs_ok = False
        return ()
    return (kwargs["retval"],) if refs == _unkept else ()


def _references(kwargs: dict[str, Any]) -> int:
    return sys.getrefcount(kwargs["retval"]) - 1  # less getrefcount's own argument


def _unkept_refs() -> int:
    """The references a return value nothing else keeps has in _task_postrun, on this Python.

    How many the signal's dispatch holds differs between Python versions (4 to 7 in all): a
    private signal is sent as Celery's tracer sends task_postrun (trace_task holds the value
    in two locals, R and retval, and passes it by keyword), to a receiver of _task_postrun's
    shape, which counts them as _returned does.
    """
    counts: list[int] = []

    def receiver(task_id: str | None = None, task: Any = None, **kwargs: Any) -> None:
        counts.append(_references(kwargs))

    signal = Signal(name="django_leakguard.calibration")
    signal.connect(receiver, weak=False)
    _send_as_tracer(signal)
    return counts[0] if counts else -1


def _send_as_tracer(signal: Signal) -> object:
    # As celery.app.trace's trace_task: `R = retval = fun(...)`, then task_postrun's send().
    R = retval = [object()]
    signal.send(sender=None, task_id="", task=None, args=(), kwargs={}, retval=retval, state="")
    return R


def _connect_postrun_last(**kwargs: Any) -> None:
    """Move the task_postrun receiver after those connected at worker_init.

    Celery's Django fix-up connects its clean-up (closing database connections) to
    task_postrun when the worker starts: a task's measurement ends after that clean-up, so
    that what the task frees at teardown is not counted as kept.
    """
    uid = _uid("postrun")
    signals.task_postrun.disconnect(dispatch_uid=uid)
    signals.task_postrun.connect(_task_postrun, weak=False, dispatch_uid=uid)


def _flush(**kwargs: Any) -> None:
    from django_leakguard.recorder_process import flush_at_exit

    flush_at_exit()
