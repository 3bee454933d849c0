"""Operating-system threads and locks, also where gevent or eventlet patched `threading`.

Under Gunicorn's gevent and eventlet workers (or any project that monkey-patches), a
`threading.Thread` is a greenlet: a flush that waits on the database would then hold up every
request the worker serves, unless the database driver cooperates. The flush thread runs on a
real thread instead, and the locks it shares with the calls are real locks: the calls hold them
for microseconds, never across a wait, so a greenlet that waits for one does not hold up the
others for longer than that.

Without monkey-patching, these are the standard library's own threads and locks.
"""

from __future__ import annotations

import _thread
import contextlib
import sys
import threading
from collections.abc import Callable
from typing import Any

# gevent's and eventlet's saved originals are the standard library's own lock type.
Lock = _thread.LockType


def _patched() -> tuple[Callable[..., Any], Callable[[], Any], Callable[[], int]] | None:
    """(start_new_thread, allocate_lock, get_ident) as they were before gevent or eventlet
    patched them, or None when nothing is patched."""
    gevent_monkey = sys.modules.get("gevent.monkey")
    if gevent_monkey is not None:
        try:
            if gevent_monkey.is_module_patched("threading"):
                return (
                    gevent_monkey.get_original("_thread", "start_new_thread"),
                    gevent_monkey.get_original("_thread", "allocate_lock"),
                    gevent_monkey.get_original("_thread", "get_ident"),
                )
        except Exception:  # pragma: no cover - an older or broken gevent: fall through
            pass
    patcher = sys.modules.get("eventlet.patcher")
    if patcher is not None:
        try:
            if patcher.is_monkey_patched("thread"):
                original = patcher.original("_thread")
                return original.start_new_thread, original.allocate_lock, original.get_ident
        except Exception:  # pragma: no cover - an older or broken eventlet: fall through
            pass
    return None


def patched() -> bool:
    """Whether gevent or eventlet has replaced threads with greenlets in this process."""
    return _patched() is not None


def allocate_lock() -> Lock:
    """A lock that blocks the operating-system thread, not only a greenlet."""
    originals = _patched()
    lock: Lock = originals[1]() if originals is not None else _thread.allocate_lock()
    return lock


class Wake:
    """A flag a thread waits on with a timeout (threading.Event, on a real lock)."""

    def __init__(self) -> None:
        self._lock = allocate_lock()
        self._lock.acquire()

    def set(self) -> None:
        if self._lock.locked():
            # RuntimeError: set twice at the same moment, and the other one released it.
            with contextlib.suppress(RuntimeError):
                self._lock.release()

    def is_set(self) -> bool:
        return not self._lock.locked()

    def wait(self, timeout: float) -> bool:
        """Wait at most timeout seconds for set(); return whether it was set."""
        if self._lock.acquire(timeout=max(timeout, 0.0)):
            self._lock.release()  # stays set, as an Event does
            return True
        return False


class OSThread:
    """A daemon thread on the operating system's own threads, with Thread's few methods we use.

    Under gevent or eventlet it is started with their saved original `start_new_thread`;
    otherwise it is a plain `threading.Thread`.
    """

    def __init__(self, target: Callable[..., object], name: str, args: tuple[Any, ...] = ()):
        self.name = name
        self._target = target
        self._args = args
        originals = _patched()
        self._start_new = originals[0] if originals is not None else None
        self._get_ident = originals[2] if originals is not None else _thread.get_ident
        self._thread: threading.Thread | None = None
        self._done: Lock | None = None
        self.ident: int | None = None

    def start(self) -> None:
        if self._start_new is None:
            self._thread = threading.Thread(
                target=self._target, args=self._args, name=self.name, daemon=True
            )
            self._thread.start()
            self.ident = self._thread.ident
            return
        done = allocate_lock()
        done.acquire()
        self._done = done
        self.ident = self._start_new(self._bootstrap, (done,))

    def _bootstrap(self, done: Lock) -> None:
        try:
            self._target(*self._args)
        finally:
            done.release()

    def is_alive(self) -> bool:
        if self._thread is not None:
            return self._thread.is_alive()
        return self._done is not None and self._done.locked()

    def join(self, timeout: float | None = None) -> None:
        if self._thread is not None:
            self._thread.join(timeout)
            return
        done = self._done
        if done is not None and done.acquire(timeout=-1 if timeout is None else timeout):
            done.release()

    def is_current(self) -> bool:
        """Whether the caller runs on this thread."""
        if self._thread is not None:
            return self._thread is threading.current_thread()
        return self.ident is not None and self.ident == self._get_ident()
