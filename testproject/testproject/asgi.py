from __future__ import annotations

import os

from django.core.asgi import get_asgi_application

from django_leakguard.asgi import LeakGuardASGI

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "testproject.settings")
# LeakGuardASGI flushes when a standalone Uvicorn, Hypercorn or Granian stops (lifespan).
application = LeakGuardASGI(get_asgi_application())
