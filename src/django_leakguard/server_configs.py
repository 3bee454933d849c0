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
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from django_leakguard.recycling import installed_uwsgi_version, parse_version

if TYPE_CHECKING:
    from celery import Celery

    from django_leakguard import discovery

GUNICORN_CONF_MODULE = "django_leakguard.gunicorn_conf"


@dataclass(frozen=True)
class Unreadable:
    """A server config that exists (or was named) but cannot be loaded."""

    server: str
    source: str
    error: str
    hint: str = ""  # what to do, when it is not to fix the file (see checks._unreadable)


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


def _parse_gunicorn_args(reader: Any, argv: Sequence[str]) -> dict[str, Any]:
    """Return the options a Gunicorn command line sets; raise ValueError when it does not parse."""
    with contextlib.redirect_stderr(io.StringIO()) as captured:
        try:
            parsed = reader.cfg.parser().parse_args(list(argv))
        except SystemExit:
            lines = captured.getvalue().strip().splitlines()
            raise ValueError(lines[-1] if lines else "invalid arguments") from None
    return {
        key: value for key, value in vars(parsed).items() if value is not None and key != "args"
    }


def _gunicorn_location(location: str, locate: Callable[[str], Path]) -> str:
    """A -c value: a python: module as it is, else the file it names, found by locate."""
    if location.startswith("python:"):
        return location
    return str(locate(location.removeprefix("file:")))


def _not_in_project(server: str, path: str, command: discovery.Command) -> Unreadable:
    """A path of the image that a Dockerfile's command names, with no copy in the project."""
    setting = "GUNICORN_CONFIG" if server == "Gunicorn" else "UWSGI_INI"
    return Unreadable(
        server,
        path,
        f"{command.source} names it in the image, and no copy of it was found in the project",
        hint=f"Name the project's copy of it in LEAKGUARD[{setting!r}].",
    )


def read_gunicorn_configs(
    paths: Sequence[str], base_dir: Path | None
) -> list[GunicornConfig | Unreadable]:
    """Read the Gunicorn configs in use, with the command-line options that apply on top.

    The configs in paths when set (they say which configs Gunicorn really loads); else the -c
    of GUNICORN_CMD_ARGS; else the gunicorn commands of the project's Procfiles and Dockerfiles
    (each with its -c, or the gunicorn.conf.py of its directory, and its options); else the
    config files found where projects keep them (discovery.py). The options in
    GUNICORN_CMD_ARGS override every file's values, as they do when Gunicorn starts; a
    command's own options override both. When nothing is found but GUNICORN_CMD_ARGS is set,
    the environment alone is one config.
    """
    try:
        import gunicorn.config  # type: ignore[import-untyped]  # noqa: F401
    except ImportError:  # pragma: no cover - Gunicorn is installed wherever the tests run
        return []
    from django_leakguard import discovery

    env_options: dict[str, Any] = {}
    env_argv: list[str] = _gunicorn_reader().cfg.get_cmd_args_from_env()
    if env_argv:
        try:
            env_options = _parse_gunicorn_args(_gunicorn_reader(), env_argv)
        except ValueError as exc:
            return [Unreadable("Gunicorn", "GUNICORN_CMD_ARGS", str(exc))]
    env_config = env_options.pop("config", None)
    results: list[GunicornConfig | Unreadable] = []
    # (location, name when there is no file, options on top of the file's)
    runs: list[tuple[str, str, dict[str, Any]]] = []
    if paths:
        runs = [
            (_gunicorn_location(path, lambda name: resolve_path(name, base_dir)), "", env_options)
            for path in paths
        ]
    elif env_config:
        # Gunicorn resolves GUNICORN_CMD_ARGS' -c against the current directory.
        location = _gunicorn_location(env_config, lambda name: resolve_path(name, None))
        runs = [(location, "", env_options)]
    else:
        for command in discovery.find_commands(base_dir, "gunicorn"):
            try:
                options = _parse_gunicorn_args(_gunicorn_reader(), command.args)
            except ValueError as exc:
                results.append(Unreadable("Gunicorn", command.source, str(exc)))
                continue
            config = options.pop("config", None)
            default = command.locate("gunicorn.conf.py")
            location = (
                _gunicorn_location(config, command.locate)
                if config
                else str(default)
                if default.is_file()
                else ""
            )
            in_image = command.in_image and not location.startswith("python:")
            if in_image and location and not Path(location).exists():
                results.append(_not_in_project("Gunicorn", location, command))
                continue
            runs.append((location, command.source, {**env_options, **options}))
        if not runs and not results:
            found = discovery.find_files(discovery.GUNICORN_FILES, base_dir)
            runs = [(str(path), "", env_options) for path in found]
    if not runs and not results and env_options:
        runs = [("", "GUNICORN_CMD_ARGS", env_options)]
    seen: set[tuple[str, str]] = set()
    for location, name, options in runs:
        if (location, name) in seen:
            continue
        seen.add((location, name))
        results.append(_read_gunicorn_run(location, name, options))
    return results


