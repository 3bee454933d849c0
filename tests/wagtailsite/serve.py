"""Serve Wagtail pages through LeakGuardMiddleware and print the keys stored, as JSON.

Run in a process of its own by tests/test_refine.py (Wagtail needs its apps installed and
migrated, which the rest of the suite does without): python -m tests.wagtailsite.serve.
"""

from __future__ import annotations

import json
import os
import sys


def main() -> None:
    os.environ["DJANGO_SETTINGS_MODULE"] = "tests.wagtailsite.settings"
    import django

    django.setup()
    from django.core.management import call_command
    from django.db import connection
    from django.test import Client
    from django.test.utils import CaptureQueriesContext
    from wagtail.models import Page

    from django_leakguard import refine
    from django_leakguard.models import Growth
    from django_leakguard.recorder_process import get_recorder
    from tests.wagtailsite.models import ArticlePage

    call_command("migrate", run_syncdb=True, verbosity=0)
    home = Page.objects.get(depth=2)  # Wagtail's initial "Welcome" page, the default site's root
    home.add_child(instance=ArticlePage(title="First", slug="first"))
    client = Client()
    statuses = [client.get(path).status_code for path in ("/", "/first/", "/first/", "/nope/")]
    # The refinement reads the route Wagtail cached on the request: no query of its own.
    request = client.get("/first/").wsgi_request
    with CaptureQueriesContext(connection) as queries:
        refined = refine.wagtail_page_type(request, "/<arg1>")
    if not get_recorder().flush():
        sys.exit("the flush failed")
    keys = dict(Growth.objects.values_list("key", "calls"))
    json.dump(
        {"statuses": statuses, "keys": keys, "refined": refined, "queries": len(queries)},
        sys.stdout,
    )


if __name__ == "__main__":
    main()
