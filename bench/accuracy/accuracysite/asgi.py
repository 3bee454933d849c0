from __future__ import annotations

import os

from django.core.asgi import get_asgi_application

from django_leakguard.asgi import LeakGuardASGI

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "accuracysite.settings")
# As the installation guide says, under any ASGI server.
application = LeakGuardASGI(get_asgi_application())
