from __future__ import annotations

import datetime as dt
import importlib.util
import io
import json
import logging
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from django.core.management import call_command
from django.http import HttpRequest, HttpResponse
from django.test import Client, override_settings
from django.urls import re_path
from django.utils import timezone

from django_leakguard import conf, lookup, recorder_heap, refine
from django_leakguard.models import Growth
from django_leakguard.recorder import Recorder
from django_leakguard.recorder_process import get_recorder
from django_leakguard.records import KEY_MAX_LENGTH, OTHER, fit_key

ROOT = Path(__file__).resolve().parent.parent
FIXTURE = Path(__file__).parent / "fixtures" / "uwsgi-memory-report.log"


def catch_all(request: HttpRequest, path: str) -> HttpResponse:
    # As a CMS does: the view finds what it serves and leaves it on the request.
    request.served_kind = path.strip("/") or "home"  # type: ignore[attr-defined]
    return HttpResponse("ok")


urlpatterns = [re_path(r"^((?:[\w\-]+/)*)$", catch_all, name="catch_all")]


def by_served_kind(request: HttpRequest, key: str) -> str | None:
    kind = getattr(request, "served_kind", None)
    return None if kind is None else f"{key} [{kind}]"


def raises(request: HttpRequest, key: str) -> str:
    raise RuntimeError("refinement bug")


def returns_a_number(request: HttpRequest, key: str) -> int:
    return 42


def returns_nothing_useful(request: HttpRequest, key: str) -> str:
    return ""


def returns_a_long_key(request: HttpRequest, key: str) -> str:
    return key + "x" * 400


NOT_CALLABLE = "a string"


@pytest.fixture
def rec(monkeypatch: pytest.MonkeyPatch) -> Iterator[Recorder]:
    monkeypatch.setattr(recorder_heap, "HEAP_PROBE_BUDGET", float("inf"))
    instance = get_recorder()
    instance.discard()
    yield instance
    instance.discard()


def keys(rec: Recorder) -> dict[str, int]:
    return {key: aggregate.calls for (_, key), aggregate in rec.totals().items()}


@override_settings(ROOT_URLCONF=__name__, LEAKGUARD={"REFINE_KEY": f"{__name__}.by_served_kind"})
def test_a_catch_all_route_splits_by_what_it_served(rec: Recorder) -> None:
    client = Client()
    for path in ("/", "/news/", "/news/", "/shop/?token=secret"):
        assert client.get(path).status_code == 200
    assert keys(rec) == {"/<arg1> [home]": 1, "/<arg1> [news]": 2, "/<arg1> [shop]": 1}
    assert all(a.view == f"{__name__}.catch_all" for a in rec.totals().values())


@override_settings(ROOT_URLCONF=__name__, LEAKGUARD={"REFINE_KEY": None})
def test_none_keeps_the_pattern(rec: Recorder) -> None:
    Client().get("/news/")
    assert keys(rec) == {"/<arg1>": 1}


@override_settings(
    ROOT_URLCONF=__name__,
    LEAKGUARD={"REFINE_KEY": f"{__name__}.by_served_kind", "MAX_KEYS": 2},
)
def test_refined_keys_are_bounded_by_max_keys(rec: Recorder) -> None:
    client = Client()
    for n in range(6):
        client.get(f"/page-{n}/")
    assert keys(rec) == {"/<arg1> [page-0]": 1, "/<arg1> [page-1]": 1, OTHER: 4}


@override_settings(ROOT_URLCONF=__name__)
def test_refined_keys_are_cut_like_every_key(rec: Recorder) -> None:
    with override_settings(LEAKGUARD={"REFINE_KEY": f"{__name__}.returns_a_long_key"}):
        Client().get("/news/")
    (key,) = keys(rec)
    assert len(key) == KEY_MAX_LENGTH
    assert key == fit_key("/<arg1>" + "x" * 400)


@pytest.mark.parametrize(
    ("function", "says"),
    [
        ("raises", "raised RuntimeError: refinement bug"),
        ("returns_a_number", "returned 42, not a non-empty string or None"),
        ("returns_nothing_useful", "returned '', not a non-empty string or None"),
    ],
)
@override_settings(ROOT_URLCONF=__name__)
def test_a_failing_refinement_never_breaks_the_request(
    rec: Recorder, caplog: pytest.LogCaptureFixture, function: str, says: str
) -> None:
    client = Client()
    path = f"{__name__}.{function}"
    with (
        override_settings(LEAKGUARD={"REFINE_KEY": path}),
        caplog.at_level(logging.WARNING, "django_leakguard"),
    ):
        assert [client.get("/news/").status_code for _ in range(3)] == [200] * 3
    assert keys(rec) == {"/<arg1>": 3}
    messages = [record.getMessage() for record in caplog.records]
    assert messages == [
        f"django-leakguard: LEAKGUARD['REFINE_KEY'] {path!r} {says}; requests keep their "
        "unrefined keys. Fix the function, or set REFINE_KEY to None. Further failures are "
        "not logged."
    ]


