"""Sizes and durations: the one formatter of byte counts and the parsers of sizes and windows.

A leaf module: the settings (conf), the report, the admin pages, the server integrations and
leakhunt all print and parse through it, so a number reads the same everywhere.
"""

from __future__ import annotations

import datetime as dt
import re

from django_leakguard.text import shown

_SINCE_RE = re.compile(r"^\s*(\d+)\s*([mhdw])\s*$")
_SINCE_UNITS = {"m": "minutes", "h": "hours", "d": "days", "w": "weeks"}


def parse_since(value: str, now: dt.datetime) -> dt.datetime:
    """Return the start of a window given as 30m, 24h, 7d, 2w or an ISO date or datetime."""
    match = _SINCE_RE.match(value)
    if match:
        amount, unit = match.groups()
        return now - dt.timedelta(**{_SINCE_UNITS[unit]: int(amount)})
    try:
        parsed = dt.datetime.fromisoformat(value.strip())
    except ValueError:
        raise ValueError(
            f"--since should be a duration such as 30m, 24h or 7d, or an ISO date such as "
            f"2025-01-31, got {value!r}"
        ) from None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=now.tzinfo)
    if parsed > now:
        raise ValueError(f"--since {value!r} is in the future")
    return parsed


def format_bytes(value: float | None, signed: bool = False) -> str:
    """Return a size in binary units: 512 B, 1.5 KiB, 12.0 MiB."""
    if value is None:
        return "n/a"
    sign = "-" if value < 0 else ("+" if signed and value > 0 else "")
    size = abs(value)
    if size < 1024:
        return f"{sign}{size:.0f} B"
    for unit in ("KiB", "MiB", "GiB"):
        size /= 1024
        if size < 1024 or unit == "GiB":
            break
    return f"{sign}{size:.1f} {unit}"


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
# The largest size a setting may hold (a C int64).
MAX_SIZE = 2**63 - 1


def parse_memory_size(value: object) -> int:
    """Return a memory size in bytes from an int or a string such as "512MiB" or "1.5 GB"."""
    if isinstance(value, bool):
        raise ValueError(f"expected bytes or a size such as '512MiB', got {value!r}")
    if isinstance(value, int):
        if value <= 0:
            raise ValueError(f"a memory size should be positive, got {shown(value)}")
        if value > MAX_SIZE:
            raise ValueError(f"a memory size should be at most 8 EiB, got {shown(value)}")
        return value
    if isinstance(value, str):
        match = _SIZE_RE.match(value)
        if match is not None:
            number, unit = match.groups()
            factor = _UNITS.get(unit.lower())
            if factor is not None:
                # A string of 400 digits is a float of infinity: compare before int().
                product = float(number) * factor
                if not product < MAX_SIZE:
                    raise ValueError(f"a memory size should be at most 8 EiB, got {shown(value)}")
                size = int(product)
                if size <= 0:
                    raise ValueError(f"a memory size should be positive, got {shown(value)}")
                return size
        raise ValueError(
            f"cannot parse {shown(value)} as a memory size; use bytes or a number with a unit "
            "such as '512MiB', '2GiB' or '500MB'"
        )
    raise ValueError(f"expected bytes or a size such as '512MiB', got {shown(value)}")
