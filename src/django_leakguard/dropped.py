"""What is freed with a response once its server lets go of it, reference cycles included."""

from __future__ import annotations

import gc
import sys
import types
from collections.abc import Iterable, Mapping

# Objects walked from a response at most (see dropped_parts).
DROPPED_PARTS = 50_000

# An object more references than this refer to is shared (a registry, a cache, an interned
# name): dropped_parts does not walk into it.
SHARED_REFS = 100


def dropped_parts(
    root: object, counted: Iterable[int] = (), limit: int = DROPPED_PARTS
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
