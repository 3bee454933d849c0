from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from typing import Any

import pytest
from django.contrib.auth.models import Permission, User
from django.db import DatabaseError
from django.test import Client, override_settings
from django.urls import reverse
from django.utils import timezone

from django_leakguard import memory
from django_leakguard.models import Growth, Worker
from django_leakguard.reporting import pages
from tests.test_history import fill

pytestmark = [pytest.mark.django_db, pytest.mark.urls("tests.urls_admin")]

ADMIN_MIDDLEWARE = [
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
]
RANKING = "admin:django_leakguard_growth_changelist"
KEY = "admin:django_leakguard_growth_key"
WORKERS = "admin:django_leakguard_worker_changelist"


@pytest.fixture(autouse=True)
def admin_settings(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setattr(memory, "available_memory", lambda: 8 * 1024**3)
    with override_settings(
        MIDDLEWARE=ADMIN_MIDDLEWARE,
        SESSION_ENGINE="django.contrib.sessions.backends.signed_cookies",
    ):
        yield


def staff(*permissions: str) -> Client:
    user = User.objects.create_user("staff", is_staff=True)
    user.user_permissions.set(Permission.objects.filter(codename__in=permissions))
    client = Client()
    client.force_login(user)
    return client


@pytest.fixture
def viewer() -> Client:
    return staff("view_growth", "view_worker")


def get(client: Client, name: str, **query: Any) -> Any:
    return client.get(reverse(name), query)


@pytest.mark.parametrize("name", [RANKING, KEY, WORKERS])
def test_anonymous_users_go_to_the_login_page(name: str) -> None:
    response = get(Client(), name)
    assert response.status_code == 302
    assert response["Location"].startswith(reverse("admin:login"))


def test_non_staff_users_go_to_the_login_page() -> None:
    client = Client()
    client.force_login(User.objects.create_user("joe"))
    response = get(client, RANKING)
    assert response.status_code == 302
    assert response["Location"].startswith(reverse("admin:login"))


@pytest.mark.parametrize("name", [RANKING, KEY, WORKERS])
def test_staff_without_the_view_permission_are_refused(name: str) -> None:
    assert get(staff(), name).status_code == 403


def test_the_admin_index_leads_to_the_pages(viewer: Client) -> None:
    text = viewer.get(reverse("admin:index")).content.decode()
    assert "LeakGuard" in text
    assert reverse(RANKING) in text
    assert reverse(WORKERS) in text
    assert "addlink" not in text


def test_rows_cannot_be_added_changed_or_deleted() -> None:
    client = staff("view_growth", "add_growth", "change_growth", "delete_growth")
    growth = Growth.objects.create(kind="request", key="/", hour=timezone.now())
    assert client.get(reverse("admin:django_leakguard_growth_add")).status_code == 403
    change = reverse("admin:django_leakguard_growth_change", args=[growth.pk])
    assert client.post(change, {"key": "/x/"}).status_code == 403
    delete = reverse("admin:django_leakguard_growth_delete", args=[growth.pk])
    assert client.post(delete, {"post": "yes"}).status_code == 403
    assert Growth.objects.get().key == "/"


def test_ranking_page(viewer: Client) -> None:
    fill()
    response = get(viewer, RANKING, since="6h", sort="rss", min_count="", limit="10")
    text = response.content.decode()
    assert response.status_code == 200
    assert response["X-Frame-Options"] == "DENY"
    assert 'data-key="/leak/retain/"' in text
    assert "shop.views.leak_retain" in text
    assert 'class="leakguard-sparkline"' in text
    assert "leakguard.css" in text
    assert " style=" not in text.split('id="content-main"')[1]
    assert "kind=request&amp;key=%2Fleak%2Fretain%2F&amp;since=6h" in text
    page = response.context["page"]
    assert [row.key for row in page.rows][:2] == ["/leak/retain/", "/spike/"]
    assert page.report.sort == "rss"


def test_ranking_filters_by_kind_and_minimum_calls(viewer: Client) -> None:
    fill()
    page = get(viewer, RANKING, kind="task").context["page"]
    assert [(row.kind, row.key) for row in page.rows] == [("task", "/leak/retain/")]
    page = get(viewer, RANKING, min_count="100").context["page"]
    assert [row.key for row in page.rows] == ["/leak/retain/"]


def test_ranking_says_what_is_wrong_with_a_filter(viewer: Client) -> None:
    response = get(viewer, RANKING, since="soon", limit="0")
    text = response.content.decode()
    assert "should be a duration such as 30m" in text
    assert "page" not in response.context
    assert "errorlist" in text


def test_pages_say_when_the_tables_are_unreadable(
    viewer: Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(*args: Any, **kwargs: Any) -> Any:
        raise DatabaseError("no such table: django_leakguard_growth")

    for name in ("ranking_report", "key_page", "workers_page"):
        monkeypatch.setattr(pages, name, broken)
    for name in (RANKING, KEY, WORKERS):
        text = get(viewer, name).content.decode()
        assert "Cannot read the leakguard tables in database &#x27;default&#x27;" in text
        assert "migrate django_leakguard" in text


def test_key_page(viewer: Client) -> None:
    fill()
    response = get(viewer, KEY, kind="request", key="/leak/retain/", since="6h")
    text = response.content.decode()
    assert response.status_code == 200
    assert response.context["page"].total.calls == 300
    assert text.count('class="leakguard-chart"') == 3
    assert "Readings behind these figures" in text
    assert "No call of this key was traced" in text
    assert "shop.views.leak_retain" in text


def test_key_page_with_unknown_kind_and_window(viewer: Client) -> None:
    fill()
    response = get(viewer, KEY, kind="bogus", key="/spike/", since="later")
    assert response.context["page"].kind == "request"
    assert response.context["since_text"] == "24h"
    assert "should be a duration such as 30m" in response.content.decode()


def test_key_page_escapes_the_key(viewer: Client) -> None:
    hostile = "/<script>alert(1)</script>/"
    Growth.objects.create(kind="request", key=hostile, hour=timezone.now(), calls=1)
    text = get(viewer, KEY, key=hostile).content.decode()
    assert "<script>alert(1)</script>" not in text
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in text


def test_workers_page(viewer: Client) -> None:
    fill()
    response = get(viewer, WORKERS, since="3h", kind="bogus")
    text = response.content.decode()
    assert response.context["kind"] == "all"
    assert "2 workers seen, at most 1 at once on one host, 1 replaced" in text
    assert 'data-setting="MAX_REQUESTS"' in text
    assert "web-1" in text


def test_workers_page_without_workers(viewer: Client) -> None:
    Worker.objects.all().delete()
    text = get(viewer, WORKERS, since=dt.date.today().isoformat()).content.decode()
    assert "0 workers seen" in text
    assert "Too few calls to recommend" in text
