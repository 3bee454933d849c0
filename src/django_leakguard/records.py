"""What every module shares: the kinds of calls, the reserved keys, the growth counters, the key.

A leaf module (it imports only tracing_records, itself a leaf), so that the recorder, storage,
the models, the log parser and the report can all import it and none imports another for it.

The growth counters are the fields of `Counts`. Their metadata drives the model's columns
(models.py), the storage's upserts and increments (storage.py), the report's sums (report.py)
and the JSON and CSV output: adding a counter is adding a field here, plus the code that
measures it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any, Protocol

from django_leakguard.tracing_records import Site, TraceResult, merge_sites

if TYPE_CHECKING:
    from django.urls import ResolverMatch

REQUEST = "request"
TASK = "task"
KINDS = (REQUEST, TASK)
# The key calls are folded into once a process has MAX_KEYS keys in an hour.
OTHER = "<other>"
# The key of a request that resolved to no URL pattern.
UNMATCHED = "<unmatched>"
KEY_MAX_LENGTH = 255
VIEW_MAX_LENGTH = 255

SUM = "sum"
MAX = "max"
# A cut key ends with this separator and a short hash of the whole key.
_CUT = "~"
_DIGEST_LENGTH = 8


def counter(
    verbose_name: str, *, merge: str = SUM, count: str | None = None, output: str | None = None
) -> Any:
    """Declare a growth counter (a field of Counts).

    merge: SUM (added up across calls, hours and processes) or MAX (the largest). count: the
    counter that counts the readings behind this one; a MAX counter with no readings yet takes
    the other's value, and the output shows None while it is 0. output: the name of the field
    in the report's JSON and CSV rows, or None when the report shows a derived figure instead.
    """
    metadata = {"verbose_name": verbose_name, "merge": merge, "count": count, "output": output}
    return dataclasses.field(default=0, metadata=metadata)


@dataclass(slots=True)
class Counts:
    """The growth counters of one (kind, key): of an hour in a process, or summed over a window."""

    calls: int = counter("calls", output="calls")
    rss_growth: int = counter("net RSS growth", output="rss_growth_bytes")
    rss_growth_positive: int = counter("positive RSS growth", output="rss_growth_positive_bytes")
    rss_grew_calls: int = counter("calls that grew RSS")
    rss_growth_max: int = counter(
        "largest RSS growth of one call", merge=MAX, count="calls", output="rss_growth_max_bytes"
    )
    heap_calls: int = counter("calls with a heap reading", output="heap_calls")
    heap_growth: int = counter("net heap growth")
    heap_growth_max: int = counter(
        "largest heap growth of one call",
        merge=MAX,
        count="heap_calls",
        output="heap_growth_max_bytes",
    )
    blocks_growth: int = counter("net pymalloc block growth", output="blocks_growth")
    late_calls: int = counter("heap readings of late calls", output="late_readings")
    late_heap_growth: int = counter(
        "net heap growth of late calls", output="late_heap_growth_bytes"
    )
    late_blocks_growth: int = counter(
        "net pymalloc block growth of late calls", output="late_blocks_growth"
    )
    traced_calls: int = counter("calls traced with tracemalloc", output="traced_calls")
    traced_retained: int = counter(
        "bytes the traced calls allocated and kept", count="traced_calls", output="retained_bytes"
    )

    def merge(self, other: Counts) -> None:
        """Add other's counters to these (sums added, maxima kept)."""
        # Maxima first: they look at the readings counted before the sums are added.
        for spec in _MAXIMA:
            value = getattr(other, spec.name)
            if _has_readings(other, spec) and (
                not _has_readings(self, spec) or value > getattr(self, spec.name)
            ):
                setattr(self, spec.name, value)
        for name in _SUMS:
            setattr(self, name, getattr(self, name) + getattr(other, name))

    def values(self) -> tuple[int, ...]:
        """The counters in COUNTERS order."""
        return tuple(getattr(self, spec.name) for spec in COUNTERS)


