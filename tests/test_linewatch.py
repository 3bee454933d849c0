from __future__ import annotations

import ctypes
import ctypes.util
import json
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from django_leakguard import memory
from django_leakguard.linewatch import LineWatch

SOURCE = Path(__file__).read_text().splitlines()
HERE = __file__


def line_of(text: str) -> int:
    return next(number for number, line in enumerate(SOURCE, 1) if text in line)


class ScriptedHeap(LineWatch):
    """LineWatch reading scripted C-heap sizes: the real heap moves with everything the
    interpreter does, so the matching of rises and falls is tested on exact numbers."""

    def __init__(self, readings: list[int]) -> None:
        super().__init__()
        self.readings: Iterator[int] = iter(readings)

    def _read(self) -> int:
        return next(self.readings)


def test_a_rise_never_freed_is_kept_by_its_line() -> None:
    watch = ScriptedHeap([1000, 1000, 1000 + 4096, 1000 + 4096, 1000 + 4096])
    watch.begin_request()  # 1000
    watch.on_line("app.py", 1)  # 1000: nothing before the first line
    watch.on_line("app.py", 2)  # line 1 ran: +4096
    watch.on_line("app.py", 3)  # line 2 ran: nothing
    watch.end_request()  # line 3 and the teardown: nothing
    assert watch.kept == {("app.py", 1): 4096}
    assert watch.total == 4096


def test_a_rise_freed_later_is_not_kept_and_frees_match_the_oldest_rise_first() -> None:
    # Line 1 makes a 10 KiB buffer, line 2 keeps 2 KiB for good, the return frees the buffer.
    watch = ScriptedHeap([0, 0, 10240, 12288, 2048])
    watch.begin_request()
    watch.on_line("app.py", 1)
    watch.on_line("app.py", 2)
    watch.on_line("app.py", 3)
    watch.end_request()
    assert watch.kept == {("app.py", 2): 2048}
    assert watch.total == 2048


def test_what_the_framework_allocates_before_the_first_line_does_not_cancel_a_rise() -> None:
    # The framework allocates 1 KiB before the view's first line and frees it at teardown.
    watch = ScriptedHeap([0, 1024, 1024 + 512, 512])
    watch.begin_request()
    watch.on_line("app.py", 1)
    watch.on_line("app.py", 2)
    watch.end_request()
    assert watch.kept == {("app.py", 1): 512}


def test_repeated_events_of_one_line_read_the_heap_once() -> None:
    watch = ScriptedHeap([0, 0, 100])  # a third reading would raise StopIteration
    watch.begin_request()
    watch.on_line("app.py", 1)
    for _ in range(1000):  # a comprehension's loop
        watch.on_line("app.py", 1)
    watch.end_request()
    assert watch.kept == {("app.py", 1): 100}


def test_kept_adds_up_over_requests() -> None:
    watch = ScriptedHeap([0, 0, 64] * 3)
    for _ in range(3):
        watch.begin_request()
        watch.on_line("app.py", 7)
        watch.end_request()
    assert watch.kept == {("app.py", 7): 192}
    assert watch.total == 192


_libc = ctypes.CDLL(ctypes.util.find_library("c"))
_libc.malloc.restype = ctypes.c_void_p
_libc.malloc.argtypes = [ctypes.c_size_t]
_libc.free.argtypes = [ctypes.c_void_p]


def keep_c_memory(blocks: list[int]) -> None:
    address = _libc.malloc(64 * 1024)
    ctypes.memset(address, 1, 64 * 1024)
    blocks.append(address)


@pytest.mark.skipif(not memory.heap_available(), reason="the C heap needs glibc's mallinfo2")
def test_watching_charges_real_c_memory_to_the_line_that_allocated_it() -> None:
    watch = LineWatch()
    blocks: list[int] = []
    try:
        with watch.watching():
            watch.begin_request()
            keep_c_memory(blocks)
            watch.end_request()
        assert sys.gettrace() is None or sys.gettrace() is not watch  # restored
        line = (HERE, line_of("address = _libc.malloc(64 * 1024)"))
        assert watch.kept.get(line, 0) >= 64 * 1024, watch.kept
    finally:
        for address in blocks:
            _libc.free(address)


def test_library_lines_get_no_event() -> None:
    seen: list[tuple[str, int]] = []

    class Recording(LineWatch):
        def on_line(self, filename: str, lineno: int) -> None:
            seen.append((filename, lineno))

    watch = Recording()
    with watch.watching():
        encode({"a": [1, 2, 3]})
    assert (HERE, encode.__code__.co_firstlineno + 1) in seen
    assert all(filename == HERE for filename, _ in seen), seen  # none in json's own code


def encode(data: object) -> str:
    return json.dumps(data)
