"""`make demo`: serve testproject under Gunicorn, send a load, show recycling and leakreport.

The run takes about a minute: 2 Gunicorn workers configured by django_leakguard.gunicorn_conf
with a small MAX_REQUESTS, a mixed load over ordinary, /leak/ and /spike/ views, then
`manage.py leakreport` (as a table, and as an HTML file to open), `manage.py check`, and a
staff user to browse the admin pages with (`make serve`). It stops everything it starts, so it
can run again.
"""

from __future__ import annotations

import argparse
import os
import random
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parent
HTML_REPORT = HERE / "leakreport.html"
# A staff user of the demo's own database, to browse the admin pages (`make serve`).
DEMO_USERNAME = "demo"
DEMO_PASSWORD = "leakguard-demo"
DEMO_USER = f"""
from django.contrib.auth.models import User
if not User.objects.filter(username={DEMO_USERNAME!r}).exists():
    User.objects.create_superuser({DEMO_USERNAME!r}, password={DEMO_PASSWORD!r})
"""

# Weighted paths of the load; {n} is replaced by the request number.
LOAD = [
    ("/", 20),
    ("/products/{n}/", 25),
    ("/search/?q=shoes{n}", 15),
    ("/health/", 10),
    ("/leak/retain/", 12),
    ("/leak/cache/item-{n}/", 12),
    ("/spike/", 6),
]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def manage(*args: str, env: dict[str, str]) -> int:
    return subprocess.call([sys.executable, "manage.py", *args], cwd=HERE, env=env)


def wait_until_served(base: str, server: subprocess.Popen[bytes], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise SystemExit(f"Gunicorn exited early with status {server.returncode}")
        try:
            with urllib.request.urlopen(base + "/health/", timeout=2):
                return
        except OSError:
            time.sleep(0.1)
    raise SystemExit(f"Gunicorn did not answer on {base} within {timeout:.0f} s")


def progress(done: int, total: int, failed: int) -> None:
    width = 40
    filled = width * done // total
    bar = "#" * filled + "-" * (width - filled)
    line = f"   [{bar}] {done}/{total} requests, {failed} failed"
    if sys.stdout.isatty():
        if done % 25 and done != total:
            return
        sys.stdout.write("\r" + line)
    elif done % max(total // 10, 1) == 0 or done == total:
        # Not a terminal (a CI log): a line per tenth instead of carriage returns.
        sys.stdout.write(line + "\n")
    sys.stdout.flush()


def send_load(base: str, total: int, threads: int, seed: int) -> int:
    rng = random.Random(seed)
    paths, weights = zip(*LOAD, strict=True)
    plan = [rng.choices(paths, weights)[0].replace("{n}", str(n)) for n in range(total)]
    lock = threading.Lock()
    state = {"next": 0, "done": 0, "failed": 0}

    def worker() -> None:
        while True:
            with lock:
                index = state["next"]
                if index >= total:
                    return
                state["next"] += 1
            path = plan[index]
            ok = False
            for _ in range(3):  # a worker being replaced may refuse one connection
                try:
                    with urllib.request.urlopen(base + path, timeout=30) as response:
                        response.read()
                        ok = response.status == 200
                        break
                except (urllib.error.URLError, ConnectionError, TimeoutError):
                    time.sleep(0.05)
            with lock:
                state["done"] += 1
                state["failed"] += not ok
                progress(state["done"], total, state["failed"])

    pool = [threading.Thread(target=worker) for _ in range(threads)]
    for thread in pool:
        thread.start()
    for thread in pool:
        thread.join()
    if sys.stdout.isatty():
        sys.stdout.write("\n")
    return state["failed"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--requests", type=int, default=3000)
    parser.add_argument("--max-requests", type=int, default=300)
    parser.add_argument("--threads", type=int, default=4)
    parser.add_argument("--seed", type=int, default=7)
    options = parser.parse_args()

    env = {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "testproject.settings",
        "LEAKGUARD_MAX_REQUESTS": str(options.max_requests),
        "LEAKGUARD_FLUSH_INTERVAL": "2",
        "PYTHONUNBUFFERED": "1",
    }
    print("1. Clearing earlier measurements")
    if manage("leakreport", "--reset", "--no-input", env=env) != 0:
        return 1

    port = free_port()
    base = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryDirectory(prefix="leakguard-demo-") as tmp:
        log_path = Path(tmp) / "gunicorn.log"
        print(
            f"2. Serving testproject under Gunicorn at {base}: 2 workers, "
            f"max_requests={options.max_requests} with jitter (django_leakguard.gunicorn_conf)"
        )
        with log_path.open("wb") as log:
            server = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "gunicorn",
                    "-c",
                    "python:django_leakguard.gunicorn_conf",
                    "--workers",
                    "2",
                    "--bind",
                    f"127.0.0.1:{port}",
                    "--log-level",
                    "info",
                    "testproject.wsgi",
                ],
                cwd=HERE,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
            try:
                wait_until_served(base, server)
                print(
                    f"3. Sending {options.requests} requests to ordinary, /leak/ and /spike/ views"
                )
                started = time.monotonic()
                failed = send_load(base, options.requests, options.threads, options.seed)
                print(f"   done in {time.monotonic() - started:.1f} s, {failed} failed")
            finally:
                server.send_signal(signal.SIGTERM)
                try:
                    server.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    server.kill()
                    server.wait()
        text = log_path.read_text(errors="replace")

    booted = re.findall(r"Booting worker with pid: (\d+)", text)
    limits = [line for line in text.splitlines() if "leakguard" in line.lower()][:1]
    print(
        f"4. Workers: {len(booted)} booted, {max(len(booted) - 2, 0)} replaced after max_requests"
    )
    if limits:
        print(f"   {limits[0].strip()}")
    for line in text.splitlines():
        if "Autorestarting worker" in line or "Booting worker" in line:
            print(f"   {line.strip()}")

    print("5. python manage.py leakreport --since 1h")
    status = manage("leakreport", "--since", "1h", env=env)
    print(f"6. python manage.py leakreport --since 1h --format html -o {HTML_REPORT.name}")
    status = (
        manage("leakreport", "--since", "1h", "--format", "html", "-o", str(HTML_REPORT), env=env)
        or status
    )
    print(f"   Open {HTML_REPORT.as_uri()} in a browser: the ranking and its charts, one file.")
    print("7. python manage.py check")
    status = manage("check", env=env) or status
    status = manage("shell", "--verbosity", "0", "-c", DEMO_USER, env=env) or status
    print(
        "8. The admin pages: run `make serve`, open http://127.0.0.1:8000/admin/django_leakguard/"
        f"growth/?since=1h and log in as {DEMO_USERNAME!r}, password {DEMO_PASSWORD!r}."
    )
    return status


if __name__ == "__main__":
    sys.exit(main())