def test_a_function_that_cannot_be_imported_at_run_time_is_logged_once(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The checks refuse such a path (leakguard.E001) and the settings use the default in its
    # place; this is a module that stops importing after the check: the refinement steps aside.
    settings = conf.build_settings({})
    monkeypatch.setattr(
        conf, "get_settings", lambda: type(settings)(**{**vars(settings), "REFINE_KEY": "x.y"})
    )
    refine.reset()
    with caplog.at_level(logging.WARNING, "django_leakguard"):
        assert refine.refine(HttpRequest(), "/a/") == "/a/"
        assert refine.refine(HttpRequest(), "/a/") == "/a/"
    assert len(caplog.records) == 1
    assert "'x.y' cannot be imported (ModuleNotFoundError: No module named 'x')" in (
        caplog.records[0].getMessage()
    )
    refine.reset()


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (5, "REFINE_KEY should be the dotted path of a function such as"),
        ("nodots", "REFINE_KEY should be the dotted path of a function such as"),
        (
            "no_such_module.refine",
            "REFINE_KEY names 'no_such_module.refine', which cannot be imported: "
            "ModuleNotFoundError: No module named 'no_such_module'.",
        ),
        (
            f"{__name__}.NOT_CALLABLE",
            f"REFINE_KEY names '{__name__}.NOT_CALLABLE', which is not callable.",
        ),
    ],
)
def test_the_checks_say_what_is_wrong_with_refine_key(value: object, message: str) -> None:
    (problem,) = conf.validate({"REFINE_KEY": value})
    assert problem.message.startswith(message)
    assert "LEAKGUARD['REFINE_KEY']" in problem.hint
    assert conf.DEFAULTS["REFINE_KEY"] == conf.build_settings({"REFINE_KEY": value}).REFINE_KEY


def test_valid_refine_keys() -> None:
    assert conf.validate({"REFINE_KEY": None}) == []
    assert conf.validate({"REFINE_KEY": f"{__name__}.by_served_kind"}) == []
    assert conf.get_settings().REFINE_KEY == "django_leakguard.refine.wagtail_page_type"


def test_wagtail_refinement_without_a_routed_page() -> None:
    request = HttpRequest()
    assert refine.wagtail_page_type(request, "/<arg1>") is None
    request._wagtail_route_for_request = None  # type: ignore[attr-defined]
    assert refine.wagtail_page_type(request, "/<arg1>") is None


def test_the_log_report_keeps_patterns_and_says_so() -> None:
    out = io.StringIO()
    with override_settings(LEAKGUARD={"REFINE_KEY": f"{__name__}.by_served_kind"}):
        call_command("leakreport", "--uwsgi-log", str(FIXTURE), "--format", "json", stdout=out)
    assert refine.LOG_NOTE in json.loads(out.getvalue())["notes"]
    out = io.StringIO()
    # The default refinement needs Wagtail, which these settings do not install: no note.
    call_command("leakreport", "--uwsgi-log", str(FIXTURE), "--format", "json", stdout=out)
    assert refine.LOG_NOTE not in json.loads(out.getvalue())["notes"]


@pytest.mark.skipif(
    importlib.util.find_spec("wagtail") is None,
    reason="Wagtail is not installed (pip install -e '.[test]' installs it)",
)
def test_wagtail_pages_are_keyed_by_their_type() -> None:
    # Wagtail's apps need their own settings and migrations: a process of its own, serving
    # Wagtail's real `serve` view through the middleware (tests/wagtailsite/serve.py).
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "testproject")])}
    result = subprocess.run(
        [sys.executable, "-m", "tests.wagtailsite.serve"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    served = json.loads(result.stdout)
    assert served["statuses"] == [200, 200, 200, 404]
    assert served["keys"] == {
        "/<arg1> [wagtailcore.Page]": 1,  # the site's root, Wagtail's "Welcome" page
        "/<arg1> [wagtailsite.ArticlePage]": 3,
        "/<arg1>": 1,  # no page there (404): the pattern
    }
    assert served["refined"] == "/<arg1> [wagtailsite.ArticlePage]"
    assert served["queries"] == 0


@pytest.mark.django_db
@override_settings(ROOT_URLCONF=__name__)
def test_detail_by_url_name_shows_the_pattern_and_its_refined_keys() -> None:
    hour = timezone.now().replace(minute=0, second=0, microsecond=0)
    for key in ("/<arg1> [news]", "/<arg1> [home]", "/<arg1>", "/<arg1>x [other]"):
        Growth.objects.create(kind="request", key=key, hour=hour, view="")
    since = hour - dt.timedelta(hours=1)
    assert lookup.keys_named("catch_all", since) == ["/<arg1>", "/<arg1> [home]", "/<arg1> [news]"]
