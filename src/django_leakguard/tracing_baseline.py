"""What a traced call holds anyway, not retained: its response, and the process's baseline."""

from __future__ import annotations

import gc
import sys
import tracemalloc
import types
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence

from django_leakguard.dropped import named_by_its_module
from django_leakguard.sizes import object_size
from django_leakguard.tracing_sites import Cell, Place, frames_cell, is_user_file

# Objects a response owns that are counted at most (see held_anyway): its headers, cookies,
# closers and content are a few dozen.
HELD_PARTS = 64

# Objects owned_parts remembers having reached from some, not yet all, of their holders.
REACHED_MAX = 100_000

# The place of held bytes that may have been allocated anywhere under their site.
ANY_PLACE: Place = ("", 0)


def held_anyway(
    roots: Iterable[object], stop_tracing: Callable[[], object]
) -> dict[Cell, list[int]]:
    """Return [bytes, objects] per cell of the responses in roots and what they own.

    roots are what every call still holds at its end whether it leaks or not: its response,
    which the server still refers to when it closes it. Its memory is freed once the server
    lets go of it, so it is not retained: the response object, at the cell it was made, and
    the objects only it refers to (headers and their values, cookies, content chunks, a
    template response's context), at most HELD_PARTS of them, at ANY_PLACE of its site:
    most were made in Django's code under the view's line. Call it while tracemalloc traces,
    after the snapshot; it calls stop_tracing() once it has looked up where the roots were
    made, so that walking the parts, which allocates, is not traced (each allocation would
    record its traceback: ten times the cost).
    """
    held: dict[Cell, list[int]] = {}
    found: list[tuple[object, Cell]] = []
    counted: set[int] = set()
    for root in roots:
        # Its content, counted where it was made whoever else refers to it (a test client
        # keeps the response's content).
        first_chunk_site = None
        for chunk in response_content(root):
            chunk_cell = _object_site(chunk)
            if chunk_cell is None:
                continue
            first_chunk_site = first_chunk_site or chunk_cell[0]
            if id(chunk) not in counted:
                counted.add(id(chunk))
                _count(held, chunk_cell, sys.getsizeof(chunk))
        cell = _object_site(root)
        if cell is None and _untraceable(root) and first_chunk_site is not None:
            # Made where its content was made (see _untraceable): a view's return.
            cell = (first_chunk_site, first_chunk_site)
        if cell is not None:
            found.append((root, cell))
    stop_tracing()
    for root, cell in found:
        _count(held, cell, object_size(root))
        size, count = _owned(root, counted)
        totals = held.setdefault((cell[0], ANY_PLACE), [0, 0])
        totals[0] += size
        totals[1] += count
    return held


def response_content(response: object) -> list[object]:
    """An HttpResponse's content chunks (bytes); none for other objects."""
    content = getattr(response, "_container", None)
    return content if type(content) is list else []


def _owned(root: object, counted: set[int]) -> tuple[int, int]:
    """Return (bytes, objects) of what only root refers to, directly or through such objects.

    An object is root's own when its one reference is its holder's: it is freed with root.
    Shared objects (a header's name, the charset, a cached template) are left out. Not
    django-leakguard's own objects (the response's close() leads to the recorder), nor those
    in counted (ids), counted already.
    """
    size = count = 0
    for part in owned_parts(root, counted):
        size += object_size(part)
        count += 1
    return size, count


def owned_parts(
    root: object, counted: Iterable[int] = (), limit: int = HELD_PARTS
) -> Iterator[object]:
    """Yield what only root refers to, directly or through such objects (see _owned), at
    most limit of them.

    An object is root's own once every reference to it comes from root's own objects: one
    that two of them refer to (a template response's context and its view both refer to the
    page's list of objects) is yielded when the walk has reached it from both.
    """
    count = 0
    seen = {id(root), *counted}
    # Objects reached from fewer of root's own objects than refer to them, and how often:
    # they may be reached again (at most REACHED_MAX remembered).
    reached: dict[int, int] = {}
    queue = [root]
    for container in queue:  # breadth first: the list grows while it is walked
        for part in gc.get_referents(container):
            kind = type(part)
            walk = _WALK.get(kind)
            if walk is None:
                walk = _walk_of(kind)
            if walk is _SKIP or id(part) in seen:
                continue
            holders = sys.getrefcount(part) - _ONE_OWNER + 1
            if holders > 1:
                times = reached.get(id(part), 0) + 1
                if times < holders:
                    if times > 1 or len(reached) < REACHED_MAX:
                        reached[id(part)] = times
                    continue
                del reached[id(part)]
            seen.add(id(part))
            yield part
            count += 1
            if count >= limit:
                return
            if walk is _INTO:
                queue.append(part)


