"""The bytes an object's own allocation takes, where sys.getsizeof() says less."""

from __future__ import annotations

import ctypes
import sys

# Python 3.13 keeps an instance's attribute values inside its own allocation, after the
# object (Py_TPFLAGS_INLINE_VALUES), and sys.getsizeof() leaves them out: an HttpResponse
# takes 304 to 328 bytes, of which getsizeof() says 48. Their size is the class's: one slot
# per key its instances share (the type's cached keys, dk_nentries + dk_usable) and a header.
_INLINE_VALUES = 1 << 2
_HEAP_TYPE = 1 << 9  # only a class made by a class statement or type() has cached keys
_WORD = ctypes.sizeof(ctypes.c_void_p)
# Where a PyDictKeysObject keeps dk_usable and dk_nentries (after its refcount, three bytes
# and the 32-bit version).
_USABLE_AT, _NENTRIES_AT = 2 * _WORD, 3 * _WORD


def _cached_keys_at() -> int:
    """The offset of ht_cached_keys in a heap type (it follows ht_qualname), or 0.

    Found in a class made here, and checked against an instance with two attributes; 0 on
    other Pythons than 3.13, or when the check fails (then nothing is added).
    """
    if sys.version_info[:2] != (3, 13):
        return 0
    return _probe_cached_keys()  # pragma: no cover - Python 3.13 only (tox's py313 envs)


def _probe_cached_keys() -> int:  # pragma: no cover - Python 3.13 only (tox's py313 envs)
    def make() -> type:
        class Probe:
            pass

        return Probe

    probe = make()
    qualname = id(probe.__qualname__)  # "_probe_cached_keys.<locals>.make.<locals>.Probe"
    words = [
        at
        for at in range(0, type.__basicsize__ - _WORD, _WORD)  # type: ignore[operator]
        if ctypes.c_size_t.from_address(id(probe) + at).value == qualname
    ]
    if len(words) != 1:
        return 0
    at = words[0] + _WORD
    instance = probe()
    instance.first, instance.second = 1, 2
    keys = ctypes.c_size_t.from_address(id(probe) + at).value
    if not keys or not probe.__flags__ & _INLINE_VALUES:
        return 0
    nentries = ctypes.c_ssize_t.from_address(keys + _NENTRIES_AT).value
    usable = ctypes.c_ssize_t.from_address(keys + _USABLE_AT).value
    return at if nentries == 2 and 0 < usable < 1024 else 0


_KEYS_AT = _cached_keys_at()


def inline_values_size(kind: type) -> int:
    """The bytes of attribute values each instance of kind keeps in its own allocation."""
    flags = kind.__flags__
    if not _KEYS_AT or not flags & _INLINE_VALUES or not flags & _HEAP_TYPE:
        return 0
    return _inline_values_size(kind)  # pragma: no cover - Python 3.13 only (tox's py313 envs)


def _inline_values_size(kind: type) -> int:  # pragma: no cover - Python 3.13 only
    keys = ctypes.c_size_t.from_address(id(kind) + _KEYS_AT).value
    if not keys:
        return 0
    slots = ctypes.c_ssize_t.from_address(keys + _NENTRIES_AT).value
    slots += ctypes.c_ssize_t.from_address(keys + _USABLE_AT).value
    if not 0 < slots < 1024:
        return 0
    # CPython's _PyInlineValuesSize(): a byte per slot (its order), rounded up to words, the
    # values' header and a word per slot.
    return -(-slots // _WORD) * _WORD + (slots + 1) * _WORD


def object_size(obj: object) -> int:
    """sys.getsizeof(obj), plus the attribute values it keeps inline (Python 3.13)."""
    return sys.getsizeof(obj) + inline_values_size(type(obj))
