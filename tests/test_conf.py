from __future__ import annotations

import logging
import math
import os

import pytest
from django.test import override_settings

from django_leakguard import conf


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
        (
            {"MAX_REQUESTS": -5},
            "MAX_REQUESTS should be a positive integer (0 disables) below 2**63, got -5.",
        ),
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
    message, hint, key = problems[0]
    assert fragment in message
    assert next(iter(raw)) in hint
    assert key == next(iter(raw))
    # The invalid value gives way to the default.
    assert getattr(conf.build_settings(raw), key) == getattr(conf.build_settings({}), key)


def test_validate_unknown_key_suggests_closest() -> None:
    [(message, hint, key)] = conf.validate({"MAX_REQUEST": 10})
    assert message == "LEAKGUARD has an unknown key 'MAX_REQUEST'."
    assert "'MAX_REQUESTS'" in hint
    assert key == "MAX_REQUEST"


def test_validate_unknown_key_without_close_match() -> None:
    [(_, hint, _)] = conf.validate({"ZZZZ": 1})
    assert "valid keys are" in hint


def test_validate_not_a_dict() -> None:
    [(message, _, key)] = conf.validate(["MAX_REQUESTS"])
    assert message == "The LEAKGUARD setting should be a dict, got list."
    assert key is None
    assert conf.build_settings(["MAX_REQUESTS"]) == conf.build_settings(None)


# Values that overflowed or slipped through (issue 14, items 8 and 9) -------------------------


@pytest.mark.parametrize(
    ("raw", "fragment"),
    [
        ({"FLUSH_INTERVAL": 10**400}, "at most 86,400 (a day), got 1000000000"),
        ({"FLUSH_INTERVAL": math.nan}, "got nan."),
        ({"FLUSH_INTERVAL": math.inf}, "got inf."),
        ({"FLUSH_INTERVAL": 86_401}, "got 86401."),
        ({"WORKER_MAX_MEMORY": "1" + "0" * 400 + "MB"}, "at most 8 EiB, got '10000"),
        ({"WORKER_MAX_MEMORY": 10**5000}, "an integer of more than 4,300 digits"),
        ({"MAX_REQUESTS": 10**400}, "below 2**63"),
        ({"MAX_REQUESTS_JITTER": math.nan}, "got nan."),
        ({"RETENTION_DAYS": 10**9}, "at most 36,500"),
        ({"DATABASE": "nope"}, "in DATABASES ('default'"),
    ],
)
def test_out_of_range_values_are_problems(raw: dict[str, object], fragment: str) -> None:
    [problem] = conf.validate(raw)
    assert fragment in problem.message
    assert len(problem.message) < 250
    settings = conf.build_settings(raw)
    key = next(iter(raw))
    assert getattr(settings, key) == getattr(conf.build_settings({}), key)


def test_get_settings_logs_each_problem_once_and_uses_the_defaults(
    caplog: pytest.LogCaptureFixture,
) -> None:
    raw = {"MAX_REQUEST": 5, "FLUSH_INTERVAL": "soon", "MAX_KEYS": 7}
    with override_settings(LEAKGUARD=raw), caplog.at_level(logging.WARNING, "django_leakguard"):
        settings = conf.get_settings()
        conf._cached = None  # as a new read in the same process would
        conf.get_settings()
    assert (settings.MAX_REQUESTS, settings.FLUSH_INTERVAL, settings.MAX_KEYS) == (1000, 30.0, 7)
    assert [record.getMessage() for record in caplog.records] == [
        "django-leakguard: LEAKGUARD has an unknown key 'MAX_REQUEST'. Did you mean "
        "'MAX_REQUESTS'? Rename LEAKGUARD['MAX_REQUEST'] to LEAKGUARD['MAX_REQUESTS']. It is "
        "ignored until then.",
        "django-leakguard: FLUSH_INTERVAL should be a positive number of seconds, at most "
        "86,400 (a day), got 'soon'. Set LEAKGUARD['FLUSH_INTERVAL'] to a valid value, or "
        "remove it to use the default (30.0). Using the default 30.0 until then.",
    ]


def test_a_setting_that_is_not_a_dict_is_logged(caplog: pytest.LogCaptureFixture) -> None:
    with override_settings(LEAKGUARD=[1]), caplog.at_level(logging.WARNING, "django_leakguard"):
        assert conf.get_settings() == conf.build_settings(None)
    assert caplog.records[0].getMessage().endswith("Every key has its default until then.")


def test_a_forked_child_reads_and_logs_again() -> None:
    with override_settings(LEAKGUARD={"MAX_KEYS": 0}):
        conf.get_settings()
        read, write = os.pipe()
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child reports through the pipe
            os.write(write, b"1" if conf._cached is None and not conf._logged else b"0")
            os._exit(0)
        os.close(write)
        os.waitpid(pid, 0)
        assert os.read(read, 1) == b"1"
        os.close(read)
        assert conf._cached is not None


def test_migrate_command_names_the_database() -> None:
    assert conf.migrate_command("default") == "python manage.py migrate django_leakguard"
    assert conf.migrate_command("stats").endswith("django_leakguard --database stats")


def test_valid_values_give_no_problem() -> None:
    raw = {"CELERY_MEMORY_FRACTION": None, "WORKER_MAX_MEMORY": "1GiB", "MAX_REQUESTS": 0}
    assert conf.validate(raw) == []
    assert conf.validate({"RETENTION_DAYS": 36_500, "WORKER_MAX_MEMORY": None}) == []
    assert conf.build_settings(raw).CELERY_MEMORY_FRACTION is None
