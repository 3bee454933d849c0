"""Settings for the test suite: SQLite by default, plus "postgres" and "mysql" aliases when their
URLs are set."""

from __future__ import annotations

import os

from testproject.dburl import database_from_url

SECRET_KEY = "tests-not-secret"
DEBUG = False
ALLOWED_HOSTS = ["testserver", "127.0.0.1", "localhost"]

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.contenttypes",
    "django.contrib.auth",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "django_leakguard",
    "shop",
]

# The admin pages' tests add the admin's middleware (tests/test_admin.py); without it,
# leakhunt's replays measure the leakguard middleware alone.
MIDDLEWARE = ["django_leakguard.middleware.LeakGuardMiddleware"]

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ]
        },
    }
]
STATIC_URL = "static/"

ROOT_URLCONF = "tests.urls"

DATABASES: dict[str, dict[str, object]] = {
    "default": {"ENGINE": "django.db.backends.sqlite3", "NAME": ":memory:"},
}
# tox runs environments side by side on one server: a test database of each one's own.
TOX_ENV_NAME = os.environ.get("TOX_ENV_NAME", "").replace("-", "_")
for alias, variable in (
    ("postgres", "LEAKGUARD_TEST_POSTGRES_URL"),
    ("mysql", "LEAKGUARD_TEST_MYSQL_URL"),
):
    if os.environ.get(variable):
        DATABASES[alias] = database_from_url(os.environ[variable])
        if TOX_ENV_NAME:
            DATABASES[alias]["TEST"] = {"NAME": f"test_{DATABASES[alias]['NAME']}_{TOX_ENV_NAME}"}
if "mysql" in DATABASES:
    # The tests only: PyMySQL, pure Python, stands in for mysqlclient, which needs the MySQL
    # client's C headers to build. Users install mysqlclient as Django's documentation says.
    import pymysql

    pymysql.install_as_MySQLdb()

USE_TZ = True
TIME_ZONE = "UTC"
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

LEAKGUARD = {"FLUSH_INTERVAL": 3600}
