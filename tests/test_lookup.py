"""What --detail accepts (the command's own tests are in test_leakreport.py)."""

from __future__ import annotations

from django.http import HttpResponse
from django.test import override_settings
from django.urls import path

from django_leakguard import lookup


@override_settings(ROOT_URLCONF="tests.urls_i18n")
def test_url_names_of_nested_namespaces_and_i18n_patterns() -> None:
    assert lookup.url_name_keys("item") == ["/{lang}/items/<int:pk>/"]
    assert lookup.url_name_keys("shop:product") == ["/{lang}/shop/<slug:slug>/"]
    assert lookup.url_name_keys("product") == []
    assert lookup.url_name_keys("archive") == ["/{lang}/archive/<year>/"]


class Twice:
    urlpatterns = [
        path("a/", HttpResponse, name="a"),
        path("a/", HttpResponse, name="a"),
        path("b/", HttpResponse, name="a"),
    ]


def test_a_url_name_gives_each_key_once() -> None:
    assert lookup.url_name_keys("a", Twice) == ["/a/", "/b/"]  # type: ignore[arg-type]
