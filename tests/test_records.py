"""The shared records: one definition of the growth counters, the kinds and the key."""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from django.test import Client, RequestFactory, override_settings
from django.urls import ResolverMatch, resolve

import tests.urls_i18n  # noqa: F401 - see test_logged_paths_resolve_without_i18n
from django_leakguard import records
from django_leakguard.middleware import request_key
from django_leakguard.recorder_process import get_recorder
from django_leakguard.records import Counts, fit_key, readable_route, route_key
from django_leakguard.reporting import uwsgi_lines

PACKAGE = Path(records.__file__).parent


def test_fit_key_keeps_short_keys_and_cuts_long_ones_apart() -> None:
    assert fit_key("/short/") == "/short/"
    assert fit_key("x" * 255) == "x" * 255
    a, b = fit_key("/" + "x" * 300 + "/a/"), fit_key("/" + "x" * 300 + "/b/")
    assert len(a) == len(b) == records.KEY_MAX_LENGTH
    assert a != b
    assert a == fit_key("/" + "x" * 300 + "/a/")  # the same key always cuts the same way
    assert a.startswith("/xxx")
    assert a[-9] == "~"


@pytest.mark.parametrize(
    ("route", "readable"),
    [
        ("shop/<int:pk>/", "shop/<int:pk>/"),
        ("", ""),
        ("robots.txt", "robots.txt"),
        (r"^archive/(?P<year>[12]\d{3})/$", "archive/<year>/"),
        (r"^price/\$", "price/$"),
        (r"robots\.txt$", "robots.txt"),
        (r"^(\d+)/(\w+)/$", "<arg1>/<arg2>/"),
        (r"^x/(?P<s>[a-z()\]]+)(?:\.(?P<fmt>json|html))?$", "x/<s>(?:.<fmt>)?"),
        (r"^tail/(?P<rest>.*\))$", "tail/<rest>"),
        (r"^n/(?P<x>(a|b)c)/$", "n/<x>/"),
        (r"^[^]x]/\d{4}/$", "[^]x]/\\d{4}/"),
        (r"^open/(?P<x>[a-z", "open/<x>"),
        (r"^escaped/\\$", "escaped/\\"),
    ],
)
def test_readable_route(route: str, readable: str) -> None:
    assert readable_route(route) == readable


@override_settings(ROOT_URLCONF="tests.urls_regex")
def test_a_regex_route_has_one_readable_key_in_the_database_and_in_logs() -> None:
    # Issue 15: the middleware stripped the anchors, the log parser kept them. Issue 16: both
    # show the groups by name.
    request = RequestFactory().get("/year/2024/")
    request.resolver_match = resolve("/year/2024/")
    key, _ = request_key(request)
    assert key == "/year/<year>/"
    assert uwsgi_lines.urlconf_key("/year/2024/") == key


def test_route_key_of_a_match_without_its_patterns_reads_the_route() -> None:
    match = ResolverMatch(lambda request: None, (), {}, route=r"^old/(?P<n>\d+)$")
    assert route_key(match) == "/old/<n>"


def test_route_key_of_an_unknown_pattern_reads_its_text() -> None:
    class Pattern:
        def __str__(self) -> str:
            return r"^custom/(?P<n>\d+)$"

    class Entry:
        pattern = Pattern()

    match = ResolverMatch(lambda request: None, (), {}, route="", tried=[[Entry()]])
    assert route_key(match) == "/custom/<n>"


def test_route_key_cache_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(records, "_MATCH_KEYS", {})
    monkeypatch.setattr(records, "_MATCH_KEYS_SIZE", 1)
    with override_settings(ROOT_URLCONF="tests.urls_i18n"):
        assert route_key(resolve("/items/1/")) == "/{lang}/items/<int:pk>/"
        assert route_key(resolve("/api/items/1/")) == "/api/items/<int:pk>/"
    assert len(records._MATCH_KEYS) == 1


I18N = {"LANGUAGE_CODE": "en", "LANGUAGES": [("en", "English"), ("fr", "French")]}
I18N_MIDDLEWARE = [
    "django_leakguard.middleware.LeakGuardMiddleware",
    "django.middleware.locale.LocaleMiddleware",
]


@pytest.mark.parametrize(
    ("urlconf", "default_prefix"),
    [("tests.urls_i18n", ""), ("tests.urls_i18n_prefixed", "/en")],
)
def test_i18n_patterns_give_one_key_per_view_in_the_database_and_in_logs(
    urlconf: str, default_prefix: str
) -> None:
    paths = {
        "/{lang}/items/<int:pk>/": ["/items/1/", "/fr/items/2/"],
        "/{lang}/about/": ["/about/", "/fr/about/"],
        "/{lang}/archive/<year>/": ["/archive/2024/", "/fr/archive/1999/"],
        "/{lang}/shop/<slug:slug>/": ["/shop/shoe/", "/fr/shop/chaussure/"],
        "/api/items/<int:pk>/": ["/api/items/3/"],
    }
    rec = get_recorder()
    rec.discard()
    client = Client()
    try:
        with override_settings(ROOT_URLCONF=urlconf, MIDDLEWARE=I18N_MIDDLEWARE, **I18N):
            for key, urls in paths.items():
                for url in urls:
                    if not url.startswith(("/fr/", "/api/")):
                        url = default_prefix + url
                    assert client.get(url).status_code == 200, url
                    assert uwsgi_lines.urlconf_key(url) == key, url
            assert uwsgi_lines.urlconf_key("/de/items/1/") is None
            keys = {key: a.calls for (_, key), a in rec.totals().items()}
    finally:
        rec.discard()
    assert keys == {key: len(urls) for key, urls in paths.items()}


