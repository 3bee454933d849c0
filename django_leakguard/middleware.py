"""LeakGuardMiddleware: record each request's memory growth under its URL pattern."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from asgiref.sync import iscoroutinefunction, markcoroutinefunction, sync_to_async
from django.http import HttpRequest, HttpResponseBase

from django_leakguard.recorder import UNMATCHED, get_recorder, recording

REQUEST = "request"


def request_key(request: HttpRequest) -> tuple[str, str]:
    """Return (URL pattern with a leading slash, view's dotted name); never the raw path."""
    try:
        match = request.resolver_match
        if match is None:
            return UNMATCHED, ""
        # ResolverMatch.route is the full route, joined across included URLconfs; strip the
        # anchors of regex routes.
        route = match.route
        if route[:1] == "^" or route[-1:] == "$":
            route = route.removeprefix("^").removesuffix("$")
        return "/" + route, match._func_path
    except Exception:
        return UNMATCHED, ""


class LeakGuardMiddleware:
    """Sample memory around each request and attribute the growth to its URL pattern.

    Put it first in MIDDLEWARE so that it measures the whole request.
    """

    sync_capable = True
    async_capable = True

    def __init__(self, get_response: Callable[[HttpRequest], Any]) -> None:
        self.get_response = get_response
        self.is_async = iscoroutinefunction(get_response)
        if self.is_async:
            markcoroutinefunction(self)

    def __call__(self, request: HttpRequest) -> HttpResponseBase | Awaitable[HttpResponseBase]:
        if self.is_async:
            return self.__acall__(request)
        if not recording():
            response: HttpResponseBase = self.get_response(request)
            return response
        recorder = get_recorder()
        call = recorder.begin()
        try:
            response = self.get_response(request)
        finally:
            key, view = request_key(request)
            recorder.end(call, REQUEST, key, view)
        recorder.flush_if_due()
        return response

    async def __acall__(self, request: HttpRequest) -> HttpResponseBase:
        if not recording():
            response: HttpResponseBase = await self.get_response(request)
            return response
        recorder = get_recorder()
        call = recorder.begin()
        try:
            response = await self.get_response(request)
        finally:
            key, view = request_key(request)
            recorder.end(call, REQUEST, key, view)
        if recorder.flush_due():
            # Database access must not run in the event loop.
            await sync_to_async(recorder.flush_if_due, thread_sensitive=True)()
        return response
