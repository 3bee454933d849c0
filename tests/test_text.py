from __future__ import annotations

import pytest

from django_leakguard.text import escape_controls


@pytest.mark.parametrize(
    ("text", "shown"),
    [
        ("/products/<int:pk>/", "/products/<int:pk>/"),
        ("/a\x1b[2J/", "/a\\x1b[2J/"),
        ("\x07\r\n\t\x00\x7f", "\\x07\\x0d\\x0a\\x09\\x00\\x7f"),
        ("/\x9b31m/", "/\\x9b31m/"),
        ("/\u202egnp.exe/", "/\\u202egnp.exe/"),
        ("/caf\u00e9/\u4e2d/", "/caf\u00e9/\u4e2d/"),
        (r"^articles/(?P<year>\d{4})/$", r"^articles/(?P<year>\d{4})/$"),
    ],
)
def test_escape_controls(text: str, shown: str) -> None:
    assert escape_controls(text) == shown
