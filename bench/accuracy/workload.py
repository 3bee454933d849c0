"""The kinds of calls in the accuracy project, and a run's plan drawn from a seed.

A plan fixes what each leak keeps per call (drawn log-uniformly from about 100 B to 50 KiB),
the traffic mix (most calls go to non-leaks; among leaks the hottest keeps the least), the
bounds of the caches (reached early in a worker's life, so that they level off) and the order
of the calls.
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass

MIN_BYTES = 100
MAX_BYTES = 50 * 1024
ITEMS = 200  # rows the project's migration creates


@dataclass(frozen=True)
class Kind:
    """One kind of call: how to request it, the key leakguard stores, the task that mirrors it."""

    name: str
    leak: bool
    path: str  # {n}: the call's number (a new id each call); {m}: n within the cache's range
    route: str
    task: str
    args: str  # "", "n", "m" or "pk": what the task takes
    about: str
    weights: tuple[float, float] = (1.0, 1.0)  # non-leaks: the range their weight is drawn from

    @property
    def task_name(self) -> str:
        return f"accuracysite.tasks.{self.task}"

    def key(self, kind: str) -> str:
        """The key a row of this kind has in leakreport ("request" or "task")."""
        return self.route if kind == "request" else self.task_name


KINDS = (
    Kind("tuples", True, "/orders/import/", "/orders/import/", "import_rows", "",
         "small tuples appended to a module-level list"),
    Kind("loggers", True, "/tenants/{n}/log/", "/tenants/<int:tenant>/log/", "tenant_log", "n",
         "logging.getLogger() per new tenant id"),
    Kind("receivers", True, "/hooks/subscribe/", "/hooks/subscribe/", "subscribe", "",
         "a fresh closure connected with weak=False per call"),
    Kind("native", True, "/images/thumbnail/", "/images/thumbnail/", "thumbnail", "",
         "libc malloc() never freed (ctypes)"),
    Kind("async", True, "/api/events/", "/api/events/", "events", "",
         "an async view appending payloads to a list"),
    Kind("db", True, "/db/export/", "/db/export/", "db_export", "",
         "a database view (CONN_MAX_AGE = 0) keeping an export"),
    Kind("dict", True, "/users/{n}/profile/", "/users/<int:user>/profile/", "profile", "n",
         "a dict entry per new user id"),
    Kind("spike", False, "/reports/export/", "/reports/export/", "report", "",
         "a 30 MiB report built and freed", (1.0, 3.0)),
    Kind("lru", False, "/fragments/{m}/", "/fragments/<int:n>/", "fragment", "m",
         "functools.lru_cache with a maxsize", (5.0, 10.0)),
    Kind("deque", False, "/activity/", "/activity/", "activity", "",
         "a deque with a maxlen", (4.0, 8.0)),
    Kind("db_list", False, "/db/items/", "/db/items/", "items", "",
         "a database view: query, render a template", (6.0, 12.0)),
    Kind("db_detail", False, "/db/items/{pk}/", "/db/items/<int:pk>/", "item", "pk",
         "a database view: one row, render a template", (6.0, 12.0)),
    Kind("plain", False, "/", "/", "plain", "n", "a plain view", (10.0, 20.0)),
    Kind("plain_json", False, "/plain/{n}/", "/plain/<int:n>/", "plain", "n",
         "a plain JSON view", (8.0, 15.0)),
    Kind("async_plain", False, "/api/ping/", "/api/ping/", "ping", "",
         "an async plain view", (4.0, 10.0)),
    Kind("api_detail", False, "/api/items/{pk}/", "/api/items/<int:pk>/", "api_item", "pk",
         "a REST framework detail view: one row serialized", (6.0, 12.0)),
    Kind("api_list", False, "/api/items/", "/api/items/", "api_items", "",
         "a REST framework list view: 20 rows serialized", (4.0, 8.0)),
)  # fmt: skip
BY_NAME = {kind.name: kind for kind in KINDS}
LEAKS = tuple(kind for kind in KINDS if kind.leak)
NON_LEAKS = tuple(kind for kind in KINDS if not kind.leak)
DB_VIEWS = ("db_list", "db_detail")
# Tasks have no home page: plain_json's task stands for both plain views.
TASK_KINDS = tuple(kind for kind in KINDS if kind.name != "plain")


@dataclass(frozen=True)
class Plan:
    seed: int
    calls: list[str]  # kind names, in the order they are sent
    sizes: dict[str, int]  # bytes kept per call, per leak kind
    shares: dict[str, float]
    max_requests: int
    cache_size: int
    recent_size: int
    entry_bytes: int

    def environ(self) -> dict[str, str]:
        """The plan as the project reads it (accuracysite.leaks)."""
        return {
            "ACCURACY_PLAN": json.dumps(
                {
                    "sizes": self.sizes,
                    "cache_size": self.cache_size,
                    "recent_size": self.recent_size,
                    "entry_bytes": self.entry_bytes,
                }
            )
        }

    def paths(self) -> list[str]:
        return [self._path(BY_NAME[name], n) for n, name in enumerate(self.calls)]

    def tasks(self) -> list[tuple[str, list[int]]]:
        """(task name, arguments) per call; plain's calls go to plain_json's task."""
        result = []
        for n, name in enumerate(self.calls):
            kind = BY_NAME[name]
            value = {"n": n, "m": self._m(n), "pk": self._pk(n)}.get(kind.args)
            result.append((kind.task_name, [] if value is None else [value]))
        return result

    def count(self, name: str) -> int:
        return self.calls.count(name)

    def leaks(self) -> list[str]:
        return [kind.name for kind in LEAKS if kind.name in self.sizes]

    def _m(self, n: int) -> int:
        # Four times the cache's bound: some hits, many evictions.
        return n * 7919 % (4 * self.cache_size)

    def _pk(self, n: int) -> int:
        return n * 31 % ITEMS + 1

    def _path(self, kind: Kind, n: int) -> str:
        return kind.path.format(n=n, m=self._m(n), pk=self._pk(n))


def draw(
    seed: int,
    calls: int,
    max_requests: int,
    *,
    sizes: dict[str, int] | None = None,
    leak_share: tuple[float, float] = (0.25, 0.4),
) -> Plan:
    """Draw a run's plan from seed; sizes, when given, fixes the leaks and what they keep."""
    rng = random.Random(seed)
    if sizes is None:
        low, high = math.log(MIN_BYTES), math.log(MAX_BYTES)
        sizes = {kind.name: round(math.exp(rng.uniform(low, high))) for kind in LEAKS}
    weights = {kind.name: rng.uniform(*kind.weights) for kind in NON_LEAKS}
    # Realistic traffic: the hottest leak keeps the least, the rarest keeps the most.
    leak_weights = sorted((rng.uniform(2, 10) for _ in sizes), reverse=True)
    by_size = sorted(sizes, key=lambda name: sizes[name])
    share = rng.uniform(*leak_share)
    scale = share / (1 - share) * sum(weights.values()) / sum(leak_weights)
    for name, weight in zip(by_size, leak_weights, strict=True):
        weights[name] = weight * scale
    total = sum(weights.values())
    shares = {name: weight / total for name, weight in weights.items()}
    names = list(weights)
    order = rng.choices(names, [weights[name] for name in names], k=calls)
    # The caches are full a third of the way into a worker's life: they level off, visibly.
    cache_size = max(8, round(max_requests * shares["lru"] / 3))
    recent_size = max(8, round(max_requests * shares["deque"] / 3))
    entry_bytes = round(math.exp(rng.uniform(math.log(1024), math.log(8192))))
    return Plan(
        seed=seed,
        calls=order,
        sizes=dict(sizes),
        shares=shares,
        max_requests=max_requests,
        cache_size=cache_size,
        recent_size=recent_size,
        entry_bytes=entry_bytes,
    )
