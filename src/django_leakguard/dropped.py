"""What is freed with a response once its server lets go of it, reference cycles included."""

from __future__ import annotations

import gc
import sys
import types
from collections.abc import Container, Iterable, Mapping
from typing import cast

# Objects walked from a response at most (see dropped_parts).
DROPPED_PARTS = 50_000

# Walks stopped at their limit so far in this process: from the first, the heap readings note
# what is young for the walk to stop at (see young_ids), which costs tens of µs a reading.
walks_cut = 0

# An object more references than this refer to is shared (a registry, a cache, an interned
# name): dropped_parts does not walk into it.
SHARED_REFS = 100


def dropped_parts(
    root: object,
    counted: Iterable[int] = (),
    limit: int = DROPPED_PARTS,
    young: Container[int] | None = None,
) -> list[object]:
    """Return what is freed with root once its holders let go of it, reference cycles included.

    That is what root refers to, directly or through other such objects, that nothing else
    refers to: what the collector would find unreachable (a REST framework response refers
    to its view and request, which refer to each other).
    At most limit objects are walked; what lies beyond counts as referred to from outside.
    Not django-leakguard's own objects, nor those in counted (ids). The references an object
    has are sys.getrefcount()'s: one a C type keeps without telling the collector makes the
    object look referred to from outside, so that it is left out, never wrongly counted.
    young: the ids of the objects in the collector's young generations, if known (see
    young_ids): an object it tracks that is not among them is older than the call and alive,
    and is not walked into. Without it, a request's resolver match leads the walk into the URL
    resolver's patterns (in NetBox, 68,000 objects: past limit, so that the response's own
    cycle looked referred to from outside).
    """
    global walks_cut
    skip = set(counted)
    # Every object reached, breadth first, and its id(), made once: under sampled tracing
    # each allocation records its traceback (a few µs), an int beyond 256 included, so the
    # walk makes as few as it can (no index per object). The references to each from the
    # walked objects; the ids of those walked into.
    order, pids = [root], [id(root)]
    refs = {pids[0]: 0}
    opened: set[int] = set()
    walked = start = 0
    while start < len(order) and walked < limit:  # a level at a time (see _referents)
        level: list[object] = []
        level_pids: list[int] = []
        for obj, pid in zip(order[start:], pids[start:], strict=True):
            if obj is not root and sys.getrefcount(obj) > SHARED_REFS:
                continue  # referred to from many places (a registry, a cache): alive, not walked
            if young is not None and pid not in young and gc.is_tracked(obj):
                continue  # older than the call: alive, not walked
            level.append(obj)
            level_pids.append(pid)
        if walked + len(level) > limit:
            level = level[: limit - walked]
            level_pids = level_pids[: limit - walked]
            walks_cut += 1
        walked += len(level)
        opened.update(level_pids)
        start = len(order)
        for part in _referents(level):
            pid = id(part)
            count = refs.get(pid)
            if count is not None:
                refs[pid] = count + 1
                continue
            kind = type(part)
            walk = _WALK.get(kind)
            if walk is None:
                walk = _walk_of(kind)
            if walk is _SKIP or pid in skip:
                continue
            refs[pid] = 1
            order.append(part)
            pids.append(pid)
        level, level_pids = [], []
        obj = part = None
    # Referred to from outside (or not walked into): alive whatever root does, with what they
    # refer to; the rest is freed with root. (What an object not walked into refers to looks
    # referred to from outside: its references were not counted.)
    alive = {pids[0]}
    frontier = []
    for obj, pid in zip(order[1:], pids[1:], strict=True):
        if pid not in opened or sys.getrefcount(obj) - _IN_ORDER > refs[pid]:
            alive.add(pid)
            if pid in opened:
                frontier.append(obj)
    obj = None
    while frontier:
        level, frontier = frontier, []
        for part in _referents(level):
            pid = id(part)
            if pid in refs and pid not in alive:
                alive.add(pid)
                if pid in opened:
                    frontier.append(part)
        level = []
        part = None
    return [obj for obj, pid in zip(order, pids, strict=True) if pid not in alive]


def young_ids() -> set[int]:
    """Return the ids of the objects in the collector's two young generations (about 100 ns
    each).

    While a call that reads the heap is in flight, what it makes stays there (see
    recorder_heap.defer_promotion); what is older is in the oldest generation.
    """
    young = set(map(id, gc.get_objects(0)))
    young.update(map(id, gc.get_objects(1)))
    return young


def _referents(objects: list[object]) -> Iterable[object]:
    """What objects refer to, as dropped_parts walks them: of a function, only its closure's
    cells; of a dict, its keys as well; nothing for strings, bytes and numbers.

    A function made per request (Django's lazy request.user, `lambda: get_user(request)`)
    refers to the request through its closure; its module's globals and code are shared.
    Breadth first, a level at a time: one gc.get_referents() call for all of a level's
    objects, so that the walk allocates a few lists, not one per object (under sampled
    tracing each allocation records its traceback: walking a response of 400 objects an
    object at a time cost 5 ms).
    """
    extra: list[object] = []
    others = []
    for obj in objects:
        kind = type(obj)
        if kind is types.FunctionType:
            extra.extend(obj.__closure__ or ())  # type: ignore[attr-defined]
        elif kind not in _LEAVES:
            others.append(obj)
            if kind is dict:
                # A dict whose keys are all strings shows the collector only its values (such
                # keys cannot be part of a cycle): keys made per call (f"row {n}") are freed
                # with it too.
                table = cast("dict[object, object]", obj)
                if table and len(gc.get_referents(table)) == len(table):
                    extra.extend(table)
    found = gc.get_referents(*others) if others else []
    return found + extra if extra else found


def _in_order() -> int:
    # sys.getrefcount() of an object held once, as dropped_parts() reads it (the list of
    # objects, its slice, the loop's variable).
    holder: list[list[object]] = [[]]
    order: list[object] = [holder, holder[0]]
    pids = [id(holder), id(holder[0])]
    for obj, _ in zip(order[1:], pids[1:], strict=True):
        return sys.getrefcount(obj) - 1
    raise AssertionError("unreachable")  # pragma: no cover


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
    if len(_WALK) < 1024 and named_by_its_module(kind):
        _WALK[kind] = walk
    return walk


def named_by_its_module(cls: type) -> bool:
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
