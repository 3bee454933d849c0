"""Sampled allocation tracing: what one request or task allocated and kept, and where."""

from __future__ import annotations

import functools
import gc
import linecache
import os
import random
import sys
import sysconfig
import threading
import tracemalloc
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "TRACE_FRAMES",
    "Site",
    "Trace",
    "TraceResult",
    "TraceTotals",
    "merge_sites",
    "should_sample",
    "site_statistics",
    "start_trace",
]

# Frames kept per allocation: enough to step out of the standard library and Django into the
# caller's code, few enough to keep tracing's overhead low.
TRACE_FRAMES = 5

# Longest source line kept with a site: enough to recognise it, bounded for storage.
MAX_LINE_LENGTH = 200

_OWN_DIR = os.path.dirname(os.path.abspath(__file__)) + os.sep


def _library_dirs() -> tuple[str, ...]:
    paths = sysconfig.get_paths()
    dirs = {
        paths[name] for name in ("stdlib", "platstdlib", "purelib", "platlib") if name in paths
    }
    return tuple(sorted(os.path.join(os.path.abspath(d), "") for d in dirs))


_LIBRARY_DIRS = _library_dirs()

# Where the measured code is entered: the request passes through these frames, so the walk
# from an allocation outwards stops there (what lies further out is the server, or leakhunt).
_BOUNDARY_FILES = frozenset(_OWN_DIR + name for name in ("middleware.py", "replay.py"))

# Taking snapshots and grouping their traces allocates too: not the call's.
_TRACEMALLOC_FILE = tracemalloc.__file__


def is_user_file(filename: str) -> bool:
    """Return whether filename is the application's code: not Python's, a library's, or ours."""
    if filename.startswith(("<", _OWN_DIR)):
        return False
    return not filename.startswith(_LIBRARY_DIRS)


def short_filename(filename: str) -> str:
    """Return filename relative to the longest sys.path entry holding it (as imports name it)."""
    # Called for every frame of every site at every traced call: memoised (bounded), keyed
    # by sys.path and the working directory ("" in sys.path) so that changing them is seen.
    return _short_filename(filename, tuple(sys.path), os.getcwd())


@functools.lru_cache(maxsize=4096)
def _short_filename(filename: str, path: tuple[str, ...], cwd: str) -> str:
    best = ""
    for entry in path:
        base = os.path.join(os.path.abspath(os.path.join(cwd, entry)), "")
        if filename.startswith(base) and len(base) > len(best):
            best = base
    return filename[len(best) :] if best else filename


def source_line(filename: str, lineno: int) -> str:
    """Return the stripped source line, bounded, or "" when the source is not available."""
    return linecache.getline(filename, lineno).strip()[:MAX_LINE_LENGTH]


def site_frame(traceback: Sequence[tracemalloc.Frame]) -> tracemalloc.Frame | None:
    """Return the frame to blame for an allocation, or None when it was made for us.

    The innermost frame in the application's code wins over the standard library's and
    libraries' frames (json.loads called from a view blames the view); without one, the
    innermost frame. Allocations made by django-leakguard, or by code it called (the ORM
    writing our rows), are the measuring's, not the call's.
    """
    innermost = traceback[-1]  # tracemalloc orders frames oldest first
    if innermost.filename.startswith(_OWN_DIR):
        return None
    for frame in reversed(traceback):
        filename = frame.filename
        if filename == _TRACEMALLOC_FILE:
            return None
        if filename.startswith(_OWN_DIR):
            if filename in _BOUNDARY_FILES:
                break
            return None
        if is_user_file(filename):
            return frame
    return innermost


