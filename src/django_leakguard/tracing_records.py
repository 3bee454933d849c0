"""Tracing's records: an allocation site, one traced call's result, a key's traced totals.

A leaf: imports nothing from the package (records, storage and the reports use these).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Site:
    """An allocation site and the bytes allocated there that were still alive."""

    filename: str  # relative to its sys.path entry, e.g. "shop/views.py"
    lineno: int
    line: str  # the source line, stripped; "" when unavailable
    size: int  # bytes retained
    count: int  # memory blocks retained
    frames: tuple[str, ...] = ()  # "file:line", innermost first, of the largest traceback

    @property
    def location(self) -> str:
        return f"{self.filename}:{self.lineno}"

    def as_dict(self) -> dict[str, Any]:
        """Return a JSON-serialisable dict (for storage)."""
        return {
            "filename": self.filename,
            "lineno": self.lineno,
            "line": self.line,
            "size": self.size,
            "count": self.count,
            "frames": list(self.frames),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Site:
        """Return the Site stored by as_dict(); raise ValueError when data is not one."""
        try:
            filename, lineno, line = data["filename"], data["lineno"], data.get("line", "")
            size, count, frames = data["size"], data["count"], data.get("frames", [])
        except (KeyError, TypeError, AttributeError) as exc:
            raise ValueError(f"not an allocation site: {data!r}") from exc
        ints_ok = all(
            isinstance(value, int) and not isinstance(value, bool)
            for value in (lineno, size, count)
        )
        strings_ok = isinstance(filename, str) and isinstance(line, str)
        frames_ok = isinstance(frames, list) and all(isinstance(f, str) for f in frames)
        if not (ints_ok and strings_ok and frames_ok):
            raise ValueError(f"not an allocation site: {data!r}")
        return cls(filename, lineno, line, size, count, tuple(frames))


def _sort_key(site: Site) -> tuple[int, str, int]:
    return (-site.size, site.filename, site.lineno)


def merge_sites(first: Iterable[Site], second: Iterable[Site], top_n: int) -> tuple[Site, ...]:
    """Return the top_n largest sites of both, adding up sizes and counts of the same line."""
    merged: dict[tuple[str, int], Site] = {}
    for site in (*first, *second):
        key = (site.filename, site.lineno)
        seen = merged.get(key)
        if seen is None:
            merged[key] = site
            continue
        # Keep the line and frames of the larger contribution: the most typical path.
        main = seen if seen.size >= site.size else site
        merged[key] = Site(
            main.filename,
            main.lineno,
            main.line or seen.line or site.line,
            seen.size + site.size,
            seen.count + site.count,
            main.frames,
        )
    return tuple(sorted(merged.values(), key=_sort_key)[: max(top_n, 0)])


@dataclass(frozen=True)
class TraceResult:
    """What one traced call allocated and still held when it ended."""

    retained: int  # bytes
    blocks: int
    sites: tuple[Site, ...]  # the top sites, largest first


@dataclass
class TraceTotals:
    """Traced calls of one key: how many, bytes retained in all, and the top sites (bounded)."""

    calls: int = 0
    retained: int = 0
    sites: tuple[Site, ...] = field(default_factory=tuple)

    def add(self, result: TraceResult, top_n: int) -> None:
        """Count one traced call, keeping only the top_n largest sites."""
        self.calls += 1
        self.retained += result.retained
        self.sites = merge_sites(self.sites, result.sites, top_n)

    def merge(self, other: TraceTotals, top_n: int) -> None:
        """Add another key's totals (e.g. pending ones into stored ones)."""
        self.calls += other.calls
        self.retained += other.retained
        self.sites = merge_sites(self.sites, other.sites, top_n)

    @property
    def retained_per_call(self) -> float | None:
        return self.retained / self.calls if self.calls else None
