"""Streaming parser of uWSGI request lines written with the memory-report option.

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

parse_logs(jobs=N) splits large plain files into byte ranges that worker processes parse; the
parent merges their results in file order into the summary one process would give (see
RangeParser and LogParser._merge()).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import gc
import gzip
import io
import multiprocessing
import os
import re
import signal
import stat
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass, field
from itertools import compress, repeat
from operator import is_
from pathlib import Path
from typing import Any, BinaryIO, TypeVar
from urllib.parse import unquote, unquote_to_bytes, urlsplit

OTHER = "<other>"
UNMATCHED = "<unmatched>"
UNLOGGED = "<path not logged>"

MAX_GROUPS = 1000
# The keys folded into OTHER are counted (each once) up to this many.
MAX_FOLDED_KEYS = 10_000
MAX_LIVE_WORKERS = 4096
MAX_INTERVALS = 10_000
PATH_CACHE_SIZE = 20_000
AUTO_SAMPLE_LINES = 1000
AUTO_MIN_RESOLVED = 0.5
CHUNK_SIZE = 1 << 20
MAX_LINE = 1 << 16
# A worker handling requests on several threads logs them in completion order, so its
# request counter can step back by up to its thread count; a counter that goes back further,
# or restarts near 1, is a new worker that reuses the pid.
RESPAWN_WINDOW = 64
# Plain files from this size are parsed by worker processes (--jobs), in ranges of at most
# RANGE_SIZE bytes: enough lines per range that its set-up (a task, cold caches, the merge) is
# noise, few enough that the workers finish together and a range's result stays small.
PARALLEL_MIN_SIZE = 8 << 20
RANGE_SIZE = 4 << 20
MAX_JOBS = 8

# Only the fields we need (not the method), each bounded by the next literal, so the match
# never backtracks far. Everything after "=> generated" (msecs or micros, "via sendfile()",
# "via offload()") is irrelevant here. One findall() per chunk runs the per-line matching in C.
REQUEST_LINE = re.compile(
    rb"\{rss usage: (\d+) bytes/\d+MB\} "
    rb"(?:\{uss usage: \d+ bytes/\d+MB\} \{pss usage: \d+ bytes/\d+MB\} )?"
    rb"\[pid: (\d+)\|app: (-?\d+)\|req: (-?\d+)/\d+\] "
    rb"\S* \(.*?\) \{\d+ vars in \d+ bytes\} "
    rb"\[([^\]\n]*)\] \S+ (\S+) => generated "
)
# The fast path: the same fields for the common line shape (memory-report = 1, digits-only app
# and request counter), built from cheaper steps ([^ ] runs instead of \S, no lazy repeat) and
# capturing the text from the client to the method in place of the date (read from it only
# when a worker is retired). Where it matches, REQUEST_LINE matches the same span with the
# same fields, provided that text and the URI hold no whitespace but spaces (checked for the
# whole chunk at once). The empty alternative makes every "{rss usage: " visited by
# REQUEST_LINE yield a row, so a line the fast path cannot read is seen (empty fields) and the
# chunk is read again with REQUEST_LINE.
FAST_LINE = re.compile(
    rb"\{rss usage: (?:([0-9]+) bytes/[0-9]+MB\} "
    rb"\[pid: ([0-9]+)\|app: ([0-9]+)\|req: ([0-9]+)/[0-9]+\] "
    rb"([^ ]* \([^)]*\) \{[0-9]+ vars in [0-9]+ bytes\} \[[^\]]*\] [^ ]+) ([^ ]+) => generated )?"
)
# The date in the text FAST_LINE captured (it matches there, as FAST_LINE did).
_FAST_DATE = re.compile(rb"[^ ]* \([^)]*\) \{[0-9]+ vars in [0-9]+ bytes\} \[([^\]]*)\] ")
# Whitespace other than the space: where these occur, FAST_LINE and REQUEST_LINE may differ.
_OTHER_WHITESPACE = b"\t\n\x0b\x0c\r"

_EDGE_BEFORE = rb"(?<![0-9A-Za-z])"
_EDGE_AFTER = rb"(?![0-9A-Za-z])"
# (pattern, placeholder), applied in order to the raw path (bytes, before decoding).
_PLACEHOLDERS = [
    (
        re.compile(
            _EDGE_BEFORE + rb"[0-9a-fA-F]{8}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{4}-?"
            rb"[0-9a-fA-F]{12}" + _EDGE_AFTER
        ),
        b"<uuid>",
    ),
    (re.compile(_EDGE_BEFORE + rb"(?=[a-fA-F]*[0-9])[0-9a-fA-F]{8,}" + _EDGE_AFTER), b"<hex>"),
    (re.compile(rb"[0-9]+"), b"<int>"),
]
# Every digit run becomes a placeholder, so paths that differ only in their digits have the
# same shape: the caches can key on the path with its digits zeroed.
_ZERO_DIGITS = bytes.maketrans(b"123456789", b"000000000")


def path_shape(path: bytes) -> bytes:
    """Return path with numbers, UUIDs and hex ids replaced by placeholders."""
    for pattern, placeholder in _PLACEHOLDERS:
        path = pattern.sub(placeholder, path)
    return path


def pattern_key(path: str) -> str:
    """Return path (decoded) with numbers, UUIDs and hex ids replaced by placeholders."""
    return path_shape(path.encode("utf-8", "surrogateescape")).decode("utf-8", "replace")[:255]


def urlconf_ignores_digits(urlconf: str | None = None) -> bool:
    """Return whether paths that differ only in their digits always resolve alike.

    True when every URL pattern is a path() route with no digit in its text and only
    Django's own converters (int, str, slug, uuid, path), none of which tells one digit from
    another.
    """
    from django.urls import URLPattern, URLResolver, converters, get_resolver
    from django.urls.resolvers import RoutePattern

    builtin = tuple(type(c) for c in converters.DEFAULT_CONVERTERS.values())

    def check(patterns: Iterable[object]) -> bool:
        for entry in patterns:
            if not isinstance(entry, (URLPattern, URLResolver)):
                return False  # pragma: no cover - Django only builds these two
            pattern = entry.pattern
            if not isinstance(pattern, RoutePattern):
                return False
            if any(c.isdigit() for c in str(pattern)):
                return False
            if any(type(c) not in builtin for c in pattern.converters.values()):
                return False
            if isinstance(entry, URLResolver) and not check(entry.url_patterns):
                return False
        return True

    return check(get_resolver(urlconf).url_patterns)


def urlconf_key(path: str) -> str | None:
    """Return the middleware's key for path ("/" + route), or None when it does not resolve."""
    from django.urls import Resolver404, resolve

    try:
        match = resolve(path)
    except Resolver404:
        return None
    return ("/" + match.route)[:255]


