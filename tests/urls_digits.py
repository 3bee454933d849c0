"""A URLconf whose routes differ only in a digit (API versions)."""

from __future__ import annotations

from django.http import HttpRequest, HttpResponse
from django.urls import path


def view(request: HttpRequest) -> HttpResponse:
    return HttpResponse()


urlpatterns = [path("api/v1/items/", view), path("api/v2/items/", view)]
