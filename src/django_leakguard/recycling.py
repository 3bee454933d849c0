"""Recycling arithmetic and config snippets for Gunicorn, uWSGI and Celery (no server imports)."""

from __future__ import annotations

import contextlib
import importlib.metadata
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from django_leakguard.conf import Settings
from django_leakguard.units import format_bytes

MIB = 1024 * 1024

#: The first uWSGI release with the max-requests-delta option.
UWSGI_DELTA_SINCE = (2, 0, 29)


# Gunicorn


@dataclass(frozen=True)
class GunicornLimits:
    """What Gunicorn gets from LEAKGUARD."""

    max_requests: int
    max_requests_jitter: int
    worker_max_memory: int | None


def gunicorn_limits(settings: Settings) -> GunicornLimits:
    """Return Gunicorn's max_requests, its absolute jitter and the per-worker RSS limit."""
    jitter = settings.max_requests_jitter_absolute if settings.MAX_REQUESTS else 0
    return GunicornLimits(settings.MAX_REQUESTS, jitter, settings.WORKER_MAX_MEMORY)


def render_gunicorn(settings: Settings) -> str:
    """Return the effective Gunicorn values, in gunicorn.conf.py syntax."""
    limits = gunicorn_limits(settings)
    memory = (
        f"{limits.worker_max_memory}  # {format_bytes(limits.worker_max_memory)}, "
        "checked after each request"
        if limits.worker_max_memory is not None
        else "None  # no RSS limit"
    )
    return (
        "# Gunicorn: what django_leakguard.gunicorn_conf applies.\n"
        f"max_requests = {limits.max_requests}"
        + ("  # 0: no request-count recycling\n" if not limits.max_requests else "\n")
        + f"max_requests_jitter = {limits.max_requests_jitter}\n"
        f"# WORKER_MAX_MEMORY = {memory}\n"
    )


# uWSGI


def max_requests_delta(max_requests: int, jitter: float, processes: int) -> int:
    """Return uWSGI's max-requests-delta spreading MAX_REQUESTS x jitter over the workers.

    uWSGI gives worker i (from 1) max-requests + (i - 1) x delta, so the last of N workers
    restarts max-requests x jitter requests after the first.
    """
    return round(max_requests * jitter / max(processes - 1, 1))


def parse_version(text: str) -> tuple[int, ...]:
    """Return the leading numeric components of a version string: "2.0.31-dev" -> (2, 0, 31)."""
    match = re.match(r"\s*(\d+(?:\.\d+)*)", text)
    if match is None:
        raise ValueError(f"cannot read a version number from {text!r}")
    return tuple(int(part) for part in match.group(1).split("."))


def _uwsgi_binary() -> str | None:
    beside = Path(sys.executable).with_name("uwsgi")
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    return shutil.which("uwsgi")


def installed_uwsgi_version() -> str | None:
    """Return the installed uWSGI's version, or None when uWSGI is not found."""
    with contextlib.suppress(importlib.metadata.PackageNotFoundError):
        return importlib.metadata.version("uWSGI")
    binary = _uwsgi_binary()
    if binary is None:
        return None
    try:
        result = subprocess.run(
            [binary, "--version"], capture_output=True, text=True, timeout=10, check=True
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return result.stdout.strip() or None


def reload_on_rss_mib(worker_max_memory: int) -> int:
    """Return WORKER_MAX_MEMORY in whole MiB for reload-on-rss (rounded down, at least 1)."""
    return max(worker_max_memory // MIB, 1)


def render_uwsgi(settings: Settings, processes: int, uwsgi_version: str | None) -> str:
    """Return an ini snippet with uWSGI's recycling options for `processes` workers."""
    lines = [
        "[uwsgi]",
        f"; Recycling from LEAKGUARD (django-leakguard) for processes = {processes}.",
    ]
    if settings.MAX_REQUESTS:
        lines.append(f"max-requests = {settings.MAX_REQUESTS}")
        delta = max_requests_delta(settings.MAX_REQUESTS, settings.MAX_REQUESTS_JITTER, processes)
        version = None
        if uwsgi_version is not None:
            with contextlib.suppress(ValueError):
                version = parse_version(uwsgi_version)
        if version is None:
            lines.append(
                "; max-requests-delta left out: the uWSGI version is unknown and the option "
                "needs 2.0.29 or later; pass --uwsgi-version to include it."
            )
        elif version < UWSGI_DELTA_SINCE:
            lines.append(
                f"; max-requests-delta left out: uWSGI {uwsgi_version} predates it (2.0.29), "
                "so workers that start together restart together."
            )
        elif delta:
            lines.append(f"; Worker i restarts after max-requests + (i - 1) x {delta} requests.")
            lines.append(f"max-requests-delta = {delta}")
    else:
        lines.append("; MAX_REQUESTS is 0: no request-count recycling.")
    if settings.WORKER_MAX_MEMORY is not None:
        lines.append(
            f"; WORKER_MAX_MEMORY = {format_bytes(settings.WORKER_MAX_MEMORY)}, in MiB; "
            "checked after each request."
        )
        lines.append(f"reload-on-rss = {reload_on_rss_mib(settings.WORKER_MAX_MEMORY)}")
    if settings.SPOOLER_MAX_TASKS:
        lines.append(f"spooler-max-tasks = {settings.SPOOLER_MAX_TASKS}")
    return "\n".join(lines) + "\n"


# Celery


def celery_memory_per_child_kib(
    available: int, fraction: float | None, concurrency: int
) -> int | None:
    """Return worker_max_memory_per_child in KiB: the pool's share of memory per child."""
    if fraction is None:
        return None
    return max(int(available * fraction / max(concurrency, 1)) // 1024, 1)


@dataclass(frozen=True)
class CeleryLimits:
    """What a Celery worker gets from LEAKGUARD."""

    max_tasks_per_child: int | None
    max_memory_per_child: int | None  # KiB, Celery's unit
    concurrency: int
    available: int


def celery_limits(settings: Settings, concurrency: int, available: int) -> CeleryLimits:
    """Return Celery's per-child task and memory limits for this concurrency and memory."""
    return CeleryLimits(
        max_tasks_per_child=settings.CELERY_MAX_TASKS_PER_CHILD or None,
        max_memory_per_child=celery_memory_per_child_kib(
            available, settings.CELERY_MEMORY_FRACTION, concurrency
        ),
        concurrency=concurrency,
        available=available,
    )


def render_celery(settings: Settings, concurrency: int, available: int) -> str:
    """Return the effective Celery values as configure(app) applies them at worker start."""
    limits = celery_limits(settings, concurrency, available)
    if limits.max_memory_per_child is None:
        memory = "None  # CELERY_MEMORY_FRACTION is None"
    else:
        memory = (
            f"{limits.max_memory_per_child}  # KiB: {format_bytes(available)} available x "
            f"{settings.CELERY_MEMORY_FRACTION} / {concurrency} children; "
            "compared with each child's peak RSS"
        )
    tasks = limits.max_tasks_per_child
    return (
        f"# Celery: what django_leakguard.celery.configure(app) applies with -c {concurrency}.\n"
        f"worker_max_tasks_per_child = {tasks}"
        + ("  # CELERY_MAX_TASKS_PER_CHILD is 0\n" if tasks is None else "\n")
        + f"worker_max_memory_per_child = {memory}\n"
    )
