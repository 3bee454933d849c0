"""The view of the i18n URLconfs: it takes any URL arguments."""

from __future__ import annotations

from django.http import HttpRequest, HttpResponse


def view(request: HttpRequest, **kwargs: object) -> HttpResponse:
    return HttpResponse("ok")
