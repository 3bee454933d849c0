"""Stop uWSGI under load, again and again: what do its workers write, lose, or crash on?

Each round starts the test project under uWSGI (2 workers, enable-threads, SQLite, a flush
interval of an hour, so that only the exit writes), sends requests from 3 clients without
pause, and stops the master with SIGTERM (die-on-term: the workers get SIGINT, and uWSGI's C
handler calls exit() wherever the worker is) after 1 to 2 seconds. A busy worker is cut off
anywhere: inside a view, closing a response, inside the garbage collector or the recorder.

Per round: the requests answered, the calls stored, the calls the workers logged as lost, the
time from SIGTERM to the master's exit, and whether a worker crashed or hung. "Unaccounted" are
answered calls neither stored nor logged as lost (what the project promises never happens; the
request being served at the stop is not answered, so not counted).

Run: flock /tmp/leakguard-bench.lock .venv/bin/python bench/bench_uwsgi_stops.py [--rounds 50]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "testproject")]

from tests import servers  # noqa: E402

LOST = re.compile(r"([\d,]+) calls? of [\d,]+ keys? lost")


def one_round(seed: int) -> dict[str, float]:
    rng = random.Random(seed)
    with tempfile.TemporaryDirectory(prefix="uwsgi-stops-") as folder:
        tmp = Path(folder)
        env = servers.project_env(tmp / "db.sqlite3", LEAKGUARD_FLUSH_INTERVAL=3600)
        servers.migrate(env)
        port = servers.free_port()
        command = servers.uwsgi_command(
            "testproject.wsgi:application",
            port,
            extra=["--processes", "2", "--enable-threads", "--disable-logging"],
        )
        server = servers.start("uwsgi", command, env=env, log_path=tmp / "uwsgi.log", port=port)
        answered = 0
        lock = threading.Lock()
        stop = threading.Event()

        def client(offset: int) -> None:
            nonlocal answered
            n = offset
            while not stop.is_set():
                n += 3
                with contextlib.suppress(Exception):  # the stop cuts requests off
                    if servers.get(server.url(f"/products/{n}/"), timeout=5)[0] == 200:
                        with lock:
                            answered += 1

        hung = False
        try:
            server.wait_for_http("/products/0/")
            answered -= 1  # the readiness probe is stored, not answered here
            clients = [threading.Thread(target=client, args=(i,)) for i in range(3)]
            for thread in clients:
                thread.start()
            time.sleep(1 + rng.random())
            os.kill(server.pid, signal.SIGTERM)
            started = time.monotonic()
            try:
                server.process.wait(20)
            except subprocess.TimeoutExpired:
                hung = True
            seconds = time.monotonic() - started
            stop.set()
            for thread in clients:
                thread.join()
        finally:
            stop.set()
            server.stop()
        log = server.log()
        stored = sum(servers.stored_calls(env, "request").values())
    lost = sum(int(n.replace(",", "")) for n in LOST.findall(log))
    return {
        "answered": answered,
        "stored": stored,
        "lost": lost,
        "unaccounted": max(0, answered - stored - lost),
        "seconds": seconds,
        "crashed": float("Segmentation Fault" in log or "signal 11" in log),
        "hung": float(hung),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=50)
    parser.add_argument("--seed", type=int, default=2026)
    options = parser.parse_args()
    rounds = []
    for n in range(options.rounds):
        result = one_round(options.seed + n)
        rounds.append(result)
        print(
            f"round {n + 1:3}: answered {result['answered']:6.0f}  stored {result['stored']:6.0f}"
            f"  logged lost {result['lost']:4.0f}  unaccounted {result['unaccounted']:5.0f}"
            f"  exit {result['seconds']:4.1f} s"
            f"{'  CRASHED' if result['crashed'] else ''}{'  HUNG' if result['hung'] else ''}",
            flush=True,
        )
    answered = sum(r["answered"] for r in rounds)
    print(
        f"\n{len(rounds)} stops: {answered:,.0f} calls answered,"
        f" {sum(r['stored'] for r in rounds):,.0f} stored,"
        f" {sum(r['lost'] for r in rounds):,.0f} logged as lost,"
        f" {sum(r['unaccounted'] for r in rounds):,.0f} unaccounted;"
        f" stops with a loss logged: {sum(1 for r in rounds if r['lost'])},"
        f" with calls unaccounted: {sum(1 for r in rounds if r['unaccounted'])},"
        f" crashed workers: {sum(1 for r in rounds if r['crashed']):.0f},"
        f" hung: {sum(1 for r in rounds if r['hung']):.0f};"
        f" slowest exit {max(r['seconds'] for r in rounds):.1f} s"
    )


if __name__ == "__main__":
    main()
