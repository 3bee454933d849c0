"""The parser of uWSGI request lines written with the memory-report option: one per-line loop.

uWSGI (``memory-report = true``) prefixes every request line with the worker's memory after
the request::

    {address space usage: 59990016 bytes/57MB} {rss usage: 12517376 bytes/11MB}
    [pid: 10721|app: 0|req: 1/1] 127.0.0.1 () {24 vars in 265 bytes}
    [Thu Nov 26 22:35:03 2026] GET /leak/1?x=2 => generated 5 bytes in 0 msecs
    (HTTP/1.1 200) 1 headers in 45 bytes (1 switches on core 0)

(one line in the log). uWSGI 2.1's ``memory-report = 2`` adds ``{uss usage: ...} {pss usage:
...}`` after the RSS field. The change of RSS between two consecutive lines of one worker is
charged to the second request. Memory use does not grow with the log: per worker we keep its
latest line's figures, groups are capped and the path cache is cleared when full.

Files are opened and handed to a parser by `logs.parse_logs()`; large plain files are parsed in
byte ranges by worker processes (`uwsgi_parallel`), whose RangeParser is this parser with other
answers to the three rare events of the loop (a worker's first line, a respawn, a group's first
call). What a line holds and how its path becomes a key: `uwsgi_lines`.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from itertools import compress, repeat
from operator import is_
from typing import BinaryIO
from urllib.parse import unquote_to_bytes

from django_leakguard.records import OTHER, UNMATCHED, Counts, fit_key
from django_leakguard.reporting.model import most_at_once
from django_leakguard.reporting.uwsgi_lines import (
    FAST_DATE,
    FAST_LINE,
    REQUEST_LINE,
    UNLOGGED,
    ZERO_DIGITS,
    decode_path,
    digits_that_matter,
    parse_log_date,
    path_shape,
    plain,
    raw_path,
    urlconf_key,
)

MAX_GROUPS = 1000
# The keys folded into OTHER are counted (each once) up to this many.
MAX_FOLDED_KEYS = 10_000
MAX_LIVE_WORKERS = 4096
MAX_INTERVALS = 10_000
PATH_CACHE_SIZE = 20_000
AUTO_SAMPLE_LINES = 1000
AUTO_MIN_RESOLVED = 0.5
CHUNK_SIZE = 1 << 20
PIECE_SIZE = 1 << 18
MAX_LINE = 1 << 16
# A worker handling requests on several threads (or async cores) reads its request counter
# when it logs a request, so two of its lines often show the same counter, and a line may show
# one lower than the line before (its thread read the counter just before another's request
# ended), or, when the thread was preempted between reading the counter and writing its line,
# a few lower: none of these starts a new worker. A counter that goes back to 1, back by
# RESPAWN_WINDOW or more, or back by more than THREAD_SLACK to RESPAWN_WINDOW or below, is a new
# worker that reuses the pid. (The rule looks at two lines only, so that a range of a log
# parsed alone decides as the whole log would. A thread's line reads 1 after another's only at a
# worker's first requests; a master that loads the app before forking carries a worker slot's
# counter over to the worker it respawns there, with lazy-apps the counter restarts at 1.)
RESPAWN_WINDOW = 64
THREAD_SLACK = 16


@dataclass(slots=True)
class LiveWorker:
    """A worker's latest request line (the baseline of its next request) and its first."""

    rss: int
    req: int
    app: bytes
    first_rss: int
    # Dates as logged (or the text FAST_LINE captured around them): parsed only at retirement.
    first_date: bytes
    last_date: bytes


@dataclass
class LogSummary:
    """What a parse found: groups by key, worker figures and line counts."""

    group_by: str
    group_by_reason: str
    # RSS counters only: calls, net and positive growth, calls that grew, largest growth.
    groups: dict[str, Counts]
    lines: int
    request_lines: int
    skipped_lines: int
    respawns: int
    workers: int
    worker_calls: int
    worker_rss_growth: int
    worker_rss_first_total: int
    workers_at_once: int
    first_date: float | None
    last_date: float | None
    folded_groups: int
    files: list[str] = field(default_factory=list)


