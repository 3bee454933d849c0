"""`leakreport --format html`: one self-contained HTML file with the ranking and its charts."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

from django.template import Context, Engine
from django.utils.safestring import mark_safe

from django_leakguard.reporting import pages

PACKAGE = Path(__file__).resolve().parent.parent
STYLESHEET = PACKAGE / "static" / "django_leakguard" / "leakguard.css"
# An engine of the report's own: it works whatever the project's TEMPLATES say (none, Jinja2),
# and the same data gives the same file in any project.
ENGINE = Engine(dirs=[str(PACKAGE / "templates")], libraries={"i18n": "django.templatetags.i18n"})
# Keys of the ranking that get a section of their own (charts, readings, sites).
KEYS_SHOWN = 10


def render_html(
    ranking: pages.Ranking,
    since: dt.datetime,
    now: dt.datetime,
    *,
    kind: str = "all",
    keys_shown: int = KEYS_SHOWN,
) -> str:
    """The report as one HTML file: the same pages as the admin's, nothing to fetch."""
    ranking_page = pages.ranking_page(ranking, since, now)
    keys = [pages.key_page(row.kind, row.key, since) for row in ranking.report.rows[:keys_shown]]
    template = ENGINE.get_template("django_leakguard/report.html")
    return template.render(
        Context(
            {
                "title": "Memory growth by URL pattern and task",
                "since": since,
                "now": now,
                "ranking": ranking_page,
                "keys": keys,
                "workers_page": pages.workers_page(since, kind),
                # Our own file, read from the package: nothing in it comes from the data.
                "stylesheet": mark_safe(STYLESHEET.read_text(encoding="utf-8")),
            }
        )
    )
