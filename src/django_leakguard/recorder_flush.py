"""The recorder's flushes: when one is due, taking and writing a batch, pruning, the exit flush."""

from __future__ import annotations

import contextlib
import itertools
import logging
import time
from collections import deque
from typing import TYPE_CHECKING

from django_leakguard import conf, threads
from django_leakguard.flusher import EXIT_TIMEOUT, Flusher, run_bounded
from django_leakguard.recorder_pending import PendingAggregates, describe_batch, describe_pending
from django_leakguard.records import Batch, Pending, Writer

if TYPE_CHECKING:
    from django_leakguard.recorder_calls import Call

logger = logging.getLogger("django_leakguard")

# A process prunes old rows at its first flush, then at most once per this many seconds.
PRUNE_EVERY = 24 * 3600.0
# A flush at process exit waits at most this many seconds for the recorder's locks: a call cut
# off while it held one (uWSGI ends a worker from a C signal handler, which can interrupt the
# main thread anywhere) would otherwise hang the worker's exit for good.
EXIT_LOCK_TIMEOUT = 5.0
# How long a lock may stay taken, at an exit that cut this thread off inside the recorder,
# before it is taken for the cut-off code's (see Flushing.release_cut_off_locks).
CUT_OFF_WAIT = 0.2
# Recording errors are logged at most once per this many seconds.
ERROR_LOG_INTERVAL = 60.0


class RateLimitedLog:
    """Log an exception at most once per interval, counting the ones left out."""

    def __init__(self, interval: float = ERROR_LOG_INTERVAL) -> None:
        self.interval = interval
        self.next_at = 0.0
        self.suppressed = 0

    def exception(self, message: str) -> None:
        now = time.monotonic()
        if now < self.next_at:
            self.suppressed += 1
            return
        suffix = f" ({self.suppressed} similar errors not logged)" if self.suppressed else ""
        self.suppressed = 0
        self.next_at = now + self.interval
        logger.exception("%s%s", message, suffix)