# How _owned treats objects of a type: skipped (shared or tiny: a status code, a flag, a
# class, a function; ours), counted (strings, bytes: they refer to nothing), or walked into.
_SKIP, _LEAF, _INTO = "skip", "leaf", "into"
_SKIPPED: tuple[type, ...] = (
    type(None), bool, int, float, types.ModuleType, types.MethodType, types.FunctionType,
    types.BuiltinFunctionType, types.FrameType, types.CodeType,
)  # fmt: skip
_WALK: dict[type, str] = dict.fromkeys(_SKIPPED, _SKIP) | {str: _LEAF, bytes: _LEAF}


def _walk_of(kind: type) -> str:
    if issubclass(kind, type) or kind.__module__.startswith("django_leakguard"):
        walk = _SKIP
    else:
        walk = _INTO
    # Not a class made at run time: remembered, it would stay alive (see dropped._walk_of).
    if len(_WALK) < 1024 and named_by_its_module(kind):
        _WALK[kind] = walk
    return walk


def _one_owner() -> int:
    # sys.getrefcount() of an object with one holder, seen as _owned() sees its parts (the
    # list of referents and the loop's variable hold it too).
    holder = [object()]
    for part in gc.get_referents(holder):
        return sys.getrefcount(part)
    raise AssertionError("unreachable")  # pragma: no cover


_ONE_OWNER = _one_owner()


def _count(held: dict[Cell, list[int]], cell: Cell, size: int) -> None:
    totals = held.setdefault(cell, [0, 0])
    totals[0] += size
    totals[1] += 1


def _object_site(obj: object) -> Cell | None:
    # The raw frames, innermost first: tracemalloc.get_object_traceback() would build Frame
    # objects, each allocation of which is traced (and slow) while this runs.
    frames = _raw_traceback(obj)
    return frames_cell(frames) if frames else None


def _public_traceback(obj: object) -> tuple[tuple[str, int], ...] | None:
    traceback = tracemalloc.get_object_traceback(obj)
    if traceback is None:
        return None
    return tuple((frame.filename, frame.lineno) for frame in reversed(traceback))


_raw_traceback: Callable[[object], tuple[tuple[str, int], ...] | None] = getattr(
    tracemalloc, "_get_object_traceback", _public_traceback
)


# Python 3.11's tracemalloc looks an instance with a managed __dict__ up at the wrong address
# (it forgets the pre-header): such objects (a response, its headers) look untraced.
_MANAGED_DICT = 1 << 4
_PRE_HEADER_BUG = sys.version_info < (3, 12)


def _untraceable(obj: object) -> bool:
    return _PRE_HEADER_BUG and bool(type(obj).__flags__ & _MANAGED_DICT)


# Traced calls whose allocations the baseline compares (see Baseline): a few dozen dicts of a
# few hundred entries at most.
BASELINE_CALLS = 32


class Baseline:
    """What every traced call in this process keeps at its end anyway, per allocation place.

    Beyond its response and request (see held_anyway), every call leaves some memory that
    the next call replaces: the framework's context variables, a connection's last cursor, a
    thread's lock. What a place in Python's, a library's or Django's code kept in each of the
    last BASELINE_CALLS traced calls, of at least two keys, is not retained by any of them.
    The baseline does not depend on the key: a leak in one view's code, present in its calls
    only, is never part of it (a per-key minimum would hide a constant leak); the
    application's own lines are never part of it either.
    """

    def __init__(self, calls: int = BASELINE_CALLS) -> None:
        self._calls: deque[tuple[str, dict[Place, int]]] = deque(maxlen=calls)

    def take(self, key: str, places: dict[Place, int]) -> dict[Place, int]:
        """Return the baseline per place for a call of key, then remember the call's places."""
        calls = self._calls
        baseline: dict[Place, int] = {}
        if len({seen for seen, _ in calls}) >= 2:
            for place in places:
                least = 0
                for _, kept in calls:
                    size = kept.get(place, 0)
                    if not size:
                        break  # most places are not in every call: stop at the first
                    if not least or size < least:
                        least = size
                else:
                    baseline[place] = least
        calls.append((key, places))
        return baseline


def library_places(cells: Mapping[Place, Mapping[Place, Sequence[int]]]) -> dict[Place, int]:
    """Bytes per allocation place outside the application's code (Baseline's input)."""
    places: dict[Place, int] = {}
    for by_place in cells.values():
        for place, (size, _) in by_place.items():
            if size > 0 and not is_user_file(place[0]):
                places[place] = places.get(place, 0) + size
    return places


def take_baseline(cells: dict[Place, dict[Place, list[int]]], baseline: dict[Place, int]) -> None:
    """Take each place's baseline off the cells allocated there, largest cell first."""
    for place, amount in baseline.items():
        take_from_places(
            (by_place[place] for by_place in cells.values() if place in by_place), amount
        )


def take_from_places(kept: Iterable[list[int]], amount: int) -> None:
    """Take amount bytes off the [bytes, blocks] of kept, largest first, down to 0."""
    for cell in sorted(kept, key=lambda cell: -cell[0]):
        if amount <= 0:
            break
        taken = min(amount, cell[0])
        if cell[0]:
            cell[1] -= round(cell[1] * taken / cell[0])
        cell[0] -= taken
        amount -= taken
