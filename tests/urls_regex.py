"""A URLconf with a regular-expression route."""

from __future__ import annotations

from django.urls import re_path

from tests.urls_digits import view

urlpatterns = [re_path(r"^year/(?P<year>[12]\d{3})/$", view)]
