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
"""

from __future__ import annotations

import contextlib
import datetime as dt
import gc
import gzip
import io
import re
import sys
import time
from collections.abc import Callable, Iterable, Iterator
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
        self.folded_groups = 0
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
            key = self._key(path, shape)
            group = self._groups.get(key)
            if group is None:
                if len(self._groups) >= self._max_groups:
                    self.folded_groups += 1
                    key = OTHER
                    group = self._groups.get(key)
                if group is None:
                    group = self._groups[key] = [0, 0, 0, 0, 0]
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

    def feed(self, stream: BinaryIO, chunk_size: int = CHUNK_SIZE) -> None:
        """Parse a whole binary stream, chunk by chunk."""
        read = stream.read
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
        live = self._live
        resolve = self._resolve
        for pid, rss, req, app, date, group, uri in zip(
            pids, map(int, rss_values), map(int, reqs), apps, dates, groups, uris, strict=True
        ):
            state = live.get(pid)
            if state is not None:
                last_req = state[1]
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
        rss, _req, _app, first_rss, first_date, last_date = self._live.pop(pid)
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
            folded_groups=self.folded_groups,
        )


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
) -> LogSummary:
    """Parse the named logs (in order) into one summary; raise OSError when one is unreadable."""
    parser = LogParser(group_by, key_for_urlconf=key_for_urlconf)
    files = []
    # findall() creates a tuple per request line, which sets off the cyclic garbage collector
    # every few hundred lines for nothing: parsing makes no reference cycles (everything it
    # drops is freed at once), so the collector is paused meanwhile (about 10 % of the time).
    collecting = gc.isenabled()
    gc.disable()
    try:
        for name in names:
            with open_log(name, stdin) as stream:
                parser.feed(stream)
            files.append(name)
    finally:
        if collecting:
            gc.enable()
    summary = parser.summary()
    summary.files = files
    return summary
