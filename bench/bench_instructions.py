"""Instructions added per request by LeakGuardMiddleware, counted by valgrind (callgrind).

Timings on a shared virtual machine move by several microseconds between runs; instruction
counts do not: callgrind counts the instructions the process runs in user space, the same for
the same inputs whatever else the machine does. Each variant runs twice under callgrind, once
with no measured requests and once with REQUESTS of them after the same warm-up, and the
difference divided by REQUESTS is its cost per request. Time spent in the kernel (the
/proc/self/statm read itself) is not counted: the timings of bench_middleware.py show it.

Run: .venv/bin/python bench/bench_instructions.py (skipped when valgrind is not installed).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
REQUESTS = 1000
WARM_UP = 300

VARIANTS = {
    "no middleware": [],
    "LeakGuardMiddleware": ["django_leakguard.middleware.LeakGuardMiddleware"],
    "LeakGuard, reads stubbed": ["django_leakguard.middleware.LeakGuardMiddleware"],
    "naive psutil middleware": ["bench_middleware.PsutilMiddleware"],
}

CHILD = """
import contextlib, sys
sys.path.insert(0, {here!r})
import bench_middleware as bench
from django_leakguard import recorder_process

bench.setup()
serve = bench.handler({middleware!r})
recorder_process.get_recorder()._has_heap = {heap!r}
from django.test import override_settings
traced = override_settings(LEAKGUARD={{"FLUSH_INTERVAL": 3600, "TRACE_SAMPLE_RATE": 1.0}})
with bench.MemoryReadsStubbed() if {stub!r} else contextlib.nullcontext():
    for _ in range({warm}):
        serve()
    with traced if {trace!r} else contextlib.nullcontext():
        for _ in range({requests}):
            serve()
recorder = recorder_process.get_recorder()
print("traced", sum(a.traced_calls for b in recorder.pending().values() for a in b.values()))
recorder.discard()
"""
# Requests traced one after the other (TRACE_SAMPLE_RATE = 1): fewer, each costs far more.
TRACED_REQUESTS = 200


def count(middleware: list[str], requests: int, *, stub: bool, heap: bool) -> int:
    """Return the instructions callgrind counts for the child script."""
    return count_traced(middleware, requests, stub=stub, heap=heap)[0]


def count_traced(
    middleware: list[str], requests: int, *, stub: bool, heap: bool, trace: bool = False
) -> tuple[int, int]:
    """Return the instructions callgrind counts for the child script, and the calls traced."""
    code = CHILD.format(
        here=str(HERE),
        stub=stub,
        middleware=middleware,
        heap=heap,
        warm=WARM_UP,
        requests=requests,
        trace=trace,
    )
    with tempfile.TemporaryDirectory() as tmp:
        out = subprocess.run(
            [
                "valgrind",
                "--tool=callgrind",
                f"--callgrind-out-file={tmp}/callgrind.out",
                sys.executable,
                "-c",
                code,
            ],
            env={**os.environ, "PYTHONHASHSEED": "0"},
            capture_output=True,
            text=True,
            check=True,
        )
    match = re.search(r"Collected : (\d+)", out.stderr)
    assert match, out.stderr[-2000:]
    traced = re.search(r"^traced (\d+)$", out.stdout, re.MULTILINE)
    assert traced, out.stdout[-2000:]
    return int(match.group(1)), int(traced.group(1))


def main() -> None:
    if shutil.which("valgrind") is None:
        print("valgrind is not installed: skipped")
        return
    print(
        f"user-space instructions per request (callgrind, {REQUESTS} requests after "
        f"{WARM_UP} of warm-up; heap readings off, so that the figures do not depend on sampling)"
    )
    per_request = {}
    for name, middleware in VARIANTS.items():
        stub = name.endswith("stubbed")
        runs = [count(middleware, n, stub=stub, heap=False) for n in (0, REQUESTS)]
        per_request[name] = (runs[1] - runs[0]) / REQUESTS
    base = per_request["no middleware"]
    print(f"{'variant':<26} {'per request':>12} {'added':>10}")
    for name, value in per_request.items():
        added = "" if name == "no middleware" else f"{value - base:+10,.0f}"
        print(f"{name:<26} {value:12,.0f} {added:>10}")
    heap = [
        count(VARIANTS["LeakGuardMiddleware"], n, stub=False, heap=True) for n in (0, REQUESTS)
    ]
    print(
        f"{'LeakGuard, heap on':<26} {(heap[1] - heap[0]) / REQUESTS:12,.0f} "
        f"{(heap[1] - heap[0]) / REQUESTS - base:+10,.0f}  (every call of the key's late band "
        "reads until it has its first readings, from the 500th call; past them a share budgeted "
        "by time, which valgrind slows: bench_middleware.py gives the heap's steady cost)"
    )
    guarded = VARIANTS["LeakGuardMiddleware"]
    untraced = per_request["LeakGuardMiddleware"]
    (before, _), (after, traced) = (
        count_traced(guarded, n, stub=False, heap=False, trace=True) for n in (0, TRACED_REQUESTS)
    )
    # Requests the GC budget left untraced (see tracing_gc) cost what an untraced one does.
    extra = (after - before - TRACED_REQUESTS * untraced) / max(traced, 1)
    print(
        f"{'LeakGuard, traced':<26} {untraced + extra:12,.0f} {untraced + extra - base:+10,.0f}"
        f"  ({traced} of {TRACED_REQUESTS} requests traced; a traced one costs {extra:,.0f} "
        f"more than an untraced one, {extra / base:.1f} times a request without middleware)"
    )


if __name__ == "__main__":
    main()
