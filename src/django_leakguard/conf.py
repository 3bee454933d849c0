"""The LEAKGUARD setting: defaults, parsing, validation; read lazily.

An invalid value never stops a process: get_settings() uses the default in its place and logs
the problem once per process, and the checks report it (leakguard.E001).
"""

from __future__ import annotations

import difflib
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple

from django.core.signals import setting_changed

from django_leakguard.text import shown
from django_leakguard.units import parse_memory_size

SETTING_NAME = "LEAKGUARD"

logger = logging.getLogger("django_leakguard")

DEFAULTS: dict[str, Any] = {
    # Recording (middleware, Celery task signals).
    "RECORD": True,
    "FLUSH_INTERVAL": 30.0,
    "MAX_KEYS": 500,
    "RETENTION_DAYS": 14,
    "DATABASE": "default",
    # The function that refines a request's key at the end of the call (see refine.py).
    "REFINE_KEY": "django_leakguard.refine.wagtail_page_type",
    # Recycling.
    "MAX_REQUESTS": 1000,
    "MAX_REQUESTS_JITTER": 0.05,
    "WORKER_MAX_MEMORY": None,
    "CELERY_MAX_TASKS_PER_CHILD": 100,
    "CELERY_MEMORY_FRACTION": 0.75,
    "SPOOLER_MAX_TASKS": 500,
    # Where system checks look for server configs.
    "GUNICORN_CONFIG": [],
    "UWSGI_INI": [],
    "CELERY_APP": None,
    # Sampled allocation tracing.
    "TRACE_SAMPLE_RATE": 0.0,
    "TRACE_TOP_SITES": 10,
}

# Bounds that keep every computation with a setting finite (float(), timedelta(), a C int).
MAX_COUNT = 2**63 - 1
MAX_FLUSH_INTERVAL = 86_400
MAX_RETENTION_DAYS = 36_500


@dataclass(frozen=True)
class Settings:
    """The effective LEAKGUARD settings, validated."""

    RECORD: bool
    FLUSH_INTERVAL: float
    MAX_KEYS: int
    RETENTION_DAYS: int
    DATABASE: str
    REFINE_KEY: str | None
    MAX_REQUESTS: int
    MAX_REQUESTS_JITTER: float
    WORKER_MAX_MEMORY: int | None
    CELERY_MAX_TASKS_PER_CHILD: int
    CELERY_MEMORY_FRACTION: float | None
    SPOOLER_MAX_TASKS: int
    GUNICORN_CONFIG: tuple[str, ...]
    UWSGI_INI: tuple[str, ...]
    CELERY_APP: str | None
    TRACE_SAMPLE_RATE: float
    TRACE_TOP_SITES: int

    @property
    def max_requests_jitter_absolute(self) -> int:
        """The jitter as a number of requests, as Gunicorn's max_requests_jitter wants it."""
        return round(self.MAX_REQUESTS * self.MAX_REQUESTS_JITTER)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_value(key: str, value: object) -> str | None:
    """Return a message when value is invalid for key, else None."""
    got = f"got {shown(value)}."
    # Comparisons written so that NaN fails them (every comparison with NaN is false).
    if key == "RECORD":
        if not isinstance(value, bool):
            return f"RECORD should be True or False, {got}"
    elif key in ("MAX_KEYS", "TRACE_TOP_SITES"):
        if not _is_int(value) or not 1 <= value <= MAX_COUNT:  # type: ignore[operator]
            return f"{key} should be a positive integer, {got}"
    elif key in ("MAX_REQUESTS", "CELERY_MAX_TASKS_PER_CHILD", "SPOOLER_MAX_TASKS"):
        if not _is_int(value) or not 0 <= value <= MAX_COUNT:  # type: ignore[operator]
            return f"{key} should be a positive integer (0 disables) below 2**63, {got}"
    elif key == "RETENTION_DAYS":
        if not _is_int(value) or not 1 <= value <= MAX_RETENTION_DAYS:  # type: ignore[operator]
            return (
                "RETENTION_DAYS should be a positive integer number of days, at most "
                f"{MAX_RETENTION_DAYS:,}, {got}"
            )
    elif key == "FLUSH_INTERVAL":
        if not _is_number(value) or not 0 < value <= MAX_FLUSH_INTERVAL:  # type: ignore[operator]
            return (
                "FLUSH_INTERVAL should be a positive number of seconds, at most "
                f"{MAX_FLUSH_INTERVAL:,} (a day), {got}"
            )
    elif key == "MAX_REQUESTS_JITTER":
        if not _is_number(value) or not 0 <= value <= 1:  # type: ignore[operator]
            return f"MAX_REQUESTS_JITTER should be a fraction of MAX_REQUESTS from 0 to 1, {got}"
    elif key == "TRACE_SAMPLE_RATE":
        if not _is_number(value) or not 0 <= value <= 1:  # type: ignore[operator]
            return f"TRACE_SAMPLE_RATE should be a fraction from 0 to 1, {got}"
    elif key == "CELERY_MEMORY_FRACTION":
        if value is not None and (not _is_number(value) or not 0 < value <= 1):  # type: ignore[operator]
            return (
                "CELERY_MEMORY_FRACTION should be a fraction greater than 0 and at most 1, "
                f"or None, {got}"
            )
    elif key == "WORKER_MAX_MEMORY":
        if value is not None:
            try:
                parse_memory_size(value)
            except ValueError as exc:
                return f"WORKER_MAX_MEMORY is invalid: {exc}."
    elif key in ("GUNICORN_CONFIG", "UWSGI_INI"):
        if isinstance(value, str):
            return None
        if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
            return f"{key} should be a path or a list of paths, {got}"
    elif key == "DATABASE":
        from django.db import connections

        aliases = list(connections.settings)
        if not isinstance(value, str) or value not in aliases:
            return (
                "DATABASE should be the alias of a database in DATABASES "
                f"({', '.join(map(repr, aliases))}), {got}"
            )
    elif key == "REFINE_KEY":
        return None if value is None else _check_function(value)
    elif key == "CELERY_APP" and value is not None and not isinstance(value, str):
        return f"CELERY_APP should be a dotted path such as 'myproject.celery.app', {got}"
    return None


