"""The test project's Celery app, recycled by LEAKGUARD: `celery -A testproject worker`."""

from __future__ import annotations

import os
from pathlib import Path

from celery import Celery

from django_leakguard.celery import configure

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "testproject.settings")

# Without CELERY_BROKER_URL, Kombu's filesystem transport in a local directory: no service to
# run. Redis (CELERY_BROKER_URL=redis://127.0.0.1:6379/14) or RabbitMQ work the same way.
BROKER_DIR = Path(
    os.environ.get("TESTPROJECT_BROKER_DIR")
    or Path(__file__).resolve().parent.parent / ".celery-broker"
)

app = Celery("testproject")
app.config_from_object("django.conf:settings", namespace="CELERY")
broker_url = os.environ.get("CELERY_BROKER_URL", "")
if broker_url:
    app.conf.broker_url = broker_url
else:
    app.conf.broker_url = "filesystem://"
    app.conf.broker_transport_options = {
        "data_folder_in": str(BROKER_DIR / "queue"),
        "data_folder_out": str(BROKER_DIR / "queue"),
        "processed_folder": str(BROKER_DIR / "processed"),
        "control_folder": str(BROKER_DIR / "control"),
        "store_processed": False,
    }
    for folder in ("queue", "processed", "control"):
        (BROKER_DIR / folder).mkdir(parents=True, exist_ok=True)
# Tests set it to show that the worker's -c option wins.
if os.environ.get("CELERY_WORKER_CONCURRENCY"):
    app.conf.worker_concurrency = int(os.environ["CELERY_WORKER_CONCURRENCY"])
app.conf.task_ignore_result = True
app.conf.broker_connection_retry_on_startup = True
app.autodiscover_tasks()
configure(app)
