"""The accuracy project's Celery app: `celery -A accuracysite worker`, Redis as broker."""

from __future__ import annotations

import os

from celery import Celery

from django_leakguard.celery import configure

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "accuracysite.settings")

app = Celery("accuracysite")
app.conf.broker_url = os.environ.get("ACCURACY_BROKER_URL", "redis://127.0.0.1:6379/11")
# A queue of the run's own, so that runs (and other users of the same Redis) never mix.
app.conf.task_default_queue = os.environ.get("ACCURACY_QUEUE", "accuracy")
app.conf.task_ignore_result = True
app.conf.broker_connection_retry_on_startup = True
app.autodiscover_tasks(["accuracysite"])
configure(app)
