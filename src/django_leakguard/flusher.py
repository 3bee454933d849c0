"""Flushing off the request path: one thread per process, and a bounded flush at exit.

A request never waits on the database. Each process runs a flush thread that wakes at least
once a second and writes the recorder's measurements every FLUSH_INTERVAL seconds, idle or not,
through a database connection of its own. Calls watch it cheaply (a float comparison per call;
a look at most once a second):

- when the process id changed (a fork that ran no at-fork hook, as uWSGI's do unless
  py-call-osafterfork is set), or the thread died, a new one is started;
- when a write has hung for WRITE_STUCK_AFTER seconds (a database that accepts connections and
  never answers defeats server-side timeouts), the thread is left to its fate and a new one
  takes over, with a connection of its own; at most MAX_STUCK_THREADS are left hanging, after
  which the process stops writing and says so once;
- when threads do not run (uWSGI without enable-threads on releases that do not enable them
  by default, where app threads only run while a request runs Python code), calls flush
  inline once a flush is overdue, after the response has been sent.

At exit the last flush runs in a daemon thread that the exiting process waits for at most
EXIT_TIMEOUT seconds, database included; what could not be written is logged once, with its
counts.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from django_leakguard import conf
from django_leakguard.threads import OSThread, Wake, allocate_lock

if TYPE_CHECKING:
    from django_leakguard.recorder import Recorder

logger = logging.getLogger("django_leakguard")

# How long the exiting process waits for its last flush, in seconds, database included.
EXIT_TIMEOUT = 5.0
# A write that has not finished after this many seconds is considered hung.
WRITE_STUCK_AFTER = 30.0
# Hung threads left behind before the process stops writing.
MAX_STUCK_THREADS = 3
# The flush thread's longest sleep: its heartbeat, and how soon it sees a shorter interval.
TICK = 1.0
# Calls look at the flush thread at most once per this many seconds.
WATCH_EVERY = 1.0
# A flush thread that has not beaten for this long while calls run is taken not to run.
SILENT_AFTER = 5.0


def flush_interval() -> float:
    try:
        return conf.get_settings().FLUSH_INTERVAL
    except Exception:  # invalid settings (the checks report them): keep flushing, bounded
        return float(conf.DEFAULTS["FLUSH_INTERVAL"])


class Flusher:
    """The flush thread of one recorder in one process."""

    def __init__(self, recorder: Recorder) -> None:
        self._recorder = recorder
        self._lock = allocate_lock()
        self._thread: OSThread | None = None
        self._pid = 0
        self._generation = 0
        self._stuck = 0
        self._gave_up = False
        self._stopping = False
        self._wake = Wake()
        self.beat = 0.0  # monotonic time of the thread's latest heartbeat
        self.started = 0.0  # when the current thread was started
        self.writing_since: float | None = None  # when the running write began
        self.watch_at = 0.0  # the next time a call looks at the thread

    # Called by the recorder at the end of calls ---------------------------------------------

    def watch(self, now: float) -> None:
        """Keep a flush thread running in this process; flush inline when threads do not run."""
        self.watch_at = now + WATCH_EVERY
        if self._gave_up or self._stopping:
            return
        thread = self._thread
        if thread is None or self._pid != os.getpid() or not thread.is_alive():
            self.start()
            return
        writing_since = self.writing_since
        if writing_since is not None:
            # A thread in a write does not beat: silence is no sign that threads get no time,
            # and a call that flushed inline would hang on the same database.
            if now - writing_since > WRITE_STUCK_AFTER:
                self._abandon()
            return
        if now - max(self.beat, self.started) > SILENT_AFTER:
            # The thread exists but gets no time: flush here, after the response was sent.
            self._recorder.flush_if_due()

    def start(self) -> None:
        with self._lock:
            self._generation += 1
            generation = self._generation
            self._pid = os.getpid()
            self._wake = Wake()
            self.writing_since = None
            self.started = time.monotonic()
            thread = OSThread(self._run, "django-leakguard-flush", (generation, self._wake))
            self._thread = thread
        thread.start()

    def _abandon(self) -> None:
        self._stuck += 1
        if self._stuck > MAX_STUCK_THREADS:
            self._gave_up = True
            logger.error(
                "LeakGuard stopped writing memory measurements: %d writes to the database "
                "have hung for more than %.0f s each. Measurements stay in memory (bounded) "
                "and are lost when the process exits.",
                self._stuck,
                WRITE_STUCK_AFTER,
            )
            return
        logger.warning(
            "LeakGuard's write to the database has hung for more than %.0f s; a new flush "
            "thread with a connection of its own takes over.",
            WRITE_STUCK_AFTER,
        )
        self.start()

    # The thread ---------------------------------------------------------------------------

    def _run(self, generation: int, wake: Wake) -> None:
        _leave_stop_signals_to_other_threads()
        try:
            self._loop(generation, wake)
        finally:
            # The thread's own database connection: closed with it, not left to the collector.
            with contextlib.suppress(Exception):
                self._recorder.writer.close()

    def _loop(self, generation: int, wake: Wake) -> None:
        recorder = self._recorder
        while generation == self._generation and not self._stopping:
            now = time.monotonic()
            self.beat = now
            due_in = recorder.last_flush + flush_interval() - now
            if due_in > 0:
                wake.wait(min(due_in, TICK))
                continue
            self.writing_since = now
            try:
                recorder.flush(timeout=TICK)
            finally:
                if generation == self._generation:
                    self.writing_since = None

    # Exit -----------------------------------------------------------------------------------

    def stop(self, join: float = 0.0) -> None:
        """Stop the flush thread: it finishes the write it may be running.

        join: wait at most this many seconds for the thread to end. Only the process that
        started the thread touches it (in a forked child it did not come along, and its
        event's lock may have been held at the fork).
        """
        self._stopping = True
        thread = self._thread
        if thread is None or self._pid != os.getpid():
            return
        self._wake.set()
        if join and not thread.is_current():
            thread.join(join)


def run_bounded(function: Callable[[], bool], timeout: float) -> bool | None:
    """Run function in a daemon thread and wait at most timeout seconds for it.

    Return its result, or None when it did not finish in time (it goes on until the process
    ends). Where a thread cannot be started, run it here.
    """
    result: list[bool] = []

    def target() -> None:
        try:
            result.append(function())
        except Exception:  # pragma: no cover - the flushes passed here never raise
            logger.exception("LeakGuard's flush at exit failed")
            result.append(False)

    thread = OSThread(target, "django-leakguard-exit-flush")
    try:
        thread.start()
    except RuntimeError:  # interpreter shutting down: no new threads
        return function()
    thread.join(timeout)
    return result[0] if result else None


# Signals that stop a process, and that a server may handle in C, in whatever thread the kernel
# picks (uWSGI ends a worker with exit() from its SIGINT and SIGTERM handlers).
_STOP_SIGNALS = ("SIGINT", "SIGTERM", "SIGHUP", "SIGQUIT")


def _leave_stop_signals_to_other_threads() -> None:
    """Block the stop signals in the calling thread (the flush thread).

    A process's exit flush waits for a write the flush thread has begun: run on that thread's
    own stack by a C signal handler, it would wait for a write that can no longer finish. Python
    runs its own handlers in the main thread whichever thread a signal reaches, so blocking
    them here changes nothing else.
    """
    numbers = {getattr(signal, name) for name in _STOP_SIGNALS if hasattr(signal, name)}
    with contextlib.suppress(AttributeError, OSError, ValueError):  # no pthread_sigmask
        signal.pthread_sigmask(signal.SIG_BLOCK, numbers)
