"""uWSGI integration: flush the recorder when a worker exits; what a call's end takes off.

uWSGI calls uwsgi.atexit in a worker that exits, unless the worker is inside a request when it
is told to stop (a SIGINT or SIGTERM from the master at a stop, or from an operator): then its
Python plugin skips uwsgi.atexit and the interpreter's own exit alike (python_plugin.c,
uwsgi_python_atexit: "if busy do not run atexit hooks"), and what the worker served since its
last flush was lost without a word. So the flush is also registered with the C library's exit
handlers, which exit() runs whatever uWSGI decides.

The order matters: exit() runs those handlers in the reverse order of their registration, and
uWSGI registers its own (which finalizes the interpreter) once the application is loaded
(core/uwsgi.c: "after all applications have been loaded"). Ours is registered at each worker's
first request, so that it runs before uWSGI's, while Python is alive; run after it, it would
crash the exiting process. The flushes that follow ours find nothing to write.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import importlib
import logging
import os
import signal
import sys
from collections.abc import Callable
from types import FrameType, ModuleType

from django_leakguard import memory

__all__ = ["install", "running_under_uwsgi"]

_MARK = "_leakguard_atexit"
# The largest chunk glibc's allocator serves from its heap rather than mmap() by default.
_MMAP_THRESHOLD = 128 * 1024
# sizeof(struct uwsgi_buffer) (uwsgi.h: a pointer and three size_t).
_UWSGI_BUFFER_STRUCT = 32
logger = logging.getLogger("django_leakguard")

# The C callback registered with the C library's exit handlers, kept alive for the life of the
# process, and the process that registered it (a worker forked from the master has not).
_c_exit_hook: Callable[[object], None] | None = None
_c_exit_pid = 0


def _uwsgi_module() -> ModuleType | None:
    # The uwsgi module exists only inside a uWSGI process: import it lazily, never at import.
    try:
        return importlib.import_module("uwsgi")
    except ImportError:
        return None


def running_under_uwsgi() -> bool:
    """Return whether this process is a uWSGI process."""
    return _uwsgi_module() is not None


def flush_at_exit(*, cut_off_inside: bool = False) -> None:
    """Write this worker's pending measurements (uWSGI calls it as the worker exits)."""
    from django_leakguard import recorder_process

    recorder_process.flush_at_exit(cut_off_inside=cut_off_inside)


def _flush_at_c_exit(_argument: object = None) -> None:
    # Called from C: an exception must not escape (ctypes would print it and carry on).
    with contextlib.suppress(BaseException):
        # The Python code exit() cut off in this thread, if any, is below this frame.
        cut_off = sys._getframe().f_back
        if _cut_off_a_collection(cut_off):
            from django_leakguard import recorder_process

            recorder_process.abandon_at_exit("the worker was stopped during a garbage collection")
            return
        flush_at_exit(cut_off_inside=_cut_off_inside_the_recorder(cut_off))


def _cut_off_a_collection(cut_off: FrameType | None) -> bool:
    """Return whether exit() was called while this thread was in Python's garbage collector.

    uWSGI's handlers of the stop signals call exit() in the thread they reach, on top of whatever
    it was doing. Inside a collection, the collector's lists are half-rewritten: a flush there,
    which frees objects or lets another thread run, crashed the worker (about one stop in four
    of a worker busy collecting). Only a thread that was running Python (cut_off, the frame
    below the C exit handler's) can have been collecting; then a collection of the youngest
    generation, which Python refuses during another, tells.
    """
    if cut_off is None:
        return False  # exit() from uWSGI's own loop, outside Python
    before: int = gc.get_stats()[0]["collections"]
    gc.collect(0)
    return bool(gc.get_stats()[0]["collections"] == before)


def _cut_off_inside_the_recorder(cut_off: FrameType | None) -> bool:
    """Return whether exit() was called while this thread ran the recorder's code (which may
    hold its locks, for good: the flush at exit then replaces them); cut_off is the frame it
    cut off."""
    frame = cut_off
    while frame is not None:
        if frame.f_globals.get("__name__", "").startswith("django_leakguard.recorder"):
            return True
        frame = frame.f_back
    return False