@dataclass(frozen=True)
class Site:
    """An allocation site and the bytes allocated there that were still alive."""

    filename: str  # relative to its sys.path entry, e.g. "shop/views.py"
    lineno: int
    line: str  # the source line, stripped; "" when unavailable
    size: int  # bytes retained
    count: int  # memory blocks retained
    frames: tuple[str, ...] = ()  # "file:line", innermost first, of the largest traceback

    @property
    def location(self) -> str:
        return f"{self.filename}:{self.lineno}"

    def as_dict(self) -> dict[str, Any]:
        """Return a JSON-serialisable dict (for storage)."""
        return {
            "filename": self.filename,
            "lineno": self.lineno,
            "line": self.line,
            "size": self.size,
            "count": self.count,
            "frames": list(self.frames),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Site:
        """Return the Site stored by as_dict(); raise ValueError when data is not one."""
        try:
            filename, lineno, line = data["filename"], data["lineno"], data.get("line", "")
            size, count, frames = data["size"], data["count"], data.get("frames", [])
        except (KeyError, TypeError, AttributeError) as exc:
            raise ValueError(f"not an allocation site: {data!r}") from exc
        ints_ok = all(
            isinstance(value, int) and not isinstance(value, bool)
            for value in (lineno, size, count)
        )
        strings_ok = isinstance(filename, str) and isinstance(line, str)
        frames_ok = isinstance(frames, list) and all(isinstance(f, str) for f in frames)
        if not (ints_ok and strings_ok and frames_ok):
            raise ValueError(f"not an allocation site: {data!r}")
        return cls(filename, lineno, line, size, count, tuple(frames))


def _sort_key(site: Site) -> tuple[int, str, int]:
    return (-site.size, site.filename, site.lineno)


def merge_sites(first: Iterable[Site], second: Iterable[Site], top_n: int) -> tuple[Site, ...]:
    """Return the top_n largest sites of both, adding up sizes and counts of the same line."""
    merged: dict[tuple[str, int], Site] = {}
    for site in (*first, *second):
        key = (site.filename, site.lineno)
        seen = merged.get(key)
        if seen is None:
            merged[key] = site
            continue
        # Keep the line and frames of the larger contribution: the most typical path.
        main = seen if seen.size >= site.size else site
        merged[key] = Site(
            main.filename,
            main.lineno,
            main.line or seen.line or site.line,
            seen.size + site.size,
            seen.count + site.count,
            main.frames,
        )
    return tuple(sorted(merged.values(), key=_sort_key)[: max(top_n, 0)])


def site_statistics(
    snapshot: tracemalloc.Snapshot, top_n: int | None = None
) -> tuple[int, int, tuple[Site, ...]]:
    """Return (bytes, blocks, sites largest first) of the snapshot's traces, by site_frame().

    Allocations made for django-leakguard are left out of all three.
    """
    sizes: dict[tuple[str, int], list[int]] = {}
    largest: dict[tuple[str, int], tracemalloc.Statistic] = {}
    total_size = total_count = 0
    for stat in snapshot.statistics("traceback"):
        frame = site_frame(stat.traceback)
        if frame is None:
            continue
        key = (frame.filename, frame.lineno)
        totals = sizes.setdefault(key, [0, 0])
        totals[0] += stat.size
        totals[1] += stat.count
        total_size += stat.size
        total_count += stat.count
        if key not in largest:  # statistics() sorts largest first
            largest[key] = stat
    ranked = sorted(sizes.items(), key=lambda item: (-item[1][0], item[0]))
    if top_n is not None:
        ranked = ranked[: max(top_n, 0)]
    sites = tuple(
        Site(
            short_filename(filename),
            lineno,
            source_line(filename, lineno),
            size,
            count,
            tuple(
                f"{short_filename(f.filename)}:{f.lineno}"
                for f in reversed(largest[(filename, lineno)].traceback)
            ),
        )
        for (filename, lineno), (size, count) in ranked
    )
    return total_size, total_count, sites


@dataclass(frozen=True)
class TraceResult:
    """What one traced call allocated and still held when it ended."""

    retained: int  # bytes
    blocks: int
    sites: tuple[Site, ...]  # the top sites, largest first


# Reentrant: the garbage collection in stop() may run finalizers that start a trace.
_lock = threading.RLock()
_active: Trace | None = None


class Trace:
    """tracemalloc running for one call; end it with stop() or discard()."""

    def stop(self, top_n: int) -> TraceResult | None:
        """Stop tracing and return what the call retained; None if the trace was lost."""
        snapshot = self._end(take_snapshot=True)
        if snapshot is None:
            return None
        retained, blocks, sites = site_statistics(snapshot, top_n)
        return TraceResult(retained, blocks, sites)

    def discard(self) -> None:
        """Stop tracing without a result (another call ran in the process meanwhile)."""
        self._end(take_snapshot=False)

    def _end(self, *, take_snapshot: bool) -> tracemalloc.Snapshot | None:
        global _active
        with _lock:
            if _active is not self:
                return None  # already ended, or lost to a fork
            _active = None
            if not tracemalloc.is_tracing():
                return None  # someone else stopped tracemalloc meanwhile
            try:
                if not take_snapshot:
                    return None
                # Garbage cycles made by the call (a response and its request, say) are not
                # retained; the young generations hold them and are cheap to collect.
                gc.collect(1)
                return tracemalloc.take_snapshot()
            finally:
                tracemalloc.stop()  # also frees every trace


def start_trace(frames: int = TRACE_FRAMES) -> Trace | None:
    """Start tracing allocations for one call; None when tracemalloc is already in use.

    tracemalloc is process-wide: a user's own tracing (python -X tracemalloc, a profiler) or
    a trace already under way is left alone.
    """
    global _active
    trace = Trace()  # before start(): the trace object is not part of what it measures
    with _lock:
        if _active is not None or tracemalloc.is_tracing():
            return None
        tracemalloc.start(frames)
        _active = trace
    return trace


def should_sample(rate: float) -> bool:
    """Return True for a share rate of calls, chosen at random; never when rate is 0."""
    return rate > 0 and random.random() < rate


def _stop_after_fork() -> None:
    # A child forked while its parent traced a call must not trace forever.
    global _active
    if _active is not None:
        _active = None
        if tracemalloc.is_tracing():
            tracemalloc.stop()


if hasattr(os, "register_at_fork"):  # pragma: no branch - POSIX
    os.register_at_fork(after_in_child=_stop_after_fork)


@dataclass
class TraceTotals:
    """Traced calls of one key: how many, bytes retained in all, and the top sites (bounded)."""

    calls: int = 0
    retained: int = 0
    sites: tuple[Site, ...] = field(default_factory=tuple)

    def add(self, result: TraceResult, top_n: int) -> None:
        """Count one traced call, keeping only the top_n largest sites."""
        self.calls += 1
        self.retained += result.retained
        self.sites = merge_sites(self.sites, result.sites, top_n)

    def merge(self, other: TraceTotals, top_n: int) -> None:
        """Add another key's totals (e.g. pending ones into stored ones)."""
        self.calls += other.calls
        self.retained += other.retained
        self.sites = merge_sites(self.sites, other.sites, top_n)

    @property
    def retained_per_call(self) -> float | None:
        return self.retained / self.calls if self.calls else None
