"""Sizes and durations: the byte formatter and the parsers (units.py)."""

from __future__ import annotations

import datetime as dt

import pytest

from django_leakguard.units import format_bytes, parse_memory_size, parse_since

NOW = dt.datetime(2025, 11, 1, 12, 30, tzinfo=dt.timezone.utc)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("30m", NOW - dt.timedelta(minutes=30)),
        ("24h", NOW - dt.timedelta(hours=24)),
        (" 7d ", NOW - dt.timedelta(days=7)),
        ("2w", NOW - dt.timedelta(weeks=2)),
        ("2025-10-31", dt.datetime(2025, 10, 31, tzinfo=dt.timezone.utc)),
        ("2025-10-31T08:00:00+01:00", dt.datetime(2025, 10, 31, 7, tzinfo=dt.timezone.utc)),
    ],
)
def test_parse_since(value: str, expected: dt.datetime) -> None:
    assert parse_since(value, NOW) == expected


@pytest.mark.parametrize("value", ["", "5y", "soon", "2026-01-01"])
def test_parse_since_rejects(value: str) -> None:
    with pytest.raises(ValueError, match="--since"):
        parse_since(value, NOW)


@pytest.mark.parametrize(
    ("value", "signed", "text"),
    [
        (None, False, "n/a"),
        (0, False, "0 B"),
        (512, True, "+512 B"),
        (-1536, False, "-1.5 KiB"),
        (3 * 1024**2, False, "3.0 MiB"),
        (5 * 1024**4, False, "5120.0 GiB"),
    ],
)
def test_format_bytes(value: float | None, signed: bool, text: str) -> None:
    assert format_bytes(value, signed) == text


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("512MiB", 512 * 1024**2),
        ("1.5 GiB", int(1.5 * 1024**3)),
        ("500MB", 500 * 1000**2),
        ("2g", 2 * 1000**3),
        ("4096", 4096),
        (1024, 1024),
    ],
)
def test_parse_memory_size(text: object, expected: int) -> None:
    assert parse_memory_size(text) == expected


@pytest.mark.parametrize(
    "bad",
    ["lots", "12 parsecs", "", -5, 0, True, 1.5, "0MiB", None, 2**63, "1" + "0" * 400 + "MB"],
)
def test_parse_memory_size_rejects(bad: object) -> None:
    with pytest.raises(ValueError, match=r"memory size|expected bytes"):
        parse_memory_size(bad)


@pytest.mark.parametrize(
    ("value", "text"),
    [(1023, "1023 B"), (1024, "1.0 KiB"), (512 * 1024**2, "512.0 MiB"), (2**40, "1024.0 GiB")],
)
def test_one_style_for_every_size(value: int, text: str) -> None:
    # leakhunt printed 1,023 B and 1,048,576.0 MiB, leakguard_config 1.0 TiB: all read alike now.
    assert format_bytes(value) == text


def test_the_commands_and_servers_print_sizes_through_units() -> None:
    from django_leakguard import celery, gunicorn_conf, hunt, recycling
    from django_leakguard.reporting import ranking, render

    for module in (celery, gunicorn_conf, hunt, recycling, ranking, render):
        assert module.format_bytes is format_bytes, module.__name__