def register_c_atexit() -> bool:
    """In a uWSGI worker, register the exit flush with the C library, once per process.

    Return whether this process has it. Called at a worker's first request (see the module's
    docstring for why not earlier); glibc's atexit() is a static stub around
    __cxa_atexit(function, argument, NULL), which is what is called here.
    """
    global _c_exit_hook, _c_exit_pid
    pid = os.getpid()
    if _c_exit_pid == pid:
        return _c_exit_hook is not None
    _c_exit_pid = pid
    uwsgi = _uwsgi_module()
    worker_id = getattr(uwsgi, "worker_id", None)
    if worker_id is None or not worker_id():
        return False  # not a uWSGI worker (the master serves no request; a stand-in in tests)
    try:
        hook = _c_exit_hook or ctypes.CFUNCTYPE(None, ctypes.c_void_p)(_flush_at_c_exit)
        if ctypes.CDLL(None).__cxa_atexit(hook, None, None) != 0:
            raise OSError("__cxa_atexit() refused the handler")
    except (OSError, AttributeError) as exc:  # no such C library here (not glibc or musl)
        logger.warning(
            "django-leakguard: cannot register the uWSGI exit flush with the C library (%s): a "
            "worker stopped during a request loses what it has not flushed yet.",
            exc,
        )
        return False
    _c_exit_hook = hook
    return True


def _register_at_first_request(**kwargs: object) -> None:
    if _c_exit_pid != os.getpid():
        with contextlib.suppress(Exception):  # never in the way of a request
            register_c_atexit()


def server_heap(page_size: int | None = None) -> int:
    """Return the C heap uWSGI holds for a request at its response's close(): the buffer it
    makes for the response's headers when the application calls start_response (a page,
    core/writer.c, uwsgi_buffer_new(uwsgi.page_size)) and frees once the response is closed
    (core/utils.c, uwsgi_close_request): each call ended at the close counted 4,160 bytes kept.

    In glibc's chunks: the page's, and the 32-byte struct uwsgi_buffer's (48 bytes); 0 where
    a page is too large to come from the heap (it is then mapped apart, but counted as well:
    nothing is taken off rather than a guess). Response headers longer than a page grow the
    buffer: the rest stays counted.
    """
    from django_leakguard.recorder_heap import chunk_size

    size = os.sysconf("SC_PAGE_SIZE") if page_size is None else page_size
    chunk = chunk_size(size)
    return chunk + chunk_size(_UWSGI_BUFFER_STRUCT) if chunk < _MMAP_THRESHOLD else 0


def install() -> bool:
    """Make uWSGI flush the recorder at worker exit: uwsgi.atexit (chaining an existing one),
    and the C library's atexit() for a worker stopped during a request. And take uWSGI's
    buffer for each response's headers off its call's figures (see server_heap).

    Return whether it is installed: False outside uWSGI. Calling it again changes nothing.
    """
    uwsgi = _uwsgi_module()
    if uwsgi is None:
        return False
    from django.core.signals import request_started

    from django_leakguard import middleware

    middleware.server_heap = server_heap()
    # uWSGI's workers exit() from their SIGINT and SIGTERM handlers (core/uwsgi.c, end_me): one
    # that came during a heap reading hung the worker (see memory.hold_signals_in_heap_readings).
    memory.hold_signals_in_heap_readings((signal.SIGINT, signal.SIGTERM))

    request_started.connect(
        _register_at_first_request, dispatch_uid="django_leakguard.uwsgi.register_c_atexit"
    )
    previous: Callable[[], object] | None = getattr(uwsgi, "atexit", None)
    if previous is not None and getattr(previous, _MARK, False):
        return True

    def atexit() -> None:
        # uWSGI's Python plugin calls uwsgi.atexit in each worker as it shuts down (after
        # max-requests, reload-on-rss, a reload or a stop). The recorder's Python atexit
        # handler usually runs as well; a second flush finds nothing left to write.
        try:
            flush_at_exit()
        finally:
            if previous is not None:
                previous()

    setattr(atexit, _MARK, True)
    setattr(uwsgi, "atexit", atexit)  # noqa: B010  (a module attribute uWSGI reads)
    return True