@dataclass(frozen=True)
class Counter:
    """One growth counter, as declared in Counts."""

    name: str
    verbose_name: str
    merge: str
    count: str | None
    output: str | None


def counters(cls: type[Counts] = Counts) -> tuple[Counter, ...]:
    """Return the counters declared by cls (Counts, or a subclass that adds some)."""
    return tuple(
        Counter(
            name=field.name,
            verbose_name=field.metadata["verbose_name"],
            merge=field.metadata["merge"],
            count=field.metadata["count"],
            output=field.metadata["output"],
        )
        for field in dataclasses.fields(cls)
        if "merge" in field.metadata
    )


def _has_readings(counts: Counts, spec: Counter) -> bool:
    # Sums start from 0 and need no readings; a MAX counter means something once counted.
    return spec.count is None or getattr(counts, spec.count) > 0


def output_values(counts: Counts, specs: tuple[Counter, ...] | None = None) -> dict[str, Any]:
    """The counters shown as they are in JSON and CSV rows: None where nothing was read."""
    return {
        spec.output: getattr(counts, spec.name) if _has_readings(counts, spec) else None
        for spec in (COUNTERS if specs is None else specs)
        if spec.output is not None
    }


COUNTERS = counters()
COUNTER_NAMES = tuple(spec.name for spec in COUNTERS)
# What the report's ranking sums over every stored row of its window: what ranks, filters and
# totals every key; and the traced sums, which only --sort retained ranks by. The growth
# table's ranking index holds them after (kind, key, hour), so those sums read the index alone.
RANKING_SUMS = (
    "calls",
    "rss_growth",
    "heap_calls",
    "heap_growth",
    "blocks_growth",
    "late_calls",
    "late_heap_growth",
    "late_blocks_growth",
)
TRACED_SUMS = ("traced_calls", "traced_retained")
_MAXIMA = tuple(spec for spec in COUNTERS if spec.merge != SUM)
_SUMS = tuple(spec.name for spec in COUNTERS if spec.merge == SUM)


class Aggregate(Counts):
    """The counters of one (kind, key) during one hour in one process, as the recorder adds."""

    __slots__ = ("traced_sites", "view")

    def __init__(self, view: str = "") -> None:
        Counts.__init__(self)
        self.view = view
        self.traced_sites: tuple[Site, ...] = ()

    def add(
        self,
        rss_growth: int,
        heap_growth: int | None,
        blocks_growth: int = 0,
        late: bool = False,
    ) -> None:
        """Count one call: its RSS growth, and its heap signals when it read them.

        late: the call came in the second half of its process's life (recorder.LATE_AFTER).
        """
        if self.calls == 0 or rss_growth > self.rss_growth_max:
            self.rss_growth_max = rss_growth
        self.calls += 1
        self.rss_growth += rss_growth
        if rss_growth > 0:
            self.rss_growth_positive += rss_growth
            self.rss_grew_calls += 1
        if heap_growth is not None:
            if self.heap_calls == 0 or heap_growth > self.heap_growth_max:
                self.heap_growth_max = heap_growth
            self.heap_calls += 1
            self.heap_growth += heap_growth
            self.blocks_growth += blocks_growth
            if late:
                self.late_calls += 1
                self.late_heap_growth += heap_growth
                self.late_blocks_growth += blocks_growth

    def add_trace(self, result: TraceResult, top_n: int) -> None:
        """Count one traced call: its retained bytes and sites, keeping the top_n sites."""
        self.traced_calls += 1
        self.traced_retained += result.retained
        self.traced_sites = merge_sites(self.traced_sites, result.sites, top_n)

    def merge(self, other: Counts) -> None:
        if isinstance(other, Aggregate):
            if other.calls and other.view:
                self.view = other.view
            if other.traced_calls:
                # Both hold at most TRACE_TOP_SITES sites: the merge keeps as many as the larger.
                top_n = max(len(self.traced_sites), len(other.traced_sites))
                self.traced_sites = merge_sites(self.traced_sites, other.traced_sites, top_n)
        Counts.merge(self, other)

    def copy(self) -> Aggregate:
        clone = Aggregate(self.view)
        clone.merge(self)
        return clone


