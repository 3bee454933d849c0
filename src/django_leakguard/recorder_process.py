"""This process's recorder: get_recorder(), recording(), suspended(), the exit flush, forks."""

from __future__ import annotations

import atexit
import contextlib
import os
from collections.abc import Iterator
from typing import Any

from django.test.signals import setting_changed

from django_leakguard import conf, threads
from django_leakguard.flusher import EXIT_TIMEOUT
from django_leakguard.recorder import Recorder
from django_leakguard.recorder_calls import Call

_recorder: Recorder | None = None
_recorder_lock = threads.allocate_lock()


def recording() -> bool:
    """Return LEAKGUARD["RECORD"]; False when the setting is invalid (the checks report it)."""
    try:
        return conf.get_settings().RECORD
    except Exception:  # a bad setting never fails a request or a task
        return False


def get_recorder() -> Recorder:
    """Return this process's recorder (a forked child starts with an empty one)."""
    recorder = _recorder
    if recorder is None:
        recorder = _create()
    return recorder


def _create() -> Recorder:
    global _recorder
    with _recorder_lock:
        if _recorder is None:
            _recorder = Recorder()
            atexit.register(flush_at_exit)
        return _recorder


def flush_at_exit(timeout: float = EXIT_TIMEOUT, *, cut_off_inside: bool = False) -> bool:
    """Flush as the process exits, so that a recycled worker loses nothing.

    Registered with atexit, and called by the Gunicorn, uWSGI and Celery exit hooks. The whole
    flush, database included, takes at most timeout seconds: it never hangs an exit. What could
    not be written is logged once, with its counts. cut_off_inside: the exit runs on top of this
    thread's own recorder code, which never resumes (see Recorder.release_cut_off_locks).
    """
    recorder = _recorder
    if recorder is None:
        return True
    if cut_off_inside:
        recorder.release_cut_off_locks()
    return recorder.flush_at_exit(timeout)


def abandon_at_exit(why: str) -> None:
    """Log what this process has not written as lost, writing nothing (see
    Recorder.abandon_at_exit)."""
    recorder = _recorder
    if recorder is not None:
        recorder.abandon_at_exit(why)


class _SuspendedRecorder(Recorder):
    """Records nothing: what get_recorder() returns inside suspended()."""

    def begin(self, *, read_heap: bool | None = None, kind: str | None = None) -> Call:
        return Call(-1, 0.0, None)

    def end(
        self,
        call: Call,
        kind: str,
        key: str,
        view: str = "",
        held: tuple[object, ...] = (),
        server_heap: int = 0,
    ) -> None:
        return None

    def awaiting_close(self, call: Call, kind: str, key: str, view: str = "") -> None:
        return None

    def end_later(self, call: Call, kind: str, key: str, view: str = "") -> None:
        return None

    def flush_at_exit(self, timeout: float = EXIT_TIMEOUT) -> bool:
        return True

    def abandon_at_exit(self, why: str) -> None:
        return None

    def release_cut_off_locks(self) -> None:
        return None

    def flush_due(self) -> bool:
        return False

    def flush_if_due(self) -> None:
        return None

    def flush(self, *, timeout: float | None = None, exiting: bool = False) -> bool:
        return True


@contextlib.contextmanager
def suspended() -> Iterator[None]:
    """Record nothing in this process while the block runs (leakhunt's replayed requests).

    The process's recorder is swapped for one that ignores every call, so the request path
    pays nothing for it; what the real recorder holds is kept and flushed as usual.
    """
    global _recorder
    real = get_recorder()
    with _recorder_lock:
        _recorder = _SuspendedRecorder()
    try:
        yield
    finally:
        with _recorder_lock:
            _recorder = real


def _settings_changed(setting: str = "", **kwargs: Any) -> None:
    recorder = _recorder
    if setting == conf.SETTING_NAME and recorder is not None:
        recorder.settings_changed()


setting_changed.connect(_settings_changed, dispatch_uid="django_leakguard.recorder.settings")


def _after_fork_in_child() -> None:
    global _recorder_lock
    _recorder_lock = threads.allocate_lock()
    if _recorder is not None:
        _recorder._reset()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
