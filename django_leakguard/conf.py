"""The LEAKGUARD setting: defaults, parsing, validation; read lazily."""

from __future__ import annotations

import difflib
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from django.core.exceptions import ImproperlyConfigured
from django.core.signals import setting_changed

SETTING_NAME = "LEAKGUARD"

DEFAULTS: dict[str, Any] = {
    # Recording (middleware, Celery task signals).
    "RECORD": True,
    "FLUSH_INTERVAL": 30.0,
    "MAX_KEYS": 500,
    "RETENTION_DAYS": 14,
    "DATABASE": "default",
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

_UNITS = {
    "": 1,
    "b": 1,
    "k": 1000,
    "kb": 1000,
    "m": 1000**2,
    "mb": 1000**2,
    "g": 1000**3,
    "gb": 1000**3,
    "t": 1000**4,
    "tb": 1000**4,
    "kib": 1024,
    "mib": 1024**2,
    "gib": 1024**3,
    "tib": 1024**4,
}
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*$")


def parse_memory_size(value: object) -> int:
    """Return a memory size in bytes from an int or a string such as "512MiB" or "1.5 GB"."""
    if isinstance(value, bool):
        raise ValueError(f"expected bytes or a size such as '512MiB', got {value!r}")
    if isinstance(value, int):
        if value <= 0:
            raise ValueError(f"a memory size should be positive, got {value!r}")
        return value
    if isinstance(value, str):
        match = _SIZE_RE.match(value)
        if match is not None:
            number, unit = match.groups()
            factor = _UNITS.get(unit.lower())
            if factor is not None:
                size = int(float(number) * factor)
                if size <= 0:
                    raise ValueError(f"a memory size should be positive, got {value!r}")
                return size
        raise ValueError(
            f"cannot parse {value!r} as a memory size; use bytes or a number with a unit "
            "such as '512MiB', '2GiB' or '500MB'"
        )
    raise ValueError(f"expected bytes or a size such as '512MiB', got {value!r}")


@dataclass(frozen=True)
class Settings:
    """The effective LEAKGUARD settings, validated."""

    RECORD: bool
    FLUSH_INTERVAL: float
    MAX_KEYS: int
    RETENTION_DAYS: int
    DATABASE: str
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
    got = f"got {value!r}."
    if key == "RECORD":
        if not isinstance(value, bool):
            return f"RECORD should be True or False, {got}"
    elif key in ("MAX_KEYS", "TRACE_TOP_SITES"):
        if not _is_int(value) or value < 1:  # type: ignore[operator]
            return f"{key} should be a positive integer, {got}"
    elif key in ("MAX_REQUESTS", "CELERY_MAX_TASKS_PER_CHILD", "SPOOLER_MAX_TASKS"):
        if not _is_int(value) or value < 0:  # type: ignore[operator]
            return f"{key} should be a positive integer (0 disables), {got}"
    elif key == "RETENTION_DAYS":
        if not _is_int(value) or value < 1:  # type: ignore[operator]
            return f"RETENTION_DAYS should be a positive integer number of days, {got}"
    elif key == "FLUSH_INTERVAL":
        if not _is_number(value) or value <= 0:  # type: ignore[operator]
            return f"FLUSH_INTERVAL should be a positive number of seconds, {got}"
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
        if not isinstance(value, str) or not value:
            return f"DATABASE should be the alias of a database in DATABASES, {got}"
    elif key == "CELERY_APP" and value is not None and not isinstance(value, str):
        return f"CELERY_APP should be a dotted path such as 'myproject.celery.app', {got}"
    return None


def validate(raw: object) -> list[tuple[str, str]]:
    """Return (message, hint) for every problem in a raw LEAKGUARD value."""
    if raw is None:
        return []
    if not isinstance(raw, Mapping):
        return [
            (
                f"The LEAKGUARD setting should be a dict, got {type(raw).__name__}.",
                "Set LEAKGUARD to a dict such as {'MAX_REQUESTS': 1000}.",
            )
        ]
    problems: list[tuple[str, str]] = []
    for key, value in raw.items():
        if key not in DEFAULTS:
            close = difflib.get_close_matches(str(key), DEFAULTS, n=1)
            hint = (
                f"Did you mean {close[0]!r}? Rename LEAKGUARD[{key!r}] to LEAKGUARD[{close[0]!r}]."
                if close
                else f"Remove it; valid keys are {', '.join(sorted(DEFAULTS))}."
            )
            problems.append((f"LEAKGUARD has an unknown key {key!r}.", hint))
            continue
        message = _check_value(key, value)
        if message is not None:
            problems.append(
                (
                    message,
                    f"Set LEAKGUARD[{key!r}] to a valid value, or remove it to use the "
                    f"default ({DEFAULTS[key]!r}).",
                )
            )
    return problems


def _as_paths(value: object) -> tuple[str, ...]:
    if isinstance(value, str):
        return (value,)
    return tuple(value)  # type: ignore[arg-type]


def build_settings(raw: object) -> Settings:
    """Validate raw and merge it with the defaults; raise ImproperlyConfigured on problems."""
    problems = validate(raw)
    if problems:
        raise ImproperlyConfigured(" ".join(message for message, _ in problems))
    merged = {**DEFAULTS, **(raw or {})}  # type: ignore[dict-item]
    memory = merged["WORKER_MAX_MEMORY"]
    fraction = merged["CELERY_MEMORY_FRACTION"]
    return Settings(
        RECORD=merged["RECORD"],
        FLUSH_INTERVAL=float(merged["FLUSH_INTERVAL"]),
        MAX_KEYS=merged["MAX_KEYS"],
        RETENTION_DAYS=merged["RETENTION_DAYS"],
        DATABASE=merged["DATABASE"],
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


_cached: Settings | None = None


def raw_setting() -> object:
    """Return the LEAKGUARD setting as the user wrote it (None when absent)."""
    from django.conf import settings

    return getattr(settings, SETTING_NAME, None)


def get_settings() -> Settings:
    """Return the effective settings, computed once and reset when LEAKGUARD changes."""
    global _cached
    if _cached is None:
        _cached = build_settings(raw_setting())
    return _cached


def reset(**kwargs: Any) -> None:
    """Forget the cached settings (connected to setting_changed)."""
    global _cached
    if kwargs.get("setting", SETTING_NAME) == SETTING_NAME:
        _cached = None


setting_changed.connect(reset, dispatch_uid="django_leakguard.conf.reset")
