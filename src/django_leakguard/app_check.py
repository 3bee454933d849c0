"""leakguard.E002: LeakGuardMiddleware in MIDDLEWARE without the app in INSTALLED_APPS.

The other checks are registered by the app's ready(), which never runs without the app in
INSTALLED_APPS: the very case of this check. So it is registered when any part of the package
is imported (the package's __init__ imports this module), whatever is imported first: the
middleware, the Gunicorn config module, the Celery integration, the settings. Django itself
never imports MIDDLEWARE's entries during `manage.py check`, so in a project that imports
nothing of the package before the checks run, the middleware says it instead: one warning when
a server loads it (docs/checks).
"""

from __future__ import annotations

from typing import Any

from django.apps import apps
from django.conf import settings as django_settings
from django.core import checks
from django.utils.module_loading import import_string

MIDDLEWARE_PATH = "django_leakguard.middleware.LeakGuardMiddleware"


def is_leakguard_middleware(entry: str) -> bool:
    """Return whether a MIDDLEWARE entry is LeakGuardMiddleware or a subclass of it."""
    if entry == MIDDLEWARE_PATH:
        return True
    from django_leakguard.middleware import LeakGuardMiddleware

    try:
        candidate = import_string(entry)
    except Exception:  # a broken entry is Django's to report, not ours
        return False
    return isinstance(candidate, type) and issubclass(candidate, LeakGuardMiddleware)


@checks.register("leakguard")
def check_app_installed(**kwargs: Any) -> list[checks.CheckMessage]:
    """leakguard.E002: LeakGuardMiddleware is in MIDDLEWARE without the app in INSTALLED_APPS."""
    if apps.is_installed("django_leakguard"):
        return []
    middleware = list(getattr(django_settings, "MIDDLEWARE", None) or [])
    if not any(is_leakguard_middleware(entry) for entry in middleware):
        return []
    from django_leakguard import conf

    return [
        checks.Error(
            "LeakGuardMiddleware is in MIDDLEWARE but 'django_leakguard' is not in "
            "INSTALLED_APPS, so its tables do not exist and nothing is recorded.",
            hint=(
                "Add 'django_leakguard' to INSTALLED_APPS and run "
                f"`{conf.migrate_command(conf.get_settings().DATABASE)}`."
            ),
            id="leakguard.E002",
        )
    ]
