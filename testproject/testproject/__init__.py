# Load the Celery app with Django, so that @shared_task binds to it (Celery's Django layout).
from __future__ import annotations

from testproject.celery import app as celery_app

__all__ = ["celery_app"]
