"""The handler leakhunt replays requests through; a module of its own for tracing's sake.

tracing_sites.site_frame() walks from an allocation outwards and stops at this module's frames:
what lies beyond is leakhunt's own code and the test client, not the request.
"""

from __future__ import annotations

from typing import Any

from django.core.handlers.wsgi import WSGIRequest
from django.core.signals import request_started
from django.test.client import ClientHandler


class ReplayHandler(ClientHandler):
    """ClientHandler without its per-request signal juggling (see hunt.ReplayClient)."""

    def __call__(self, environ: dict[str, Any]) -> Any:
        if getattr(self, "_middleware_chain", None) is None:
            self.load_middleware()
        request_started.send(sender=self.__class__, environ=environ)
        request = WSGIRequest(environ)
        request._dont_enforce_csrf_checks = not self.enforce_csrf_checks  # type: ignore[attr-defined]
        response = self.get_response(request)
        if response.streaming:
            for _ in response:  # what a server would send; the view may produce as it goes
                pass
        response.close()  # fires request_finished, as a WSGI server does
        return response
