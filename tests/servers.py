"""Start and stop real Gunicorn, uWSGI and Celery processes for integration tests.

Every server gets a free loopback port, writes its output to a log file, and is always stopped
by its PID (SIGTERM, then SIGKILL of its process group after a timeout).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TESTPROJECT = ROOT / "testproject"
BIN = Path(sys.executable).parent
PYTHON = sys.executable


def free_port() -> int:
    """Return a loopback TCP port nobody listens on (bind to port 0 and let the OS choose)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def project_env(
    database: Path | str | None = None, **overrides: str | int | float | None
) -> dict[str, str]:
    """Return an environment running the test project: its settings, a database, overrides.

    database is a SQLite file path or a database URL. Overrides set (or with None, remove)
    variables, e.g. LEAKGUARD_MAX_REQUESTS=20.
    """
    env = dict(os.environ)
    for name in list(env):
        # The test run's own settings and coverage switches must not leak into the server.
        ours = name in ("DJANGO_SETTINGS_MODULE", "DATABASE_URL") or name.startswith("LEAKGUARD_")
        if ours and not name.startswith("LEAKGUARD_TEST_"):
            del env[name]
    paths = [str(ROOT), str(TESTPROJECT)]
    if env.get("PYTHONPATH"):
        paths.append(env["PYTHONPATH"])
    env["PYTHONPATH"] = os.pathsep.join(paths)
    env["DJANGO_SETTINGS_MODULE"] = "testproject.settings"
    env["PYTHONUNBUFFERED"] = "1"
    if database is not None:
        text = str(database)
        env["DATABASE_URL"] = text if "://" in text else f"sqlite://{Path(text).resolve()}"
    for name, value in overrides.items():
        if value is None:
            env.pop(name, None)
        else:
            env[name] = str(value)
    return env


def manage(
    env: Mapping[str, str], *args: str, timeout: float = 60, project: Path = TESTPROJECT
) -> str:
    """Run project's manage.py (testproject's by default) with env; return its output, raise
    on failure."""
    result = subprocess.run(
        [PYTHON, str(project / "manage.py"), *args],
        env=dict(env),
        cwd=project,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    if result.returncode:
        raise AssertionError(
            f"manage.py {' '.join(args)} failed ({result.returncode}):\n"
            f"{result.stdout}\n{result.stderr}"
        )
    return result.stdout


def stored_calls(env: Mapping[str, str], kind: str) -> Counter[str]:
    """Return the calls stored per key for kind, in the database env points at."""
    return Counter({key: sums["calls"] for key, sums in stored_sums(env, kind).items()})


def stored_sums(
    env: Mapping[str, str], kind: str, counters: Sequence[str] = ("calls",)
) -> dict[str, dict[str, int]]:
    """Return the sums of counters stored per key for kind, in the database env points at."""
    sums = ", ".join(f"{name}=Sum({name!r})" for name in counters)
    output = manage(
        env,
        "shell",
        "-c",
        "import json\n"
        "from django.db.models import Sum\n"
        "from django_leakguard.models import Growth\n"
        f"rows = Growth.objects.filter(kind={kind!r}).values('key').annotate({sums})\n"
        "print(json.dumps({row.pop('key'): row for row in rows}))",
    )
    result: dict[str, dict[str, int]] = json.loads(output.strip().splitlines()[-1])
    return result


def migrate(env: Mapping[str, str]) -> None:
    """Create the test project's tables in the database env points at."""
    manage(env, "migrate", "--noinput", "-v", "0")


@dataclass
class Server:
    """A running server process."""

    name: str
    process: subprocess.Popen[bytes]
    log_path: Path
    port: int | None = None
    stopped_rc: int | None = field(default=None, init=False)

    @property
    def pid(self) -> int:
        return self.process.pid

    def url(self, path: str = "/") -> str:
        assert self.port is not None, f"{self.name} has no HTTP port"
        return f"http://127.0.0.1:{self.port}{path}"

    def log(self) -> str:
        """Return everything the server has written so far."""
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def running(self) -> bool:
        return self.process.poll() is None

    def wait_for_log(self, pattern: str, timeout: float = 30, count: int = 1) -> list[str]:
        """Wait until the log matches pattern (a regex) count times; return the matches."""
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        while True:
            found = regex.findall(self.log())
            if len(found) >= count:
                return found
            if not self.running():
                raise AssertionError(
                    f"{self.name} exited ({self.process.returncode}) before logging "
                    f"{pattern!r}:\n{self.log()}"
                )
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"{self.name} did not log {pattern!r} {count} time(s) in {timeout}s "
                    f"(found {len(found)}):\n{self.log()}"
                )
            time.sleep(0.1)

    def wait_for_http(self, path: str = "/", timeout: float = 30) -> None:
        """Wait until GET path answers (any HTTP status counts as up)."""
        deadline = time.monotonic() + timeout
        while True:
            if not self.running():
                raise AssertionError(
                    f"{self.name} exited ({self.process.returncode}):\n{self.log()}"
                )
            try:
                get(self.url(path), timeout=2)
                return
            except urllib.error.HTTPError:
                return
            except OSError:
                if time.monotonic() > deadline:
                    raise AssertionError(
                        f"{self.name} did not answer {path} in {timeout}s:\n{self.log()}"
                    ) from None
                time.sleep(0.1)

    def stop(self, timeout: float = 20) -> int:
        """Stop the server by its PID: SIGTERM, then SIGKILL of its group; return its code."""
        if self.stopped_rc is not None:
            return self.stopped_rc
        if self.running():
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                # The process group is the server's own (start_new_session): its children only.
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.pid, signal.SIGKILL)
                self.process.wait(10)
        # Children (workers) that outlived their master would keep the port: end them too.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, signal.SIGKILL)
        self.stopped_rc = self.process.returncode
        return self.stopped_rc


