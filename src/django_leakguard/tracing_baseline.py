"""What a traced call holds anyway, not retained: its response, and the process's baseline."""

from __future__ import annotations

import gc
import sys
import tracemalloc
import types
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence

from django_leakguard.tracing_sites import Cell, Place, frames_cell, is_user_file

# Objects walked from a traced call's response (see held_anyway): a REST framework
# response's view, request and serializer are a few hundred.
HELD_PARTS = 5_000

# An object more references than this refer to is shared (a registry, a cache, an interned
# name): dropped_parts does not walk into it.
SHARED_REFS = 100

# The place of held bytes that may have been allocated anywhere under their site.
ANY_PLACE: Place = ("", 0)


def held_anyway(
    roots: Iterable[object], stop_tracing: Callable[[], object]
) -> dict[Cell, list[int]]:
    """Return [bytes, objects] per cell of the responses in roots and what they free.

    roots are what every call still holds at its end whether it leaks or not: its response,
    which the server still refers to when it closes it. Its memory is freed once the server
    lets go of it, so it is not retained: the response object and what is freed with it
    (headers and their values, cookies, content chunks, a template response's context, a REST
    framework response's view and request, which refer to each other; see dropped_parts),
    each at ANY_PLACE of the site it was made at, else of the response's site. Call it while
    tracemalloc traces, after the snapshot; it calls stop_tracing() once it has looked the
    objects up.
    """
    held: dict[Cell, list[int]] = {}
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
        if cell is None:
            continue
        _count(held, cell, sys.getsizeof(root))
        for part in dropped_parts(root, counted, HELD_PARTS):
            # Anywhere under the site it was made at (a dict's table may have been made at
            # another place), else (taken from a free list, whose tables were traced, or an
            # instance _untraceable hides) under the response's site.
            site = (_object_site(part) or cell)[0]
            _count(held, (site, ANY_PLACE), sys.getsizeof(part))
    stop_tracing()
    return held


def response_content(response: object) -> list[object]:
    """An HttpResponse's content chunks (bytes); none for other objects."""
    content = getattr(response, "_container", None)
    return content if type(content) is list else []


def dropped_parts(
    root: object, counted: Iterable[int] = (), limit: int = HELD_PARTS
) -> list[object]:
    """Return what is freed with root once its holders let go of it, reference cycles included.

    That is what root refers to, directly or through other such objects, that nothing else
    refers to: what the collector would find unreachable (a REST framework response refers
    to its view and request, which refer to each other).
    At most limit objects are walked; what lies beyond counts as referred to from outside.
    Not django-leakguard's own objects, nor those in counted (ids). The references an object
    has are sys.getrefcount()'s: one a C type keeps without telling the collector makes the
    object look referred to from outside, so that it is left out, never wrongly counted.
    """
    skip = set(counted)
    order = [root]
    index = {id(root): 0}
    refs_in = [0]  # references from the walked objects
    opened = bytearray(1)  # walked into
    walked = 0
    for j, container in enumerate(order):  # breadth first: the list grows while it is walked
        if walked >= limit:
            break
        if j and sys.getrefcount(container) > SHARED_REFS:
            continue  # referred to from many places (a registry, a cache): alive, not walked
        walked += 1
        opened[j] = 1
        if type(container) in _LEAVES:
            continue  # refers to nothing
        for part in _referents(container):
            k = index.get(id(part))
            if k is None:
                kind = type(part)
                walk = _WALK.get(kind)
                if walk is None:
                    walk = _walk_of(kind)
                if walk is _SKIP or id(part) in skip:
                    continue
                k = index[id(part)] = len(order)
                order.append(part)
                refs_in.append(0)
                opened.append(0)
            refs_in[k] += 1
    container = part = None
    # Referred to from outside (or not walked into): alive whatever root does, with what they
    # refer to; the rest is freed with root. (What an object not walked into refers to looks
    # referred to from outside: its references were not counted.)
    alive = bytearray(len(order))
    stack = []
    for j in range(1, len(order)):
        if not opened[j] or sys.getrefcount(order[j]) - _IN_ORDER > refs_in[j]:
            alive[j] = 1
            if opened[j]:
                stack.append(j)
    while stack:
        container = order[stack.pop()]
        if type(container) in _LEAVES:
            continue
        for part in _referents(container):
            k = index.get(id(part), 0)
            if k and not alive[k]:
                alive[k] = 1
                if opened[k]:
                    stack.append(k)
    container = part = None
    return [order[j] for j in range(1, len(order)) if not alive[j]]


def _referents(obj: object) -> Iterable[object]:
    """What obj refers to, as dropped_parts walks it: a function, only its closure's cells.

    A function made per request (Django's lazy request.user, `lambda: get_user(request)`)
    refers to the request through its closure; its module's globals and code are shared.
    """
    if type(obj) is types.FunctionType:
        return obj.__closure__ or ()
    return gc.get_referents(obj)


def _in_order() -> int:
    # sys.getrefcount(order[j]) of an object held once, as dropped_parts() reads it.
    holder: list[list[object]] = [[]]
    order: list[object] = [holder, holder[0]]
    return sys.getrefcount(order[1]) - 1


_IN_ORDER = _in_order()


# How dropped_parts treats objects of a type: skipped (shared: a flag, a class, a module,
# code; ours), counted (strings, bytes, numbers: they refer to nothing), or walked into.
_SKIP, _LEAF, _INTO = "skip", "leaf", "into"
_SKIPPED: tuple[type, ...] = (
    type(None), bool, types.ModuleType, types.FrameType, types.CodeType,
)  # fmt: skip
_LEAVES = frozenset((str, bytes, int, float))
_WALK: dict[type, str] = dict.fromkeys(_SKIPPED, _SKIP) | dict.fromkeys(_LEAVES, _LEAF)


def _walk_of(kind: type) -> str:
    if issubclass(kind, type) or kind.__module__.startswith("django_leakguard"):
        walk = _SKIP
    else:
        walk = _INTO
    # Not a class made at run time (django-filter makes a form class per request): remembered,
    # it would stay alive with what it refers to (its fields, their querysets), charged to the
    # calls that made it. At most 1,024 others.
    if len(_WALK) < 1024 and _named_by_its_module(kind):
        _WALK[kind] = walk
    return walk


def _named_by_its_module(cls: type) -> bool:
    """Whether cls is what its module's namespace names it (not a class made by a call)."""
    qualname = getattr(cls, "__qualname__", "")
    module = sys.modules.get(getattr(cls, "__module__", None) or "")
    if module is None or "<locals>" in qualname:
        return False
    found: object = module
    for name in qualname.split("."):
        namespace = getattr(found, "__dict__", None)
        if not isinstance(namespace, Mapping):
            return False
        found = namespace.get(name)
    return found is cls


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
