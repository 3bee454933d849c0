"""System checks (leakguard.E001, leakguard.W001...); see docs/checks."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from django.conf import settings as django_settings
from django.core import checks
from django.core.exceptions import ImproperlyConfigured
from django.utils.module_loading import import_string

from django_leakguard import conf, recycling, server_configs

if TYPE_CHECKING:
    from celery import Celery

MIDDLEWARE_PATH = "django_leakguard.middleware.LeakGuardMiddleware"
_PREFORK_POOL = "celery.concurrency.prefork:TaskPool"


@checks.register("leakguard")
def check_settings(**kwargs: Any) -> list[checks.CheckMessage]:
    """leakguard.E001: the LEAKGUARD setting is invalid."""
    return [
        checks.Error(message, hint=hint, id="leakguard.E001")
        for message, hint in conf.validate(conf.raw_setting())
    ]


def _settings() -> conf.Settings | None:
    """The effective settings, or None when invalid (leakguard.E001 reports why)."""
    try:
        return conf.get_settings()
    except ImproperlyConfigured:
        return None


def _base_dir() -> Path | None:
    base_dir = getattr(django_settings, "BASE_DIR", None)
    return Path(base_dir) if base_dir else None


def _recommended_max_requests(settings: conf.Settings) -> int:
    return settings.MAX_REQUESTS or conf.DEFAULTS["MAX_REQUESTS"]


def _jitter_fraction(settings: conf.Settings) -> float:
    return settings.MAX_REQUESTS_JITTER or conf.DEFAULTS["MAX_REQUESTS_JITTER"]


def _unreadable(problem: server_configs.Unreadable) -> checks.Warning:
    return checks.Warning(
        f"The {problem.server} config {problem.source} cannot be read: "
        f"{problem.error.rstrip('.')}.",
        hint=(
            f"Fix {problem.source} so that {problem.server} can load it; until then "
            "django-leakguard cannot check its worker recycling."
        ),
        id="leakguard.W010",
    )


# Middleware -----------------------------------------------------------------------------------


def _is_leakguard_middleware(entry: str) -> bool:
    if entry == MIDDLEWARE_PATH:
        return True
    from django_leakguard.middleware import LeakGuardMiddleware

    try:
        candidate = import_string(entry)
    except Exception:  # a broken entry is Django's to report, not ours
        return False
    return isinstance(candidate, type) and issubclass(candidate, LeakGuardMiddleware)


@checks.register("leakguard")
def check_middleware(**kwargs: Any) -> list[checks.CheckMessage]:
    """leakguard.W008, W009: LeakGuardMiddleware is missing from MIDDLEWARE or not first."""
    settings = _settings()
    if settings is None or not settings.RECORD:
        return []
    middleware = list(getattr(django_settings, "MIDDLEWARE", None) or [])
    positions = [i for i, entry in enumerate(middleware) if _is_leakguard_middleware(entry)]
    if not positions:
        return [
            checks.Warning(
                "LeakGuardMiddleware is not in MIDDLEWARE, so no request is recorded and "
                "leakreport stays empty.",
                hint=f"Add {MIDDLEWARE_PATH!r} as the first entry of MIDDLEWARE.",
                id="leakguard.W008",
            )
        ]
    if positions[0] > 0:
        above = ", ".join(repr(entry) for entry in middleware[: positions[0]])
        return [
            checks.Warning(
                "LeakGuardMiddleware is not first in MIDDLEWARE, so memory used by the "
                f"middleware above it ({above}) is not measured.",
                hint=f"Move {middleware[positions[0]]!r} to the top of MIDDLEWARE.",
                id="leakguard.W009",
            )
        ]
    return []


# Gunicorn -------------------------------------------------------------------------------------


def _gunicorn_hint(source: str, **values: int) -> str:
    if source == "GUNICORN_CMD_ARGS":
        flags = " ".join(f"--{name.replace('_', '-')} {value}" for name, value in values.items())
        return f"Add {flags} to GUNICORN_CMD_ARGS."
    lines = ", ".join(f"`{name} = {value}`" for name, value in values.items())
    return f"Set {lines} in {source}."


@checks.register("leakguard")
def check_gunicorn(**kwargs: Any) -> list[checks.CheckMessage]:
    """leakguard.W001, W002, W010: Gunicorn configs without (jittered) max_requests."""
    settings = _settings()
    if settings is None:
        return []
    messages: list[checks.CheckMessage] = []
    for found in server_configs.read_gunicorn_configs(settings.GUNICORN_CONFIG, _base_dir()):
        if isinstance(found, server_configs.Unreadable):
            messages.append(_unreadable(found))
        elif found.uses_leakguard:
            continue  # django_leakguard.gunicorn_conf applies LEAKGUARD's limits
        elif found.max_requests <= 0:
            max_requests = _recommended_max_requests(settings)
            hint = _gunicorn_hint(
                found.source,
                max_requests=max_requests,
                max_requests_jitter=max(1, round(max_requests * _jitter_fraction(settings))),
            )
            if found.source != "GUNICORN_CMD_ARGS":
                hint += (
                    " Or end it with `from django_leakguard.gunicorn_conf import "
                    "leakguard_settings` and `globals().update(leakguard_settings(globals()))` "
                    "to use the limits in LEAKGUARD."
                )
            messages.append(
                checks.Warning(
                    f"The Gunicorn config {found.source} does not set max_requests, so Gunicorn "
                    "never recycles its workers and a leak grows until they are killed.",
                    hint=hint,
                    id="leakguard.W001",
                )
            )
        elif found.max_requests_jitter <= 0:
            jitter = max(1, round(found.max_requests * _jitter_fraction(settings)))
            messages.append(
                checks.Warning(
                    f"The Gunicorn config {found.source} sets max_requests = "
                    f"{found.max_requests} without max_requests_jitter, so all workers restart "
                    "at the same moment.",
                    hint=_gunicorn_hint(found.source, max_requests_jitter=jitter),
                    id="leakguard.W002",
                )
            )
    return messages


# uWSGI ----------------------------------------------------------------------------------------


def _uwsgi_has_delta() -> bool:
    version = server_configs.uwsgi_version()
    # Unknown version: assume a current uWSGI (older ones refuse to start with the option, so
    # the hint names the version it needs).
    return version is None or version >= recycling.UWSGI_DELTA_SINCE


@checks.register("leakguard")
def check_uwsgi(**kwargs: Any) -> list[checks.CheckMessage]:
    """leakguard.W003, W004, W005, W010: uWSGI configs without (staggered) recycling."""
    settings = _settings()
    if settings is None:
        return []
    messages: list[checks.CheckMessage] = []
    for found in server_configs.read_uwsgi_configs(settings.UWSGI_INI, _base_dir()):
        if isinstance(found, server_configs.Unreadable):
            messages.append(_unreadable(found))
            continue
        where = f"the [uwsgi] section of {found.source}"
        if found.source.startswith("of the running"):
            where = "the uWSGI config"
        if not found.has("max-requests", "reload-on-rss", "evil-reload-on-rss"):
            messages.append(
                checks.Warning(
                    f"The uWSGI config {found.source} sets neither max-requests nor "
                    "reload-on-rss, so uWSGI never recycles its workers and a leak grows until "
                    "they are killed.",
                    hint=(
                        f"Add `max-requests = {_recommended_max_requests(settings)}` to {where}."
                    ),
                    id="leakguard.W003",
                )
            )
        elif found.has("max-requests") and not found.has("max-requests-delta"):
            processes = found.number("processes", "workers")
            if processes is not None and processes >= 2 and _uwsgi_has_delta():
                max_requests = found.number("max-requests") or _recommended_max_requests(settings)
                delta = max(
                    1,
                    recycling.max_requests_delta(
                        max_requests, _jitter_fraction(settings), processes
                    ),
                )
                messages.append(
                    checks.Warning(
                        f"The uWSGI config {found.source} sets max-requests for {processes} "
                        "processes without max-requests-delta, so all workers restart at the "
                        "same moment.",
                        hint=(
                            f"Add `max-requests-delta = {delta}` to {where} "
                            "(needs uWSGI 2.0.29 or later)."
                        ),
                        id="leakguard.W004",
                    )
                )
        if found.has("spooler") and not found.has("spooler-max-tasks"):
            max_tasks = settings.SPOOLER_MAX_TASKS or conf.DEFAULTS["SPOOLER_MAX_TASKS"]
            messages.append(
                checks.Warning(
                    f"The uWSGI config {found.source} runs a spooler without spooler-max-tasks, "
                    "so spooler processes are never recycled.",
                    hint=f"Add `spooler-max-tasks = {max_tasks}` to {where}.",
                    id="leakguard.W005",
                )
            )
    return messages


# Celery ---------------------------------------------------------------------------------------


def _configured_by_leakguard(app: Celery) -> bool:
    # Imported here: django_leakguard.celery imports Celery, an optional dependency.
    from django_leakguard.celery import is_configured

    return is_configured(app)


def _is_prefork(pool: object) -> bool:
    from celery import concurrency

    if isinstance(pool, str):
        aliases: dict[str, str] = getattr(concurrency, "ALIASES", {})
        target = aliases.get(pool, pool)
        return target.replace(":", ".") == _PREFORK_POOL.replace(":", ".")
    from celery.concurrency.prefork import TaskPool

    return isinstance(pool, type) and issubclass(pool, TaskPool)


def _celery_setting(app: Celery, name: str) -> str:
    namespace = getattr(app, "namespace", None)
    return f"{namespace}_{name.upper()}" if namespace else name


@checks.register("leakguard")
def check_celery(**kwargs: Any) -> list[checks.CheckMessage]:
    """leakguard.W006, W007, W010: a Celery app without recycling, or on a pool that drops it."""
    settings = _settings()
    if settings is None:
        return []
    found = server_configs.find_celery_app(settings.CELERY_APP)
    if found is None:
        return []
    if isinstance(found, server_configs.Unreadable):
        return [_unreadable(found)]
    name, app = found
    try:
        max_tasks = app.conf.worker_max_tasks_per_child
        max_memory = app.conf.worker_max_memory_per_child
        pool = app.conf.worker_pool
    except Exception as exc:  # the app's configuration source fails to load
        return [_unreadable(server_configs.Unreadable("Celery", repr(name), repr(exc)))]
    limited = bool(max_tasks) or bool(max_memory) or _configured_by_leakguard(app)
    if not limited:
        max_tasks_setting = _celery_setting(app, "worker_max_tasks_per_child")
        recommended = (
            settings.CELERY_MAX_TASKS_PER_CHILD or conf.DEFAULTS["CELERY_MAX_TASKS_PER_CHILD"]
        )
        return [
            checks.Warning(
                f"The Celery app {name!r} sets neither worker_max_tasks_per_child nor "
                "worker_max_memory_per_child, so its worker processes are never recycled.",
                hint=(
                    "Call django_leakguard.celery.configure(app) where the app is created, or "
                    f"set {max_tasks_setting} = {recommended}."
                ),
                id="leakguard.W006",
            )
        ]
    if not _is_prefork(pool):
        pool_name = pool if isinstance(pool, str) else getattr(pool, "__qualname__", repr(pool))
        return [
            checks.Warning(
                f"The Celery app {name!r} uses the {pool_name!r} pool, which ignores "
                "worker_max_tasks_per_child and worker_max_memory_per_child; only the prefork "
                "pool recycles worker processes.",
                hint=(
                    f"Set {_celery_setting(app, 'worker_pool')} = 'prefork' and start the worker "
                    "without --pool, or with --pool prefork."
                ),
                id="leakguard.W007",
            )
        ]
    return []
