"""Which frame an allocation is blamed on: the application's code, not ours or a library's."""

from __future__ import annotations

import functools
import linecache
import os
import sys
import sysconfig
import tracemalloc
from collections.abc import Sequence
from typing import TYPE_CHECKING

from django_leakguard.text import escape_controls

if TYPE_CHECKING:
    from django_leakguard.tracing_records import Site

# Longest source line kept with a site: enough to recognise it, bounded for storage.
MAX_LINE_LENGTH = 200

_OWN_DIR = os.path.dirname(os.path.abspath(__file__)) + os.sep


def _library_dirs() -> tuple[str, ...]:
    paths = sysconfig.get_paths()
    dirs = {
        paths[name] for name in ("stdlib", "platstdlib", "purelib", "platlib") if name in paths
    }
    return tuple(sorted(os.path.join(os.path.abspath(d), "") for d in dirs))


_LIBRARY_DIRS = _library_dirs()

# Where the measured code is entered: the request passes through these frames, so the walk
# from an allocation outwards stops there (what lies further out is the server, or leakhunt).
_BOUNDARY_FILES = frozenset(_OWN_DIR + name for name in ("middleware.py", "replay.py"))

# Taking snapshots and grouping their traces allocates too: not the call's.
_TRACEMALLOC_FILE = tracemalloc.__file__


@functools.lru_cache(maxsize=1024)
def is_user_file(filename: str) -> bool:
    """Return whether filename is the application's code: not Python's, a library's, or ours."""
    # Memoised (bounded): called for frames of every traceback at every traced call.
    if filename.startswith(("<", _OWN_DIR)):
        return False
    return not filename.startswith(_LIBRARY_DIRS)


def short_filename(filename: str) -> str:
    """Return filename relative to the longest sys.path entry holding it (as imports name it)."""
    # Called for every frame of every site at every traced call: memoised (bounded), keyed
    # by sys.path and the working directory ("" in sys.path) so that changing them is seen.
    return _short_filename(filename, tuple(sys.path), os.getcwd())


def site_names(filename: str, frames: Frames) -> tuple[str, tuple[str, ...]]:
    """Return short_filename(filename) and "file:line" of each of frames, so named."""
    path, cwd = tuple(sys.path), os.getcwd()  # read once for all
    return _short_filename(filename, path, cwd), _frame_names(frames, path, cwd)


@functools.lru_cache(maxsize=1024)
def _frame_names(frames: Frames, path: tuple[str, ...], cwd: str) -> tuple[str, ...]:
    return tuple(f"{_short_filename(filename, path, cwd)}:{lineno}" for filename, lineno in frames)


@functools.lru_cache(maxsize=4096)
def _short_filename(filename: str, path: tuple[str, ...], cwd: str) -> str:
    best = ""
    for entry in path:
        base = os.path.join(os.path.abspath(os.path.join(cwd, entry)), "")
        if filename.startswith(base) and len(base) > len(best):
            best = base
    return filename[len(best) :] if best else filename


def source_line(filename: str, lineno: int) -> str:
    """Return the stripped source line, bounded, or "" when the source is not available."""
    return linecache.getline(filename, lineno).strip()[:MAX_LINE_LENGTH]


def site_frame(traceback: Sequence[tracemalloc.Frame]) -> tracemalloc.Frame | None:
    """Return the frame to blame for an allocation, or None when it was made for us.

    The innermost frame in the application's code wins over the standard library's and
    libraries' frames (json.loads called from a view blames the view); without one, the
    innermost frame. Allocations made by django-leakguard, or by code it called (the ORM
    writing our rows), are the measuring's, not the call's.
    """
    innermost = traceback[-1]  # tracemalloc orders frames oldest first
    if innermost.filename.startswith(_OWN_DIR):
        return None
    for frame in reversed(traceback):
        filename = frame.filename
        if filename == _TRACEMALLOC_FILE:
            return None
        if filename.startswith(_OWN_DIR):
            if filename in _BOUNDARY_FILES:
                break
            return None
        if is_user_file(filename):
            return frame
    return innermost


Place = tuple[str, int]  # (filename, line)
Cell = tuple[Place, Place]  # (the site blamed, where the allocation was made)
Frames = tuple[tuple[str, int], ...]  # (filename, line) of each frame, innermost first


@functools.lru_cache(maxsize=1024)
def frames_cell(frames: Frames) -> Cell | None:
    """site_frame() on raw frames (innermost first): (the site, where it was allocated)."""
    # Memoised (bounded): a call's tracebacks are mostly those of the calls before it.
    inner = frames[0]
    if inner[0].startswith(_OWN_DIR):
        return None
    for filename, lineno in frames:
        if filename == _TRACEMALLOC_FILE:
            return None
        if filename.startswith(_OWN_DIR):
            if filename in _BOUNDARY_FILES:
                break
            return None
        if is_user_file(filename):
            return (filename, lineno), inner
    return inner, inner


def site_lines(site: Site, callers: int) -> list[str]:
    """A site's source line and up to callers of its callers, indented under its ranked line,
    escaped for a terminal (leakreport --detail and leakhunt print sites alike)."""
    lines = [f"      {escape_controls(site.line)}"] if site.line else []
    # frames run innermost first: the callers are those after the site's own frame.
    own = site.frames.index(site.location) if site.location in site.frames else -1
    lines.extend(
        f"      from {escape_controls(frame)}"
        for frame in site.frames[own + 1 : own + 1 + callers]
    )
    return lines
