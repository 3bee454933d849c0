"""Read Gunicorn configs, uWSGI ini files and Celery apps without starting any server.

The system checks (django_leakguard.checks) use these readers; see docs/checks for where each
server's config is looked for. Every reader returns what it found plus an `Unreadable` entry
for each config that exists but cannot be loaded, and never raises because of a user's file.
"""

from __future__ import annotations

import configparser
import contextlib
import importlib
import io
import re
import sys
import types
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from django_leakguard.recycling import installed_uwsgi_version, parse_version

if TYPE_CHECKING:
    from celery import Celery

GUNICORN_CONF_MODULE = "django_leakguard.gunicorn_conf"


@dataclass(frozen=True)
class Unreadable:
    """A server config that exists (or was named) but cannot be loaded."""

    server: str
    source: str
    error: str


def resolve_path(path: str, base_dir: Path | None) -> Path:
    """Return path made absolute against base_dir (else the current directory)."""
    candidate = Path(path).expanduser()
    if candidate.is_absolute():
        return candidate
    return (base_dir or Path.cwd()) / candidate


def _describe(exc: BaseException) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


# Gunicorn -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GunicornConfig:
    """The settings of one Gunicorn config, with GUNICORN_CMD_ARGS applied on top."""

    source: str
    max_requests: int
    max_requests_jitter: int
    uses_leakguard: bool


def _uses_leakguard(location: str, namespace: Mapping[str, Any]) -> bool:
    """Tell whether a config is (or imports from) django_leakguard.gunicorn_conf."""
    if location == f"python:{GUNICORN_CONF_MODULE}":
        return True
    for value in namespace.values():
        if isinstance(value, types.ModuleType) and value.__name__ == GUNICORN_CONF_MODULE:
            return True
        if getattr(value, "__module__", None) == GUNICORN_CONF_MODULE:
            return True
    return False


def _gunicorn_reader() -> Any:
    """Return a Gunicorn Application that loads configs but never parses sys.argv or serves."""
    from gunicorn.app.base import Application  # type: ignore[import-untyped]
    from gunicorn.config import Config  # type: ignore[import-untyped]

    class ConfigReader(Application):  # type: ignore[misc]
        def __init__(self) -> None:
            # BaseApplication.__init__ would parse sys.argv (manage.py's) and exit on errors.
            self.usage = None
            self.prog = "gunicorn"
            self.callable = None
            self.logger = None
            self.cfg = Config(prog="gunicorn")

    return ConfigReader()


def _load_gunicorn_location(reader: Any, location: str) -> Mapping[str, Any]:
    """Load a config file or python: module into reader.cfg as Gunicorn does; raise on errors."""
    previous = sys.modules.get("__config__")
    try:
        # Gunicorn prints the traceback and calls sys.exit(1) when a config file fails; keep
        # its output out of `manage.py check` and report the original exception instead.
        with contextlib.redirect_stderr(io.StringIO()) as captured:
            try:
                namespace: Mapping[str, Any] = reader.load_config_from_module_name_or_filename(
                    location
                )
            except SystemExit as exc:
                raise ValueError(_describe(exc.__context__ or exc)) from None
            except Exception as exc:
                # Gunicorn names the setting only in what it prints ("Invalid value for x: y").
                printed = captured.getvalue().strip().splitlines()
                message = _describe(exc)
                if printed and printed[0].startswith("Invalid value"):
                    message = f"{printed[0]} ({message})"
                raise ValueError(message) from None
    finally:
        # Gunicorn registers each config file as the module "__config__"; leave no trace.
        if previous is None:
            sys.modules.pop("__config__", None)
        else:
            sys.modules["__config__"] = previous
    return namespace


