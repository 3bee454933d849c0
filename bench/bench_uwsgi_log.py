"""leakreport --uwsgi-log against pyuwsgimemhog, and the database report over 1,000,000 rows.

Generates a ~1,000,000-line uWSGI memory-report log in a temporary directory (the line format
is copied from uWSGI 2.0.31's output), then parses it in one subprocess per tool, so each
one's memory is its own: ours with the default --jobs (worker processes) and with --jobs 1,
then pyuwsgimemhog. Also runs each on a tenth of the log, to show whether memory grows with the
log's size. Finally bulk-creates 1,000,000 Growth rows in a temporary SQLite file and times the
report over them.

Memory, two figures sampled every 50 ms from /proc while a tool runs, summed over its process
and the worker processes it forked: peak RSS (at least the process's own ru_maxrss; it counts
the pages a worker shares with the process it was forked from in both) and peak PSS (each
shared page divided between the processes that map it: what the run costs the machine).

Run: flock /tmp/bench.lock .venv/bin/python bench/bench_uwsgi_log.py [--lines N] [--rows N]
(flock: other benchmarks on the machine wait meanwhile).
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import tempfile
import textwrap
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PYTHON = sys.executable

# Paths of the test project's shop app, so --group-by auto picks the URLconf.
PATHS = [
    (0.30, lambda r: f"/products/{r.randrange(1, 100_000)}/"),
    (0.20, lambda r: f"/search/?q={r.choice(['shoes', 'hats', 'socks'])}&page={r.randrange(9)}"),
    (0.15, lambda r: "/health/"),
    (0.10, lambda r: "/leak/retain/"),
    (0.10, lambda r: f"/leak/cache/{uuid.UUID(int=r.getrandbits(128))}/"),
    (0.05, lambda r: "/spike/"),
    (0.05, lambda r: "/"),
    (0.05, lambda r: f"/static/app.{r.getrandbits(32):08x}.js"),
]
METHODS = ["GET"] * 8 + ["POST", "HEAD", "PUT", "DELETE", "PATCH", "OPTIONS"]
CLIENTS = ["127.0.0.1", "10.0.3.17", "::1", "2001:db8::8a2e:370:7334", ""]
GROWTH = {"/leak/retain/": 65536, "/spike/": 0}
MB = 1024 * 1024


def write_log(path: Path, lines: int, seed: int = 4) -> None:
    """Write a memory-report log of about `lines` lines (a few are not request lines)."""
    rng = random.Random(seed)
    weights = [w for w, _ in PATHS]
    makers = [m for _, m in PATHS]
    workers = {pid: [60 * MB, 0] for pid in range(1001, 1009)}
    total = 0
    start = 1795732503
    with path.open("w") as out:
        for n in range(lines):
            if n % 5000 == 4999:
                out.write("worker 3 killed successfully (pid: 1003)\n")
                continue
            pid = 1001 + rng.randrange(8)
            state = workers[pid]
            if state[1] >= 20_000:
                # A respawned worker that reuses the pid: fresh RSS, counter back to 1.
                state[0], state[1] = 60 * MB, 0
                out.write(f"Respawned uWSGI worker {pid - 1000} (new pid: {pid})\n")
            uri = rng.choices(makers, weights)[0](rng)
            key = uri.partition("?")[0]
            state[0] += GROWTH.get(key, rng.choice((0, 0, 0, 4096, -4096)))
            state[1] += 1
            total += 1
            rss = state[0]
            date = time.strftime("%a %b %d %H:%M:%S %Y", time.gmtime(start + n // 50))
            out.write(
                f"{{address space usage: {rss * 4} bytes/{rss * 4 // MB}MB}} "
                f"{{rss usage: {rss} bytes/{rss // MB}MB}} "
                f"[pid: {pid}|app: 0|req: {state[1]}/{total}] {rng.choice(CLIENTS)} () "
                f"{{24 vars in 265 bytes}} [{date}] {rng.choice(METHODS)} {uri} => generated "
                f"5 bytes in {rng.randrange(1, 90)} msecs (HTTP/1.1 200) 1 headers in 45 bytes "
                "(1 switches on core 0)\n"
            )


OURS = textwrap.dedent(
    """
    import io, json, os, resource, sys, time
    sys.path[:0] = [{root!r}, {testproject!r}]
    os.environ["DJANGO_SETTINGS_MODULE"] = "testproject.settings"
    import django
    django.setup()
    from django.core.management import call_command
    from django_leakguard.reporting import uwsgi_parallel
    jobs = uwsgi_parallel.default_jobs() if sys.argv[2] == "auto" else int(sys.argv[2])
    out = io.StringIO()
    started = time.perf_counter()
    call_command("leakreport", "--uwsgi-log", sys.argv[1], "--format", "json", "--jobs",
        sys.argv[2], stdout=out)
    elapsed = time.perf_counter() - started
    rows = json.loads(out.getvalue())["rows"]
    print(json.dumps({{"seconds": elapsed, "maxrss": resource.getrusage(
        resource.RUSAGE_SELF).ru_maxrss * 1024, "top": rows[0]["key"], "jobs": jobs}}))
    """
)

THEIRS = textwrap.dedent(
    """
    import json, resource, sys, time
    from pyuwsgimemhog.pyuwsgimemhog import normalize_path_with_nums, uwsgimemhog
    started = time.perf_counter()
    with open(sys.argv[1]) as f:
        hogs = list(uwsgimemhog(f, 0, normalize_path_with_nums))
    elapsed = time.perf_counter() - started
    print(json.dumps({"seconds": elapsed, "maxrss": resource.getrusage(
        resource.RUSAGE_SELF).ru_maxrss * 1024, "top": hogs[0][0], "jobs": 1}))
    """
)


def memory(pid: int) -> tuple[int, int]:
    """Return the RSS and PSS of a process and its descendants, summed (0 once it is gone)."""
    rss = pss = 0
    pids = [pid]
    while pids:
        current = pids.pop()
        try:
            rollup = Path(f"/proc/{current}/smaps_rollup").read_text()
            children = Path(f"/proc/{current}/task/{current}/children").read_text()
        except OSError:
            continue  # it ended meanwhile
        for line in rollup.splitlines():
            if line.startswith("Rss:"):
                rss += int(line.split()[1]) * 1024
            elif line.startswith("Pss:"):
                pss += int(line.split()[1]) * 1024
        pids.extend(int(child) for child in children.split())
    return rss, pss


def run(code: str, log: Path, *args: str) -> dict[str, object]:
    """Run code in a fresh interpreter, sampling its PSS; return its figures."""
    with subprocess.Popen(
        [PYTHON, "-c", code, str(log), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    ) as process:
        peak_rss = peak_pss = 0
        while process.poll() is None:
            rss, pss = memory(process.pid)
            peak_rss, peak_pss = max(peak_rss, rss), max(peak_pss, pss)
            time.sleep(0.05)
        out, err = process.communicate()
    if process.returncode:
        raise subprocess.CalledProcessError(process.returncode, process.args, out, err)
    figures: dict[str, object] = json.loads(out.strip().splitlines()[-1])
    figures["rss"] = max(peak_rss, int(figures["maxrss"]))  # type: ignore[call-overload]
    figures["pss"] = peak_pss
    return figures


def bench_logs(lines: int, tmp: Path) -> None:
    small, big = tmp / "small.log", tmp / "big.log"
    write_log(small, lines // 10)
    write_log(big, lines)
    ours = OURS.format(root=str(ROOT), testproject=str(ROOT / "testproject"))
    print(f"uWSGI memory-report log: {lines:,} lines ({big.stat().st_size / MB:.0f} MiB)")
    print(
        f"{'tool':<30}{'jobs':>5}{'lines':>11}{'seconds':>9}{'lines/s':>11}"
        f"{'peak RSS':>11}{'peak PSS':>11}  top key"
    )
    tools = (
        ("leakreport --uwsgi-log", ours, ("auto",)),
        ("leakreport --uwsgi-log", ours, ("1",)),
        ("pyuwsgimemhog 0.3.0", THEIRS, ()),
    )
    rates = []
    for name, code, args in tools:
        for log, count in ((small, lines // 10), (big, lines)):
            figures = run(code, log, *args)
            seconds = float(figures["seconds"])  # type: ignore[arg-type]
            rate = count / seconds
            print(
                f"{name:<30}{figures['jobs']:>5}{count:>11,}{seconds:>9.2f}{rate:>11,.0f}"
                f"{int(figures['rss']) / MB:>7.1f} MiB"  # type: ignore[call-overload]
                f"{int(figures['pss']) / MB:>7.1f} MiB  {figures['top']}"  # type: ignore[call-overload]
            )
        rates.append(rate)
    print(
        f"throughput ratio on {lines:,} lines: {rates[0] / rates[2]:.1f}x "
        f"(--jobs 1: {rates[1] / rates[2]:.1f}x)"
    )


DATABASE = textwrap.dedent(
    """
    import datetime as dt, io, os, sys, time
    sys.path[:0] = [{root!r}, {testproject!r}]
    os.environ["DJANGO_SETTINGS_MODULE"] = "testproject.settings"
    os.environ["DATABASE_URL"] = "sqlite:///" + sys.argv[1]
    import django
    django.setup()
    from django.core.management import call_command
    from django.utils import timezone
    from django_leakguard.models import Growth
    rows, keys = int(sys.argv[2]), 500
    call_command("migrate", verbosity=0)
    hour = timezone.now().replace(minute=0, second=0, microsecond=0)
    started = time.perf_counter()
    batch = []
    for n in range(rows):
        batch.append(Growth(kind="request" if n % keys < 400 else "task", key=f"/k{{n % keys}}/",
            hour=hour - dt.timedelta(hours=n // keys), calls=100, rss_growth=n % 977,
            rss_growth_positive=n % 977, rss_grew_calls=3, rss_growth_max=500, heap_calls=100,
            heap_growth=(n % 1013) * 64, heap_growth_max=4096))
        if len(batch) == 20000:
            Growth.objects.bulk_create(batch)
            batch = []
    Growth.objects.bulk_create(batch)
    print("filled {{:,}} rows in {{:.1f}} s".format(rows, time.perf_counter() - started))
    days = rows // keys // 24 + 2
    for since in ("24h", "7d", str(days) + "d"):
        for fmt in ("table", "json"):
            started = time.perf_counter()
            call_command("leakreport", "--since", since, "--format", fmt, stdout=io.StringIO())
            print("report --since {{:<5}} --format {{:<6}} {{:.3f}} s".format(
                since, fmt, time.perf_counter() - started))
    """
)


def bench_database(rows: int, tmp: Path) -> None:
    code = DATABASE.format(root=str(ROOT), testproject=str(ROOT / "testproject"))
    print(f"\nDatabase report over {rows:,} Growth rows (SQLite file, 500 keys, one row per hour)")
    done = subprocess.run(
        [PYTHON, "-c", code, str(tmp / "bench.sqlite3"), str(rows)],
        capture_output=True,
        text=True,
        check=True,
        cwd=ROOT,
    )
    print(done.stdout, end="")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lines", type=int, default=1_000_000)
    parser.add_argument("--rows", type=int, default=1_000_000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        bench_logs(args.lines, Path(tmp))
        bench_database(args.rows, Path(tmp))
    return 0


if __name__ == "__main__":
    sys.exit(main())