def _check_function(value: object) -> str | None:
    """Return why value does not name a function (REFINE_KEY), else None."""
    if not isinstance(value, str) or "." not in value:
        return (
            "REFINE_KEY should be the dotted path of a function such as "
            f"'myproject.leakguard.refine_key', or None, got {shown(value)}."
        )
    from django.utils.module_loading import import_string

    try:
        function = import_string(value)
    except Exception as exc:  # the module may raise anything while it is imported
        return f"REFINE_KEY names {shown(value)}, which cannot be imported: {exception_line(exc)}."
    if not callable(function):
        return f"REFINE_KEY names {shown(value)}, which is not callable."
    return None


def exception_line(exc: BaseException) -> str:
    """Return an exception as one short line: its type and the first line of its message."""
    text = str(exc).strip().splitlines()
    first = text[0] if text else ""
    first = first if len(first) <= 120 else first[:117] + "..."
    return f"{type(exc).__name__}: {first}" if first else type(exc).__name__


class Problem(NamedTuple):
    """What is wrong with LEAKGUARD (message) and how to fix it (hint)."""

    message: str
    hint: str
    key: object = None  # the key at fault; None when LEAKGUARD is not a dict


def validate(raw: object) -> list[Problem]:
    """Return every problem in a raw LEAKGUARD value."""
    if raw is None:
        return []
    if not isinstance(raw, Mapping):
        return [
            Problem(
                f"The LEAKGUARD setting should be a dict, got {type(raw).__name__}.",
                "Set LEAKGUARD to a dict such as {'MAX_REQUESTS': 1000}.",
            )
        ]
    problems: list[Problem] = []
    for key, value in raw.items():
        if key not in DEFAULTS:
            close = difflib.get_close_matches(str(key), DEFAULTS, n=1)
            hint = (
                f"Did you mean {close[0]!r}? Rename LEAKGUARD[{key!r}] to LEAKGUARD[{close[0]!r}]."
                if close
                else f"Remove it; valid keys are {', '.join(sorted(DEFAULTS))}."
            )
            problems.append(Problem(f"LEAKGUARD has an unknown key {shown(key)}.", hint, key))
            continue
        message = _check_value(key, value)
        if message is not None:
            problems.append(
                Problem(
                    message,
                    f"Set LEAKGUARD[{key!r}] to a valid value, or remove it to use the "
                    f"default ({DEFAULTS[key]!r}).",
                    key,
                )
            )
    return problems