def read_gunicorn_configs(
    paths: Sequence[str], base_dir: Path | None
) -> list[GunicornConfig | Unreadable]:
    """Read the Gunicorn configs in paths, plus the one Gunicorn would load from here.

    Gunicorn's default is ./gunicorn.conf.py, or the -c named in GUNICORN_CMD_ARGS; the options
    in GUNICORN_CMD_ARGS override every file's values, as they do when Gunicorn starts. When no
    file is found but GUNICORN_CMD_ARGS is set, the environment alone is one config.
    """
    try:
        from gunicorn.config import get_default_config_file
    except ImportError:  # pragma: no cover - Gunicorn is installed wherever the tests run
        return []

    env_reader = _gunicorn_reader()
    env_argv: list[str] = env_reader.cfg.get_cmd_args_from_env()
    env_options: dict[str, Any] = {}
    if env_argv:
        try:
            with contextlib.redirect_stderr(io.StringIO()) as captured:
                try:
                    parsed = env_reader.cfg.parser().parse_args(env_argv)
                except SystemExit:
                    lines = captured.getvalue().strip().splitlines()
                    raise ValueError(lines[-1] if lines else "invalid arguments") from None
        except ValueError as exc:
            return [Unreadable("Gunicorn", "GUNICORN_CMD_ARGS", str(exc))]
        env_options = {
            key: value
            for key, value in vars(parsed).items()
            if value is not None and key != "args"
        }

    locations: list[str] = []
    seen: set[str] = set()

    def add(location: str) -> None:
        if not location.startswith("python:"):
            filename = location.removeprefix("file:")
            location = str(resolve_path(filename, base_dir))
        if location not in seen:
            seen.add(location)
            locations.append(location)

    for path in paths:
        add(path)
    default = env_options.pop("config", None) or get_default_config_file()
    if default is not None:
        # Gunicorn resolves its own default (and GUNICORN_CMD_ARGS' -c) against the cwd.
        add(default if default.startswith("python:") else str(resolve_path(default, None)))

    results: list[GunicornConfig | Unreadable] = []
    if not locations:
        if not env_options:
            return results
        locations = [""]  # GUNICORN_CMD_ARGS alone
    for location in locations:
        reader = _gunicorn_reader()
        source = location or "GUNICORN_CMD_ARGS"
        namespace: Mapping[str, Any] = {}
        try:
            if location:
                namespace = _load_gunicorn_location(reader, location)
        except ValueError as exc:
            results.append(Unreadable("Gunicorn", source, str(exc)))
            continue
        try:
            for key, value in env_options.items():
                reader.cfg.set(key, value)
        except Exception as exc:
            results.append(Unreadable("Gunicorn", "GUNICORN_CMD_ARGS", _describe(exc)))
            continue
        results.append(
            GunicornConfig(
                source=source,
                max_requests=reader.cfg.max_requests,
                max_requests_jitter=reader.cfg.max_requests_jitter,
                uses_leakguard=_uses_leakguard(location, namespace),
            )
        )
    return results


# uWSGI ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class UwsgiConfig:
    """uWSGI options by name (dashes, lower case); a repeated option keeps its last value."""

    source: str
    options: Mapping[str, str]

    def has(self, *names: str) -> bool:
        """Tell whether any of the options is set to something other than 0 or false."""
        for name in names:
            value = self.options.get(name)
            if value is None:
                continue
            number = self.number(name)
            if number is None:
                if value.strip().lower() not in ("", "false", "no", "off"):
                    return True  # a placeholder or a size uWSGI resolves itself
            elif number > 0:
                return True
        return False

    def number(self, *names: str) -> int | None:
        """Return the first of the options that is set to an integer, else None."""
        for name in names:
            value = self.options.get(name)
            if value is not None and re.fullmatch(r"\s*-?\d+\s*", value):
                return int(value)
        return None


def _option_name(name: str) -> str:
    # uWSGI accepts max_requests for max-requests in config files.
    return name.strip().lower().replace("_", "-")


def _option_value(value: object) -> str:
    if isinstance(value, list):
        value = value[-1] if value else ""
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if value is True:
        return "true"
    return str(value)


def live_uwsgi_options() -> dict[str, str] | None:
    """Return the options of the uWSGI this process runs in, or None outside uWSGI."""
    try:
        import uwsgi  # type: ignore[import-untyped,unused-ignore]  # only inside uWSGI
    except ImportError:
        return None
    return {_option_name(str(key)): _option_value(value) for key, value in uwsgi.opt.items()}


