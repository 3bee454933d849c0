from __future__ import annotations

from io import StringIO

import pytest
from django.core.management import CommandError, call_command
from django.test import override_settings

from django_leakguard import memory, recycling


def run(*args: str) -> str:
    out = StringIO()
    call_command("leakguard_config", *args, stdout=out)
    return out.getvalue()


def test_all_servers_by_default() -> None:
    text = run("--processes", "4", "--concurrency", "2", "--uwsgi-version", "2.0.31")
    assert "max_requests = 1000" in text
    assert "max-requests-delta = 17" in text
    kib = recycling.celery_memory_per_child_kib(memory.available_memory(), 0.75, 2)
    assert f"worker_max_memory_per_child = {kib}  # KiB" in text


@override_settings(LEAKGUARD={"WORKER_MAX_MEMORY": "512MiB"})
def test_uwsgi_uses_the_installed_version() -> None:
    text = run("uwsgi", "--processes", "2")
    assert "max-requests-delta = 50" in text  # 2.0.31 is installed here
    assert "reload-on-rss = 512" in text
    assert "Gunicorn" not in text


def test_one_server() -> None:
    assert run("gunicorn").startswith("# Gunicorn")
    assert run("celery").startswith("# Celery")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("uwsgi", "--processes", "0"), "--processes should be a positive integer"),
        (("celery", "--concurrency", "-1"), "--concurrency should be a positive integer"),
        (("uwsgi", "--uwsgi-version", "new"), "--uwsgi-version: cannot read"),
    ],
)
def test_bad_options(args: tuple[str, ...], message: str) -> None:
    with pytest.raises(CommandError, match=message):
        run(*args)
