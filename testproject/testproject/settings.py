"""Settings of the demo project used by the docs, `make demo` and the integration tests."""

from __future__ import annotations

import os
from pathlib import Path

from testproject.csp import CSP_MIDDLEWARE, SECURE_CSP  # noqa: F401  (a strict policy)
from testproject.dburl import database_from_url

BASE_DIR = Path(__file__).resolve().parent.parent

SECRET_KEY = "testproject-not-secret"
DEBUG = os.environ.get("TESTPROJECT_DEBUG", "") == "1"
ALLOWED_HOSTS = ["127.0.0.1", "localhost", "[::1]", "testserver"]

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.contenttypes",
    "django.contrib.auth",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "django_leakguard",
    "shop",
]

MIDDLEWARE = [
    "django_leakguard.middleware.LeakGuardMiddleware",
    *CSP_MIDDLEWARE,
    "django.middleware.security.SecurityMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
]

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

# The admin's and leakguard's files, served by testproject's own URLconf (see urls.py).
STATIC_URL = "static/"

ROOT_URLCONF = "testproject.urls"
WSGI_APPLICATION = "testproject.wsgi.application"
ASGI_APPLICATION = "testproject.asgi.application"

# SQLite by default; PostgreSQL (or another SQLite file) when DATABASE_URL names it.
DATABASES = {
    "default": database_from_url(os.environ["DATABASE_URL"])
    if os.environ.get("DATABASE_URL")
    else {
        "ENGINE": "django.db.backends.sqlite3",
        "NAME": BASE_DIR / "db.sqlite3",
        "OPTIONS": {"timeout": 30},
    }
}

# The fault-injection tests give LeakGuard a database of its own (LEAKGUARD["DATABASE"] below).
if os.environ.get("LEAKGUARD_DATABASE_URL"):
    DATABASES["leakguard"] = database_from_url(os.environ["LEAKGUARD_DATABASE_URL"])

USE_TZ = True
TIME_ZONE = "UTC"
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

LEAKGUARD = {
    "MAX_REQUESTS": int(os.environ.get("LEAKGUARD_MAX_REQUESTS", "1000")),
    "MAX_REQUESTS_JITTER": float(os.environ.get("LEAKGUARD_MAX_REQUESTS_JITTER", "0.1")),
    "FLUSH_INTERVAL": float(os.environ.get("LEAKGUARD_FLUSH_INTERVAL", "30")),
    **({"DATABASE": "leakguard"} if "leakguard" in DATABASES else {}),
    # Recycling limits for the integration tests; unset, the defaults apply.
    **{
        key: parse(os.environ[f"LEAKGUARD_{key}"])
        for key, parse in (
            ("WORKER_MAX_MEMORY", str),
            ("CELERY_MAX_TASKS_PER_CHILD", int),
            ("CELERY_MEMORY_FRACTION", float),
            ("TRACE_SAMPLE_RATE", float),
        )
        if os.environ.get(f"LEAKGUARD_{key}")
    },
}

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "handlers": {"console": {"class": "logging.StreamHandler"}},
    "loggers": {"django_leakguard": {"handlers": ["console"], "level": "INFO"}},
}
