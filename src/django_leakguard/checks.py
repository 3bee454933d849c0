"""System checks (leakguard.E001, leakguard.W001...); see docs/checks."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from django.apps import apps
from django.conf import settings as django_settings
from django.core import checks

from django_leakguard import conf, discovery, jitter, recycling, server_configs

# leakguard.E002 lives apart: registered whenever any part of the package is imported.
from django_leakguard.app_check import MIDDLEWARE_PATH, is_leakguard_middleware

if TYPE_CHECKING:
    from celery import Celery
    from django.db.backends.base.base import BaseDatabaseWrapper

_PREFORK_POOL = "celery.concurrency.prefork:TaskPool"


@checks.register("leakguard")
def check_settings(**kwargs: Any) -> list[checks.CheckMessage]:
    """leakguard.E001: the LEAKGUARD setting is invalid."""
    return [
        checks.Error(problem.message, hint=problem.hint, id="leakguard.E001")
        for problem in conf.problems()
    ]


def _settings() -> conf.Settings | None:
    """The effective settings, or None when invalid (leakguard.E001 reports why)."""
    if conf.problems():
        return None
    return conf.get_settings()


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
        hint=problem.hint
        or (
            f"Fix {problem.source} so that {problem.server} can load it; until then "
            "django-leakguard cannot check its worker recycling."
        ),
        id="leakguard.W010",
    )


# Middleware -----------------------------------------------------------------------------------


@checks.register("leakguard")
def check_middleware(**kwargs: Any) -> list[checks.CheckMessage]:
    """leakguard.W008, W009: LeakGuardMiddleware is missing from MIDDLEWARE or not first."""
    settings = _settings()
    if settings is None or not settings.RECORD:
        return []
    middleware = list(getattr(django_settings, "MIDDLEWARE", None) or [])
    positions = [i for i, entry in enumerate(middleware) if is_leakguard_middleware(entry)]
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


# Database -------------------------------------------------------------------------------------


def _sqlite_file_missing(connection: BaseDatabaseWrapper) -> bool:
    if connection.vendor != "sqlite" or connection.is_in_memory_db():  # type: ignore[attr-defined]
        return False
    return not Path(connection.settings_dict["NAME"]).exists()


@checks.register("leakguard")
def check_tables(**kwargs: Any) -> list[checks.CheckMessage]:
    """leakguard.W011: the leakguard tables are missing from LEAKGUARD["DATABASE"]."""
    settings = _settings()
    if settings is None or not settings.RECORD or not apps.is_installed("django_leakguard"):
        return []
    from django.db import connections

    from django_leakguard.models import Growth, Worker

    connection = connections[settings.DATABASE]
    try:
        if _sqlite_file_missing(connection):
            tables: set[str] = set()  # connecting would create an empty file
        else:
            tables = set(connection.introspection.table_names())
    except Exception:  # unreachable (or, in tests, not allowed): Django's checks say why
        return []
    missing = [model._meta.db_table for model in (Growth, Worker)]
    missing = [table for table in missing if table not in tables]
    if not missing:
        return []
    return [
        checks.Warning(
            f"The database {settings.DATABASE!r} has no table {' or '.join(missing)}, so the "
            "measurements cannot be written and leakreport cannot read them.",
            hint=f"Run `{conf.migrate_command(settings.DATABASE)}`.",
            id="leakguard.W011",
        )
    ]


# The worker rows this check reads: the latest week's.
JITTER_WINDOW_DAYS = 7


@checks.register("leakguard")
def check_jitter(**kwargs: Any) -> list[checks.CheckMessage]:
    """leakguard.W013: the recorded workers restart too close together for the jitter."""
    settings = _settings()
    if settings is None or not settings.MAX_REQUESTS or not apps.is_installed("django_leakguard"):
        return []
    import datetime as dt

    from django.utils import timezone

    since = timezone.now() - dt.timedelta(days=JITTER_WINDOW_DAYS)
    try:
        advice = jitter.stored_advice(since, "request", settings.DATABASE, settings)
    except Exception:  # no tables, or unreachable: leakguard.W011 and Django's checks say why
        return []
    if advice is None or not advice.too_narrow:
        return []
    fleet = advice.fleet
    return [
        checks.Warning(
            f"MAX_REQUESTS_JITTER {settings.MAX_REQUESTS_JITTER:g} keeps only "
            f"{advice.apart:.0%} of worker restarts more than a boot time apart, by a "
            f"simulation of {advice.rule}'s jitter rule with the recorded workers "
            f"({fleet.workers} at once, {fleet.rate:.3g} requests/s each, {fleet.boot:.3g} s "
            "to boot): workers restart together and requests wait for them.",
            hint=f"Set LEAKGUARD['MAX_REQUESTS_JITTER'] to {advice.recommended:g}.",
            id="leakguard.W013",
        )
    ]


# Gunicorn -------------------------------------------------------------------------------------


def _gunicorn_hint(source: str, **values: int) -> str:
    if source == "GUNICORN_CMD_ARGS" or source.startswith("the gunicorn command"):
        flags = " ".join(f"--{name.replace('_', '-')} {value}" for name, value in values.items())
        return f"Add {flags} to {source}."
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
            if found.source != "GUNICORN_CMD_ARGS" and not found.source.startswith("the "):
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


@checks.register("leakguard")
def check_server_configs_found(**kwargs: Any) -> list[checks.CheckMessage]:
    """leakguard.I001: no Gunicorn or uWSGI config was found, and none is named."""
    settings = _settings()
    if settings is None or settings.GUNICORN_CONFIG or settings.UWSGI_INI:
        return []
    if os.environ.get("GUNICORN_CMD_ARGS") or server_configs.live_uwsgi_options() is not None:
        return []
    if not discovery.nothing_found(_base_dir()):
        return []
    return [
        checks.Info(
            "No Gunicorn config, uWSGI ini file or server command in a Procfile or Dockerfile "
            "was found (in the current directory, BASE_DIR, BASE_DIR's parent and their etc/, "
            "deploy/, config/, conf/ and docker/ directories), so worker recycling is not "
            "checked.",
            hint=(
                "Set LEAKGUARD['GUNICORN_CONFIG'] to the config Gunicorn loads (a path or "
                "'python:module', e.g. ['python:django_leakguard.gunicorn_conf']) or "
                "LEAKGUARD['UWSGI_INI'] to your uWSGI ini files."
            ),
            id="leakguard.I001",
        )
    ]


# uWSGI ----------------------------------------------------------------------------------------


def _uwsgi_has_delta() -> bool:
    version = server_configs.uwsgi_version()
    # Unknown version: assume a current uWSGI (older ones refuse to start with the option, so
    # the hint names the version it needs).
    return version is None or version >= recycling.UWSGI_DELTA_SINCE


# uWSGI enables Python threads by default since 2.0.27 (unbit/uwsgi 1caea16d); before, only
# enable-threads or threads > 1 did, and other threads ran only while a request ran Python code.
UWSGI_THREADS_BY_DEFAULT_SINCE = (2, 0, 27)


def _uwsgi_threads_off(found: server_configs.UwsgiConfig) -> bool:
    if found.has("enable-threads"):
        return False
    threads = found.number("threads")
    if threads is None and found.has("threads"):
        return False  # a placeholder: uWSGI resolves it, maybe to more than 1
    if threads is not None and threads > 1:
        return False
    version = server_configs.uwsgi_version()
    # Unknown version: assume a current uWSGI, as leakguard.W004 does.
    return version is not None and version < UWSGI_THREADS_BY_DEFAULT_SINCE


@checks.register("leakguard")
def check_uwsgi(**kwargs: Any) -> list[checks.CheckMessage]:
    """leakguard.W003, W004, W005, W010, W012: uWSGI configs without (staggered) recycling or
    without threads."""
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
        elif found.source.startswith("the uwsgi command"):
            where = found.source
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
        if _uwsgi_threads_off(found):
            messages.append(
                checks.Warning(
                    f"The uWSGI config {found.source} does not set enable-threads, and this "
                    "uWSGI (before 2.0.27) does not enable threads by default: LeakGuard's "
                    "flush thread only runs while requests run, so workers write their "
                    "measurements themselves after a response, and a slow database holds them.",
                    hint=f"Add `enable-threads = true` to {where}.",
                    id="leakguard.W012",
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