def start(
    name: str,
    command: Sequence[str],
    *,
    env: Mapping[str, str],
    log_path: Path,
    cwd: Path = TESTPROJECT,
    port: int | None = None,
) -> Server:
    """Start command in its own session, output to log_path; the caller must stop() it."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            list(command),
            env=dict(env),
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    return Server(name, process, log_path, port)


@contextlib.contextmanager
def running(
    name: str,
    command: Sequence[str],
    *,
    env: Mapping[str, str],
    log_path: Path,
    cwd: Path = TESTPROJECT,
    port: int | None = None,
    ready: Callable[[Server], object] | None = None,
) -> Iterator[Server]:
    """Start a server, wait until ready(server) returns, yield it, and always stop it."""
    server = start(name, command, env=env, log_path=log_path, cwd=cwd, port=port)
    try:
        if ready is not None:
            ready(server)
        yield server
    finally:
        server.stop()


def gunicorn_command(
    app: str,
    port: int,
    *,
    config: str | None = "python:django_leakguard.gunicorn_conf",
    workers: int = 2,
    worker_class: str = "sync",
    threads: int = 1,
    extra: Sequence[str] = (),
) -> list[str]:
    """Return a Gunicorn command line; the access log names each request's worker PID."""
    command = [PYTHON, "-m", "gunicorn"]
    if config is not None:
        command += ["-c", config]
    command += [
        "--bind",
        f"127.0.0.1:{port}",
        "--workers",
        str(workers),
        "--worker-class",
        worker_class,
        "--threads",
        str(threads),
        "--graceful-timeout",
        "10",
        "--access-logfile",
        "-",
        "--access-logformat",
        "ACCESS pid=%(p)s status=%(s)s path=%(U)s",
        "--log-level",
        "info",
        *_no_control_socket(),
        *extra,
        app,
    ]
    return command


def _no_control_socket() -> list[str]:
    # Gunicorn 25+ opens a control socket in $HOME by default; servers run side by side here.
    from gunicorn.config import KNOWN_SETTINGS

    names = {setting.name for setting in KNOWN_SETTINGS}
    return ["--no-control-socket"] if "control_socket_disable" in names else []


def uwsgi_command(
    module: str,
    port: int,
    *,
    ini: Path | None = None,
    extra: Sequence[str] = (),
    http: str = "--http-socket",
) -> list[str]:
    """Return a uWSGI command line serving module over HTTP on port, with a master.

    http: --http-socket (the workers parse HTTP) or --http (uWSGI's HTTP router in front).
    """
    command = [str(BIN / "uwsgi")]
    if ini is not None:
        command += ["--ini", str(ini)]
    command += [
        http,
        f"127.0.0.1:{port}",
        "--module",
        module,
        "--master",
        "--die-on-term",
        "--need-app",
        *extra,
    ]
    return command


def celery_worker_command(
    app: str = "testproject", *, concurrency: int = 2, extra: Sequence[str] = ()
) -> list[str]:
    """Return a Celery prefork worker command line."""
    return [
        PYTHON,
        "-m",
        "celery",
        "-A",
        app,
        "worker",
        "--pool",
        "prefork",
        "--concurrency",
        str(concurrency),
        "--loglevel",
        "info",
        "--without-gossip",
        "--without-mingle",
        "--without-heartbeat",
        *extra,
    ]


def get(url: str, timeout: float = 10) -> tuple[int, str]:
    """GET url with a new connection; return (status, body). HTTP errors raise HTTPError."""
    request = urllib.request.Request(url, headers={"Connection": "close"})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return int(response.status), response.read().decode(errors="replace")


def get_all(
    server: Server,
    paths: Sequence[str],
    clients: int = 1,
    timeout: float = 30,
    join_timeout: float = 120,
) -> list[str]:
    """GET every path, in order, from clients threads; return the failures (empty when all 200)."""
    failures: list[str] = []
    lock = threading.Lock()
    queue = list(reversed(paths))

    def client() -> None:
        while True:
            with lock:
                if not queue:
                    return
                path = queue.pop()
            try:
                status, _ = get(server.url(path), timeout=timeout)
                if status != 200:
                    failures.append(f"{path}: status {status}")
            except Exception as exc:
                failures.append(f"{path}: {exc!r}")

    threads = [threading.Thread(target=client) for _ in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(join_timeout)
    return failures


def access_pids(log: str) -> list[int]:
    """Return, in order, the worker PID of each request in a Gunicorn access log of ours."""
    return [int(pid) for pid in re.findall(r"ACCESS pid=<?(\d+)>? status=\d+", log)]


def uwsgi_request_pids(log: str) -> list[int]:
    """Return, in order, the worker PID of each request in a uWSGI request log."""
    return [int(pid) for pid in re.findall(r"^\[pid: (\d+)\|app: ", log, re.MULTILINE)]


def runs(pids: Sequence[int]) -> dict[int, int]:
    """Return how many requests (or tasks) each PID served, in order of first appearance."""
    counts: dict[int, int] = {}
    for pid in pids:
        counts[pid] = counts.get(pid, 0) + 1
    return counts
