"""Parsing a large plain log in worker processes: byte ranges, their events, the merge.

logs.parse_logs(jobs=N) splits a plain file of PARALLEL_MIN_SIZE bytes or more into ranges cut
at line starts. Worker processes, forked with Django and the URLconf set up, each parse ranges
with a RangeParser (the serial LogParser's loop, reporting the few lines it cannot settle
without the lines before the range), and the parent merges the results in file order into
the summary one process would give.
"""

from __future__ import annotations

import dataclasses
import gc
import multiprocessing
import os
import signal
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass
from typing import BinaryIO

from django_leakguard.records import Counts
from django_leakguard.reporting import uwsgi_log
from django_leakguard.reporting.uwsgi_log import LiveWorker, LogParser, is_respawn

# Plain files from this size are parsed by worker processes (--jobs), in ranges of at most
# RANGE_SIZE bytes: enough lines per range that its set-up (a task, cold caches, the merge) is
# noise, few enough that the workers finish together and a range's result stays small.
PARALLEL_MIN_SIZE = 8 << 20
RANGE_SIZE = 4 << 20
MAX_JOBS = 8
# What a worker's heap keeps free between ranges (see _start_worker()).
HEAP_KEPT = 8 << 20

# The events of a range, in the order of their lines. A worker is the LiveWorker as the range
# leaves it: updated to the last line of that pid there.


@dataclass(slots=True)
class FirstCall:
    """The first call charged to a group in the range: its counters at the range's end."""

    group: Counts
    key: str


@dataclass(slots=True)
class FirstLine:
    """The first line of a pid in the range: the parent charges it, or takes it as a baseline
    or a respawn, against the pid's state before the range."""

    pid: bytes
    rss: int
    req: int
    app: bytes
    date: bytes
    key: str
    worker: LiveWorker


@dataclass(slots=True)
class Respawn:
    """A new worker on a pid after its first line in the range."""

    pid: bytes
    worker: LiveWorker


Event = FirstCall | FirstLine | Respawn


@dataclass
class RangeResult:
    """What a worker process found in a range of a log (see RangeParser)."""

    lines: int
    request_lines: int
    events: list[Event]


@dataclass(frozen=True)
class RangeSettings:
    """How the workers parse: the grouping the parent decided, and its URL resolver."""

    group_by: str
    zero_digits: bool
    key_for_urlconf: Callable[[str], str | None]
    digit_texts: tuple[bytes, ...] = ()


class RangeParser(LogParser):
    """Parses a byte range of a log in a worker process, for merge().

    It knows nothing of the lines before its range, so the first line of each pid there is
    not a baseline: it is reported (a FirstLine event) for the parent to charge, or to take as
    a baseline or a respawn, against the pid's state before the range. Later lines of the pid
    are charged here, as the serial loop would. Groups are not capped here: the parent folds
    them into OTHER in the order of their first calls (FirstCall events).

    A worker process parses all its ranges with one: its caches stay warm from one range to
    the next (cold, they cost a few milliseconds a range), its groups are zeroed in between.
    """

    def __init__(self, settings: RangeSettings) -> None:
        super().__init__(settings.group_by, key_for_urlconf=settings.key_for_urlconf)
        self._zero_digits = settings.zero_digits
        self._digit_texts = settings.digit_texts
        self._events: list[Event] = []
        # id(group) -> its key, for the events.
        self._keys: dict[int, str] = {}

    def _group_of_key(self, key: str) -> Counts:
        group = self._groups.get(key)
        if group is None:
            group = self._groups[key] = Counts()
            self._keys[id(group)] = key
        return group

    def begin(self) -> None:
        """Forget the previous range (its result was sent): start a new one."""
        for event in self._events:
            if isinstance(event, FirstCall):
                _zero(event.group)
        self._events = []
        self._live = {}
        self.lines = self.request_lines = 0
        if len(self._groups) >= uwsgi_log.PATH_CACHE_SIZE:
            # The groups are not capped here: drop them, and the caches that hold them.
            for cache in (
                self._groups,
                self._keys,
                self._by_uri,
                self._by_exact_uri,
                self._by_shape,
                self._by_uri_shape,
            ):
                cache.clear()

    def _first_line(
        self,
        pid: bytes,
        rss: int,
        req: int,
        app: bytes,
        date: bytes,
        group: Counts | None,
        uri: bytes,
        shapes: dict[bytes, bytes],
    ) -> None:
        if group is None:
            group = self._resolve(uri, shapes)
        worker = self._live[pid] = LiveWorker(rss, req, app, rss, date, date)
        self._events.append(FirstLine(pid, rss, req, app, date, self._keys[id(group)], worker))

    def _respawn(
        self,
        pid: bytes,
        rss: int,
        req: int,
        app: bytes,
        date: bytes,
        group: Counts | None,
        uri: bytes,
        shapes: dict[bytes, bytes],
    ) -> None:
        worker = self._live[pid] = LiveWorker(rss, req, app, rss, date, date)
        self._events.append(Respawn(pid, worker))

    def _first_call(self, group: Counts) -> None:
        self._events.append(FirstCall(group, self._keys[id(group)]))

    def result(self) -> RangeResult:
        """Return what the range held (send it before the next begin())."""
        return RangeResult(self.lines, self.request_lines, self._events)


