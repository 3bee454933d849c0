from __future__ import annotations

import sys
import tracemalloc

import pytest

from django_leakguard import sizes


class Page:
    def __init__(self) -> None:
        self.title, self.body, self.status = "t", "b", 200


def traced_size_of_new_page() -> tuple[int, int]:
    Page()  # the class's keys are shared from its first instance on
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        page = Page()
        size = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    return size, sizes.object_size(page)


# Before 3.13 the values are an allocation of their own, or the instance's __dict__.
@pytest.mark.skipif(sys.version_info[:2] != (3, 13), reason="inline values are Python 3.13's")
def test_object_size_is_the_traced_allocation_of_an_instance_on_python_313() -> None:
    traced, counted = traced_size_of_new_page()
    # getsizeof() alone says 48 of about 300 bytes.
    assert sizes.inline_values_size(Page) > 8 * 3
    assert abs(traced - counted) <= 16, (traced, counted)


def test_objects_without_inline_values_are_their_getsizeof() -> None:
    for obj in ("text", b"bytes", [1, 2], {"a": 1}, (1, 2), Page):
        assert sizes.object_size(obj) == sys.getsizeof(obj)