def read_uwsgi_ini(path: Path, section: str = "uwsgi") -> UwsgiConfig:
    """Parse a uWSGI ini file; raise ValueError naming the problem when it cannot be read."""
    # uWSGI's ini dialect repeats keys, uses %(...) placeholders of its own and allows bare
    # flags; no DEFAULT section is merged into [uwsgi].
    parser = configparser.ConfigParser(
        interpolation=None, strict=False, allow_no_value=True, default_section="\x00"
    )
    try:
        with path.open(encoding="utf-8") as handle:
            parser.read_file(handle, source=str(path))
    except (OSError, UnicodeDecodeError, configparser.Error) as exc:
        raise ValueError(_describe(exc)) from None
    if not parser.has_section(section):
        raise ValueError(f"it has no [{section}] section")
    options = {
        _option_name(key): "true" if value is None else value
        for key, value in parser.items(section, raw=True)
    }
    return UwsgiConfig(str(path), options)


def read_uwsgi_configs(
    paths: Sequence[str], base_dir: Path | None
) -> list[UwsgiConfig | Unreadable]:
    """Read the running uWSGI's options, else the ini files in paths, else ./uwsgi.ini."""
    live = live_uwsgi_options()
    if live is not None:
        return [UwsgiConfig("of the running uWSGI", live)]
    candidates: list[tuple[Path, str]] = []
    for entry in paths:
        name, section = entry, "uwsgi"
        # uWSGI's --ini file.ini:section form.
        if not resolve_path(entry, base_dir).exists() and ":" in entry:
            name, _, section = entry.rpartition(":")
        candidates.append((resolve_path(name, base_dir), section or "uwsgi"))
    if not paths:
        for directory in (base_dir, Path.cwd()):
            if directory is not None and (directory / "uwsgi.ini").is_file():
                candidates.append((directory / "uwsgi.ini", "uwsgi"))
    results: list[UwsgiConfig | Unreadable] = []
    seen: set[tuple[Path, str]] = set()
    for path, section in candidates:
        key = (path.resolve(), section)
        if key in seen:
            continue
        seen.add(key)
        try:
            results.append(read_uwsgi_ini(path, section))
        except ValueError as exc:
            results.append(Unreadable("uWSGI", str(path), str(exc)))
    return results


def uwsgi_version() -> tuple[int, ...] | None:
    """Return the version of the running uWSGI, else of the installed one; None when unknown."""
    try:
        import uwsgi
    except ImportError:
        text = installed_uwsgi_version()
    else:
        text = _option_value(uwsgi.version)
    try:
        return parse_version(text) if text is not None else None
    except ValueError:  # pragma: no cover - a uwsgi binary that prints no version number
        return None


# Celery ---------------------------------------------------------------------------------------


def _import_object(dotted: str) -> object:
    """Import "package.module.attr" or "package.module:attr"."""
    if ":" in dotted:
        module_name, _, attr = dotted.partition(":")
    else:
        module_name, _, attr = dotted.rpartition(".")
    if not module_name or not attr:
        raise ImportError(f"{dotted!r} is not a dotted path such as 'myproject.celery.app'")
    module = importlib.import_module(module_name)
    try:
        return getattr(module, attr)
    except AttributeError:
        raise ImportError(f"module {module_name!r} has no attribute {attr!r}") from None


def find_celery_app(dotted: str | None) -> tuple[str, Celery] | Unreadable | None:
    """Return (name, app) for LEAKGUARD['CELERY_APP'], else the project's current Celery app.

    Without CELERY_APP, an app counts only when the project created one (Celery apps make
    themselves current) or set one as default; the fallback app Celery creates on demand does
    not, and none is created here.
    """
    if dotted:
        try:
            from celery import Celery

            app = _import_object(dotted)
        except Exception as exc:
            return Unreadable("Celery", dotted, _describe(exc))
        if not isinstance(app, Celery):
            return Unreadable("Celery", dotted, f"it is {type(app).__name__}, not a Celery app")
        return dotted, app
    if "celery" not in sys.modules:
        return None  # the project has not imported Celery, so it has no app
    from celery import _state

    # celery-types does not describe celery._state; these names exist since Celery 4.
    state: Any = _state
    current: Celery | None = getattr(state._tls, "current_app", None) or state.default_app
    if current is None or (
        current.main == "default" and not getattr(current, "set_as_current", True)
    ):
        return None
    return current.main or repr(current), current
