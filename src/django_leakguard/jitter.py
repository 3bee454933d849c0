"""Jitter that de-correlates restarts in time: simulate the server's own rule, from real figures.

A jitter counted in requests says nothing about time. Two workers that restart within one boot
time of each other are both away at once: the others take their load, and a request waits
(10 s for one request where a worker boots in 5 s, in issue 16). What matters is how far apart
in seconds the restarts fall, which depends on the request rate and the boot time, both read
from the worker rows (a worker's boot time: from the process's start to its first call).

The simulation runs each server's rule as its source has it, for the workers seen at once:

- Gunicorn (workers/base.py): each worker, when it starts, draws
  max_requests + randint(0, max_requests_jitter).
- uWSGI (core/utils.c, uwsgi_close_request): worker i (from 1) recycles after
  max-requests + (i - 1) x max-requests-delta requests, and not before min-worker-lifetime
  (10 s by default); LEAKGUARD's jitter becomes the delta as recycling.max_requests_delta says.
- Celery (billiard's pool): every child recycles after exactly max_tasks_per_child tasks; there
  is no jitter to widen, so nothing is recommended.

Every worker starts at once (a deploy), serves an equal share of the requests at the measured
rate, and boots in the measured time before its next life; the first LIVES lives are simulated,
RUNS times over for Gunicorn's random draws. Uneven load spreads restarts
further, so the figure errs towards a wider jitter. The narrowest jitter (a fraction of
MAX_REQUESTS, in steps of 0.01) for which at least TARGET of the restarts fall more than one boot
time from any other worker's is recommended.
"""

from __future__ import annotations

import datetime as dt
import random
import statistics
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from django_leakguard import conf, discovery, recycling
from django_leakguard.records import TASK

GUNICORN = "gunicorn"
UWSGI = "uwsgi"
CELERY = "celery"
RULES = (GUNICORN, UWSGI, CELERY)
# The share of restarts that must fall more than a boot time from any other worker's ("most").
TARGET = 0.75
# Below this share with the configured jitter, the check warns (leakguard.W013): "clearly".
CLEARLY_TOO_NARROW = 0.5
# The least data behind advice: workers with a boot time, and workers alive at once.
MIN_BOOTS = 3
MIN_AT_ONCE = 2
# The simulation: lives per worker, runs, and at most this many workers (a larger fleet is
# simulated as this many, which errs towards a wider jitter: fewer gaps to fall into).
LIVES = 20
RUNS = 40
MAX_WORKERS = 32
# uWSGI recycles no worker younger than this (its min-worker-lifetime default), in seconds.
UWSGI_MIN_WORKER_LIFETIME = 10.0
# Boot times longer than this are a worker that waited for its first request, not a boot.
MAX_BOOT_SECONDS = 600.0
STEPS = 100  # jitter fractions tried: 0.01 to 1.00


@dataclass(frozen=True)
class Fleet:
    """What the worker rows say: workers at once, one worker's request rate, its boot time."""

    workers: int
    rate: float  # calls per second served by one worker
    boot: float  # seconds from a worker's start to its first call (the median)
    boots: int  # workers with a boot time behind it

    @property
    def enough(self) -> bool:
        return (
            self.boots >= MIN_BOOTS
            and self.workers >= MIN_AT_ONCE
            and self.rate > 0
            and self.boot > 0
        )


