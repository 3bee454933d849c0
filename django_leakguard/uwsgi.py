"""uWSGI integration: flush the recorder when a worker exits (uwsgi.atexit)."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from types import ModuleType

__all__ = ["install", "running_under_uwsgi"]

_MARK = "_leakguard_atexit"


def _uwsgi_module() -> ModuleType | None:
    # The uwsgi module exists only inside a uWSGI process: import it lazily, never at import.
    try:
        return importlib.import_module("uwsgi")
    except ImportError:
        return None


def running_under_uwsgi() -> bool:
    """Return whether this process is a uWSGI process."""
    return _uwsgi_module() is not None


def flush_at_exit() -> None:
    """Write this worker's pending measurements (uWSGI calls it as the worker exits)."""
    from django_leakguard import recorder

    recorder.flush_at_exit()


def install() -> bool:
    """Make uWSGI flush the recorder at worker exit, chaining an existing uwsgi.atexit.

    Return whether it is installed: False outside uWSGI. Calling it again changes nothing.
    """
    uwsgi = _uwsgi_module()
    if uwsgi is None:
        return False
    previous: Callable[[], object] | None = getattr(uwsgi, "atexit", None)
    if previous is not None and getattr(previous, _MARK, False):
        return True

    def atexit() -> None:
        # uWSGI's Python plugin calls uwsgi.atexit in each worker as it shuts down (after
        # max-requests, reload-on-rss, a reload or a stop). The recorder's Python atexit
        # handler usually runs as well; a second flush finds nothing left to write.
        try:
            flush_at_exit()
        finally:
            if previous is not None:
                previous()

    setattr(atexit, _MARK, True)
    setattr(uwsgi, "atexit", atexit)  # noqa: B010  (a module attribute uWSGI reads)
    return True
