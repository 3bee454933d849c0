"""A strict Content-Security-Policy for testproject: only its own scripts, styles and images.

Django 6.0 and later set it with their own middleware and SECURE_CSP; on Django 5.2 a
middleware of the test project's sends the same header, so the admin pages are always served,
and tested, under it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import django
from django.http import HttpRequest, HttpResponse

POLICY = "default-src 'self'; frame-ancestors 'none'; form-action 'self'; base-uri 'none'"

if django.VERSION >= (6, 0):  # pragma: no cover  (depends on the installed Django)
    from django.utils.csp import CSP  # type: ignore[import-not-found,unused-ignore]

    SECURE_CSP: dict[str, Any] = {
        "default-src": [CSP.SELF],
        "frame-ancestors": [CSP.NONE],
        "form-action": [CSP.SELF],
        "base-uri": [CSP.NONE],
    }
    CSP_MIDDLEWARE = ["django.middleware.csp.ContentSecurityPolicyMiddleware"]
else:  # pragma: no cover
    SECURE_CSP = {}
    CSP_MIDDLEWARE = ["testproject.csp.StrictPolicyMiddleware"]


class StrictPolicyMiddleware:
    """Send POLICY with every response (Django 5.2, which has no SECURE_CSP)."""

    def __init__(self, get_response: Callable[[HttpRequest], HttpResponse]) -> None:
        self.get_response = get_response

    def __call__(self, request: HttpRequest) -> HttpResponse:
        response = self.get_response(request)
        response.headers.setdefault("Content-Security-Policy", POLICY)
        return response
