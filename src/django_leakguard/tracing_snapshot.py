"""A traced call's snapshot grouped into its allocation sites, net of what it holds anyway."""

from __future__ import annotations

import tracemalloc
from collections.abc import Mapping, Sequence

from django_leakguard.tracing_baseline import (
    ANY_PLACE,
    Baseline,
    library_places,
    take_baseline,
    take_from_places,
)
from django_leakguard.tracing_records import Site
from django_leakguard.tracing_sites import (
    Cell,
    Frames,
    Place,
    frames_cell,
    site_names,
    source_line,
)


def _group_traces(snapshot: tracemalloc.Snapshot) -> dict[Frames, list[int]]:
    """Return [bytes, blocks] per traceback of the snapshot's traces.

    From the raw traces when the snapshot has them (Python's own Snapshot.statistics() builds
    a Frame, a Traceback and a Statistic object for each: several times slower).
    """
    groups: dict[Frames, list[int]] = {}
    raw = getattr(snapshot.traces, "_traces", None)
    if isinstance(raw, list) and all(type(t) is tuple and len(t) >= 3 for t in raw[:1]):
        for trace in raw:
            totals = groups.get(trace[2])
            if totals is None:
                groups[trace[2]] = [trace[1], 1]
            else:
                totals[0] += trace[1]
                totals[1] += 1
        return groups
    for stat in snapshot.statistics("traceback"):  # pragma: no cover - CPython has _traces
        frames = tuple((f.filename, f.lineno) for f in reversed(stat.traceback))
        groups[frames] = [stat.size, stat.count]
    return groups


def site_statistics(
    snapshot: tracemalloc.Snapshot,
    top_n: int | None = None,
    held: Mapping[Cell, Sequence[int]] | None = None,
    baseline: Baseline | None = None,
    key: str = "",
) -> tuple[int, int, tuple[Site, ...]]:
    """Return (bytes, blocks, sites largest first) of the snapshot's traces, by site_frame().

    Allocations made for django-leakguard are left out of all three; held (from
    held_anyway()) and then baseline's share for a call of key (see Baseline) are taken off
    the sites they were allocated at, down to 0, and off the totals.
    """
    cells: dict[Place, dict[Place, list[int]]] = {}
    largest: dict[Place, tuple[int, Frames]] = {}  # the largest traceback of each site
    for frames, (size, count) in _group_traces(snapshot).items():
        found = frames_cell(frames)
        if found is None:
            continue
        site, place = found
        cell = cells.setdefault(site, {}).setdefault(place, [0, 0])
        cell[0] += size
        cell[1] += count
        if size > largest.get(site, (0, ()))[0]:
            largest[site] = (size, frames)
    for (site, place), (held_size, held_count) in (held or {}).items():
        if place == ANY_PLACE:
            take_from_places(cells.get(site, {}).values(), held_size)
            continue
        kept = cells.get(site, {}).get(place)
        if kept is not None:
            kept[0] -= min(held_size, kept[0])
            kept[1] -= min(held_count, kept[1])
    if baseline is not None:
        take_baseline(cells, baseline.take(key, library_places(cells)))
    sizes = {
        site: [sum(c[0] for c in by_place.values()), sum(c[1] for c in by_place.values())]
        for site, by_place in cells.items()
    }
    sizes = {site: totals for site, totals in sizes.items() if totals[0] > 0}
    total_size = sum(totals[0] for totals in sizes.values())
    total_count = sum(totals[1] for totals in sizes.values())
    ranked = sorted(sizes.items(), key=lambda item: (-item[1][0], item[0]))
    if top_n is not None:
        ranked = ranked[: max(top_n, 0)]
    sites = []
    for (filename, lineno), (size, count) in ranked:
        short, names = site_names(filename, largest[(filename, lineno)][1])
        sites.append(Site(short, lineno, source_line(filename, lineno), size, count, names))
    return total_size, total_count, tuple(sites)