@dataclass(frozen=True)
class Advice:
    """The configured jitter's share of restarts kept apart; the narrowest that keeps TARGET."""

    rule: str
    fleet: Fleet
    max_requests: int
    configured: float  # MAX_REQUESTS_JITTER
    apart: float  # share of restarts kept apart with it
    recommended: float | None  # None: no jitter up to 1.0 keeps TARGET apart, or Celery

    @property
    def too_narrow(self) -> bool:
        """Whether the configured jitter clearly is too narrow (leakguard.W013)."""
        return (
            self.apart < CLEARLY_TOO_NARROW
            and self.recommended is not None
            and self.recommended > self.configured
        )

    def lines(self) -> list[str]:
        """The advice as the report and the admin pages print it."""
        fleet = self.fleet
        seen = (
            f"{fleet.workers} workers at once, each serving {fleet.rate:.3g} calls/s, booting in "
            f"{fleet.boot:.3g} s (median of {fleet.boots})"
        )
        kept = f"{self.apart:.0%} of restarts more than a boot time apart"
        if self.rule == CELERY:
            return [f"Celery children recycle without jitter: {seen}, {kept}."]
        lines = [f"MAX_REQUESTS_JITTER = {self.configured:g} keeps {kept} ({seen}; {self.rule})."]
        if self.recommended is None:
            lines.append(
                f"No jitter up to 1 keeps {TARGET:.0%} apart: a worker lives about "
                f"{self.max_requests / fleet.rate:,.0f} s for a {fleet.boot:.3g} s boot, too "
                "short for the restarts to miss each other; raise MAX_REQUESTS."
            )
        elif self.recommended > self.configured:
            lines.append(
                f"Narrowest MAX_REQUESTS_JITTER that keeps {TARGET:.0%} apart: "
                f"{self.recommended:g}; widen it to that."
            )
        else:
            lines.append(
                f"Narrowest MAX_REQUESTS_JITTER that keeps {TARGET:.0%} apart: "
                f"{self.recommended:g}; the configured jitter is enough."
            )
        return lines


def fleet_from_workers(
    rows: Iterable[tuple[str, dt.datetime, dt.datetime | None, dt.datetime | None, int]],
) -> Fleet:
    """Return the fleet from worker rows (host, last_seen, process_started_at, first_call_at,
    calls)."""
    from django_leakguard.reporting.model import most_at_once

    boots: list[float] = []
    calls = 0
    seconds = 0.0
    spans: dict[str, list[tuple[dt.datetime, dt.datetime]]] = {}
    for host, last_seen, started, first_call, served in rows:
        if started is None or first_call is None:
            continue  # written before migration 0006_worker_boot_times
        boot = (first_call - started).total_seconds()
        if 0 < boot <= MAX_BOOT_SECONDS:
            boots.append(boot)
        alive = (last_seen - first_call).total_seconds()
        if alive > 0:
            calls += served
            seconds += alive
        spans.setdefault(host, []).append((first_call, max(first_call, last_seen)))
    return Fleet(
        workers=max((most_at_once(host_spans) for host_spans in spans.values()), default=0),
        rate=calls / seconds if seconds else 0.0,
        boot=statistics.median(boots) if boots else 0.0,
        boots=len(boots),
    )


def _limits(rule: str, max_requests: int, jitter: float, workers: int) -> list[int]:
    """Each worker's fixed part of its limit (uWSGI's delta; Gunicorn draws at each start)."""
    if rule == UWSGI:
        delta = recycling.max_requests_delta(max_requests, jitter, workers)
        return [max_requests + index * delta for index in range(workers)]
    return [max_requests] * workers


def apart_share(rule: str, max_requests: int, jitter: float, fleet: Fleet, seed: int = 0) -> float:
    """Return the share of simulated restarts more than one boot time from any other worker's."""
    if rule not in RULES:
        raise ValueError(f"rule should be one of {', '.join(RULES)}, got {rule!r}")
    workers = min(fleet.workers, MAX_WORKERS)
    rng = random.Random(seed)
    spread = round(max_requests * jitter) if rule == GUNICORN else 0
    base = _limits(rule, max_requests, jitter, workers)
    least = UWSGI_MIN_WORKER_LIFETIME if rule == UWSGI else 0.0
    apart = total = 0
    for _ in range(RUNS if spread else 1):  # without random draws, every run is the same
        restarts: list[tuple[float, int]] = []
        for worker in range(workers):
            now = 0.0
            for _ in range(LIVES):
                limit = base[worker] + (rng.randint(0, spread) if spread else 0)
                now += max(limit / fleet.rate, least)
                restarts.append((now, worker))
                now += fleet.boot
        restarts.sort()
        for index, (when, _) in enumerate(restarts):
            before = index > 0 and when - restarts[index - 1][0] < fleet.boot
            after = index + 1 < len(restarts) and restarts[index + 1][0] - when < fleet.boot
            apart += not (before or after)
        total += len(restarts)
    return apart / total if total else 1.0


