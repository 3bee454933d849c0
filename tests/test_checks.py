from __future__ import annotations

import os
import subprocess
import sys
import types
from io import StringIO
from pathlib import Path

import pytest
from celery import Celery
from celery.concurrency.prefork import TaskPool
from celery.concurrency.solo import TaskPool as SoloPool
from django.core import checks
from django.core.management import call_command
from django.test import override_settings

from django_leakguard import server_configs
from django_leakguard.checks import MIDDLEWARE_PATH
from django_leakguard.middleware import LeakGuardMiddleware

ROOT = Path(__file__).resolve().parent.parent

# Targets for LEAKGUARD["CELERY_APP"]; never the current app, so other tests do not see them.
DOTTED_APP = Celery("dotted", set_as_current=False)
LIMITED_DOTTED_APP = Celery("limited", set_as_current=False)
LIMITED_DOTTED_APP.conf.worker_max_tasks_per_child = 10
NOT_AN_APP = object()
GUNICORN_CONF = "django_leakguard.gunicorn_conf"


class SubclassMiddleware(LeakGuardMiddleware):
    pass


class CustomPool(TaskPool):
    pass


@pytest.fixture(autouse=True)
def isolated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Run each check in an empty directory, without GUNICORN_CMD_ARGS or a current Celery app."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("GUNICORN_CMD_ARGS", raising=False)
    # Celery keeps the last app created as the process's current app: give each test a clean
    # slate and put back whatever other tests had (state, not behaviour, is replaced here).
    from celery import _state

    monkeypatch.setattr(_state._tls, "current_app", None)
    monkeypatch.setattr(_state, "default_app", None)
    return tmp_path


def run() -> list[checks.CheckMessage]:
    # leakguard.I001 (no server config found) has tests of its own.
    return [
        message
        for message in checks.run_checks(tags=["leakguard"])
        if message.id != "leakguard.I001"
    ]


def ids() -> list[str]:
    return sorted(message.id or "" for message in run())


def only(check_id: str) -> checks.CheckMessage:
    messages = run()
    assert [message.id for message in messages] == [check_id], messages
    return messages[0]


def test_checks_are_registered_with_the_leakguard_tag() -> None:
    names = {check.__name__ for check in checks.registry.registry.get_checks()}
    assert {
        "check_settings",
        "check_middleware",
        "check_gunicorn",
        "check_uwsgi",
        "check_celery",
        "check_app_installed",
        "check_tables",
    } <= names


def test_a_configured_project_is_silent() -> None:
    assert run() == []


# leakguard.E001


@override_settings(LEAKGUARD={"MAX_REQUEST": 5, "MAX_KEYS": 0})
def test_e001_one_error_per_problem_and_other_checks_wait() -> None:
    messages = run()
    assert [message.id for message in messages] == ["leakguard.E001", "leakguard.E001"]
    assert messages[0].level == checks.ERROR
    assert "'MAX_REQUEST'" in messages[0].msg
    assert "'MAX_REQUESTS'" in (messages[0].hint or "")
    assert "MAX_KEYS" in messages[1].msg
    assert "0" in messages[1].msg


@override_settings(LEAKGUARD=["MAX_REQUESTS"], MIDDLEWARE=[])
def test_e001_not_a_dict() -> None:
    message = only("leakguard.E001")
    assert "should be a dict, got list" in message.msg


# leakguard.W008, W009


@override_settings(MIDDLEWARE=[])
def test_w008_middleware_missing() -> None:
    message = only("leakguard.W008")
    assert message.level == checks.WARNING
    assert "leakreport" in message.msg
    assert MIDDLEWARE_PATH in (message.hint or "")


@override_settings(MIDDLEWARE=[], LEAKGUARD={"RECORD": False})
def test_w008_silent_when_recording_is_off() -> None:
    assert run() == []


@override_settings(MIDDLEWARE=["tests.test_checks.SubclassMiddleware"])
def test_w008_accepts_a_subclass() -> None:
    assert run() == []


@override_settings(
    MIDDLEWARE=["django.middleware.common.CommonMiddleware", "no.such.Middleware", MIDDLEWARE_PATH]
)
def test_w009_middleware_not_first() -> None:
    message = only("leakguard.W009")
    assert "'django.middleware.common.CommonMiddleware', 'no.such.Middleware'" in message.msg
    assert message.hint == f"Move {MIDDLEWARE_PATH!r} to the top of MIDDLEWARE."


@override_settings(MIDDLEWARE=[MIDDLEWARE_PATH, "django.middleware.common.CommonMiddleware"])
def test_w009_silent_when_first() -> None:
    assert run() == []


# Gunicorn: leakguard.W001, W002, W010


def test_w001_default_gunicorn_conf_without_max_requests(isolated: Path) -> None:
    (isolated / "gunicorn.conf.py").write_text("workers = 3\n")
    message = only("leakguard.W001")
    assert str(isolated / "gunicorn.conf.py") in message.msg
    assert "`max_requests = 1000`, `max_requests_jitter = 50`" in (message.hint or "")
    assert "django_leakguard.gunicorn_conf" in (message.hint or "")


def test_w001_max_requests_zero(isolated: Path) -> None:
    (isolated / "gunicorn.conf.py").write_text("max_requests = 0\nmax_requests_jitter = 5\n")
    assert ids() == ["leakguard.W001"]


