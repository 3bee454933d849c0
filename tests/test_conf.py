from __future__ import annotations

import pytest
from django.core.exceptions import ImproperlyConfigured
from django.test import override_settings

from django_leakguard import conf


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
    assert conf.parse_memory_size(text) == expected


@pytest.mark.parametrize("bad", ["lots", "12 parsecs", "", -5, 0, True, 1.5, "0MiB", None])
def test_parse_memory_size_rejects(bad: object) -> None:
    with pytest.raises(ValueError, match=r"memory size|expected bytes"):
        conf.parse_memory_size(bad)


def test_defaults_when_unset() -> None:
    with override_settings(LEAKGUARD=None):
        settings = conf.get_settings()
    assert settings.MAX_REQUESTS == 1000
    assert settings.max_requests_jitter_absolute == 50
    assert settings.WORKER_MAX_MEMORY is None
    assert settings.MAX_KEYS == 500


def test_override_settings_resets_cache() -> None:
    with override_settings(LEAKGUARD={"MAX_REQUESTS": 7, "WORKER_MAX_MEMORY": "1MiB"}):
        assert conf.get_settings().MAX_REQUESTS == 7
        assert conf.get_settings().WORKER_MAX_MEMORY == 1024**2
    assert conf.get_settings().MAX_REQUESTS == 1000


def test_paths_accept_a_string() -> None:
    settings = conf.build_settings({"UWSGI_INI": "uwsgi.ini", "GUNICORN_CONFIG": ["a.py"]})
    assert settings.UWSGI_INI == ("uwsgi.ini",)
    assert settings.GUNICORN_CONFIG == ("a.py",)


@pytest.mark.parametrize(
    ("raw", "fragment"),
    [
        ({"MAX_REQUESTS": -5}, "MAX_REQUESTS should be a positive integer (0 disables), got -5."),
        ({"MAX_REQUESTS_JITTER": 1.5}, "got 1.5"),
        ({"WORKER_MAX_MEMORY": "lots"}, "WORKER_MAX_MEMORY is invalid"),
        ({"CELERY_MEMORY_FRACTION": 0}, "CELERY_MEMORY_FRACTION should be a fraction"),
        ({"RECORD": "yes"}, "RECORD should be True or False"),
        ({"FLUSH_INTERVAL": 0}, "FLUSH_INTERVAL should be a positive number"),
        ({"MAX_KEYS": 0}, "MAX_KEYS should be a positive integer"),
        ({"RETENTION_DAYS": 0}, "RETENTION_DAYS should be"),
        ({"TRACE_SAMPLE_RATE": 2}, "TRACE_SAMPLE_RATE should be"),
        ({"UWSGI_INI": [1]}, "UWSGI_INI should be a path"),
        ({"CELERY_APP": 3}, "CELERY_APP should be a dotted path"),
        ({"DATABASE": ""}, "DATABASE should be the alias"),
    ],
)
def test_validate_names_key_and_value(raw: dict[str, object], fragment: str) -> None:
    problems = conf.validate(raw)
    assert len(problems) == 1
    message, hint = problems[0]
    assert fragment in message
    assert next(iter(raw)) in hint
    with pytest.raises(ImproperlyConfigured, match=next(iter(raw))):
        conf.build_settings(raw)


def test_validate_unknown_key_suggests_closest() -> None:
    [(message, hint)] = conf.validate({"MAX_REQUEST": 10})
    assert message == "LEAKGUARD has an unknown key 'MAX_REQUEST'."
    assert "'MAX_REQUESTS'" in hint


def test_validate_unknown_key_without_close_match() -> None:
    [(_, hint)] = conf.validate({"ZZZZ": 1})
    assert "valid keys are" in hint


def test_validate_not_a_dict() -> None:
    [(message, _)] = conf.validate(["MAX_REQUESTS"])
    assert message == "The LEAKGUARD setting should be a dict, got list."


def test_valid_values_give_no_problem() -> None:
    raw = {"CELERY_MEMORY_FRACTION": None, "WORKER_MAX_MEMORY": "1GiB", "MAX_REQUESTS": 0}
    assert conf.validate(raw) == []
    assert conf.build_settings(raw).CELERY_MEMORY_FRACTION is None