# pending[hour][(kind, key)]; hour is the Unix time divided by 3600.
Pending = dict[int, dict[tuple[str, str], Aggregate]]


@dataclass
class WorkerState:
    """A process's identity and memory at its first and latest call.

    process_started_at (when the OS started the process) and first_call_at (when its first
    call began) give its boot time, which the jitter advice needs (jitter.py).
    """

    host: str
    pid: int
    started_at: datetime
    kind: str = ""
    process_started_at: datetime | None = None
    first_call_at: datetime | None = None
    rss_first: int | None = None
    heap_first: int | None = None
    rss_last: int = 0
    heap_last: int | None = None
    calls: int = 0  # calls not flushed yet

    def copy(self) -> WorkerState:
        return WorkerState(**vars(self))


@dataclass
class Batch:
    """What one flush writes: taken from the recorder, given back when the write fails."""

    pending: Pending
    worker: WorkerState
    prune: bool = False


class Writer(Protocol):
    """Where the recorder's flushes go (storage.DatabaseWriter)."""

    def write(self, batch: Batch) -> None:
        """Add batch to the stored totals; raise on failure."""

    def prune(self) -> int:
        """Delete rows older than the retention period; return how many."""

    def in_transaction(self) -> bool:
        """Whether this thread is inside a transaction the write must not join."""

    def discard_broken_connection(self) -> None:
        """After a failed write, drop a connection that can no longer be used."""

    def close(self) -> None:
        """Close this thread's connection (a flush thread that ends)."""


# The key -------------------------------------------------------------------------------------


def fit_key(key: str, length: int = KEY_MAX_LENGTH) -> str:
    """Return key cut to length characters; a cut key ends with a short hash of the whole.

    Two long keys that share their first characters stay apart, and the same key always
    gives the same cut key, in the recorder's memory and in the database alike.
    """
    if len(key) <= length:
        return key
    digest = hashlib.blake2s(key.encode("utf-8", "surrogatepass")).hexdigest()[:_DIGEST_LENGTH]
    return key[: length - _DIGEST_LENGTH - len(_CUT)] + _CUT + digest


# A language prefix of i18n_patterns() in a key: one key per view whatever the language.
LANGUAGE_PLACEHOLDER = "{lang}/"
# Keys of resolved routes by their chain of patterns (objects compare by identity; holding
# them keeps their ids from being reused). Cleared when full: URLconfs are finite, but a
# project may build them anew (tests overriding ROOT_URLCONF).
_MATCH_KEYS: dict[tuple[object, ...], str] = {}
_MATCH_KEYS_SIZE = 4096


def route_key(match: ResolverMatch) -> str:
    """Return the key of a resolved request: "/" + its route, in readable form.

    The one function that turns a resolution (request.resolver_match, or resolve() of a
    logged path) into a key, used by the middleware and by the uWSGI log parser, so that both
    give a pattern the same key. The route is rebuilt from the patterns that matched
    (ResolverMatch.tried's last entry): the language prefix of i18n_patterns() becomes
    "{lang}/" (prefixed or not), translated routes are shown untranslated, and regular
    expressions as readable_route() shows them.
    """
    chain = match.tried[-1] if match.tried else None
    if not chain:
        return fit_key("/" + readable_route(match.route))
    cache_key = tuple(chain)
    key = _MATCH_KEYS.get(cache_key)
    if key is None:
        key = fit_key("/" + "".join(_pattern_text(entry) for entry in chain))
        if len(_MATCH_KEYS) >= _MATCH_KEYS_SIZE:
            _MATCH_KEYS.clear()
        _MATCH_KEYS[cache_key] = key
    return key


