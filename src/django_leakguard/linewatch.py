"""Which line of the project's code kept C-heap memory: for leaks tracemalloc cannot see.

A C extension's own malloc() (or ctypes calling libc's) is invisible to tracemalloc, and
sys.setprofile fires no event for calls of C functions through ctypes. What does fire is a line
event for every line of the project's own code that runs: LineWatch reads the C heap (glibc's
mallinfo2) at each one, with sys.monitoring on Python 3.12+ and sys.settrace before, and charges
each change to the line that was running. A request's rises are matched, oldest first, against
its falls (locals are freed in the order they were made, at a function's return): what is left
at the request's end, after its teardown, is what that line kept.

Lines of the standard library, of installed packages and of django-leakguard get no event: the
project's line that called into them is charged.
"""

from __future__ import annotations

import sys
import threading
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import CodeType, FrameType
from typing import Any

from django_leakguard import memory
from django_leakguard.tracing_sites import is_user_file

__all__ = ["LineWatch"]

Line = tuple[str, int]  # (filename as the code object has it, line number)


class LineWatch:
    """Per-line C-heap growth kept by each request, summed over the requests watched."""

    def __init__(self) -> None:
        self.kept: dict[Line, int] = {}  # bytes kept per line, all requests together
        self.total = 0  # the C heap's growth over the requests watched, lines or not
        self._start = 0  # the C heap when the request began
        self._line: Line | None = None  # the line running now
        self._heap = 0
        self._rises: deque[list[Any]] = deque()  # [line, bytes] not freed yet, oldest first
        self._users: dict[str, bool] = {}  # filename -> is_user_file(filename), memoised

    @staticmethod
    def available() -> bool:
        """Return whether the C heap can be read here (glibc 2.33 or later)."""
        return memory.heap_available()

    def _read(self) -> int:
        return memory.heap() or 0

    def begin_request(self) -> None:
        self._rises.clear()
        self._line = None
        self._heap = self._start = self._read()

    def end_request(self) -> None:
        """Charge the change since the last line; add what each line kept to kept."""
        heap = self._read()
        self.total += heap - self._start
        self._charge(heap)
        kept = self.kept
        for line, size in self._rises:
            if line is not None and size > 0:
                kept[line] = kept.get(line, 0) + size
        self._rises.clear()
        self._line = None

    def _charge(self, heap: int) -> None:
        change, self._heap = heap - self._heap, heap
        if change > 0:
            # Before the request's first line of the project's code, line is None: what the
            # framework allocates then is freed at teardown, and must not cancel a line's rise.
            self._rises.append([self._line, change])
            return
        freed = -change
        rises = self._rises
        while freed > 0 and rises:
            oldest = rises[0]
            if oldest[1] > freed:
                oldest[1] -= freed
                return
            freed -= oldest[1]
            rises.popleft()

    def _is_user(self, filename: str) -> bool:
        user = self._users.get(filename)
        if user is None:
            user = self._users[filename] = is_user_file(filename)
        return user

    def on_line(self, filename: str, lineno: int) -> None:
        """A line of filename begins: charge the change since the previous one to that one."""
        line = (filename, lineno)
        if line == self._line:
            return  # a loop on one line (a comprehension): charged to it all the same
        self._charge(self._read())
        self._line = line

    @contextmanager
    def watching(self) -> Iterator[None]:
        """Get line events from the project's frames while the block runs (all threads)."""
        if sys.version_info >= (3, 12):
            with self._monitoring():
                yield
        else:  # pragma: no cover - the CI's Python 3.12+ takes the other branch
            with self._settrace():
                yield

    @contextmanager
    def _monitoring(self) -> Iterator[None]:  # pragma: no cover - Python 3.12+
        monitoring = sys.monitoring  # type: ignore[attr-defined,unused-ignore]
        tool = next(
            (tool for tool in (monitoring.PROFILER_ID, 3, 4) if monitoring.get_tool(tool) is None),
            None,
        )
        if tool is None:
            raise RuntimeError("every sys.monitoring tool id leakhunt could use is taken")
        monitoring.use_tool_id(tool, "leakhunt")
        disable = monitoring.DISABLE

        def line(code: CodeType, lineno: int) -> object:
            if not self._is_user(code.co_filename):
                return disable  # this location never fires again while we watch
            self.on_line(code.co_filename, lineno)
            return None

        try:
            monitoring.register_callback(tool, monitoring.events.LINE, line)
            monitoring.set_events(tool, monitoring.events.LINE)
            yield
        finally:
            monitoring.set_events(tool, 0)
            monitoring.register_callback(tool, monitoring.events.LINE, None)
            monitoring.free_tool_id(tool)
            monitoring.restart_events()

    @contextmanager
    def _settrace(self) -> Iterator[None]:
        def local(frame: FrameType, event: str, arg: object) -> Callable[..., Any] | None:
            if event == "line":
                self.on_line(frame.f_code.co_filename, frame.f_lineno)
            return local

        def calls(frame: FrameType, event: str, arg: object) -> Callable[..., Any] | None:
            return local if self._is_user(frame.f_code.co_filename) else None

        previous = sys.gettrace()
        sys.settrace(calls)
        threading.settrace(calls)  # async views run in asgiref's own thread
        try:
            yield
        finally:
            sys.settrace(previous)
            threading.settrace(previous)  # type: ignore[arg-type,unused-ignore]