def test_w002_max_requests_without_jitter(isolated: Path) -> None:
    (isolated / "gunicorn.conf.py").write_text("max_requests = 2000\n")
    message = only("leakguard.W002")
    assert "max_requests = 2000" in message.msg
    assert "`max_requests_jitter = 100`" in (message.hint or "")


def test_gunicorn_conf_with_both_is_silent(isolated: Path) -> None:
    (isolated / "gunicorn.conf.py").write_text("max_requests = 2000\nmax_requests_jitter = 100\n")
    assert run() == []
    assert "__config__" not in sys.modules  # Gunicorn's temporary module is not left behind


def test_gunicorn_cmd_args_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GUNICORN_CMD_ARGS", "--workers 3 --max-requests 500")
    message = only("leakguard.W002")
    assert "GUNICORN_CMD_ARGS" in message.msg
    assert message.hint == "Add --max-requests-jitter 25 to GUNICORN_CMD_ARGS."


def test_gunicorn_cmd_args_without_max_requests(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GUNICORN_CMD_ARGS", "--workers 3")
    message = only("leakguard.W001")
    assert message.hint == "Add --max-requests 1000 --max-requests-jitter 50 to GUNICORN_CMD_ARGS."


def test_gunicorn_cmd_args_override_the_file(
    isolated: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (isolated / "gunicorn.conf.py").write_text("workers = 3\n")
    monkeypatch.setenv("GUNICORN_CMD_ARGS", "--max-requests 500 --max-requests-jitter 20")
    assert run() == []


def test_gunicorn_cmd_args_config_replaces_the_default(
    isolated: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (isolated / "gunicorn.conf.py").write_text("max_requests = 0\n")
    (isolated / "prod.py").write_text("max_requests = 100\n")
    monkeypatch.setenv("GUNICORN_CMD_ARGS", "-c prod.py")
    message = only("leakguard.W002")
    assert str(isolated / "prod.py") in message.msg


def test_gunicorn_cmd_args_that_do_not_parse(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GUNICORN_CMD_ARGS", "--max-requests lots")
    message = only("leakguard.W010")
    assert message.msg.startswith("The Gunicorn config GUNICORN_CMD_ARGS cannot be read: ")
    assert "invalid int value: 'lots'" in message.msg


def test_gunicorn_cmd_args_with_an_invalid_value(
    isolated: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (isolated / "gunicorn.conf.py").write_text("workers = 3\n")
    monkeypatch.setenv("GUNICORN_CMD_ARGS", "--max-requests -5")
    message = only("leakguard.W010")
    assert "GUNICORN_CMD_ARGS" in message.msg
    assert "-5" in message.msg


def test_gunicorn_config_setting_relative_to_base_dir(isolated: Path) -> None:
    (isolated / "deploy").mkdir()
    (isolated / "deploy" / "gunicorn_prod.py").write_text("max_requests = 100\n")
    (isolated / "deploy" / "gunicorn_ok.py").write_text(
        "max_requests = 100\nmax_requests_jitter = 10\n"
    )
    elsewhere = isolated / "elsewhere"
    elsewhere.mkdir()
    os.chdir(elsewhere)
    with override_settings(
        BASE_DIR=isolated,
        LEAKGUARD={"GUNICORN_CONFIG": ["deploy/gunicorn_prod.py", "file:deploy/gunicorn_ok.py"]},
    ):
        message = only("leakguard.W002")
    assert str(isolated / "deploy" / "gunicorn_prod.py") in message.msg


def test_gunicorn_config_listed_twice_is_read_once(isolated: Path) -> None:
    (isolated / "gunicorn.conf.py").write_text("workers = 2\n")
    with override_settings(
        LEAKGUARD={"GUNICORN_CONFIG": [str(isolated / "gunicorn.conf.py"), "gunicorn.conf.py"]}
    ):
        assert ids() == ["leakguard.W001"]
    with override_settings(LEAKGUARD={"UWSGI_INI": ["x.ini", str(isolated / "x.ini")]}):
        assert ids() == ["leakguard.W001", "leakguard.W010"]


@override_settings(
    LEAKGUARD={"GUNICORN_CONFIG": "python:django_leakguard.gunicorn_conf", "MAX_REQUESTS": 0}
)
def test_gunicorn_leakguard_module_counts_as_configured() -> None:
    assert run() == []


@override_settings(LEAKGUARD={"MAX_REQUESTS": 0})
def test_gunicorn_conf_using_leakguard_settings_counts_as_configured(isolated: Path) -> None:
    (isolated / "gunicorn.conf.py").write_text(
        "from django_leakguard.gunicorn_conf import leakguard_settings\n"
        "workers = 2\n"
        "globals().update(leakguard_settings(globals()))\n"
    )
    assert run() == []


@override_settings(LEAKGUARD={"MAX_REQUESTS": 0})
def test_gunicorn_conf_importing_the_leakguard_module_counts_as_configured(isolated: Path) -> None:
    (isolated / "gunicorn.conf.py").write_text(
        "from django_leakguard import gunicorn_conf\npost_request = gunicorn_conf.post_request\n"
    )
    assert run() == []


def test_gunicorn_config_module_of_another_program_is_put_back(
    isolated: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    theirs = types.ModuleType("__config__")
    monkeypatch.setitem(sys.modules, "__config__", theirs)
    (isolated / "gunicorn.conf.py").write_text("max_requests = 2000\nmax_requests_jitter = 100\n")
    assert run() == []
    assert sys.modules["__config__"] is theirs


def test_gunicorn_conf_with_a_syntax_error_warns(isolated: Path) -> None:
    (isolated / "gunicorn.conf.py").write_text("max_requests = = 1\n")
    message = only("leakguard.W010")
    assert str(isolated / "gunicorn.conf.py") in message.msg
    assert "SyntaxError" in message.msg
    assert "line 1" in message.msg
    assert "Fix " in (message.hint or "")


def test_gunicorn_conf_that_raises_warns(isolated: Path) -> None:
    (isolated / "gunicorn.conf.py").write_text("import no_such_module_for_leakguard\n")
    message = only("leakguard.W010")
    assert "ModuleNotFoundError: No module named 'no_such_module_for_leakguard'" in message.msg


def test_gunicorn_conf_that_exits_warns(isolated: Path) -> None:
    (isolated / "gunicorn.conf.py").write_text("import sys\nsys.exit(3)\n")
    assert "SystemExit: 3" in only("leakguard.W010").msg


def test_gunicorn_conf_with_an_invalid_value_warns(isolated: Path) -> None:
    (isolated / "gunicorn.conf.py").write_text("max_requests = 'lots'\n")
    message = only("leakguard.W010")
    assert "Invalid value for max_requests: lots" in message.msg


@override_settings(LEAKGUARD={"GUNICORN_CONFIG": ["missing.py", "python:no_such_module_lg"]})
def test_gunicorn_configs_that_cannot_be_found_warn(isolated: Path) -> None:
    messages = run()
    assert [message.id for message in messages] == ["leakguard.W010", "leakguard.W010"]
    assert f"{isolated / 'missing.py'}' doesn't exist" in messages[0].msg
    assert "python:no_such_module_lg" in messages[1].msg
    assert "No module named 'no_such_module_lg'" in messages[1].msg


# uWSGI: leakguard.W003, W004, W005, W010, W012


def write_ini(path: Path, body: str) -> Path:
    path.write_text(body)
    return path


def test_w003_uwsgi_ini_without_recycling(isolated: Path) -> None:
    write_ini(isolated / "uwsgi.ini", "[uwsgi]\nmodule = app\nprocesses = 4\nmaster\n")
    message = only("leakguard.W003")
    assert str(isolated / "uwsgi.ini") in message.msg
    assert message.hint == (
        f"Add `max-requests = 1000` to the [uwsgi] section of {isolated / 'uwsgi.ini'}."
    )


def test_w003_zero_is_not_recycling(isolated: Path) -> None:
    write_ini(isolated / "uwsgi.ini", "[uwsgi]\nmax-requests = 0\nreload-on-rss = false\n")
    assert ids() == ["leakguard.W003"]


@pytest.mark.parametrize(
    "option", ["reload-on-rss = 512", "evil-reload-on-rss = 512", "reload_on_rss = 512"]
)
def test_w003_silent_with_reload_on_rss(isolated: Path, option: str) -> None:
    write_ini(isolated / "uwsgi.ini", f"[uwsgi]\nprocesses = 4\n{option}\n")
    assert run() == []


def test_w004_max_requests_without_delta(isolated: Path) -> None:
    write_ini(isolated / "uwsgi.ini", "[uwsgi]\nworkers = 4\nmax_requests = 1000\n")
    message = only("leakguard.W004")
    assert "4 processes" in message.msg
    # 1000 x 0.05 spread over the 3 workers after the first.
    assert "`max-requests-delta = 17`" in (message.hint or "")
    assert "2.0.29" in (message.hint or "")


@pytest.mark.parametrize(
    "body",
    [
        "processes = 4\nmax-requests = 1000\nmax-requests-delta = 10\n",
        "processes = 1\nmax-requests = 1000\n",
        "max-requests = 1000\n",
        "processes = %(cores)\nmax-requests = 1000\n",
    ],
)
def test_w004_silent(isolated: Path, body: str) -> None:
    write_ini(isolated / "uwsgi.ini", "[uwsgi]\n" + body)
    assert run() == []


def test_w004_silent_on_a_uwsgi_without_the_option(
    isolated: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A uWSGI older than 2.0.29 cannot be installed next to the current one here: replace the
    # version probe (the only mock in this module).
    monkeypatch.setattr(server_configs, "uwsgi_version", lambda: (2, 0, 28))
    write_ini(isolated / "uwsgi.ini", "[uwsgi]\nprocesses = 4\nmax-requests = 1000\n")
    assert run() == []
    monkeypatch.setattr(server_configs, "uwsgi_version", lambda: None)
    assert ids() == ["leakguard.W004"]


def test_w005_spooler_without_max_tasks(isolated: Path) -> None:
    write_ini(
        isolated / "uwsgi.ini",
        "[uwsgi]\nmax-requests = 1000\nspooler = /tmp/a\nspooler = /tmp/b\n",
    )
    message = only("leakguard.W005")
    assert "`spooler-max-tasks = 500`" in (message.hint or "")


def test_w005_silent_with_max_tasks(isolated: Path) -> None:
    write_ini(
        isolated / "uwsgi.ini",
        "[uwsgi]\nmax-requests = 1000\nspooler = /tmp/a\nspooler-max-tasks = 100\n",
    )
    assert run() == []


def test_w012_uwsgi_without_threads_on_a_release_that_does_not_enable_them(
    isolated: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(server_configs, "uwsgi_version", lambda: (2, 0, 26))
    write_ini(isolated / "uwsgi.ini", "[uwsgi]\nmax-requests = 1000\nthreads = 1\n")
    message = only("leakguard.W012")
    assert "flush thread only runs while requests run" in message.msg
    assert message.hint == (
        f"Add `enable-threads = true` to the [uwsgi] section of {isolated / 'uwsgi.ini'}."
    )


@pytest.mark.parametrize(
    ("version", "body"),
    [
        ((2, 0, 26), "enable-threads = true\n"),
        ((2, 0, 26), "enable-threads\n"),
        ((2, 0, 26), "threads = 4\n"),
        ((2, 0, 26), "threads = %(cores)\n"),
        ((2, 0, 27), ""),  # threads on by default since 2.0.27
        (None, ""),  # unknown: taken to be a current uWSGI
    ],
)
def test_w012_silent(
    isolated: Path, monkeypatch: pytest.MonkeyPatch, version: object, body: str
) -> None:
    monkeypatch.setattr(server_configs, "uwsgi_version", lambda: version)
    write_ini(isolated / "uwsgi.ini", "[uwsgi]\nmax-requests = 1000\n" + body)
    assert run() == []


def test_uwsgi_ini_dialect_is_tolerated(isolated: Path) -> None:
    write_ini(
        isolated / "uwsgi.ini",
        "; a comment\n[uwsgi]\nmaxreq = 1000\nmax-requests = %(maxreq)\nprocesses = 1\n"
        "env = A=1\nenv = B=2\nplugins = python3\n[uwsgi]\nharakiri = 30\n[DEFAULT]\nx = 1\n",
    )
    assert run() == []


def test_uwsgi_ini_in_base_dir(isolated: Path) -> None:
    project = isolated / "project"
    project.mkdir()
    write_ini(project / "uwsgi.ini", "[uwsgi]\nmodule = app\n")
    with override_settings(BASE_DIR=str(project)):
        message = only("leakguard.W003")
    assert str(project / "uwsgi.ini") in message.msg


def test_uwsgi_ini_in_base_dir_and_cwd_is_read_once(isolated: Path) -> None:
    write_ini(isolated / "uwsgi.ini", "[uwsgi]\nmodule = app\n")
    with override_settings(BASE_DIR=isolated):
        assert ids() == ["leakguard.W003"]


def test_uwsgi_ini_setting_with_a_section(isolated: Path) -> None:
    write_ini(
        isolated / "deploy.ini",
        "[uwsgi]\nmax-requests = 100\n[prod]\nprocesses = 8\nmax-requests = 100\n",
    )
    write_ini(isolated / "uwsgi.ini", "[uwsgi]\nmodule = app\n")  # not read: UWSGI_INI wins
    with override_settings(BASE_DIR=isolated, LEAKGUARD={"UWSGI_INI": "deploy.ini:prod"}):
        message = only("leakguard.W004")
    assert "8 processes" in message.msg


@pytest.mark.parametrize(
    ("body", "error"),
    [
        ("max-requests = 100\n", "MissingSectionHeaderError"),
        ("[uwsgi\nmax-requests = 100\n", "MissingSectionHeaderError"),
        ("[app]\nmax-requests = 100\n", "it has no [uwsgi] section"),
        (b"[uwsgi]\nmodule = \xff\n", "UnicodeDecodeError"),
    ],
)
def test_uwsgi_ini_that_does_not_parse_warns(
    isolated: Path, body: str | bytes, error: str
) -> None:
    path = isolated / "uwsgi.ini"
    if isinstance(body, bytes):
        path.write_bytes(body)
    else:
        path.write_text(body)
    message = only("leakguard.W010")
    assert message.msg.startswith(f"The uWSGI config {path} cannot be read: ")
    assert error in message.msg


@override_settings(LEAKGUARD={"UWSGI_INI": ["missing.ini"]})
def test_uwsgi_ini_that_is_missing_warns() -> None:
    assert "FileNotFoundError" in only("leakguard.W010").msg


@pytest.mark.servers
def test_uwsgi_live_options_under_a_running_uwsgi(tmp_path: Path) -> None:
    """Run the checks inside a real uWSGI (--pyrun), where they read uwsgi.opt."""
    # Under `coverage run`, measure the script too: uWSGI's embedded Python starts no coverage.
    coverage_file = ""
    measuring = "coverage" in sys.modules and sys.modules["coverage"].Coverage.current()
    if measuring:
        coverage_file = str(ROOT / os.environ.get("COVERAGE_FILE", ".coverage"))
    script = tmp_path / "run_checks.py"
    script.write_text(
        "import json, os, sys\n"
        f"sys.path[:0] = [{str(ROOT)!r}, {str(ROOT / 'testproject')!r}]\n"
        "os.environ['DJANGO_SETTINGS_MODULE'] = 'tests.settings'\n"
        "cov = None\n"
        f"if {coverage_file!r}:\n"
        "    import coverage\n"
        f"    cov = coverage.Coverage(data_file={coverage_file!r}, data_suffix=True,\n"
        f"                            config_file={str(ROOT / 'pyproject.toml')!r})\n"
        "    cov.start()\n"
        "import django\n"
        "django.setup()\n"
        "from django.core import checks\n"
        # The in-memory database has no tables (leakguard.W011): not what this test is about.
        "found = [(m.id, m.msg) for m in checks.run_checks(tags=['leakguard'])\n"
        "         if m.id != 'leakguard.W011']\n"
        "if cov is not None:\n"
        "    cov.stop()\n"
        "    cov.save()\n"
        "print('RESULT', json.dumps(found), flush=True)\n"
    )
    (tmp_path / "uwsgi.ini").write_text("[uwsgi]\nmodule = ignored.when.live\n")
    uwsgi = Path(sys.executable).with_name("uwsgi")
    spool = tmp_path / "spool"
    spool.mkdir()
    completed = subprocess.run(
        [
            str(uwsgi),
            "--pyrun",
            str(script),
            "--master",
            "--processes",
            "3",
            "--max-requests",
            "100",
            "--spooler",
            str(spool),
            "--home",
            str(Path(sys.prefix)),
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    output = completed.stdout + completed.stderr  # uWSGI sends the script's stdout to its log
    lines = [line for line in output.splitlines() if line.startswith("RESULT ")]
    assert lines, output
    import json

    found = json.loads(lines[0].removeprefix("RESULT "))
    assert [check_id for check_id, _ in found] == ["leakguard.W004", "leakguard.W005"]
    assert "The uWSGI config of the running uWSGI sets max-requests" in found[0][1]


# Celery: leakguard.W006, W007, W010


def test_w006_current_app_without_limits() -> None:
    app = Celery("proj")
    message = only("leakguard.W006")
    assert "'proj'" in message.msg
    assert "django_leakguard.celery.configure(app)" in (message.hint or "")
    assert "worker_max_tasks_per_child = 100" in (message.hint or "")
    del app


@pytest.mark.parametrize("setting", ["worker_max_tasks_per_child", "worker_max_memory_per_child"])
def test_w006_silent_with_a_limit(setting: str) -> None:
    app = Celery("proj")
    app.conf[setting] = 1000
    assert run() == []


def test_w006_silent_when_configured_by_leakguard() -> None:
    from django_leakguard.celery import configure

    app = Celery("proj")
    configure(app)
    assert run() == []


def test_w006_reads_celery_namespaced_django_settings() -> None:
    app = Celery("proj")
    app.config_from_object("django.conf:settings", namespace="CELERY")
    message = only("leakguard.W006")
    assert "CELERY_WORKER_MAX_TASKS_PER_CHILD = 100" in (message.hint or "")

    app = Celery("proj")
    app.config_from_object("django.conf:settings", namespace="CELERY")
    with override_settings(CELERY_WORKER_MAX_TASKS_PER_CHILD=50):
        assert run() == []


def test_celery_app_set_as_default() -> None:
    app = Celery("proj", set_as_current=False)
    app.set_default()
    assert ids() == ["leakguard.W006"]


def test_celery_fallback_app_is_not_the_projects() -> None:
    from celery import current_app

    assert current_app.main == "default"  # Celery creates its fallback app on demand
    assert run() == []


@override_settings(LEAKGUARD={"CELERY_APP": "tests.test_checks.DOTTED_APP"})
def test_w006_celery_app_setting() -> None:
    Celery("current-but-not-named")  # CELERY_APP wins over the current app
    message = only("leakguard.W006")
    assert "'tests.test_checks.DOTTED_APP'" in message.msg


@override_settings(LEAKGUARD={"CELERY_APP": "tests.test_checks:LIMITED_DOTTED_APP"})
def test_celery_app_setting_with_a_colon() -> None:
    assert run() == []


@pytest.mark.parametrize(
    ("dotted", "error"),
    [
        ("tests.test_checks.NOT_AN_APP", "it is object, not a Celery app"),
        ("tests.test_checks.MISSING", "has no attribute 'MISSING'"),
        ("tests.no_such_module.app", "No module named 'tests.no_such_module'"),
        ("app", "is not a dotted path"),
    ],
)
def test_celery_app_setting_that_does_not_load_warns(dotted: str, error: str) -> None:
    with override_settings(LEAKGUARD={"CELERY_APP": dotted}):
        message = only("leakguard.W010")
    assert message.msg.startswith(f"The Celery config {dotted} cannot be read: ")
    assert error in message.msg


def test_celery_app_whose_config_does_not_load_warns() -> None:
    app = Celery("proj")
    app.config_from_object("tests.no_such_celeryconfig")
    message = only("leakguard.W010")
    assert "'proj'" in message.msg
    assert "no_such_celeryconfig" in message.msg


@pytest.mark.parametrize("pool", ["solo", "threads", "gevent", "eventlet", SoloPool])
def test_w007_limits_on_a_pool_that_ignores_them(pool: object) -> None:
    app = Celery("proj")
    app.conf.worker_max_tasks_per_child = 100
    app.conf.worker_pool = pool
    message = only("leakguard.W007")
    assert "only the prefork pool recycles" in message.msg
    assert "worker_pool = 'prefork'" in (message.hint or "")


def test_w007_configured_by_leakguard_on_solo_warns_with_the_namespaced_setting() -> None:
    from django_leakguard.celery import configure

    app = Celery("proj")
    app.config_from_object("django.conf:settings", namespace="CELERY")
    configure(app)
    with override_settings(CELERY_WORKER_POOL="solo"):
        message = only("leakguard.W007")
    assert "'solo'" in message.msg
    assert "CELERY_WORKER_POOL = 'prefork'" in (message.hint or "")


@pytest.mark.parametrize(
    "pool", ["prefork", "processes", "celery.concurrency.prefork:TaskPool", TaskPool, CustomPool]
)
def test_w007_silent_on_prefork(pool: object) -> None:
    app = Celery("proj")
    app.conf.worker_max_tasks_per_child = 100
    app.conf.worker_pool = pool
    assert run() == []


def test_w007_silent_without_limits_on_solo() -> None:
    app = Celery("proj")
    app.conf.worker_pool = "solo"
    assert ids() == ["leakguard.W006"]  # W006 says what to add; W007 would be noise


# manage.py check


# What the admin needs (tests/settings.py installs it), without leakguard's middleware.
ADMIN_ONLY = [
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
]


# Django 6 runs the database checks in `check` too (JSONField support on SQLite).
@pytest.mark.django_db
@override_settings(
    MIDDLEWARE=ADMIN_ONLY, SILENCED_SYSTEM_CHECKS=["leakguard.W008", "leakguard.W001"]
)
def test_silenced_system_checks_silence_them(isolated: Path) -> None:
    (isolated / "gunicorn.conf.py").write_text("workers = 2\n")
    stdout, stderr = StringIO(), StringIO()
    call_command("check", stdout=stdout, stderr=stderr)
    assert "leakguard" not in stdout.getvalue() + stderr.getvalue()
    assert "2 silenced" in stdout.getvalue()


@pytest.mark.django_db
@override_settings(MIDDLEWARE=ADMIN_ONLY)
def test_manage_py_check_prints_warnings(isolated: Path) -> None:
    (isolated / "uwsgi.ini").write_text("[uwsgi\nbroken\n")
    stdout, stderr = StringIO(), StringIO()
    call_command("check", stdout=stdout, stderr=stderr)
    output = stderr.getvalue()
    assert "(leakguard.W008)" in output
    assert "(leakguard.W010)" in output


def test_testproject_as_shipped_prints_no_leakguard_message(tmp_path: Path) -> None:
    testproject = ROOT / "testproject"
    # Recycling is configured for every server the test project ships a config for.
    for shipped in ("gunicorn.conf.py", "uwsgi.ini", "testproject/celery.py"):
        assert (testproject / shipped).is_file(), shipped
    env = {
        key: value
        for key, value in os.environ.items()
        if key not in ("DJANGO_SETTINGS_MODULE", "GUNICORN_CMD_ARGS", "DATABASE_URL")
        and not key.startswith("LEAKGUARD_")
    }
    # A migrated database of its own (leakguard.W011 reports missing tables).
    env["DATABASE_URL"] = f"sqlite://{tmp_path / 'db.sqlite3'}"
    subprocess.run(
        [sys.executable, "manage.py", "migrate", "-v", "0"],
        cwd=testproject,
        env=env,
        capture_output=True,
        timeout=60,
        check=True,
    )
    completed = subprocess.run(
        [sys.executable, "manage.py", "check"],
        cwd=testproject,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    output = completed.stdout + completed.stderr
    assert completed.returncode == 0, output
    assert "leakguard" not in output.lower(), output
    assert "System check identified no issues" in output


# Input robustness (issue 14, items 8 to 10) --------------------------------------------------


@override_settings(
    LEAKGUARD={
        "FLUSH_INTERVAL": 10**400,
        "WORKER_MAX_MEMORY": "1" + "0" * 400 + "MB",
        "DATABASE": "stats",
    }
)
def test_e001_values_that_overflowed_and_a_missing_alias() -> None:
    messages = run()
    assert [message.id for message in messages] == ["leakguard.E001"] * 3
    assert "FLUSH_INTERVAL" in messages[0].msg
    assert "WORKER_MAX_MEMORY" in messages[1].msg
    assert "DATABASE should be the alias of a database in DATABASES" in messages[2].msg


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_e001_flush_interval_not_finite(value: float) -> None:
    with override_settings(LEAKGUARD={"FLUSH_INTERVAL": value}):
        assert "FLUSH_INTERVAL" in only("leakguard.E001").msg


@override_settings(INSTALLED_APPS=["django.contrib.contenttypes", "django.contrib.auth"])
def test_e002_middleware_without_the_app() -> None:
    message = only("leakguard.E002")
    assert message.level == checks.ERROR
    assert "'django_leakguard' is not in INSTALLED_APPS" in message.msg
    assert "python manage.py migrate django_leakguard" in (message.hint or "")


@pytest.mark.parametrize(
    "first", ["django_leakguard.middleware", "django_leakguard.conf", "django_leakguard.asgi"]
)
def test_e002_whatever_part_of_the_package_is_imported_first(tmp_path: Path, first: str) -> None:
    # A fresh process, as `manage.py check` is: the app's ready() never runs, and only the
    # module named is imported before the checks.
    (tmp_path / "noapp_settings.py").write_text(
        "SECRET_KEY = 'x'\n"
        "INSTALLED_APPS = ['django.contrib.contenttypes', 'django.contrib.auth']\n"
        f"MIDDLEWARE = [{MIDDLEWARE_PATH!r}]\n"
        "DATABASES = {'default': {'ENGINE': 'django.db.backends.sqlite3', 'NAME': ':memory:'}}\n"
    )
    script = (
        f"import {first}; from django.core.management import execute_from_command_line; "
        "execute_from_command_line(['manage.py', 'check'])"
    )
    result = subprocess.run(
        [sys.executable, "-c", script],
        env={
            **os.environ,
            "DJANGO_SETTINGS_MODULE": "noapp_settings",
            "PYTHONPATH": str(tmp_path),
        },
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert "leakguard.E002" in result.stderr, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    assert result.returncode == 1


@override_settings(
    INSTALLED_APPS=["django.contrib.contenttypes"],
    MIDDLEWARE=["django.middleware.common.CommonMiddleware"],
)
def test_e002_not_without_the_middleware() -> None:
    assert "leakguard.E002" not in ids()


@pytest.mark.django_db
def test_w011_tables_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    from django.db import connection

    assert run() == []  # migrated
    monkeypatch.setattr(
        connection.introspection, "table_names", lambda: ["django_leakguard_worker"]
    )
    message = only("leakguard.W011")
    assert "'default' has no table django_leakguard_growth," in message.msg
    assert message.hint == "Run `python manage.py migrate django_leakguard`."


def stats_alias(monkeypatch: pytest.MonkeyPatch, **settings_dict: object) -> None:
    """Add a database alias "stats" (overriding DATABASES is not supported)."""
    from django.db import connections

    monkeypatch.setitem(
        connections.settings, "stats", {**connections.settings["default"], **settings_dict}
    )
    monkeypatch.setattr(connections._connections, "stats", None, raising=False)
    monkeypatch.delattr(connections._connections, "stats")


@pytest.mark.django_db
def test_w011_hint_names_another_database(monkeypatch: pytest.MonkeyPatch) -> None:
    from django.db import connections

    stats_alias(monkeypatch)
    with override_settings(LEAKGUARD={"DATABASE": "stats"}):
        monkeypatch.setattr(connections["stats"].introspection, "table_names", list)
        message = only("leakguard.W011")
    assert "django_leakguard_growth or django_leakguard_worker" in message.msg
    assert message.hint == "Run `python manage.py migrate django_leakguard --database stats`."


def test_w011_silent_when_the_database_cannot_be_reached() -> None:
    # Outside django_db, pytest-django refuses the connection, as an unreachable server would.
    assert run() == []


@override_settings(LEAKGUARD={"RECORD": False})
def test_w011_not_when_nothing_is_recorded() -> None:
    assert run() == []


def test_w011_does_not_create_a_sqlite_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "missing.sqlite3"
    stats_alias(monkeypatch, NAME=str(path))
    with override_settings(LEAKGUARD={"DATABASE": "stats"}):
        assert "django_leakguard_growth" in only("leakguard.W011").msg
    assert not path.exists()


# Where configs are found (issue 16.4) and which one Gunicorn really uses (16.8) -----------------


def test_gunicorn_config_setting_says_which_config_is_used(isolated: Path) -> None:
    # Started with -c python:django_leakguard.gunicorn_conf: a stray gunicorn.conf.py is unused.
    (isolated / "gunicorn.conf.py").write_text("workers = 3\n")
    assert ids() == ["leakguard.W001"]
    with override_settings(LEAKGUARD={"GUNICORN_CONFIG": ["python:" + GUNICORN_CONF]}):
        assert run() == []


def test_procfile_gunicorn_command_says_which_config_is_used(isolated: Path) -> None:
    (isolated / "gunicorn.conf.py").write_text("workers = 3\n")
    (isolated / "Procfile").write_text(f"web: gunicorn -c python:{GUNICORN_CONF} site.wsgi\n")
    assert run() == []


def test_procfile_gunicorn_command_options(isolated: Path) -> None:
    (isolated / "Procfile").write_text(
        "web: gunicorn site.wsgi --max-requests 500\nworker: gunicorn --workers=x site.wsgi\n"
    )
    messages = sorted(run(), key=lambda message: message.id or "")
    assert [message.id for message in messages] == ["leakguard.W002", "leakguard.W010"]
    assert messages[0].hint == (
        f"Add --max-requests-jitter 25 to the gunicorn command in {isolated / 'Procfile'} (web)."
    )
    assert "(worker)" in messages[1].msg


def test_procfile_gunicorn_command_reads_the_config_of_its_directory(isolated: Path) -> None:
    (isolated / "gunicorn.conf.py").write_text("max_requests = 9\n")
    (isolated / "deploy").mkdir()
    (isolated / "deploy" / "g.py").write_text("max_requests = 9\nmax_requests_jitter = 1\n")
    (isolated / "Procfile").write_text("web: gunicorn site.wsgi\n")
    assert ids() == ["leakguard.W002"]
    (isolated / "Procfile").write_text("web: gunicorn -c deploy/g.py site.wsgi\n")
    assert run() == []
    (isolated / "Procfile").write_text("web: gunicorn -c deploy/g.py site.wsgi --max-requests 0\n")
    message = only("leakguard.W001")
    assert message.hint.startswith("Set `max_requests = 1000`, `max_requests_jitter = 50` in ")


def test_procfile_gunicorn_command_without_a_config_file(isolated: Path) -> None:
    (isolated / "Procfile").write_text("web: gunicorn site.wsgi\n")
    message = only("leakguard.W001")
    assert message.hint == (
        "Add --max-requests 1000 --max-requests-jitter 50 to the gunicorn command in "
        f"{isolated / 'Procfile'} (web)."
    )


def test_gunicorn_config_in_base_dir_parent_deploy_dir(isolated: Path) -> None:
    (isolated / "src").mkdir()
    (isolated / "deploy").mkdir()
    (isolated / "deploy" / "gunicorn.py").write_text("workers = 2\n")
    os.chdir(isolated / "src")
    with override_settings(BASE_DIR=isolated / "src"):
        message = only("leakguard.W001")
    assert str(isolated / "deploy" / "gunicorn.py") in message.msg


def test_dockerfile_uwsgi_command(isolated: Path) -> None:
    (isolated / "docker").mkdir()
    (isolated / "docker" / "uwsgi.ini").write_text("[uwsgi]\nprocesses = 4\n")
    (isolated / "docker" / "Dockerfile").write_text(
        'CMD ["uwsgi", "--ini", "uwsgi.ini", "--max-requests", "100"]\n'
    )
    message = only("leakguard.W004")
    assert str(isolated / "docker" / "uwsgi.ini") in message.msg


def test_dockerfile_commands_name_paths_in_the_image(isolated: Path) -> None:
    # As in healthchecks' docker/Dockerfile: the project is copied to /opt/app/ in the image.
    (isolated / "docker").mkdir()
    (isolated / "docker" / "uwsgi.ini").write_text("[uwsgi]\nprocesses = 4\n")
    (isolated / "deploy").mkdir()
    (isolated / "deploy" / "gunicorn.py").write_text("workers = 2\n")
    dockerfile = isolated / "docker" / "Dockerfile"
    dockerfile.write_text(
        "COPY . /opt/app/\n"
        'CMD ["uwsgi", "/opt/app/docker/uwsgi.ini"]\n'
        "ENTRYPOINT gunicorn -c /opt/app/deploy/gunicorn.py app.wsgi\n"
    )
    with override_settings(BASE_DIR=isolated):
        messages = {message.id: message for message in run()}
    assert sorted(messages) == ["leakguard.W001", "leakguard.W003"]
    assert str(isolated / "deploy" / "gunicorn.py") in messages["leakguard.W001"].msg
    assert str(isolated / "docker" / "uwsgi.ini") in messages["leakguard.W003"].msg
    # No copy in the project: said so, with the setting that names the right file.
    dockerfile.write_text(
        'CMD ["uwsgi", "--ini", "/srv/elsewhere.ini"]\n'
        "ENTRYPOINT gunicorn -c /srv/gunicorn_live.py app.wsgi\n"
    )
    with override_settings(BASE_DIR=isolated):
        messages = run()
    assert [message.id for message in messages] == ["leakguard.W010", "leakguard.W010"]
    gunicorn, uwsgi = sorted(messages, key=lambda message: message.msg)
    assert gunicorn.msg == (
        "The Gunicorn config /srv/gunicorn_live.py cannot be read: the gunicorn command in "
        f"{dockerfile} (ENTRYPOINT) names it in the image, and no copy of it was found in the "
        "project."
    )
    assert gunicorn.hint == "Name the project's copy of it in LEAKGUARD['GUNICORN_CONFIG']."
    assert uwsgi.msg.startswith("The uWSGI config /srv/elsewhere.ini cannot be read: ")
    assert uwsgi.hint == "Name the project's copy of it in LEAKGUARD['UWSGI_INI']."


def test_uwsgi_command_without_an_ini_file(isolated: Path) -> None:
    (isolated / "Procfile").write_text(
        "web: uwsgi --module=site.wsgi stray -M -p 4 --http :8000 -R 100 --vacuum --spooler /s\n"
        "missing: uwsgi deploy/missing.ini:app\n"
    )
    messages = run()
    assert [message.id for message in messages] == [
        "leakguard.W004",
        "leakguard.W005",
        "leakguard.W010",
    ]
    where = f"the uwsgi command in {isolated / 'Procfile'} (web)"
    assert (
        messages[0].hint
        == f"Add `max-requests-delta = 2` to {where} (needs uWSGI 2.0.29 or later)."
    )
    assert str(isolated / "deploy" / "missing.ini") in messages[2].msg


def test_i001_no_server_config_found(isolated: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    [message] = checks.run_checks(tags=["leakguard"])
    assert message.id == "leakguard.I001"
    assert message.level == checks.INFO
    assert "LEAKGUARD['GUNICORN_CONFIG']" in (message.hint or "")
    (isolated / "Procfile").write_text("web: uwsgi --ini uwsgi.ini\n")
    assert checks.run_checks(tags=["leakguard"])[0].id == "leakguard.W010"
    (isolated / "Procfile").unlink()
    with override_settings(LEAKGUARD={"UWSGI_INI": ["x.ini"]}):
        assert [m.id for m in checks.run_checks(tags=["leakguard"])] == ["leakguard.W010"]
    monkeypatch.setenv("GUNICORN_CMD_ARGS", "--max-requests 10 --max-requests-jitter 1")
    assert checks.run_checks(tags=["leakguard"]) == []