def _pattern_text(entry: object) -> str:
    """Return one matched pattern's part of a key (untranslated; regex made readable)."""
    from django.urls.resolvers import LocalePrefixPattern, RegexPattern, RoutePattern
    from django.utils import translation

    pattern = getattr(entry, "pattern", None)
    if isinstance(pattern, LocalePrefixPattern):
        return LANGUAGE_PLACEHOLDER
    if isinstance(pattern, RoutePattern):
        raw: Any = pattern._route  # type: ignore[attr-defined]
    elif isinstance(pattern, RegexPattern):
        raw = pattern._regex  # type: ignore[attr-defined]
    else:
        return readable_route(str(pattern))
    if not isinstance(raw, str):
        # A lazily translated route (path(_("about/"), ...)): the text the project wrote.
        with translation.override(None):
            raw = str(raw)
    return readable_route(raw) if isinstance(pattern, RegexPattern) else raw


# Group openings that capture nothing and stay as written: (?:...), lookarounds, flags.
_CAPTURING_GROUP = re.compile(r"\(\?P<(\w+)>|\((?!\?)")
_ESCAPED_LITERAL = re.compile(r"\\([^\w\s])")


def readable_route(route: str) -> str:
    """Return a route with its regular-expression syntax simplified.

    Anchors (^ and an unescaped $ at the end) are dropped, a named group (?P<year>...) shows as
    <year> and an unnamed one as <arg1>, <arg2>... (numbered from the left), and escaped
    punctuation as the character (robots\\.txt as robots.txt); the rest stays as written. A
    path() route is unchanged (it has none of this syntax, or only where Django reads it
    literally: then the route is not a regex and is left alone).
    """
    if not _looks_like_regex(route):
        return route
    if route[:1] == "^":
        route = route[1:]
    if route[-1:] == "$" and _unescaped(route, len(route) - 1):
        route = route[:-1]
    out: list[str] = []
    unnamed = 0
    index = 0
    while index < len(route):
        char = route[index]
        if char == "\\":
            out.append(route[index : index + 2])
            index += 2
            continue
        if char == "[":
            end = _class_end(route, index)
            out.append(route[index:end])
            index = end
            continue
        opening = _CAPTURING_GROUP.match(route, index)
        if opening is not None:
            if opening.group(1):
                name = opening.group(1)
            else:
                unnamed += 1
                name = f"arg{unnamed}"
            out.append(f"<{name}>")
            index = _group_end(route, index)
            continue
        out.append(char)
        index += 1
    return _ESCAPED_LITERAL.sub(r"\1", "".join(out))


def _looks_like_regex(route: str) -> bool:
    return route[:1] == "^" or route[-1:] == "$" or any(c in route for c in "\\()[]|")


def _unescaped(text: str, index: int) -> bool:
    """Return whether text[index] is not escaped (preceded by an even run of backslashes)."""
    backslashes = len(text[:index]) - len(text[:index].rstrip("\\"))
    return backslashes % 2 == 0


def _class_end(text: str, start: int) -> int:
    """Return the index after the character class that opens at text[start] ("[")."""
    index = start + 1
    if text[index : index + 1] == "^":
        index += 1
    if text[index : index + 1] == "]":  # a "]" first in a class is literal
        index += 1
    while index < len(text):
        if text[index] == "\\":
            index += 2
            continue
        if text[index] == "]":
            return index + 1
        index += 1
    return len(text)


def _group_end(text: str, start: int) -> int:
    """Return the index after the group that opens at text[start] ("(")."""
    depth = 0
    index = start
    while index < len(text):
        char = text[index]
        if char == "\\":
            index += 2
            continue
        if char == "[":
            index = _class_end(text, index)
            continue
        if char == "(":
            depth += 1
        elif char == ")":
            depth -= 1
            if depth == 0:
                return index + 1
        index += 1
    return len(text)
