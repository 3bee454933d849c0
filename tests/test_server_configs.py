from __future__ import annotations

import importlib.metadata
from pathlib import Path

import pytest

from django_leakguard import server_configs
from django_leakguard.recycling import parse_version
from django_leakguard.server_configs import UwsgiConfig


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (b"1000", "1000"),
        (True, "true"),
        ([b"/spool/a", b"/spool/b"], "/spool/b"),
        ([], ""),
        (8, "8"),
    ],
)
def test_live_uwsgi_option_values_become_text(value: object, expected: str) -> None:
    # The shapes uwsgi.opt holds: bytes, True for flags, lists for repeated options.
    assert server_configs._option_value(value) == expected


def test_uwsgi_option_names_use_dashes() -> None:
    assert server_configs._option_name(" Max_Requests ") == "max-requests"


def test_uwsgi_config_has_and_number() -> None:
    config = UwsgiConfig(
        "x.ini",
        {"max-requests": "100", "reload-on-rss": "0", "spooler": "/s", "harakiri": "off"},
    )
    assert config.has("reload-on-rss", "max-requests")
    assert not config.has("reload-on-rss", "harakiri", "missing")
    assert config.has("spooler")
    assert config.number("missing", "max-requests") == 100
    assert config.number("spooler") is None


def test_no_live_uwsgi_options_outside_uwsgi() -> None:
    assert server_configs.live_uwsgi_options() is None


def test_uwsgi_version_is_the_installed_one() -> None:
    assert server_configs.uwsgi_version() == parse_version(importlib.metadata.version("uWSGI"))


def test_resolve_path(tmp_path: Path) -> None:
    assert server_configs.resolve_path("a.ini", tmp_path) == tmp_path / "a.ini"
    assert server_configs.resolve_path("/etc/a.ini", tmp_path) == Path("/etc/a.ini")
    assert server_configs.resolve_path("~/a.ini", tmp_path) == Path.home() / "a.ini"
    assert server_configs.resolve_path("a.ini", None) == Path.cwd() / "a.ini"


def test_read_uwsgi_ini_keeps_the_last_of_repeated_keys(tmp_path: Path) -> None:
    path = tmp_path / "u.ini"
    path.write_text("[uwsgi]\nprocesses = 2\nprocesses = 4\nmaster\nx = %(processes)\n")
    config = server_configs.read_uwsgi_ini(path)
    assert config.options == {"processes": "4", "master": "true", "x": "%(processes)"}
    assert config.source == str(path)


def test_find_celery_app_without_a_setting_or_an_app(monkeypatch: pytest.MonkeyPatch) -> None:
    from celery import _state

    monkeypatch.setattr(_state._tls, "current_app", None)
    monkeypatch.setattr(_state, "default_app", None)
    assert server_configs.find_celery_app(None) is None
    assert _state.default_app is None  # no fallback app was created on the way
