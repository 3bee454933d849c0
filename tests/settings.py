"""Settings for the test suite: SQLite by default, plus a "postgres" alias when its URL is set."""

from __future__ import annotations

import os

from testproject.dburl import database_from_url

SECRET_KEY = "tests-not-secret"
DEBUG = False
ALLOWED_HOSTS = ["testserver", "127.0.0.1", "localhost"]

INSTALLED_APPS = [
    "django.contrib.contenttypes",
    "django.contrib.auth",
    "django_leakguard",
    "shop",
]

MIDDLEWARE = ["django_leakguard.middleware.LeakGuardMiddleware"]

ROOT_URLCONF = "testproject.urls"

DATABASES: dict[str, dict[str, object]] = {
    "default": {"ENGINE": "django.db.backends.sqlite3", "NAME": ":memory:"},
}
POSTGRES_URL = os.environ.get("LEAKGUARD_TEST_POSTGRES_URL", "")
if POSTGRES_URL:
    DATABASES["postgres"] = database_from_url(POSTGRES_URL)
    # tox runs environments side by side on one server: a test database of each one's own.
    env_name = os.environ.get("TOX_ENV_NAME", "").replace("-", "_")
    if env_name:
        DATABASES["postgres"]["TEST"] = {
            "NAME": f"test_{DATABASES['postgres']['NAME']}_{env_name}"
        }

USE_TZ = True
TIME_ZONE = "UTC"
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

LEAKGUARD = {"FLUSH_INTERVAL": 3600}
