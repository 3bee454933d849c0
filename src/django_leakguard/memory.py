"""Cheap memory probes: resident set, C heap in use, and memory available to this process;
and when the process started."""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import signal
import sys
from collections.abc import Callable, Iterable
from datetime import datetime, timezone
from pathlib import Path

import psutil

# A cgroup v1 "no limit" is a huge number near 2**63 rounded down to the page size.
_V1_NO_LIMIT = 1 << 60

_PAGE_SIZE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096

_statm_fd: int | None = None
_statm_pid: int | None = None


def _reopen_statm() -> None:
    global _statm_fd, _statm_pid
    if _statm_fd is not None:
        with contextlib.suppress(OSError):
            os.close(_statm_fd)
    _statm_fd = os.open("/proc/self/statm", os.O_RDONLY)
    _statm_pid = os.getpid()


def _forget_statm() -> None:
    # After fork the inherited descriptor still reads the parent's /proc entry: the
    # path was resolved to the parent's pid at open time.
    global _statm_fd, _statm_pid
    if _statm_fd is not None:
        with contextlib.suppress(OSError):
            os.close(_statm_fd)
    _statm_fd = None
    _statm_pid = None


def _rss_statm() -> int:
    if _statm_fd is None or _statm_pid != os.getpid():
        _reopen_statm()
    assert _statm_fd is not None
    data = os.pread(_statm_fd, 64, 0)
    return int(data.split(None, 2)[1]) * _PAGE_SIZE


_process: psutil.Process | None = None


def _rss_psutil() -> int:
    global _process
    if _process is None or _process.pid != os.getpid():
        _process = psutil.Process()
    return int(_process.memory_info().rss)


def _pick_rss() -> Callable[[], int]:
    if sys.platform.startswith("linux") and os.path.exists("/proc/self/statm"):
        return _rss_statm
    return _rss_psutil  # pragma: no cover - Linux CI


rss: Callable[[], int] = _pick_rss()
rss.__doc__ = "Return this process's resident set size in bytes."


class _Mallinfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in (
            "arena",
            "ordblks",
            "smblks",
            "hblks",
            "hblkhd",
            "usmblks",
            "fsmblks",
            "uordblks",
            "fordblks",
            "keepcost",
        )
    ]


def _load_mallinfo2() -> Callable[[], _Mallinfo2] | None:
    if not sys.platform.startswith("linux"):
        return None  # pragma: no cover - Linux CI
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        func = libc.mallinfo2
    except (OSError, AttributeError):  # pragma: no cover - musl, glibc < 2.33
        return None
    func.restype = _Mallinfo2
    func.argtypes = []
    return func


_mallinfo2 = _load_mallinfo2()

# Signals held back while mallinfo2() runs (see hold_signals_in_heap_readings).
_held_signals: frozenset[signal.Signals] = frozenset()


def hold_signals_in_heap_readings(signals: Iterable[signal.Signals]) -> None:
    """Hold signals back in a thread while it reads the heap; they are delivered on return.

    mallinfo2() holds the C allocator's lock while it walks the free lists (tens of µs). A
    server whose signal handler exits from C, uWSGI's workers on SIGINT and SIGTERM, runs the
    C library's exit handlers on top of it; those that allocate (Python's, the recorder's exit
    flush) wait for that lock for ever, and the worker hangs until it is killed, losing what it
    had not written. Two pthread_sigmask() calls a reading, only where a server asks for them.
    """
    global _held_signals
    _held_signals = frozenset(signals)


def heap() -> int | None:
    """Return bytes the C allocator has handed out and not taken back, or None if unknown."""
    if _mallinfo2 is None:
        return None  # pragma: no cover - Linux CI has glibc >= 2.33
    if _held_signals:
        held = signal.pthread_sigmask(signal.SIG_BLOCK, _held_signals)
        try:
            info = _mallinfo2()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, held)
    else:
        info = _mallinfo2()
    return int(info.uordblks + info.hblkhd)


def threads() -> int | None:
    """Return how many threads this process has, or None where it cannot be told cheaply.

    Linux counts them in the link count of /proc/self/task (2 + one per thread): one stat().
    """
    try:
        return os.stat("/proc/self/task").st_nlink - 2
    except OSError:  # pragma: no cover - CI runs on Linux
        return None


# CPython's type attribute cache (4,096 slots, chosen by a type's version and the address of
# the name looked up) refers to the last name looked up in each slot. A name made at run time
# is kept by it until another lookup takes its slot: Django's SQL compiler looks up
# "as_" + vendor for every node it compiles, a pymalloc block each (20 a call in a small
# database view), and forms, serializers and template code do the like. Emptying the cache
# frees them: about 10 µs, and a few µs of lookups that miss it afterwards.
_clear_type_cache: Callable[[], object] | None = getattr(sys, "_clear_type_cache", None)


def clear_type_cache() -> None:
    """Empty CPython's type attribute cache, so that the names only it refers to are freed."""
    if _clear_type_cache is not None:
        _clear_type_cache()


def heap_available() -> bool:
    """Return whether the heap signal (glibc mallinfo2) is available here."""
    return _mallinfo2 is not None


def _read_limit(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    if not text or text == "max":
        return None
    try:
        value = int(text)
    except ValueError:
        return None
    if value <= 0 or value >= _V1_NO_LIMIT:
        return None
    return value


def _cgroup_v2_path(root: Path, proc_cgroup: Path) -> Path:
    try:
        for line in proc_cgroup.read_text().splitlines():
            if line.startswith("0::"):
                return root / line[3:].lstrip("/")
    except OSError:
        pass
    return root


def cgroup_limit(
    root: Path = Path("/sys/fs/cgroup"), proc_cgroup: Path = Path("/proc/self/cgroup")
) -> int | None:
    """Return the cgroup memory limit of this process in bytes, or None when unlimited."""
    limits: list[int] = []
    # cgroup v2: the process's own cgroup and its ancestors up to the mount root.
    group = _cgroup_v2_path(root, proc_cgroup)
    seen = 0
    while seen < 64:
        limit = _read_limit(group / "memory.max")
        if limit is not None:
            limits.append(limit)
        if group == root or root not in group.parents:
            break
        group = group.parent
        seen += 1
    # cgroup v1.
    for v1 in (root / "memory" / "memory.limit_in_bytes", root / "memory.limit_in_bytes"):
        limit = _read_limit(v1)
        if limit is not None:
            limits.append(limit)
    return min(limits) if limits else None


def available_memory(
    root: Path = Path("/sys/fs/cgroup"), proc_cgroup: Path = Path("/proc/self/cgroup")
) -> int:
    """Return the memory this process may use: the smallest of cgroup limits and host memory."""
    total = int(psutil.virtual_memory().total)
    limit = cgroup_limit(root, proc_cgroup)
    return total if limit is None else min(limit, total)


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_statm)


def process_started_at() -> datetime | None:
    """Return when the OS started this process (to 10 ms or so), or None when unknown."""
    try:
        return datetime.fromtimestamp(psutil.Process().create_time(), tz=timezone.utc)
    except (psutil.Error, OSError, ValueError, OverflowError):  # pragma: no cover - no /proc
        return None