def _zero(group: Counts) -> None:
    for spec in dataclasses.fields(group):
        setattr(group, spec.name, 0)


def charge(group: Counts, delta: int) -> None:
    """Add one call that changed RSS by delta to a group (LogParser._account() inlines it)."""
    group.calls += 1
    group.rss_growth += delta
    if delta > 0:
        group.rss_growth_positive += delta
        group.rss_grew_calls += 1
        if delta > group.rss_growth_max:
            group.rss_growth_max = delta


def merge(parser: LogParser, result: RangeResult) -> bool:
    """Apply a range a worker process parsed, as if its lines had been parsed by parser.

    The events are replayed in the order of their lines, so workers are retired and groups
    created (or folded) in the order the serial loop would; each group's counters are then
    added. Return False, changing nothing, when the range brings so many new workers that
    the oldest would be retired partway through it: which ones depends on lines the worker
    did not report one by one, so the caller parses that range itself.
    """
    live = parser._live
    new = sum(
        1 for event in result.events if isinstance(event, FirstLine) and event.pid not in live
    )
    if len(live) + new > parser._max_live_workers:
        return False
    merged: list[tuple[Counts, Counts]] = []
    for event in result.events:
        if isinstance(event, FirstCall):
            merged.append((event.group, parser._group_of_key(event.key)))
            continue
        previous = live.get(event.pid)
        if isinstance(event, FirstLine):
            if previous is not None and not is_respawn(previous, event.req, event.app):
                charge(parser._group_of_key(event.key), event.rss - previous.rss)
                # The same worker: its first figures are from before the range.
                event.worker.first_rss = previous.first_rss
                event.worker.first_date = previous.first_date
                live[event.pid] = event.worker
                continue
            if previous is None:
                live[event.pid] = event.worker
                continue
        # A respawn, in the range or at its first line: the event's worker replaces the pid's.
        parser.respawns += 1
        parser._retire(event.pid)
        live[event.pid] = event.worker
    for group, target in merged:
        target.merge(group)
    parser.lines += result.lines
    parser.request_lines += result.request_lines
    return True


def feed_range(parser: LogParser, fd: int, start: int, end: int | None) -> None:
    """Parse bytes start to end of an open file (None: to its end, as feed() does).

    Reads stop at the multiples of CHUNK_SIZE where feed()'s reads from the file's start stop,
    so a line longer than MAX_LINE is dropped (and counted) where feed() drops it.
    """
    position = start
    while end is None or position < end:
        size = uwsgi_log.CHUNK_SIZE - position % uwsgi_log.CHUNK_SIZE
        if end is not None:
            size = min(size, end - position)
        chunk = os.pread(fd, size, position)
        if not chunk:
            break
        parser.feed_bytes(chunk)
        position += len(chunk)
    if end is None:
        parser.end_of_stream()


# A worker process's parser.
_parser: RangeParser | None = None


def _start_worker(settings: RangeSettings) -> None:
    """Set a worker process up (in the child, just after fork)."""
    global _parser
    _parser = RangeParser(settings)
    # Ctrl-C reaches the whole process group: the parent stops the pool, and the workers
    # should not print a traceback each.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # Inherited from parse_logs() already; parsing makes no reference cycles.
    gc.disable()
    # glibc gives memory back to the OS when more than twice its mmap threshold is free at the
    # top of its heap: the two 1 MiB read buffers freed at each range's end were, and the next
    # range faulted in fresh pages (about 500 page faults a range, a tenth of a worker's
    # time). A block that large, mapped and freed, raises both thresholds (mallopt(3)).
    bytes(HEAP_KEPT)


def _parse_range(path: str, file_id: tuple[int, int], start: int, end: int | None) -> RangeResult:
    """Parse a byte range of a log file (in a worker process)."""
    parser = _parser
    assert parser is not None
    parser.begin()
    fd = os.open(path, os.O_RDONLY)
    try:
        status = os.fstat(fd)
        if (status.st_dev, status.st_ino) != file_id:
            # Rotated meanwhile: the name is another file now.
            raise OSError(f"{path} was replaced while it was being read")
        feed_range(parser, fd, start, end)
    finally:
        os.close(fd)
    return parser.result()


def default_jobs() -> int:
    """Return the processes --jobs auto uses: the CPUs this process may use, at most MAX_JOBS."""
    if hasattr(os, "sched_getaffinity"):
        cpus = len(os.sched_getaffinity(0))
    else:  # pragma: no cover - macOS, Windows
        cpus = os.cpu_count() or 1
    return min(cpus, MAX_JOBS)


