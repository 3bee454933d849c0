"""Settings of a small Wagtail site: tests/settings.py plus Wagtail, serving its pages from a
catch-all route (tests/wagtailsite/urls.py)."""

from __future__ import annotations

from tests.settings import *  # noqa: F403

INSTALLED_APPS = [
    "django.contrib.contenttypes",
    "django.contrib.auth",
    "django.contrib.sessions",
    "django.contrib.messages",
    "taggit",
    "modelcluster",
    "wagtail",
    "django_leakguard",
    "tests.wagtailsite",
]
ROOT_URLCONF = "tests.wagtailsite.urls"
DATABASES = {"default": {"ENGINE": "django.db.backends.sqlite3", "NAME": ":memory:"}}
WAGTAIL_SITE_NAME = "leakguard"
WAGTAILADMIN_BASE_URL = "http://testserver"
