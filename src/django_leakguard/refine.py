"""Refined keys: LEAKGUARD["REFINE_KEY"] splits a catch-all route's key by what it served.

A catch-all route (a CMS's page serving, a single-page app's fallback, a front controller)
sends most of a site to one URL pattern, and a leak in one kind of page disappears in it. The
function named by REFINE_KEY runs when a request's view has returned, with the request and its
key, and returns a more precise key (or None to keep it). Whatever it does, the request goes
on: a function that raises, or returns something other than a non-empty string, is logged once
per process and the unrefined key is kept. The refined key is cut as every key is
(records.fit_key) and counts against MAX_KEYS like any other.

The built-in refinement, wagtail_page_type (the default), adds the type of the page Wagtail
served: "/<arg1>" becomes "/<arg1> [blog.BlogPage]". Wagtail keeps the page it routed to on
the request (Page.route_for_request caches it as request._wagtail_route_for_request), so this
runs no query; without Wagtail the attribute is never there and every key stays as it is.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import Any

from django.core.signals import setting_changed
from django.http import HttpRequest
from django.utils.module_loading import import_string

from django_leakguard import conf, text
from django_leakguard.records import fit_key

logger = logging.getLogger("django_leakguard")

Refiner = Callable[[HttpRequest, str], Any]

# Where Wagtail caches a request's route: (page, args, kwargs), or None when no page matched.
WAGTAIL_ROUTE_ATTRIBUTE = "_wagtail_route_for_request"

# The functions named by REFINE_KEY, imported once per dotted path (None: cannot be imported).
_imported: dict[str, Refiner | None] = {}
# The dotted paths whose failures this process has logged: each once.
_logged: set[str] = set()
# Whether REFINE_KEY may refine keys in this project (see enabled); None until first asked.
_enabled: bool | None = None


# What a report read from logs says when keys are refined (a log line knows only the path).
LOG_NOTE = (
    "Keys read from logs are URL patterns: REFINE_KEY's refinements (such as Wagtail's page "
    "types) are made in the process that serves the request, so only the database's report "
    "shows them."
)


def active() -> bool:
    """Return whether REFINE_KEY may refine this project's keys (the default needs Wagtail)."""
    from django.apps import apps

    path = conf.get_settings().REFINE_KEY
    if path == conf.DEFAULTS["REFINE_KEY"]:
        return apps.is_installed("wagtail")
    return path is not None


def enabled() -> bool:
    """Return active(), once per process and settings: the request path's cheap check."""
    global _enabled
    if _enabled is None:
        try:
            _enabled = active()
        except Exception:  # let refine() itself fail and log
            _enabled = True
    return _enabled


def refined_key(key: str, detail: str) -> str:
    """Return key refined by detail as the built-ins write it: "/<arg1> [app.Model]"."""
    return fit_key(f"{key} [{detail}]")


def wagtail_page_type(request: HttpRequest, key: str) -> str | None:
    """Add the model label of the page Wagtail served to key; None when it served no page."""
    route = getattr(request, WAGTAIL_ROUTE_ATTRIBUTE, None)
    if not route:
        return None
    page = route[0]
    meta = getattr(page, "_meta", None)
    label = getattr(meta, "label", None)
    return refined_key(key, label) if isinstance(label, str) else None


def refine(request: HttpRequest, key: str) -> str:
    """Return request's key refined by REFINE_KEY's function; key itself when there is none.

    Never raises: a function that fails or returns garbage is logged once and key is kept.
    """
    try:
        path = conf.get_settings().REFINE_KEY
        if path is None:
            return key
        function = _function(path)
        if function is None:
            return key
        try:
            refined = function(request, key)
        except Exception as exc:
            _log_once(path, f"raised {conf.exception_line(exc)}")
            return key
        if refined is None:
            return key
        if not isinstance(refined, str) or not refined:
            _log_once(path, f"returned {text.shown(refined)}, not a non-empty string or None")
            return key
        return fit_key(refined)
    except Exception:  # the settings or the log itself failed: the request goes on
        return key


def _function(path: str) -> Refiner | None:
    if path not in _imported:
        function: Refiner | None = None
        try:
            imported = import_string(path)
        except Exception as exc:
            _log_once(path, f"cannot be imported ({conf.exception_line(exc)})")
        else:
            if callable(imported):
                function = imported
            else:
                _log_once(path, "is not callable")
        _imported[path] = function
    return _imported[path]


def _log_once(path: str, what: str) -> None:
    if path in _logged:
        return
    _logged.add(path)
    logger.warning(
        "django-leakguard: LEAKGUARD['REFINE_KEY'] %r %s; requests keep their unrefined keys. "
        "Fix the function, or set REFINE_KEY to None. Further failures are not logged.",
        path,
        what,
    )


def reset(**kwargs: Any) -> None:
    """Forget the imported functions and the failures logged (settings changed, or a fork)."""
    global _enabled
    setting = kwargs.get("setting", conf.SETTING_NAME)
    if setting in (conf.SETTING_NAME, "INSTALLED_APPS"):
        _enabled = None
    if setting == conf.SETTING_NAME:
        _imported.clear()
        _logged.clear()


setting_changed.connect(reset, dispatch_uid="django_leakguard.refine.reset")
os.register_at_fork(after_in_child=reset)