def _raw_path(uri: bytes) -> bytes:
    """Return the path of a logged URI (still percent-encoded), without its query string."""
    path = uri.partition(b"?")[0].partition(b"#")[0]
    if not path.startswith(b"/"):
        # An absolute URI from a proxy-style request line.
        path = urlsplit(path).path or b"/"
    return path


def _decode_path(path: bytes) -> str:
    return unquote(path.decode("utf-8", "replace"))


@dataclass
class Group:
    """RSS change of the requests of one key (net: negative changes count)."""

    calls: int = 0
    rss_growth: int = 0
    rss_growth_positive: int = 0
    rss_grew_calls: int = 0
    rss_growth_max: int = 0


@dataclass
class LogSummary:
    """What a parse found: groups by key, worker figures and line counts."""

    group_by: str
    group_by_reason: str
    groups: dict[str, Group]
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


def parse_log_date(value: bytes) -> float | None:
    """Return the epoch seconds of a uWSGI ctime() date, or None when it is not one."""
    try:
        return time.mktime(time.strptime(value.decode("ascii"), "%a %b %d %H:%M:%S %Y"))
    except (ValueError, UnicodeDecodeError):
        return None


T = TypeVar("T", float, "dt.datetime")


def most_at_once(intervals: Iterable[tuple[T, T]]) -> int:
    """Return the largest number of (start, end) intervals that overlap at one instant."""
    events: list[tuple[T, int]] = []
    for start, end in intervals:
        events.append((start, 1))
        events.append((max(start, end), -1))
    # At one instant, starts count before ends: a worker seen once (start == end) counts.
    events.sort(key=lambda event: (event[0], -event[1]))
    current = best = 0
    for _, step in events:
        current += step
        best = max(best, current)
    return best