@override_settings(ROOT_URLCONF="tests.urls_i18n", USE_I18N=False)
def test_logged_paths_resolve_without_i18n() -> None:
    # i18n_patterns() reads USE_I18N when its URLconf is imported: imported beforehand (at the
    # top of this module) so that the other tests, in any order, see the language prefixes.
    assert uwsgi_lines.urlconf_key("/api/items/3/") == "/api/items/<int:pk>/"


def test_merge_adds_sums_and_keeps_maxima_of_counters_with_readings() -> None:
    a = Counts(calls=1, rss_growth_max=-5, heap_calls=0, heap_growth_max=0)
    b = Counts(calls=2, rss_growth_max=-7, heap_calls=2, heap_growth_max=-3)
    a.merge(b)
    assert (a.calls, a.rss_growth_max, a.heap_calls, a.heap_growth_max) == (3, -5, 2, -3)
    assert records.output_values(Counts(calls=1))["heap_growth_max_bytes"] is None


# A counter added in one place reaches the model, the upsert, the sums and the output --------

CHILD = """
import csv, io, json, django
from django.conf import settings

settings.configure(
    INSTALLED_APPS=["django.contrib.contenttypes", "django_leakguard"],
    DATABASES={"default": {"ENGINE": "django.db.backends.sqlite3", "NAME": ":memory:"}},
    MIGRATION_MODULES={"django_leakguard": None},  # tables from the models as they are
    USE_TZ=True,
    LEAKGUARD={"FLUSH_INTERVAL": 3600},
)
django.setup()
from django.core.management import call_command
from django.utils import timezone
from django_leakguard import storage
from django_leakguard.reporting.database import fill_rows, rows_from_database
from django_leakguard.reporting.model import Workers
from django_leakguard.reporting.ranking import build_report
from django_leakguard.reporting.render import render_csv, render_json
from django_leakguard.models import Growth
from django_leakguard.records import Aggregate, Batch, WorkerState

call_command("migrate", run_syncdb=True, verbosity=0)
field = Growth._meta.get_field("blocks_growth")
hour = int(timezone.now().timestamp()) // 3600
for value in (3, 4):
    aggregate = Aggregate("v")
    aggregate.add(10, 1)
    aggregate.blocks_growth = value
    worker = WorkerState(host="h", pid=1, started_at=timezone.now())
    storage.write(Batch(pending={hour: {("request", "/a/"): aggregate}}, worker=worker))
since = timezone.now() - timezone.timedelta(hours=1)
rows = rows_from_database(since)
fill_rows(rows, since)
built = build_report(rows, Workers(), source="database", since=since, until=None)
data = json.loads(render_json(built))
table = list(csv.DictReader(io.StringIO(render_csv(built))))
print(json.dumps({
    "field": type(field).__name__,
    "stored": Growth.objects.get().blocks_growth,
    "json": data["rows"][0]["blocks_growth"],
    "csv": table[0]["blocks_growth"],
}))
"""


def test_a_counter_added_to_counts_reaches_model_upsert_sums_and_output(tmp_path: Path) -> None:
    package = tmp_path / "django_leakguard"
    shutil.copytree(PACKAGE, package, ignore=shutil.ignore_patterns("__pycache__"))
    source = package / "records.py"
    text = source.read_text()
    anchor = '    traced_calls: int = counter("calls traced with tracemalloc"'
    assert anchor in text
    added = '    blocks_growth: int = counter("net block growth", output="blocks_growth")\n'
    source.write_text(text.replace(anchor, added + anchor))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), *sys.path])}
    env.pop("DJANGO_SETTINGS_MODULE", None)
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(CHILD)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    figures = json.loads(result.stdout.splitlines()[-1])
    # Two flushes of the same row: the upsert added the counter up; the report summed it.
    assert figures == {"field": "BigIntegerField", "stored": 7, "json": 7, "csv": "7"}


def test_csv_and_json_show_every_output_counter() -> None:
    from django_leakguard.reporting.model import Row
    from django_leakguard.reporting.render import COLUMNS, row_dict

    outputs = {spec.output for spec in records.COUNTERS if spec.output}
    assert outputs <= set(COLUMNS)
    row = Row("request", "/a/", calls=1)
    assert outputs <= set(row_dict(1, row, 0.0))
    buffer = io.StringIO()
    csv.writer(buffer).writerow(COLUMNS)
    assert buffer.getvalue().startswith("rank,kind,key,view,calls,heap_calls,")