def can_fork() -> bool:
    """Return whether worker processes can be forked safely here.

    Not on macOS, where system libraries may crash in a forked child (Python spawns there by
    default), nor in a process that runs other threads: one may hold a lock at the fork, which
    the child would wait for forever (Python 3.12 warns).
    """
    if sys.platform == "darwin" or "fork" not in multiprocessing.get_all_start_methods():
        return False  # pragma: no cover - Linux runs the tests
    if threading.active_count() > 1:
        return False
    # Threads Python did not start count too, and a thread just joined (the previous call's
    # pool's) may still exist for a moment: give those a little time to end.
    deadline = time.monotonic() + 0.1
    while _os_threads() > 1:
        if time.monotonic() > deadline:
            return False
        time.sleep(0.001)
    return True


def _os_threads() -> int:
    """Return how many threads the process runs, as the OS counts them."""
    try:
        return len(os.listdir("/proc/self/task"))
    except OSError:  # pragma: no cover - Linux has /proc
        return 1


class WorkerPool:
    """parse_logs()'s worker processes, started for the first file split between them.

    A pool (ProcessPoolExecutor) that reports a worker killed meanwhile (BrokenProcessPool)
    rather than waiting for its result forever. On exit, the workers finish the ranges already
    handed to them (an error or Ctrl-C cancels the others) and exit through os._exit(): no exit
    hooks run in them.
    """

    def __init__(self, jobs: int) -> None:
        self.jobs = jobs
        self._pool: ProcessPoolExecutor | None = None

    def pool(self, parser: LogParser) -> ProcessPoolExecutor:
        """Return the pool; its workers group as the parser does (it has decided how)."""
        if self._pool is None:
            settings = RangeSettings(
                parser.group_by,
                bool(parser._zero_digits),
                parser._key_for_urlconf,
                parser._digit_texts,
            )
            # fork: the workers inherit Django, the URLconf and the resolver as set up here
            # (forked at the first task, before the pool starts its threads).
            self._pool = ProcessPoolExecutor(
                self.jobs,
                multiprocessing.get_context("fork"),
                initializer=_start_worker,
                initargs=(settings,),
            )
        return self._pool

    def __enter__(self) -> WorkerPool:
        return self

    def __exit__(self, *_: object) -> None:
        if self._pool is not None:
            self._pool.shutdown(cancel_futures=True)


def _line_start(fd: int, position: int, size: int) -> int:
    """Return the start of the first line that starts at or after position (size: none)."""
    position -= 1
    while position < size:
        block = os.pread(fd, 1 << 13, position)
        newline = block.find(b"\n")
        if newline >= 0:
            return position + newline + 1
        if not block:
            break  # pragma: no cover - the file shrank meanwhile
        position += len(block)
    return size


def _split(fd: int, start: int, size: int, range_size: int) -> Iterator[tuple[int, int | None]]:
    """Yield ranges of about range_size bytes from start, cut at line starts.

    The last range has no end: it is read to the file's end, as feed() would.
    """
    while start + range_size < size:
        end = _line_start(fd, start + range_size, size)
        if end >= size:
            break
        yield start, end
        start = end
    yield start, None


def feed_split(
    parser: LogParser, stream: BinaryIO, name: str, workers: WorkerPool, range_size: int
) -> None:
    """Parse a plain log file in byte ranges in the worker processes: parser.feed(stream).

    The parent parses the lines up to the first request line, which settles the grouping
    (--group-by auto) the workers then use, and merges the ranges' results in file order.
    """
    read = stream.read
    while not parser.request_lines:
        chunk = read(uwsgi_log.CHUNK_SIZE)
        if not chunk:
            parser.end_of_stream()
            return
        parser.feed_bytes(chunk)
    fd = stream.fileno()
    status = os.fstat(fd)
    # The rest begins with the partial line the parser holds: a worker parses it whole.
    start = stream.tell() - len(parser._rest)
    parser._rest = b""
    if start >= status.st_size:
        return
    # Enough ranges for every worker to have a few, however small the file.
    range_size = max(1, min(range_size, (status.st_size - start) // (workers.jobs * 4)))
    pool = workers.pool(parser)
    file_id = (status.st_dev, status.st_ino)
    # A few ranges in flight per worker, so none waits for the parent; the bound keeps the
    # results waiting to be merged, and so memory, constant.
    pending: deque[tuple[int, int | None, Future[RangeResult]]] = deque()
    for begin, end in _split(fd, start, status.st_size, range_size):
        pending.append((begin, end, pool.submit(_parse_range, name, file_id, begin, end)))
        if len(pending) > 2 * workers.jobs:
            _merge_next(parser, fd, pending)
    while pending:
        _merge_next(parser, fd, pending)


def _merge_next(
    parser: LogParser, fd: int, pending: deque[tuple[int, int | None, Future[RangeResult]]]
) -> None:
    """Merge the oldest range's result (or parse that range here when it cannot be merged)."""
    begin, end, task = pending.popleft()
    if not merge(parser, task.result()):
        feed_range(parser, fd, begin, end)
