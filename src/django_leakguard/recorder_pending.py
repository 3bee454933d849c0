"""The recorder's pending aggregates: per hour and (kind, key), bounded, taken by each flush."""

from __future__ import annotations

import logging

from django_leakguard import conf, threads
from django_leakguard.records import OTHER, VIEW_MAX_LENGTH, Aggregate, Batch, Pending, WorkerState

logger = logging.getLogger("django_leakguard")

# Hourly buckets kept in memory while the database is unreachable; older ones are dropped.
MAX_PENDING_HOURS = 24


class PendingAggregates:
    """Part of the Recorder: the aggregates not written yet, and this process's worker state."""

    _lock: threads.Lock
    _pending: Pending
    _keys: dict[int, int]  # hour -> keys other than OTHER in that bucket
    _worker: WorkerState
    _dropped_logged: bool

    def _new_bucket(self, hour: int) -> dict[tuple[str, str], Aggregate]:
        if len(self._pending) >= MAX_PENDING_HOURS:
            oldest = min(self._pending)
            del self._pending[oldest]
            self._keys.pop(oldest, None)
            if not self._dropped_logged:
                self._dropped_logged = True
                logger.warning(
                    "LeakGuard dropped memory measurements older than %d hours: the database "
                    "has been unreachable for that long.",
                    MAX_PENDING_HOURS,
                )
        bucket: dict[tuple[str, str], Aggregate] = {}
        self._pending[hour] = bucket
        self._keys[hour] = 0
        return bucket

    def _new_aggregate(
        self, bucket: dict[tuple[str, str], Aggregate], hour: int, kind: str, key: str, view: str
    ) -> Aggregate:
        if key != OTHER and self._keys[hour] >= _max_keys():
            key, view = OTHER, ""
            aggregate = bucket.get((kind, key))
            if aggregate is not None:
                return aggregate
        if key != OTHER:
            self._keys[hour] += 1
        aggregate = Aggregate(view[:VIEW_MAX_LENGTH])
        bucket[(kind, key)] = aggregate
        return aggregate

    def _take(self, wait: float = -1) -> Batch | None:
        """Take the pending aggregates (None: nothing to write).

        Raise TimeoutError when the lock was not free within wait seconds (-1: no limit).
        """
        if not self._lock.acquire(timeout=wait):
            raise TimeoutError
        try:
            worker = self._worker
            if not self._pending and not worker.calls:
                return None
            batch = Batch(pending=self._pending, worker=worker.copy())
            self._pending = {}
            self._keys = {}
            worker.calls = 0
            return batch
        finally:
            self._lock.release()

    def _give_back(self, batch: Batch) -> None:
        """Merge a batch that failed to write back into the pending aggregates."""
        with self._lock:
            for hour in sorted(batch.pending):
                for (kind, key), old in batch.pending[hour].items():
                    bucket = self._pending.get(hour)
                    if bucket is None:
                        bucket = self._new_bucket(hour)
                    aggregate = bucket.get((kind, key))
                    if aggregate is None:
                        aggregate = self._new_aggregate(bucket, hour, kind, key, old.view)
                    aggregate.merge(old)
            self._worker.calls += batch.worker.calls

    def pending(self) -> Pending:
        """Return a copy of the aggregates not written yet."""
        with self._lock:
            copy: Pending = {}
            for hour, bucket in self._pending.items():
                copy[hour] = {}
                for name, aggregate in bucket.items():
                    copy[hour][name] = aggregate.copy()
            return copy

    @property
    def worker(self) -> WorkerState:
        """A copy of this process's worker state."""
        with self._lock:
            return self._worker.copy()

    def totals(self) -> dict[tuple[str, str], Aggregate]:
        """Return the aggregates not written yet per (kind, key), all hours merged."""
        merged: dict[tuple[str, str], Aggregate] = {}
        for bucket in self.pending().values():
            for name, aggregate in bucket.items():
                merged.setdefault(name, Aggregate(aggregate.view)).merge(aggregate)
        return merged


def describe_pending(*pendings: Pending) -> str:
    """Count the calls and keys of pending aggregates, for a log line."""
    buckets = [bucket for pending in pendings for bucket in pending.values()]
    calls = sum(aggregate.calls for bucket in buckets for aggregate in bucket.values())
    keys = len({name for bucket in buckets for name in bucket})
    return f"{calls:,} call{'s' if calls != 1 else ''} of {keys:,} key{'s' if keys != 1 else ''}"


def describe_batch(batch: Batch) -> str:
    return describe_pending(batch.pending)


def _max_keys() -> int:
    try:
        return conf.get_settings().MAX_KEYS
    except Exception:  # invalid settings (the checks report them): keep recording, bounded
        return int(conf.DEFAULTS["MAX_KEYS"])