def is_respawn(worker: LiveWorker, req: int, app: bytes) -> bool:
    """Return whether a line (request counter req, app) of a live pid starts a new worker."""
    back = worker.req - req
    return (
        back > 0
        and req >= 0
        and (req == 1 or back >= RESPAWN_WINDOW or (back > THREAD_SLACK and req <= RESPAWN_WINDOW))
        and app == worker.app
    )


def resolving_alike(paths: list[bytes], found: tuple[bytes, ...] | None) -> Counter[bytes]:
    """Return one raw path of each set of paths that resolve alike, and the size of its set.

    Paths that differ only in their digits resolve alike, as the caches assume, unless digits
    matter anywhere (found is None), the path has %-escapes or it holds one of the texts found
    (digits zeroed): those are only the same path as themselves.
    """
    counts = Counter(paths)
    if found is None:
        return counts
    first: dict[bytes, bytes] = {}
    sizes: Counter[bytes] = Counter()
    for path, count in counts.items():
        zeroed = path.translate(ZERO_DIGITS)
        key = path if b"%" in path or any(text in zeroed for text in found) else zeroed
        sizes[first.setdefault(key, path)] += count
    return sizes


class LogParser:
    """Feed it logs (binary streams or bytes); read the result with summary()."""

    def __init__(
        self,
        group_by: str = "auto",
        *,
        key_for_urlconf: Callable[[str], str | None] = urlconf_key,
        digits_that_matter: Callable[[], tuple[bytes, ...] | None] = digits_that_matter,
        max_groups: int = MAX_GROUPS,
        max_live_workers: int = MAX_LIVE_WORKERS,
    ) -> None:
        if group_by not in ("auto", "urlconf", "pattern"):
            raise ValueError(f"group_by should be auto, urlconf or pattern, got {group_by!r}")
        self.group_by = group_by
        self.group_by_reason = f"--group-by {group_by}"
        self._key_for_urlconf = key_for_urlconf
        self._digits_that_matter = digits_that_matter
        # Whether the caches may key on URIs with their digits zeroed (None: not known yet),
        # and the routes' texts with digits (zeroed) that a path must not hold for that.
        self._zero_digits: bool | None = True if group_by == "pattern" else None
        self._digit_texts: tuple[bytes, ...] = ()
        self._max_groups = max_groups
        self._max_live_workers = max_live_workers
        self._groups: dict[str, Counts] = {}
        # logged URI (digits zeroed when they never matter) -> its group; URIs with %-escapes
        # or a route's digits are kept apart, unzeroed. Bounded caches: cleared when full.
        self._by_uri: dict[bytes, Counts] = {}
        self._by_exact_uri: dict[bytes, Counts] = {}
        self._by_shape: dict[bytes, Counts] = {}
        # path_shape() of a whole logged URI (query string included) -> its group; only when
        # digits never matter and the URI is a plain path: URIs that differ only in their
        # UUIDs or hex ids (each one new) then skip the slow path.
        self._by_uri_shape: dict[bytes, Counts] = {}
        self._live: dict[bytes, LiveWorker] = {}
        self._intervals: list[tuple[float, float]] = []
        self._dates: dict[bytes, float | None] = {}
        self._rest = b""
        self.lines = 0
        self.request_lines = 0
        self.respawns = 0
        self.workers = 0
        self.worker_rss_growth = 0
        self.worker_rss_first_total = 0
        # The keys folded into OTHER (at most MAX_FOLDED_KEYS of them).
        self._folded: set[str] = set()
        self.first_date: float | None = None
        self.last_date: float | None = None

    # Grouping -------------------------------------------------------------------------------

    def _key(self, path: bytes, shape: bytes) -> str:
        if path == b"-":
            return UNLOGGED
        if self.group_by == "urlconf":
            return self._key_for_urlconf(decode_path(path)) or UNMATCHED
        return fit_key(shape.decode("utf-8", "replace"))

    def _group(self, uri: bytes) -> Counts:
        """Return the group of a URI not in the URI cache (and cache it)."""
        escaped = b"%" in uri
        if escaped or self._digit_texts:
            cached = self._by_exact_uri.get(uri)
            if cached is not None:
                return cached
        path = raw_path(uri)
        unquoted = unquote_to_bytes(path)
        shape = path_shape(unquoted)
        # A path that holds a route's digits (jsi18n/) is resolved as it is, not by its shape.
        literal = self._holds_digit_text(unquoted)
        by_shape = self._zero_digits and not literal
        group = self._by_shape.get(shape) if by_shape else None
        if group is None:
            group = self._group_of_key(self._key(path, shape))
            if by_shape:
                if len(self._by_shape) >= PATH_CACHE_SIZE:
                    self._by_shape.clear()
                self._by_shape[shape] = group
        # Zeroing digits inside %-escapes would change the characters they encode.
        exact = escaped or literal
        cache = self._by_exact_uri if exact else self._by_uri
        if len(cache) >= PATH_CACHE_SIZE:
            cache.clear()
        if self._zero_digits and not exact:
            uri = uri.translate(ZERO_DIGITS)
        cache[uri] = group
        return group

    def _holds_digit_text(self, text: bytes) -> bool:
        """Return whether text, digits zeroed, holds a route's text with digits (jsi18n/)."""
        if not self._digit_texts:
            return False
        zeroed = text.translate(ZERO_DIGITS)
        return any(digits in zeroed for digits in self._digit_texts)

    def _group_of_key(self, key: str) -> Counts:
        """Return the group of a key, created if new (folded into OTHER when there are many)."""
        group = self._groups.get(key)
        if group is None:
            if len(self._groups) >= self._max_groups:
                # Each folded key counts once (the same in every way of parsing: a count of
                # cache misses would depend on how lines fall into chunks and ranges).
                if len(self._folded) < MAX_FOLDED_KEYS:
                    self._folded.add(key)
                key = OTHER
                group = self._groups.get(key)
            if group is None:
                group = self._groups[key] = Counts()
        return group

    def _decide_grouping(self, uris: list[bytes]) -> None:
        """Pick urlconf grouping when most sampled paths resolve, else placeholders."""
        paths = [raw_path(uri) for uri in uris[:AUTO_SAMPLE_LINES] if uri != b"-"]
        if not paths:
            self._use_grouping("pattern", ())
            self.group_by_reason = "no paths to resolve against the URLconf"
            return
        found = self._digits_that_matter()
        resolved = sum(
            count
            for path, count in resolving_alike(paths, found).items()
            if self._key_for_urlconf(decode_path(path)) is not None
        )
        share = resolved / len(paths)
        group_by = "urlconf" if share >= AUTO_MIN_RESOLVED else "pattern"
        self._use_grouping(group_by, () if group_by == "pattern" else found)
        self.group_by_reason = (
            f"{share:.0%} of the first {len(paths):,} paths resolved against the URLconf"
        )

    def _set_grouping(self, group_by: str) -> None:
        found = () if group_by == "pattern" else self._digits_that_matter()
        self._use_grouping(group_by, found)

    def _use_grouping(self, group_by: str, found: tuple[bytes, ...] | None) -> None:
        """Group by group_by; found: the routes' texts with digits (digits_that_matter())."""
        self.group_by = group_by
        self._zero_digits = found is not None
        self._digit_texts = found or ()

    # Parsing --------------------------------------------------------------------------------

    def feed(self, stream: BinaryIO, chunk_size: int | None = None) -> None:
        """Parse a whole binary stream, chunk by chunk (of CHUNK_SIZE bytes by default)."""
        read = stream.read
        chunk_size = chunk_size or CHUNK_SIZE
        while True:
            chunk = read(chunk_size)
            if not chunk:
                break
            self.feed_bytes(chunk)
        self.end_of_stream()

    def feed_bytes(self, data: bytes) -> None:
        """Parse the complete lines in data; keep a trailing partial line for the next call."""
        start = 0
        if self._rest:
            # Complete the partial line alone, not by copying the whole chunk after it.
            start = data.find(b"\n") + 1
            if not start:
                start = len(data)
            rest = self._rest + data[:start]
            self._rest = b""
            if rest.endswith(b"\n"):
                self._parse(rest, 0, len(rest))
            else:
                self._keep(rest)
                return
        cut = data.rfind(b"\n", start) + 1
        self._keep(data[max(cut, start) :])
        if cut > start:
            self._parse(data, start, cut)

    def _keep(self, rest: bytes) -> None:
        """Keep a partial line for the next call (drop it when it is too long to be one)."""
        self._rest = rest
        if len(rest) > MAX_LINE:
            # Not a uWSGI request line (they are at most 8 KiB): count it and drop it.
            self.lines += 1
            self._rest = b""

    def end_of_stream(self) -> None:
        """Parse a last line that has no newline."""
        rest, self._rest = self._rest, b""
        if rest:
            data = rest + b"\n"
            self._parse(data, 0, len(data))

    def _parse(self, data: bytes, start: int, end: int) -> None:
        """Parse data[start:end], whole lines, a piece of about PIECE_SIZE bytes at a time.

        The rows of a piece and its text stay in the processor's cache (a core's own 512 KiB
        to 1 MiB): a 1 MiB chunk parsed in one go takes about 5 % longer. Cut at line ends, the
        pieces give the rows the chunk gives (REQUEST_LINE never crosses a line end, and
        FAST_LINE reads what it does). While --group-by auto waits for its sample, the chunk
        is parsed whole: the sample is its first AUTO_SAMPLE_LINES request lines.
        """
        while self.group_by != "auto" and end - start > PIECE_SIZE:
            cut = data.rfind(b"\n", start, start + PIECE_SIZE) + 1
            if cut <= start:
                break  # a line longer than a piece
            self._parse_piece(data, start, cut)
            start = cut
        self._parse_piece(data, start, end)

    def _parse_piece(self, data: bytes, start: int, end: int) -> None:
        """Parse data[start:end], whole lines."""
        self.lines += data.count(b"\n", start, end)
        rows = FAST_LINE.findall(data, start, end)
        if not rows:
            return
        rss_values, pids, apps, reqs, dates, uris = zip(*rows, strict=True)
        if b"" in rss_values or not plain(dates, uris):
            rows = REQUEST_LINE.findall(data, start, end)
            if not rows:
                return
            rss_values, pids, apps, reqs, dates, uris = zip(*rows, strict=True)
        self.request_lines += len(rows)
        if self.group_by == "auto":
            self._decide_grouping(list(uris))
        elif self._zero_digits is None:
            self._set_grouping(self.group_by)
        # Look the groups up in C (map) first; misses (None) are resolved in the loop. A URI
        # with %-escapes, zeroed, holds a "%" and so never hits: the cache has no such key.
        keys = map(bytes.translate, uris, repeat(ZERO_DIGITS)) if self._zero_digits else uris
        groups = list(map(self._by_uri.get, keys))
        shapes = self._miss_shapes(groups, uris) if None in groups else {}
        self._account(pids, rss_values, reqs, apps, dates, groups, uris, shapes)

    def _account(
        self,
        pids: tuple[bytes, ...],
        rss_values: tuple[bytes, ...],
        reqs: tuple[bytes, ...],
        apps: tuple[bytes, ...],
        dates: tuple[bytes, ...],
        groups: list[Counts | None],
        uris: tuple[bytes, ...],
        shapes: dict[bytes, bytes],
    ) -> None:
        """Charge each request line's RSS change to its group (columns of one chunk's lines).

        The one loop over lines, here and in the worker processes: the rare events (a pid's
        first line, a respawn, a group's first call) are methods that RangeParser overrides.
        """
        live = self._live
        resolve = self._resolve
        for pid, rss, req, app, date, group, uri in zip(
            pids, map(int, rss_values), map(int, reqs), apps, dates, groups, uris, strict=True
        ):
            try:
                worker = live[pid]
            except KeyError:
                self._first_line(pid, rss, req, app, date, group, uri, shapes)
                continue
            # A counter that does not go back starts no worker: most lines skip the call.
            if req < worker.req and is_respawn(worker, req, app):
                self._respawn(pid, rss, req, app, date, group, uri, shapes)
                continue
            delta = rss - worker.rss
            worker.rss = rss
            worker.req = req
            worker.app = app
            worker.last_date = date
            if group is None:
                group = resolve(uri, shapes)
            # charge(), inline: this runs once per line.
            calls = group.calls
            if not calls:
                self._first_call(group)
            group.calls = calls + 1
            group.rss_growth += delta
            if delta > 0:
                group.rss_growth_positive += delta
                group.rss_grew_calls += 1
                if delta > group.rss_growth_max:
                    group.rss_growth_max = delta

    # The rare events of the loop.

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
        """A worker's first line: the baseline of its next request."""
        self._live[pid] = LiveWorker(rss, req, app, rss, date, date)
        if len(self._live) > self._max_live_workers:
            self._retire_oldest()

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
        """A new worker reuses a live worker's pid: retire that one, start this one."""
        self.respawns += 1
        self._retire(pid)
        self._first_line(pid, rss, req, app, date, group, uri, shapes)

    def _first_call(self, group: Counts) -> None:
        """A group is charged its first call (RangeParser reports it)."""

    def _miss_shapes(
        self, groups: list[Counts | None], uris: tuple[bytes, ...]
    ) -> dict[bytes, bytes]:
        """Return path_shape() of the plain-path URIs that missed the URI cache.

        One substitution per placeholder over all of them joined by newlines: the patterns
        never match a newline and treat it as an edge, like the end of a string.
        """
        if not self._zero_digits:
            return {}
        # The URIs whose group is None, picked in C, then the plain paths among them.
        missed = set(compress(uris, map(is_, groups, repeat(None))))
        ordered = [uri for uri in missed if uri[:1] == b"/" and b"%" not in uri]
        joined = b"\n".join(ordered)
        if self._holds_digit_text(joined):
            # Rare (the admin's jsi18n/): look for the URIs one by one only then.
            ordered = [uri for uri in ordered if not self._holds_digit_text(uri)]
            joined = b"\n".join(ordered)
        if not ordered:
            return {}
        return dict(zip(ordered, path_shape(joined).split(b"\n"), strict=True))

    def _resolve(self, uri: bytes, shapes: dict[bytes, bytes]) -> Counts:
        """Return the group of a URI that missed the URI cache."""
        shape = shapes.get(uri)
        if shape is None:
            return self._group(uri)
        group = self._by_uri_shape.get(shape)
        if group is None:
            group = self._group(uri)
            if len(self._by_uri_shape) >= PATH_CACHE_SIZE:
                self._by_uri_shape.clear()
            self._by_uri_shape[shape] = group
        return group

    # Workers --------------------------------------------------------------------------------

    def _date(self, value: bytes) -> float | None:
        if b"]" in value:
            # The text FAST_LINE captured from the client to the method (a date has no "]").
            value = FAST_DATE.match(value).group(1)  # type: ignore[union-attr]
        if value not in self._dates:
            if len(self._dates) >= PATH_CACHE_SIZE:
                self._dates.clear()
            self._dates[value] = parse_log_date(value)
        return self._dates[value]

    def _retire_oldest(self) -> None:
        """Retire the half of the live workers whose latest line is oldest."""
        by_age = sorted(self._live, key=lambda pid: self._date(self._live[pid].last_date) or 0.0)
        for pid in by_age[: len(by_age) // 2]:
            self._retire(pid)

    def _retire(self, pid: bytes) -> None:
        """Fold a finished worker (no longer live) into the totals."""
        worker = self._live.pop(pid)
        self.workers += 1
        self.worker_rss_growth += worker.rss - worker.first_rss
        self.worker_rss_first_total += worker.first_rss
        first = self._date(worker.first_date)
        last = self._date(worker.last_date)
        if first is not None and last is not None:
            if len(self._intervals) >= MAX_INTERVALS:
                # Keep the latest ones: recycling can leave many short-lived workers.
                del self._intervals[: MAX_INTERVALS // 2]
            self._intervals.append((first, last))
            if self.first_date is None or first < self.first_date:
                self.first_date = first
            if self.last_date is None or last > self.last_date:
                self.last_date = last

    def summary(self) -> LogSummary:
        """Return the result (folds the workers still live into the totals)."""
        self.end_of_stream()
        if self.group_by == "auto":
            self._decide_grouping([])
        for pid in list(self._live):
            self._retire(pid)
        return LogSummary(
            group_by=self.group_by,
            group_by_reason=self.group_by_reason,
            groups=dict(self._groups),
            lines=self.lines,
            request_lines=self.request_lines,
            skipped_lines=self.lines - self.request_lines,
            respawns=self.respawns,
            workers=self.workers,
            # Each request line is either a worker's first (its baseline) or one of its calls.
            worker_calls=self.request_lines - self.workers,
            worker_rss_growth=self.worker_rss_growth,
            worker_rss_first_total=self.worker_rss_first_total,
            workers_at_once=most_at_once(self._intervals),
            first_date=self.first_date,
            last_date=self.last_date,
            folded_groups=len(self._folded),
        )
