"""A Wagtail page type for the refined keys' test (tests/test_refine.py)."""

from __future__ import annotations

from django.http import HttpRequest, HttpResponse
from wagtail.models import Page


class ArticlePage(Page):
    def serve(self, request: HttpRequest, *args: object, **kwargs: object) -> HttpResponse:
        return HttpResponse(f"article {self.title}")
