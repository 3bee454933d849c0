"""The admin pages in a real browser: testproject under Gunicorn after a load, Chromium driven
by Playwright, as a staff user and as a user who is not staff.

Playwright's sync API runs an event loop in this thread, so nothing here touches the ORM: the
stored figures are read with sqlite3 and through `manage.py leakreport` in a subprocess.
Screenshots go to LEAKGUARD_SCREENSHOTS (docs/_static/admin for the docs: `make screenshots`),
else to a temporary directory.
"""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests import servers

pytestmark = pytest.mark.browser

CHROMIUM = os.environ.get("LEAKGUARD_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--headless",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
PASSWORD = "leakguard-browser-test"
LOAD = (
    ["/leak/retain/"] * 120
    + [f"/leak/cache/k{n}/" for n in range(120)]
    + [f"/products/{n}/" for n in range(160)]
    + ["/", "/search/?q=shoes"] * 60
)
USERS = f"""
from django.contrib.auth.models import Permission, User
staff = User.objects.create_user("staff", password={PASSWORD!r}, is_staff=True)
staff.user_permissions.set(Permission.objects.filter(
    content_type__app_label="django_leakguard", codename__startswith="view_"))
User.objects.create_user("joe", password={PASSWORD!r})
"""


# Each key's memory kept per stored hour, as the report defines it (history.kept of the hour's
# row): run in a subprocess, since this process's thread belongs to Playwright.
KEPT = """
import json
from django_leakguard.reporting.history import kept
from django_leakguard.models import Growth
from django_leakguard.reporting.model import Row
from django_leakguard.records import COUNTER_NAMES
found = {}
for row in Growth.objects.order_by("hour").values("kind", "key", *COUNTER_NAMES):
    kind, key = row.pop("kind"), row.pop("key")
    found.setdefault(f"{kind} {key}", []).append(kept(Row(kind, key, **row)))
print(json.dumps(found))
"""


@dataclass
class Site:
    server: servers.Server
    database: Path
    report: dict[str, Any]
    kept: dict[str, list[int]]
    screenshots: Path


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    if not Path(CHROMIUM).exists():
        pytest.fail(f"{CHROMIUM} is missing: run `make browser` (apt-get install chromium)")
    tmp = tmp_path_factory.mktemp("browser")
    database = tmp / "db.sqlite3"
    env = servers.project_env(
        database,
        LEAKGUARD_MAX_REQUESTS=150,
        LEAKGUARD_TRACE_SAMPLE_RATE=0.05,
        LEAKGUARD_FLUSH_INTERVAL=3600,  # rows are written as each worker exits
    )
    servers.migrate(env)
    servers.manage(env, "shell", "-c", USERS)
    port = servers.free_port()
    command = servers.gunicorn_command("testproject.wsgi", port, workers=2)
    with servers.running(
        "gunicorn",
        command,
        env=env,
        log_path=tmp / "load.log",
        port=port,
        ready=lambda server: server.wait_for_http("/health/"),
    ) as server:
        assert servers.get_all(server, LOAD, 2) == []
    report = json.loads(servers.manage(env, "leakreport", "--format", "json", "--limit", "25"))
    kept = json.loads(servers.manage(env, "shell", "-c", KEPT).strip().splitlines()[-1])
    # Browsing records nothing more until the server stops: the pages show what was stored.
    port = servers.free_port()
    command = servers.gunicorn_command("testproject.wsgi", port, workers=1)
    shots = Path(os.environ.get("LEAKGUARD_SCREENSHOTS") or tmp / "screenshots")
    shots.mkdir(parents=True, exist_ok=True)
    with servers.running(
        "gunicorn",
        command,
        env=env,
        log_path=tmp / "browse.log",
        port=port,
        ready=lambda server: server.wait_for_http("/health/"),
    ) as server:
        yield Site(server, database, report, kept, shots)


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield chromium
        finally:
            chromium.close()


@pytest.fixture
def page(browser: Any, site: Site) -> Iterator[Any]:
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    tab = context.new_page()
    tab.violations = []
    tab.on(
        "console",
        lambda message: (
            tab.violations.append(message.text)
            if "Content Security Policy" in message.text or message.type == "error"
            else None
        ),
    )
    try:
        yield tab
    finally:
        context.close()


def log_in(page: Any, site: Site, username: str) -> None:
    page.goto(site.server.url("/admin/login/"))
    page.fill("#id_username", username)
    page.fill("#id_password", PASSWORD)
    page.click("input[type=submit]")


def stored_hours(site: Site, kind: str, key: str) -> list[tuple[int, int, int, int]]:
    with contextlib.closing(sqlite3.connect(site.database)) as connection:
        return connection.execute(
            "SELECT calls, heap_calls, heap_growth, rss_growth FROM django_leakguard_growth "
            "WHERE kind = ? AND key = ? ORDER BY hour",
            (kind, key),
        ).fetchall()


def test_anonymous_and_non_staff_users_see_the_login_page(page: Any, site: Site) -> None:
    page.goto(site.server.url("/admin/django_leakguard/growth/"))
    assert "/admin/login/" in page.url
    log_in(page, site, "joe")
    assert "/admin/login/" in page.url
    assert "correct username and password for a staff account" in page.content()
    page.goto(site.server.url("/admin/django_leakguard/worker/"))
    assert "/admin/login/" in page.url
    assert page.locator("svg.leakguard-chart").count() == 0


def test_staff_see_the_ranking_with_the_stored_rows(page: Any, site: Site) -> None:
    log_in(page, site, "staff")
    assert "LEAKGUARD" in page.inner_text("#content-main").upper()
    assert page.locator('a[href="/admin/django_leakguard/growth/"]').count() >= 1
    response = page.goto(site.server.url("/admin/django_leakguard/growth/?limit=25"))
    assert "default-src 'self'" in response.headers["content-security-policy"]
    rows = page.locator("#leakguard-ranking tbody tr")
    keys = [rows.nth(n).get_attribute("data-key") for n in range(rows.count())]
    assert keys == [row["key"] for row in site.report["rows"]]
    calls = page.locator('#leakguard-ranking tbody tr td[data-column="calls"]').all_inner_texts()
    assert calls == [f"{row['calls']:,}" for row in site.report["rows"]]
    # Sparklines render, and the hour plotted is the memory stored for it.
    spark = rows.first.locator("svg.leakguard-sparkline")
    box = spark.bounding_box()
    assert box is not None
    assert box["width"] > 50
    assert box["height"] > 10
    top = site.report["rows"][0]
    plotted = [int(value) for value in spark.get_attribute("data-values").split()]
    stored = site.kept[f"{top['kind']} {top['key']}"]
    assert [value for value in plotted if value] == [value for value in stored if value]
    page.screenshot(path=site.screenshots / "ranking.png")
    assert page.violations == []


def test_staff_see_one_keys_charts_with_the_stored_values(page: Any, site: Site) -> None:
    log_in(page, site, "staff")
    page.goto(site.server.url("/admin/django_leakguard/growth/?limit=25"))
    top = site.report["rows"][0]
    page.click(f'#leakguard-ranking tbody tr[data-key="{top["key"]}"] a')
    assert page.locator("h1").inner_text() == f"{top['kind']} {top['key']}"
    charts = page.locator("svg.leakguard-chart")
    assert charts.count() == 3
    for n in range(3):
        box = charts.nth(n).bounding_box()
        assert box is not None
        assert box["width"] > 300
    stored = stored_hours(site, top["kind"], top["key"])
    bars = charts.nth(0).locator("rect")
    assert [int(bars.nth(n).get_attribute("data-y")) for n in range(bars.count())] == [
        hour[0] for hour in stored
    ]
    assert top["view"] in page.inner_text("#content-main")
    assert "Readings behind these figures" in page.inner_text("#content-main")
    page.screenshot(path=site.screenshots / "key.png", full_page=True)
    assert page.violations == []


def test_staff_see_the_workers_and_the_recommendation(page: Any, site: Site) -> None:
    log_in(page, site, "staff")
    page.goto(site.server.url("/admin/django_leakguard/worker/?since=1h"))
    with contextlib.closing(sqlite3.connect(site.database)) as connection:
        stored = connection.execute("SELECT count(*) FROM django_leakguard_worker").fetchone()[0]
    assert page.locator("#leakguard-worker-list tbody tr").count() == stored
    chart = page.locator("svg.leakguard-chart")
    assert chart.locator("g.leakguard-series").count() == stored
    assert page.locator('#leakguard-limits tr[data-setting="MAX_REQUESTS"]').count() == 1
    # 520 requests, MAX_REQUESTS 150 with jitter: the first two workers were recycled.
    replaced = page.locator("#leakguard-worker-list tbody tr td:last-child").all_inner_texts()
    assert replaced.count("yes") >= 2, replaced
    page.screenshot(path=site.screenshots / "workers.png", full_page=True)
    assert page.violations == []
