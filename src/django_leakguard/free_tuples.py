"""How many freed tuples CPython keeps for reuse: allocated blocks that nobody keeps.

CPython keeps up to 2,000 freed tuples of each length under 20 (its tuple free lists), and
sys.getallocatedblocks() counts them as allocated. A call that keeps tuples takes them from
there (its blocks do not grow), and a call that makes and frees many (a report of 100,000
rows) puts as many back (its blocks grow): the one that frees is charged with what the one
that keeps took. In the accuracy project a 30 MiB report ranked among the leaks for it,
154 blocks a reading. CPython exports no count of them; the counts are an array of C ints in
the interpreter's state, found once here by watching which ints change as tuples are freed.
"""

from __future__ import annotations

import ctypes
import sys
import threading

# Lengths 1 to 19: every Python from 3.10 to 3.13 keeps these (3.11 on keep length 20 too).
LENGTHS = 19
# How far into the interpreter's state the counts are looked for (read through
# /proc/self/mem, which refuses an address that is not mapped instead of crashing).
SCAN_BYTES = 1 << 20
_CHUNK = 1 << 16

# Looked for at most this many times (another thread freeing short tuples meanwhile spoils a
# try); then 0 is counted, as before.
TRIES = 3

_lock = threading.Lock()
_counts: ctypes.Array[ctypes.c_int] | None = None
_tries = 0


def free_tuples() -> int:
    """Return how many freed tuples CPython keeps for reuse, or 0 where it cannot tell (not
    found yet: look_up, which a reading calls first, looks for them)."""
    counts = _counts
    return sum(counts) if counts is not None else 0


def look_up() -> None:
    """Find the counts now if they are still to be found: before a reading, never inside one
    (looking frees thousands of tuples into the free lists)."""
    global _counts, _tries
    if _counts is not None or _tries >= TRIES:
        return
    with _lock:
        if _counts is None and _tries < TRIES:  # pragma: no branch - else: another thread did
            _tries += 1
            try:
                _counts = _find_counts()
            except Exception:  # anything unexpected: count nothing, never fail a reading
                _counts = None


def looks() -> int:
    """How many times the counts were looked for in this process (at most TRIES).

    A call whose two heap readings straddle a look does not count: the look freed thousands of
    tuples meanwhile, and once the counts are found the readings count them out, before not.
    """
    return _tries


def _find_counts() -> ctypes.Array[ctypes.c_int] | None:
    """Find the interpreter's counts of freed tuples per length, or None (see module)."""
    if not sys.platform.startswith("linux"):
        return None
    get = ctypes.pythonapi.PyInterpreterState_Get
    get.restype = ctypes.c_void_p
    state = get()
    if not state:  # pragma: no cover - a thread without an interpreter does not run this
        return None
    # Hold more tuples of lengths 1 to 3 than a free list keeps: their free lists are empty.
    # Then free a few of each, twice, with nothing else that frees a short tuple meanwhile
    # (a loop over zip() would).
    ones = [(i,) for i in range(2100)]
    twos = [(i, i) for i in range(2100)]
    threes = [(i, i, i) for i in range(2100)]
    with open("/proc/self/mem", "rb", buffering=0) as mem:
        snapshots = [_read(mem, state)]
        del ones[:4], twos[:7], threes[:3]
        snapshots.append(_read(mem, state))
        del ones[:5], twos[:5], threes[:6]
        snapshots.append(_read(mem, state))
    del ones, twos, threes
    found = _matches(snapshots)
    if len(found) != 1:
        return None
    return (ctypes.c_int * LENGTHS).from_address(state + found[0])


def _matches(snapshots: list[bytes]) -> list[int]:
    """The offsets in the three snapshots where the counts of lengths 1 to 3 are (see below)."""
    size = min(len(snapshot) for snapshot in snapshots) // 4 * 4
    views = [memoryview(snapshot[:size]).cast("i") for snapshot in snapshots]
    # The counts of lengths 1 to 3 grew by 4, 7, 3, then by 5, 5, 6 (the length-1 count may
    # not have started at 0: something else freed one before). Lengths 2 and 3 end at 12, 9.
    pattern = b"".join(count.to_bytes(4, sys.byteorder) for count in (12, 9))
    last = snapshots[-1][:size]
    found = []
    at = last.find(pattern, 4)
    while at != -1:
        first = at // 4 - 1  # the count of length 1
        if at % 4 == 0 and [
            [later - earlier for earlier, later in zip(before, after, strict=True)]
            for before, after in (
                (views[0][first : first + 3], views[1][first : first + 3]),
                (views[1][first : first + 3], views[2][first : first + 3]),
            )
        ] == [[4, 7, 3], [5, 5, 6]]:
            found.append(first * 4)
        at = last.find(pattern, at + 1)
    return found


def _read(mem: object, start: int) -> bytes:
    """Up to SCAN_BYTES of this process's memory from start, until an unmapped page."""
    chunks = []
    for offset in range(0, SCAN_BYTES, _CHUNK):  # pragma: no branch - stops at a short read
        try:
            mem.seek(start + offset)  # type: ignore[attr-defined]
            chunk = mem.read(_CHUNK)  # type: ignore[attr-defined]
        except OSError:
            break
        chunks.append(chunk)
        if len(chunk) < _CHUNK:
            break
    return b"".join(chunks)
