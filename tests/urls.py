"""The test suite's URLconf: testproject's views without its admin and static files, which
would change what the uWSGI log parser resolves (tests/urls_admin.py adds the admin)."""

from __future__ import annotations

from django.urls import include, path

urlpatterns = [path("", include("shop.urls"))]
