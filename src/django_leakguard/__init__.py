"""Keep leaking Django workers alive and find the URL patterns and tasks that leak."""

from __future__ import annotations

from django_leakguard import app_check  # noqa: F401  (registers leakguard.E002)

__all__ = ["flush"]


def flush() -> bool:
    """Write this process's pending measurements to the database now; return success."""
    from django_leakguard.recorder_process import get_recorder

    return get_recorder().flush()
