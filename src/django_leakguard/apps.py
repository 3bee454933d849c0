from __future__ import annotations

from django.apps import AppConfig
from django.utils.translation import gettext_lazy as _


class LeakGuardConfig(AppConfig):
    name = "django_leakguard"
    verbose_name = _("LeakGuard")
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        from django_leakguard import (
            checks,  # noqa: F401  (registers the system checks)
            uwsgi,
        )

        # Under uWSGI, flush the recorder as each worker exits (uwsgi.atexit); a no-op elsewhere.
        uwsgi.install()