def narrowest_jitter(rule: str, max_requests: int, fleet: Fleet) -> float | None:
    """Return the narrowest jitter (0.01 to 1) that keeps TARGET of restarts apart, or None."""
    if rule == CELERY or not max_requests:
        return None

    def enough(step: int) -> bool:
        return apart_share(rule, max_requests, step / STEPS, fleet) >= TARGET

    if rule == UWSGI:
        # Deterministic, and not monotonic (a delta that brings the workers back together
        # within the lives simulated): every step in turn, each one run.
        return next((step / STEPS for step in range(1, STEPS + 1) if enough(step)), None)
    if not enough(STEPS):
        return None
    # Gunicorn's share grows with the jitter (up to the simulation's noise): a binary search.
    low, high = 0, STEPS  # enough(high); 0 is never tried
    while high - low > 1:
        middle = (low + high) // 2
        if enough(middle):
            high = middle
        else:
            low = middle
    return high / STEPS


def advise(rule: str, max_requests: int, jitter: float, fleet: Fleet) -> Advice | None:
    """Return the advice for these limits and fleet, or None when the data is too thin."""
    if not max_requests or not fleet.enough:
        return None
    return Advice(
        rule=rule,
        fleet=fleet,
        max_requests=max_requests,
        configured=jitter,
        apart=apart_share(rule, max_requests, jitter, fleet),
        recommended=narrowest_jitter(rule, max_requests, fleet),
    )


def stored_fleet(since: dt.datetime, kind: str, using: str) -> Fleet:
    """Return the fleet of the worker rows of kind ("request" or "task") seen since."""
    from django_leakguard.models import Worker

    rows = (
        Worker.objects.using(using)
        .filter(last_seen__gte=since, kind=kind, first_call_at__isnull=False)
        .values_list("host", "last_seen", "process_started_at", "first_call_at", "calls")
    )
    return fleet_from_workers(rows.iterator())


def server_rule(settings: conf.Settings, base_dir: Path | None, kind: str) -> str:
    """Return whose rule recycles the workers of kind: Celery's for tasks; for requests,
    uWSGI's when the project runs under it or has uWSGI configs and no Gunicorn config,
    else Gunicorn's (the rule LEAKGUARD's jitter maps to one to one)."""
    from django_leakguard.server_configs import live_uwsgi_options

    if kind == TASK:
        return CELERY
    if live_uwsgi_options() is not None:
        return UWSGI
    if settings.GUNICORN_CONFIG or discovery.find_files(discovery.GUNICORN_FILES, base_dir):
        return GUNICORN
    if settings.UWSGI_INI or discovery.find_files(discovery.UWSGI_FILES, base_dir):
        return UWSGI
    return GUNICORN


def stored_advice(
    since: dt.datetime, kind: str, using: str, settings: conf.Settings
) -> Advice | None:
    """Return the advice from the worker rows of kind seen since, or None when too thin."""
    from django.conf import settings as django_settings

    kind = TASK if kind == TASK else "request"
    base_dir = getattr(django_settings, "BASE_DIR", None)
    rule = server_rule(settings, Path(base_dir) if base_dir else None, kind)
    if rule == CELERY:
        max_requests, configured = settings.CELERY_MAX_TASKS_PER_CHILD, 0.0
    else:
        max_requests, configured = settings.MAX_REQUESTS, settings.MAX_REQUESTS_JITTER
    return advise(rule, max_requests, configured, stored_fleet(since, kind, using))
