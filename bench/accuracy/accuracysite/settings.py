"""Settings of the accuracy project; the harness sets everything that varies by environment.

DATABASE_URL (postgresql:// or sqlite://), LEAKGUARD_* (recycling and flushing), ACCURACY_PLAN
(the run's sizes, read by accuracysite.leaks), ACCURACY_BROKER_URL and ACCURACY_QUEUE (Celery).
"""

from __future__ import annotations

import os
from pathlib import Path
from urllib.parse import unquote, urlsplit

BASE_DIR = Path(__file__).resolve().parent.parent

SECRET_KEY = "accuracy-not-secret"
DEBUG = False
# "testserver": leakhunt replays requests through the test client (bench/bench_lines.py).
ALLOWED_HOSTS = ["127.0.0.1", "localhost", "testserver"]

INSTALLED_APPS = [
    "django.contrib.contenttypes",
    "django_leakguard",
    "rest_framework",
    "accuracysite",
]

# REST framework views as most projects write them, without authentication (no
# django.contrib.auth here).
REST_FRAMEWORK = {
    "DEFAULT_AUTHENTICATION_CLASSES": [],
    "DEFAULT_PERMISSION_CLASSES": [],
    "UNAUTHENTICATED_USER": None,
}

MIDDLEWARE = [
    "django_leakguard.middleware.LeakGuardMiddleware",
    "django.middleware.common.CommonMiddleware",
]

ROOT_URLCONF = "accuracysite.urls"
WSGI_APPLICATION = "accuracysite.wsgi.application"
ASGI_APPLICATION = "accuracysite.asgi.application"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "APP_DIRS": True,
        "OPTIONS": {},
    }
]


def _database(url: str) -> dict[str, object]:
    parts = urlsplit(url)
    if parts.scheme in ("postgres", "postgresql"):
        return {
            "ENGINE": "django.db.backends.postgresql",
            "NAME": unquote(parts.path.lstrip("/")),
            "USER": unquote(parts.username or ""),
            "PASSWORD": unquote(parts.password or ""),
            "HOST": parts.hostname or "",
            "PORT": str(parts.port or ""),
        }
    return {
        "ENGINE": "django.db.backends.sqlite3",
        "NAME": parts.path or BASE_DIR / "accuracy.sqlite3",
        "OPTIONS": {"timeout": 30},
    }


# CONN_MAX_AGE = 0 (Django's default, spelled out): every request opens a connection and
# closes it at request_finished, the teardown a measurement must not charge to the view.
DATABASES = {"default": {**_database(os.environ.get("DATABASE_URL", "")), "CONN_MAX_AGE": 0}}

USE_TZ = True
TIME_ZONE = "UTC"
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

LEAKGUARD = {
    "MAX_REQUESTS": int(os.environ.get("LEAKGUARD_MAX_REQUESTS", "500")),
    "MAX_REQUESTS_JITTER": float(os.environ.get("LEAKGUARD_MAX_REQUESTS_JITTER", "0.1")),
    "FLUSH_INTERVAL": float(os.environ.get("LEAKGUARD_FLUSH_INTERVAL", "2")),
    "CELERY_MAX_TASKS_PER_CHILD": int(os.environ.get("LEAKGUARD_MAX_REQUESTS", "500")),
    "TRACE_SAMPLE_RATE": float(os.environ.get("LEAKGUARD_TRACE_SAMPLE_RATE", "0")),
}

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "handlers": {"console": {"class": "logging.StreamHandler"}},
    "loggers": {"django_leakguard": {"handlers": ["console"], "level": "INFO"}},
}