class Flushing(PendingAggregates):
    """Part of the Recorder: flush policy, writes that fail and are retried, the exit flush."""

    # Where flushes write (storage.DatabaseWriter unless a test hands another).
    _writer: Writer | None
    _flusher: Flusher
    _flush_lock: threads.Lock
    _flushes: int  # incremented when a flush starts and when it ends: odd while one runs
    _last_flush: float
    _next_prune: float
    _failing: bool
    _errors: RateLimitedLog
    _write_tokens: itertools.count[int]  # batches being written, by a token of their own
    _writing: dict[int, Batch]
    _reported: set[int]  # tokens of the writes already counted as lost
    _abandoned: bool  # what is pending was logged as lost by abandon_at_exit()
    _late: deque[tuple[Call, str, str, str]]  # calls ended without the lock (end_later)
    # Calls answered and awaiting their teardown, by id (see Recorder.awaiting_close).
    _closing: dict[int, tuple[Call, str, str, str]]

    def _end_late(self) -> None:  # pragma: no cover - the Recorder's
        raise NotImplementedError

    @property
    def writer(self) -> Writer:
        if self._writer is None:
            from django_leakguard import storage  # needs the app registry: not at import time

            self._writer = storage.DatabaseWriter()
        return self._writer

    def flush_due(self) -> bool:
        """Return whether FLUSH_INTERVAL has elapsed since the last flush; never raises."""
        try:
            return time.monotonic() - self._last_flush >= conf.get_settings().FLUSH_INTERVAL
        except Exception:
            return False

    def flush_if_due(self) -> None:
        """Flush when FLUSH_INTERVAL has elapsed; never raises (the inline fallback)."""
        try:
            if not self.flush_due() or self.writer.in_transaction():
                return  # never write inside someone's transaction: retry later
            self._flush_now(0.0)  # another thread taking a batch: skip, a later call retries
        except Exception:
            self._errors.exception("LeakGuard could not flush")

    @property
    def last_flush(self) -> float:
        """When the latest flush began (monotonic time)."""
        return self._last_flush

    def flush(self, *, timeout: float | None = None, exiting: bool = False) -> bool:
        """Write pending aggregates now; return False when they could not be written.

        timeout: wait at most this many seconds for another flush, or a call being recorded,
        to let go of the recorder (None: as long as it takes); the exit hooks pass one.
        exiting: a failure is logged as a loss, with its counts.
        """
        try:
            return self._flush_now(-1 if timeout is None else timeout, exiting=exiting)
        except Exception:
            self._errors.exception("LeakGuard could not flush")
            return False

    def flush_at_exit(self, timeout: float = EXIT_TIMEOUT) -> bool:
        """Stop the flush thread and write what is pending, in at most timeout seconds.

        A write the flush thread has begun is waited for within the same bound. Whatever is
        not stored when this returns (pending, or in a write that failed or has not finished)
        is logged once as lost, with its counts; a second call does not count it again.
        """
        if self._abandoned:
            return False
        self._flusher.stop()
        deadline = time.monotonic() + timeout
        # A call answered but not yet torn down (a uWSGI worker told to stop while it closes a
        # response exits from a signal handler): the client has its answer, so it is recorded,
        # as a late call (its memory is read now, its heap reading does not count).
        closing = self._closing
        for ident in list(closing):
            entry = closing.pop(ident, None)
            if entry is not None:
                self._late.append(entry)

        def last_flush() -> bool:
            try:
                done = self.flush(timeout=min(EXIT_LOCK_TIMEOUT, timeout), exiting=True)
            finally:
                with contextlib.suppress(Exception):
                    self.writer.close()  # this thread's connection, opened for the flush
            while self._unreported_writes() and time.monotonic() < deadline:
                time.sleep(0.01)
            return done

        done = run_bounded(last_flush, timeout)
        lost = self._lost_at_exit()
        if done is None:
            _log_lost_at_exit(f"within {timeout:.0f} s at exit", lost)
            return False
        if any(bucket for pending in lost for bucket in pending.values()):
            _log_lost_at_exit("at exit", lost)
            return False
        return bool(done)

    def _unreported_writes(self) -> list[Batch]:
        return [
            batch for token, batch in list(self._writing.items()) if token not in self._reported
        ]

    def _lost_at_exit(self) -> list[Pending]:
        """Take what is pending and the writes not finished, once: they are lost."""
        lost = [batch.pending for batch in self._unreported_writes()]
        self._reported.update(self._writing)
        try:
            batch = self._take(EXIT_LOCK_TIMEOUT / 10)
        except TimeoutError:
            # A lock held for good (a call cut off by the exit while it held it): count what
            # is pending without it, and leave it (a flush that gets the lock writes it).
            lost.append(self._pending)
        else:
            if batch is not None:
                lost.append(batch.pending)
        return lost

    def release_cut_off_locks(self) -> None:
        """Replace the locks that a call or flush cut off by the exit holds for good.

        For an exit on top of this thread's own recorder code (uWSGI's C handler calls exit()
        wherever the thread is, see uwsgi._flush_at_c_exit): a lock that stays taken for
        CUT_OFF_WAIT seconds is the cut-off code's, which never resumes, so the exit flush
        writes with a new one rather than lose what is pending. At most the cut-off call is
        half added.
        """
        for name in ("_lock", "_flush_lock"):
            lock: threads.Lock = getattr(self, name)
            if lock.acquire(timeout=CUT_OFF_WAIT):
                lock.release()
            else:
                setattr(self, name, threads.allocate_lock())

    def abandon_at_exit(self, why: str) -> None:
        """Log what is pending as lost, once, writing and freeing nothing (the exit cut off
        something that makes any more work unsafe: see uwsgi._flush_at_c_exit)."""
        if self._abandoned:
            return
        self._abandoned = True
        # Counted without the lock: taking it, or waiting for a write, is what is unsafe.
        lost = [batch.pending for batch in self._unreported_writes()]
        lost.append(self._pending)
        _log_lost_at_exit(f"at exit ({why})", lost)

    def _busy_at_flush(self, timeout: float | None) -> None:
        logger.warning(
            "LeakGuard could not flush: the recorder stayed busy for %s s (a call or a flush "
            "cut off while it held a lock?); its measurements are not written, and are lost "
            "if the process is exiting.",
            timeout,
        )

    def _flush_now(self, wait: float = -1, *, exiting: bool = False) -> bool:
        """Take the pending batch and write it.

        Only the taking is serialised (wait: at most this many seconds, -1 for no limit), not
        the write: a write that hangs must not keep the next flush thread from writing.
        """
        if not _app_installed():
            # No tables to write to (leakguard.E002): drop the batch rather than grow.
            self._last_flush = time.monotonic()
            with contextlib.suppress(TimeoutError):
                self._take(wait)
            return False
        writer = self.writer
        if not self._flush_lock.acquire(timeout=wait):
            if wait:
                self._busy_at_flush(wait)
            return False
        try:
            self._last_flush = time.monotonic()
            if self._late:
                self._end_late()  # so that a process's last calls are not left behind
            batch = self._take(wait)
        except TimeoutError:
            if wait:
                self._busy_at_flush(wait)
            return False
        finally:
            self._flush_lock.release()
        if batch is None:
            return True
        return self._write(writer, batch, exiting=exiting)

    def _write(self, writer: Writer, batch: Batch, *, exiting: bool) -> bool:
        now = time.monotonic()
        batch.prune = now >= self._next_prune
        self._flushes += 1  # calls in flight now are not charged with the write's memory
        token = next(self._write_tokens)
        self._writing[token] = batch  # until it is written or given back (see flush_at_exit)
        try:
            writer.write(batch)
        except Exception as exc:
            if exiting:
                # Not given back: nothing would write it again. Lost, and said so here.
                self._reported.add(token)
                logger.warning(
                    "LeakGuard could not write memory measurements to the database %s at exit "
                    "(%s: %s): %s lost.",
                    _database_name(),
                    type(exc).__name__,
                    one_line(exc),
                    describe_batch(batch),
                )
            else:
                self._give_back(batch)
            if not exiting and not self._failing:
                self._failing = True
                logger.warning(
                    "LeakGuard could not write memory measurements to the database %s "
                    "(%s: %s); keeping them in memory and retrying every flush.",
                    _database_name(),
                    type(exc).__name__,
                    one_line(exc),
                )
            with contextlib.suppress(Exception):
                writer.discard_broken_connection()
            return False
        finally:
            del self._writing[token]
            self._flushes += 1
        if batch.prune:
            # Separate from the write: a failed prune must not give back a written batch.
            self._next_prune = now + PRUNE_EVERY
            try:
                writer.prune()
            except Exception:
                self._errors.exception("LeakGuard could not delete old rows")
        if self._failing:
            self._failing = False
            self._dropped_logged = False
            logger.info("LeakGuard wrote its pending memory measurements again.")
        return True


def one_line(exc: BaseException) -> str:
    """An exception's message on one line (database drivers' span several)."""
    return " ".join(str(exc).split())


def _log_lost_at_exit(when: str, lost: list[Pending]) -> None:
    try:
        described = describe_pending(*lost)
    except RuntimeError:  # counted without the lock: a dict that changed size meanwhile
        described = "an unknown number of calls"
    logger.warning(
        "LeakGuard could not write memory measurements to the database %s %s: %s lost.",
        _database_name(),
        when,
        described,
    )


def _database_name() -> str:
    try:
        return repr(conf.get_settings().DATABASE)
    except Exception:
        return "(LEAKGUARD is invalid)"


_said_app_missing = False


def _app_installed() -> bool:
    """Return whether django_leakguard is in INSTALLED_APPS; log once per process if not."""
    global _said_app_missing
    from django.apps import apps

    if apps.is_installed("django_leakguard"):
        return True
    if not _said_app_missing:
        _said_app_missing = True
        logger.warning(
            "django-leakguard: 'django_leakguard' is not in INSTALLED_APPS, so measurements "
            "are dropped instead of written. Add it to INSTALLED_APPS and run `%s`.",
            conf.migrate_command(conf.get_settings().DATABASE),
        )
    return False