def problems() -> list[Problem]:
    """Return the problems of the LEAKGUARD setting in use (for the checks and commands)."""
    return validate(raw_setting())


def _as_paths(value: object) -> tuple[str, ...]:
    if isinstance(value, str):
        return (value,)
    return tuple(value)  # type: ignore[arg-type]


def build_settings(raw: object, found: list[Problem] | None = None) -> Settings:
    """Merge the valid values of raw with the defaults, which stand in for invalid ones."""
    if found is None:
        found = validate(raw)
    if not isinstance(raw, Mapping):
        raw = {}
    invalid = {problem.key for problem in found}
    merged = {**DEFAULTS, **{key: value for key, value in raw.items() if key not in invalid}}
    memory = merged["WORKER_MAX_MEMORY"]
    fraction = merged["CELERY_MEMORY_FRACTION"]
    return Settings(
        RECORD=merged["RECORD"],
        FLUSH_INTERVAL=float(merged["FLUSH_INTERVAL"]),
        MAX_KEYS=merged["MAX_KEYS"],
        RETENTION_DAYS=merged["RETENTION_DAYS"],
        DATABASE=merged["DATABASE"],
        REFINE_KEY=merged["REFINE_KEY"],
        MAX_REQUESTS=merged["MAX_REQUESTS"],
        MAX_REQUESTS_JITTER=float(merged["MAX_REQUESTS_JITTER"]),
        WORKER_MAX_MEMORY=None if memory is None else parse_memory_size(memory),
        CELERY_MAX_TASKS_PER_CHILD=merged["CELERY_MAX_TASKS_PER_CHILD"],
        CELERY_MEMORY_FRACTION=None if fraction is None else float(fraction),
        SPOOLER_MAX_TASKS=merged["SPOOLER_MAX_TASKS"],
        GUNICORN_CONFIG=_as_paths(merged["GUNICORN_CONFIG"]),
        UWSGI_INI=_as_paths(merged["UWSGI_INI"]),
        CELERY_APP=merged["CELERY_APP"],
        TRACE_SAMPLE_RATE=float(merged["TRACE_SAMPLE_RATE"]),
        TRACE_TOP_SITES=merged["TRACE_TOP_SITES"],
    )


def migrate_command(alias: str) -> str:
    """Return the command that creates the leakguard tables in the database alias."""
    command = "python manage.py migrate django_leakguard"
    return command if alias == "default" else f"{command} --database {alias}"


_cached: Settings | None = None
# The problems this process has logged: each once.
_logged: set[str] = set()


def raw_setting() -> object:
    """Return the LEAKGUARD setting as the user wrote it (None when absent)."""
    from django.conf import settings

    return getattr(settings, SETTING_NAME, None)


def get_settings() -> Settings:
    """Return the effective settings, computed once and reset when LEAKGUARD changes.

    Never raises: an invalid value is replaced by its default and logged once per process.
    """
    global _cached
    if _cached is None:
        raw = raw_setting()
        found = validate(raw)
        for problem in found:
            _log(problem)
        _cached = build_settings(raw, found)
    return _cached


def _log(problem: Problem) -> None:
    if problem.message in _logged:
        return
    _logged.add(problem.message)
    if problem.key is None:
        meanwhile = "Every key has its default until then."
    elif problem.key in DEFAULTS:
        meanwhile = f"Using the default {DEFAULTS[str(problem.key)]!r} until then."
    else:
        meanwhile = "It is ignored until then."
    logger.warning("django-leakguard: %s %s %s", problem.message, problem.hint, meanwhile)


def reset(**kwargs: Any) -> None:
    """Forget the cached settings (connected to setting_changed, and run in forked children)."""
    global _cached
    if kwargs.get("setting", SETTING_NAME) == SETTING_NAME:
        _cached = None
        _logged.clear()


setting_changed.connect(reset, dispatch_uid="django_leakguard.conf.reset")
# Every process says what is wrong: a forked worker reads the settings (and logs) afresh.
os.register_at_fork(after_in_child=reset)
