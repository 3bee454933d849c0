# Gunicorn config of the test project: `gunicorn testproject.wsgi` from this directory reads it.
# Recycling (max_requests with jitter, WORKER_MAX_MEMORY) comes from LEAKGUARD in settings.py;
# hooks defined above the last two lines are chained, not replaced.
from __future__ import annotations

import os

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "testproject.settings")

bind = "127.0.0.1:8000"
workers = 2

from django_leakguard.gunicorn_conf import leakguard_settings  # noqa: E402

globals().update(leakguard_settings(globals()))
