"""`make demo`: serve testproject under Gunicorn, send a load, show recycling and leakreport."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def main() -> int:
    port = free_port()
    env = {**os.environ, "DJANGO_SETTINGS_MODULE": "testproject.settings"}
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "gunicorn",
            "--workers",
            "2",
            "--bind",
            f"127.0.0.1:{port}",
            "testproject.wsgi",
        ],
        cwd=HERE,
        env=env,
    )
    try:
        base = f"http://127.0.0.1:{port}"
        for _ in range(100):
            try:
                with urllib.request.urlopen(base + "/", timeout=2) as response:
                    print(f"testproject is served at {base}: {response.status}")
                    break
            except OSError:
                time.sleep(0.1)
        else:
            print("Gunicorn did not answer", file=sys.stderr)
            return 1
        for path in ["/products/1/", "/leak/retain/", "/spike/"]:
            with urllib.request.urlopen(base + path, timeout=10) as response:
                print(f"GET {path} -> {response.status}")
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=30)
    return 0


if __name__ == "__main__":
    sys.exit(main())