def is_respawn(req: int, app: bytes, state: list[Any]) -> bool:
    """Return whether a line (request counter req, app) starts a new worker on a live pid."""
    last_req: int = state[1]
    return (
        req <= last_req
        and req >= 0
        and (req <= RESPAWN_WINDOW or last_req - req >= RESPAWN_WINDOW)
        and app == state[2]
    )


def _charge(group: list[int], delta: int) -> None:
    """Add one call that changed RSS by delta to a group."""
    group[0] += 1
    group[1] += delta
    if delta > 0:
        group[2] += delta
        group[3] += 1
        if delta > group[4]:
            group[4] = delta


def _plain(*columns: tuple[bytes, ...]) -> bool:
    """Return whether the fields hold no whitespace but spaces."""
    text = b"".join(b"".join(column) for column in columns)
    return len(text.translate(None, _OTHER_WHITESPACE)) == len(text)


class LogParser:
    """Feed it logs (binary streams or bytes); read the result with summary()."""

    def __init__(
        self,
        group_by: str = "auto",
        *,
        key_for_urlconf: Callable[[str], str | None] = urlconf_key,
        urlconf_ignores_digits: Callable[[], bool] = urlconf_ignores_digits,
        max_groups: int = MAX_GROUPS,
        max_live_workers: int = MAX_LIVE_WORKERS,
    ) -> None:
        if group_by not in ("auto", "urlconf", "pattern"):
            raise ValueError(f"group_by should be auto, urlconf or pattern, got {group_by!r}")
        self.group_by = group_by
        self.group_by_reason = f"--group-by {group_by}"
        self._key_for_urlconf = key_for_urlconf
        self._urlconf_ignores_digits = urlconf_ignores_digits
        # Whether the caches may key on URIs with their digits zeroed (None: not known yet).
        self._zero_digits: bool | None = True if group_by == "pattern" else None
        self._max_groups = max_groups
        self._max_live_workers = max_live_workers
        # key -> [calls, net growth, positive growth, calls that grew, largest growth]
        self._groups: dict[str, list[int]] = {}
        # logged URI (digits zeroed when they never matter) -> its group's list; URIs with
        # %-escapes are kept apart, unzeroed. Bounded caches: cleared when full.
        self._by_uri: dict[bytes, list[int]] = {}
        self._by_escaped_uri: dict[bytes, list[int]] = {}
        self._by_shape: dict[bytes, list[int]] = {}
        # path_shape() of a whole logged URI (query string included) -> its group; only when
        # digits never matter and the URI is a plain path: URIs that differ only in their
        # UUIDs or hex ids (each one new) then skip the slow path.
        self._by_uri_shape: dict[bytes, list[int]] = {}
        # pid -> [rss, req, app, first rss, first date, last date]
        self._live: dict[bytes, list[Any]] = {}
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
            return self._key_for_urlconf(_decode_path(path)) or UNMATCHED
        return shape.decode("utf-8", "replace")[:255]

    def _group(self, uri: bytes) -> list[int]:
        """Return the group of a URI not in the URI cache (and cache it)."""
        escaped = b"%" in uri
        if escaped:
            # Zeroing digits inside %-escapes would change the characters they encode.
            cached = self._by_escaped_uri.get(uri)
            if cached is not None:
                return cached
        path = _raw_path(uri)
        shape = path_shape(unquote_to_bytes(path))
        group = self._by_shape.get(shape) if self._zero_digits else None
        if group is None:
            group = self._group_of_key(self._key(path, shape))
            if self._zero_digits:
                if len(self._by_shape) >= PATH_CACHE_SIZE:
                    self._by_shape.clear()
                self._by_shape[shape] = group
        cache = self._by_escaped_uri if escaped else self._by_uri
        if len(cache) >= PATH_CACHE_SIZE:
            cache.clear()
        if self._zero_digits and not escaped:
            uri = uri.translate(_ZERO_DIGITS)
        cache[uri] = group
        return group

    def _group_of_key(self, key: str) -> list[int]:
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
                group = self._groups[key] = [0, 0, 0, 0, 0]
        return group

    def _decide_grouping(self, uris: list[bytes]) -> None:
        """Pick urlconf grouping when most sampled paths resolve, else placeholders."""
        paths = [_decode_path(_raw_path(uri)) for uri in uris[:AUTO_SAMPLE_LINES] if uri != b"-"]
        if not paths:
            self._set_grouping("pattern")
            self.group_by_reason = "no paths to resolve against the URLconf"
            return
        resolved = sum(self._key_for_urlconf(path) is not None for path in paths)
        share = resolved / len(paths)
        self._set_grouping("urlconf" if share >= AUTO_MIN_RESOLVED else "pattern")
        self.group_by_reason = (
            f"{share:.0%} of the first {len(paths):,} paths resolved against the URLconf"
        )

    def _set_grouping(self, group_by: str) -> None:
        self.group_by = group_by
        self._zero_digits = group_by == "pattern" or self._urlconf_ignores_digits()

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
        """Parse data[start:end], whole lines."""
        self.lines += data.count(b"\n", start, end)
        rows = FAST_LINE.findall(data, start, end)
        if not rows:
            return
        rss_values, pids, apps, reqs, dates, uris = zip(*rows, strict=True)
        if b"" in rss_values or not _plain(dates, uris):
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
        keys = map(bytes.translate, uris, repeat(_ZERO_DIGITS)) if self._zero_digits else uris
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
        groups: list[list[int] | None],
        uris: tuple[bytes, ...],
        shapes: dict[bytes, bytes],
    ) -> None:
        """Charge each request line's RSS change to its group (columns of one chunk's lines)."""
        live = self._live
        resolve = self._resolve
        for pid, rss, req, app, date, group, uri in zip(
            pids, map(int, rss_values), map(int, reqs), apps, dates, groups, uris, strict=True
        ):
            state = live.get(pid)
            if state is not None:
                last_req = state[1]
                # is_respawn(), inline: this loop runs once per line.
                if (
                    req <= last_req
                    and req >= 0
                    and (req <= RESPAWN_WINDOW or last_req - req >= RESPAWN_WINDOW)
                    and app == state[2]
                ):
                    self.respawns += 1
                    self._retire(pid)
                else:
                    delta = rss - state[0]
                    state[0] = rss
                    state[1] = req
                    state[2] = app
                    state[5] = date
                    if group is None:
                        group = resolve(uri, shapes)
                    group[0] += 1
                    group[1] += delta
                    if delta > 0:
                        group[2] += delta
                        group[3] += 1
                        if delta > group[4]:
                            group[4] = delta
                    continue
            # The first line of a worker: the baseline of its next request.
            live[pid] = [rss, req, app, rss, date, date]
            if len(live) > self._max_live_workers:
                self._retire_oldest()

    def _miss_shapes(
        self, groups: list[list[int] | None], uris: tuple[bytes, ...]
    ) -> dict[bytes, bytes]:
        """Return path_shape() of the plain-path URIs that missed the URI cache.

        One substitution per placeholder over all of them joined by newlines: the patterns
        never match a newline and treat it as an edge, like the end of a string.
        """
        if not self._zero_digits:
            return {}
        # The URIs whose group is None, picked in C, then the plain paths among them.
        missed = set(compress(uris, map(is_, groups, repeat(None))))
        misses = {uri for uri in missed if uri[:1] == b"/" and b"%" not in uri}
        if not misses:
            return {}
        ordered = list(misses)
        return dict(zip(ordered, path_shape(b"\n".join(ordered)).split(b"\n"), strict=True))

    def _resolve(self, uri: bytes, shapes: dict[bytes, bytes]) -> list[int]:
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

    def _date(self, value: bytes) -> float | None:
        if b"]" in value:
            # The text FAST_LINE captured from the client to the method (a date has no "]").
            value = _FAST_DATE.match(value).group(1)  # type: ignore[union-attr]
        if value not in self._dates:
            if len(self._dates) >= PATH_CACHE_SIZE:
                self._dates.clear()
            self._dates[value] = parse_log_date(value)
        return self._dates[value]

    def _retire_oldest(self) -> None:
        """Retire the half of the live workers whose latest line is oldest."""
        by_age = sorted(self._live, key=lambda pid: self._date(self._live[pid][5]) or 0.0)
        for pid in by_age[: len(by_age) // 2]:
            self._retire(pid)

    def _retire(self, pid: bytes) -> None:
        """Fold a finished worker incarnation into the totals."""
        self._retire_state(self._live.pop(pid))

    def _retire_state(self, state: list[Any]) -> None:
        """Fold a worker incarnation, given its state (no longer live), into the totals."""
        rss, _req, _app, first_rss, first_date, last_date = state
        self.workers += 1
        self.worker_rss_growth += rss - first_rss
        self.worker_rss_first_total += first_rss
        first = self._date(first_date)
        last = self._date(last_date)
        if first is not None and last is not None:
            if len(self._intervals) >= MAX_INTERVALS:
                # Keep the latest ones: recycling can leave many short-lived workers.
                del self._intervals[: MAX_INTERVALS // 2]
            self._intervals.append((first, last))
            if self.first_date is None or first < self.first_date:
                self.first_date = first
            if self.last_date is None or last > self.last_date:
                self.last_date = last

    def _merge(self, result: RangeResult) -> bool:
        """Apply a range a worker process parsed, as if its lines had been parsed here.

        The events are replayed in the order of their lines, so workers are retired and groups
        created (or folded) in the order the serial loop would; each group's counters are then
        added. Return False, changing nothing, when the range brings so many new workers that
        the oldest would be retired partway through it: which ones depends on lines the worker
        did not report one by one, so the caller parses that range itself.
        """
        live = self._live
        new = sum(1 for event in result.events if event[0] == _FIRST_LINE and event[1] not in live)
        if len(live) + new > self._max_live_workers:
            return False
        merged: list[tuple[list[int], list[int]]] = []
        for event in result.events:
            if event[0] == _FIRST_CALL:
                _, group, key = event
                merged.append((group, self._group_of_key(key)))
            elif event[0] == _FIRST_LINE:
                _, pid, rss, req, app, _date, key, state = event
                previous = live.get(pid)
                if previous is not None and not is_respawn(req, app, previous):
                    _charge(self._group_of_key(key), rss - previous[0])
                    # The same worker: its first figures are from before the range. The state
                    # list is the worker's, updated to its last line in the range.
                    state[3] = previous[3]
                    state[4] = previous[4]
                    live[pid] = state
                    continue
                if previous is not None:
                    self.respawns += 1
                    self._retire(pid)
                live[pid] = state
            else:
                # A respawn in the range: live[pid] holds the state the event ends.
                _, pid, state = event
                self.respawns += 1
                self._retire(pid)
                live[pid] = state
        for group, target in merged:
            target[0] += group[0]
            target[1] += group[1]
            target[2] += group[2]
            target[3] += group[3]
            target[4] = max(target[4], group[4])
        self.lines += result.lines
        self.request_lines += result.request_lines
        return True

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
            groups={key: Group(*values) for key, values in self._groups.items()},
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


# Parallel parsing ---------------------------------------------------------------------------

# The events of a range, in the order of their lines: the first charged call of a group
# (_FIRST_CALL, group, key: the group's counters at the range's end), the first line of a pid
# (_FIRST_LINE, pid, rss, req, app, date, key, state) and a respawn after it (_RESPAWN, pid,
# state). A state is the worker's list (see LogParser._live) as the range leaves it: updated
# to the last line of that worker there.
_FIRST_CALL = 0
_FIRST_LINE = 1
_RESPAWN = 2


@dataclass
class RangeResult:
    """What a worker process found in a range of a log (see RangeParser)."""

    lines: int
    request_lines: int
    events: list[tuple[Any, ...]]


@dataclass(frozen=True)
class RangeSettings:
    """How the workers parse: the grouping the parent decided, and its URL resolver."""

    group_by: str
    zero_digits: bool
    key_for_urlconf: Callable[[str], str | None]


class RangeParser(LogParser):
    """Parses a byte range of a log in a worker process, for LogParser._merge().

    It knows nothing of the lines before its range, so the first line of each pid there is
    not a baseline: it is reported (a _FIRST_LINE event) for the parent to charge, or to take as
    a baseline or a respawn, against the pid's state before the range. Later lines of the pid
    are charged here, as the serial loop would. Groups are not capped here: the parent folds
    them into OTHER in the order of their first calls (_FIRST_CALL events).

    A worker process parses all its ranges with one: its caches stay warm from one range to
    the next (cold, they cost a few milliseconds a range), its groups are zeroed in between.
    """

    def __init__(self, settings: RangeSettings) -> None:
        super().__init__(settings.group_by, key_for_urlconf=settings.key_for_urlconf)
        self._zero_digits = settings.zero_digits
        self._events: list[tuple[Any, ...]] = []
        # id(group) -> its key, for the events.
        self._keys: dict[int, str] = {}

    def _group_of_key(self, key: str) -> list[int]:
        group = self._groups.get(key)
        if group is None:
            group = self._groups[key] = [0, 0, 0, 0, 0]
            self._keys[id(group)] = key
        return group

    def begin(self) -> None:
        """Forget the previous range (its result was sent): start a new one."""
        for event in self._events:
            if event[0] == _FIRST_CALL:
                event[1][:] = [0, 0, 0, 0, 0]
        self._events = []
        self._live = {}
        self.lines = self.request_lines = 0
        if len(self._groups) >= PATH_CACHE_SIZE:
            # The groups are not capped here: drop them, and the caches that hold them.
            for cache in (
                self._groups,
                self._keys,
                self._by_uri,
                self._by_escaped_uri,
                self._by_shape,
                self._by_uri_shape,
            ):
                cache.clear()

    def _account(
        self,
        pids: tuple[bytes, ...],
        rss_values: tuple[bytes, ...],
        reqs: tuple[bytes, ...],
        apps: tuple[bytes, ...],
        dates: tuple[bytes, ...],
        groups: list[list[int] | None],
        uris: tuple[bytes, ...],
        shapes: dict[bytes, bytes],
    ) -> None:
        # LogParser._account(), but a pid's first line is reported and a respawn too.
        live = self._live
        report = self._events.append
        resolve = self._resolve
        for pid, rss, req, app, date, group, uri in zip(
            pids, map(int, rss_values), map(int, reqs), apps, dates, groups, uris, strict=True
        ):
            state = live.get(pid)
            if state is not None:
                last_req = state[1]
                # is_respawn(), inline: this loop runs once per line.
                if (
                    req <= last_req
                    and req >= 0
                    and (req <= RESPAWN_WINDOW or last_req - req >= RESPAWN_WINDOW)
                    and app == state[2]
                ):
                    state = live[pid] = [rss, req, app, rss, date, date]
                    report((_RESPAWN, pid, state))
                    continue
                delta = rss - state[0]
                state[0] = rss
                state[1] = req
                state[2] = app
                state[5] = date
                if group is None:
                    group = resolve(uri, shapes)
                calls = group[0]
                if not calls:
                    report((_FIRST_CALL, group, self._keys[id(group)]))
                group[0] = calls + 1
                group[1] += delta
                if delta > 0:
                    group[2] += delta
                    group[3] += 1
                    if delta > group[4]:
                        group[4] = delta
                continue
            if group is None:
                group = resolve(uri, shapes)
            state = live[pid] = [rss, req, app, rss, date, date]
            report((_FIRST_LINE, pid, rss, req, app, date, self._keys[id(group)], state))

    def result(self) -> RangeResult:
        """Return what the range held (send it before the next begin())."""
        return RangeResult(self.lines, self.request_lines, self._events)


def feed_range(parser: LogParser, fd: int, start: int, end: int | None) -> None:
    """Parse bytes start to end of an open file (None: to its end, as feed() does).

    Reads stop at the multiples of CHUNK_SIZE where feed()'s reads from the file's start stop,
    so a line longer than MAX_LINE is dropped (and counted) where feed() drops it.
    """
    position = start
    while end is None or position < end:
        size = CHUNK_SIZE - position % CHUNK_SIZE
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


class _Workers:
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
                parser.group_by, bool(parser._zero_digits), parser._key_for_urlconf
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

    def __enter__(self) -> _Workers:
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


def _feed_split(
    parser: LogParser, stream: BinaryIO, name: str, workers: _Workers, range_size: int
) -> None:
    """Parse a plain log file in byte ranges in the worker processes: parser.feed(stream).

    The parent parses the lines up to the first request line, which settles the grouping
    (--group-by auto) the workers then use, and merges the ranges' results in file order.
    """
    read = stream.read
    while not parser.request_lines:
        chunk = read(CHUNK_SIZE)
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
    if not parser._merge(task.result()):
        feed_range(parser, fd, begin, end)


@contextlib.contextmanager
def open_log(name: str, stdin: BinaryIO | None = None) -> Iterator[BinaryIO]:
    """Open a log for reading bytes: a plain or gzip file, or stdin for "-"."""
    if name == "-":
        stream = stdin if stdin is not None else sys.stdin.buffer
        head = stream.peek(2)[:2] if isinstance(stream, io.BufferedReader) else b""
        if head == b"\x1f\x8b":
            with gzip.GzipFile(fileobj=stream) as unzipped:
                yield unzipped  # type: ignore[misc]
        else:
            yield stream
        return
    path = Path(name)
    with path.open("rb") as raw:
        head = raw.read(2)
        raw.seek(0)
        if head == b"\x1f\x8b":
            with gzip.GzipFile(fileobj=raw) as unzipped:
                yield unzipped  # type: ignore[misc]
        else:
            yield raw


def parse_logs(
    names: Iterable[str],
    group_by: str = "auto",
    *,
    stdin: BinaryIO | None = None,
    key_for_urlconf: Callable[[str], str | None] = urlconf_key,
    jobs: int = 1,
    parallel_min_size: int | None = None,
    range_size: int | None = None,
    max_groups: int = MAX_GROUPS,
    max_live_workers: int = MAX_LIVE_WORKERS,
) -> LogSummary:
    """Parse the named logs (in order) into one summary; raise OSError when one is unreadable.

    With jobs above 1, plain files of parallel_min_size bytes or more (PARALLEL_MIN_SIZE) are
    split into ranges of at most range_size bytes (RANGE_SIZE) that jobs worker processes
    parse, where they can be forked; the summary is the same as with jobs=1. A worker killed
    meanwhile (out of memory?) raises concurrent.futures.process.BrokenProcessPool.
    """
    parser = LogParser(
        group_by,
        key_for_urlconf=key_for_urlconf,
        max_groups=max_groups,
        max_live_workers=max_live_workers,
    )
    files = []
    split = jobs > 1 and can_fork()
    min_size = PARALLEL_MIN_SIZE if parallel_min_size is None else parallel_min_size
    # findall() creates a tuple per request line, which sets off the cyclic garbage collector
    # every few hundred lines for nothing: parsing makes no reference cycles (everything it
    # drops is freed at once), so the collector is paused meanwhile (about 10 % of the time).
    collecting = gc.isenabled()
    gc.disable()
    try:
        with _Workers(jobs) as workers:
            for name in names:
                with open_log(name, stdin) as stream:
                    if split and name != "-" and _large_plain_file(stream, min_size):
                        _feed_split(parser, stream, name, workers, range_size or RANGE_SIZE)
                    else:
                        parser.feed(stream)
                files.append(name)
    finally:
        if collecting:
            gc.enable()
    summary = parser.summary()
    summary.files = files
    return summary


def _large_plain_file(stream: BinaryIO, min_size: int) -> bool:
    """Return whether a stream open_log() opened is a regular file (not gzip) of min_size."""
    if isinstance(stream, gzip.GzipFile):
        return False
    status = os.fstat(stream.fileno())
    return stat.S_ISREG(status.st_mode) and status.st_size >= min_size