def _read_gunicorn_run(
    location: str, name: str, options: Mapping[str, Any]
) -> GunicornConfig | Unreadable:
    """Load one config (location, or none) and apply options on top."""
    reader = _gunicorn_reader()
    source = location or name
    namespace: Mapping[str, Any] = {}
    try:
        if location:
            namespace = _load_gunicorn_location(reader, location)
    except ValueError as exc:
        return Unreadable("Gunicorn", source, str(exc))
    try:
        for key, value in options.items():
            reader.cfg.set(key, value)
    except Exception as exc:
        return Unreadable("Gunicorn", name or "GUNICORN_CMD_ARGS", _describe(exc))
    return GunicornConfig(
        source=source,
        max_requests=reader.cfg.max_requests,
        max_requests_jitter=reader.cfg.max_requests_jitter,
        uses_leakguard=_uses_leakguard(location, namespace),
    )


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


def uwsgi_options(opt: Mapping[Any, object]) -> dict[str, str]:
    """Return uWSGI options as uwsgi.opt holds them (bytes, lists of repeated values) by name,
    as UwsgiConfig takes them."""
    return {_option_name(str(key)): _option_value(value) for key, value in opt.items()}


def live_uwsgi_options() -> dict[str, str] | None:
    """Return the options of the uWSGI this process runs in, or None outside uWSGI."""
    try:
        import uwsgi  # type: ignore[import-untyped,unused-ignore]  # only inside uWSGI
    except ImportError:
        return None
    return uwsgi_options(uwsgi.opt)


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
    """Read the running uWSGI's options, else the ini files in paths, else the uwsgi commands
    of the project's Procfiles and Dockerfiles, else the uwsgi.ini files found where projects
    keep them (discovery.py)."""
    from django_leakguard import discovery

    live = live_uwsgi_options()
    if live is not None:
        return [UwsgiConfig("of the running uWSGI", live)]
    candidates = [
        _ini_candidate(entry, lambda name: resolve_path(name, base_dir)) for entry in paths
    ]
    results: list[UwsgiConfig | Unreadable] = []
    if not paths:
        commands = discovery.find_commands(base_dir, "uwsgi")
        for command in commands:
            results.append(_read_uwsgi_command(command))
        if not commands:
            candidates = [
                (path, "uwsgi") for path in discovery.find_files(discovery.UWSGI_FILES, base_dir)
            ]
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


def _ini_candidate(entry: str, locate: Callable[[str], Path]) -> tuple[Path, str]:
    name, section = entry, "uwsgi"
    # uWSGI's --ini file.ini:section form.
    if not locate(entry).exists() and ":" in entry:
        name, _, section = entry.rpartition(":")
    return locate(name), section or "uwsgi"


# uWSGI's one-letter options that matter to the checks.
_UWSGI_SHORT = {"-R": "max-requests", "-p": "processes", "-M": "master"}


def _read_uwsgi_command(command: discovery.Command) -> UwsgiConfig | Unreadable:
    """Return the options of a uwsgi command line: its ini file's, with its own on top."""
    args = command.args
    options: dict[str, str] = {}
    ini: tuple[Path, str] | None = None
    index = 0
    while index < len(args):
        word = args[index]
        index += 1
        name, value = "", "true"
        if word.startswith("--"):
            name, equals, value = word[2:].partition("=")
            if not equals:
                value = "true"
                if index < len(args) and not args[index].startswith("-"):
                    value = args[index]
                    index += 1
        elif word in _UWSGI_SHORT:
            name = _UWSGI_SHORT[word]
            if name != "master" and index < len(args):
                value = args[index]
                index += 1
        elif word.endswith(".ini") or ".ini:" in word:
            name, value = "ini", word
        if name == "ini":
            ini = _ini_candidate(value, command.locate)
        elif name:
            options[_option_name(name)] = value
    if ini is None:
        return UwsgiConfig(command.source, options)
    if command.in_image and not ini[0].exists():
        return _not_in_project("uWSGI", str(ini[0]), command)
    try:
        config = read_uwsgi_ini(*ini)
    except ValueError as exc:
        return Unreadable("uWSGI", str(ini[0]), str(exc))
    return UwsgiConfig(config.source, {**config.options, **options})


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
