from __future__ import annotations

import datetime as dt
import re
from html.parser import HTMLParser

import pytest
from django.test import override_settings
from django.utils import timezone

from django_leakguard import memory
from django_leakguard.reporting import html_report, pages
from tests.test_history import fill

pytestmark = pytest.mark.django_db


@pytest.fixture(autouse=True)
def fixed_memory(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(memory, "available_memory", lambda: 8 * 1024**3)


class Resources(HTMLParser):
    """What a page would fetch: scripts, stylesheets, images, frames."""

    def __init__(self) -> None:
        super().__init__()
        self.fetched: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        found = dict(attrs)
        if tag in ("script", "img", "iframe", "link") or (tag == "use" and "href" in found):
            self.fetched.append(f"{tag} {found}")


def render(**kwargs: object) -> str:
    now = timezone.now()
    since = now - dt.timedelta(hours=6)
    return html_report.render_html(pages.ranking_report(since, now), since, now, **kwargs)  # type: ignore[arg-type]


def test_one_self_contained_file() -> None:
    fill()
    text = render()
    parser = Resources()
    parser.feed(text)
    assert parser.fetched == []
    assert "leakguard-table" in text
    assert ".leakguard-table {" in text
    assert "default-src 'none'" in text


def test_ranking_then_a_section_per_key_then_workers() -> None:
    fill()
    text = render()
    assert (
        text.index('id="leakguard-ranking"')
        < text.index('id="key-1"')
        < text.index("leakguard-workers")
    )
    assert '<a href="#key-1">/leak/retain/</a>' in text
    assert len(re.findall(r'<h2 id="key-\d+"', text)) == 3
    assert text.count('class="leakguard-chart"') == 3 * 3 + 1


def test_keys_shown_limits_the_sections() -> None:
    fill()
    assert len(re.findall(r'<h2 id="key-\d+"', render(keys_shown=1))) == 1


@override_settings(TEMPLATES=[])
def test_needs_no_template_settings() -> None:
    fill()
    assert 'data-key="/leak/retain/"' in render()


def test_nothing_recorded() -> None:
    text = render()
    assert "No data to rank." in text
    assert 'id="key-1"' not in text
