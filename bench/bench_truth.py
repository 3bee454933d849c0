"""What each call of the accuracy workload really keeps, measured in one process without LeakGuard.

The ground truth beside bench_accuracy.py: the accuracy project's calls (one run's plan, drawn
from a seed as there) are served in this process, one at a time, through Django's WSGI handler
without LeakGuardMiddleware, and around every call the script collects the garbage and reads
the two heap signals the recorder reads (glibc's C heap, and pymalloc blocks at
report.BLOCK_BYTES each). Nothing overlaps, nothing is sampled, no worker is recycled: each
figure is what an ideal per-call measurement would charge. Per kind it prints what a call kept,
for all calls but the first and by the key's call number in the process, and the blocks per
call; then which non-leaks keep more per call than the smallest leak.

    python bench/bench_truth.py [--seed 101] [--calls 4000] [--database sqlite|postgresql]
                                [--collect 0|1|2]

Run it under `flock /tmp/leakguard-bench.lock` on a shared machine.
"""

from __future__ import annotations

import argparse
import gc
import io
import os
import statistics
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT)]

from bench.accuracy import harness, workload  # noqa: E402

BANDS = ((1, 10), (10, 30), (30, 100), (100, 300), (300, None))
POSTGRES = "postgresql://postgres@127.0.0.1:5432/postgres"


def serve(plan: workload.Plan, collect: int) -> dict[str, list[tuple[int, int]]]:
    """Serve plan in this process; per kind, (C heap, blocks) each call kept, in order."""
    import django
    from django.conf import settings
    from django.core.handlers.wsgi import WSGIHandler
    from django.core.management import call_command

    from django_leakguard import memory

    django.setup()
    settings.MIDDLEWARE = [name for name in settings.MIDDLEWARE if "leakguard" not in name]
    call_command("migrate", verbosity=0)
    app = WSGIHandler()

    def read() -> tuple[int, int]:
        gc.collect(collect)
        return memory.heap() or 0, sys.getallocatedblocks()

    def start_response(status: str, headers: object, exc_info: object = None) -> None:
        return None

    kept: dict[str, list[tuple[int, int]]] = defaultdict(list)
    for path, name in zip(plan.paths(), plan.calls, strict=True):
        environ = {
            "REQUEST_METHOD": "GET",
            "PATH_INFO": path,
            "SERVER_NAME": "127.0.0.1",
            "SERVER_PORT": "80",
            "HTTP_HOST": "127.0.0.1",
            "SERVER_PROTOCOL": "HTTP/1.1",
            "wsgi.input": io.BytesIO(),
            "wsgi.errors": sys.stderr,
            "wsgi.url_scheme": "http",
        }
        heap, blocks = read()
        response = app(environ, start_response)
        for _chunk in response:
            pass
        response.close()
        del response
        heap_after, blocks_after = read()
        kept[name].append((heap_after - heap, blocks_after - blocks))
    return kept


def mean(values: list[float]) -> str:
    return f"{statistics.mean(values):8.0f}" if values else "       -"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=101)
    parser.add_argument("--calls", type=int, default=4000)
    parser.add_argument("--database", choices=("sqlite", "postgresql"), default="postgresql")
    parser.add_argument("--collect", type=int, choices=(0, 1, 2), default=0)
    args = parser.parse_args(argv)
    from django_leakguard.reporting.model import BLOCK_BYTES

    plan = workload.draw(args.seed, args.calls, max(100, args.calls // 6))
    postgres = POSTGRES if args.database == "postgresql" else None
    if postgres and not harness.reachable(postgres):
        postgres = None
    with (
        tempfile.TemporaryDirectory() as workdir,
        harness.fresh_database(Path(workdir), postgres) as (url, description),
    ):
        env = harness.project_env(url, plan)
        os.environ.update(env)
        sys.path[:0] = env["PYTHONPATH"].split(os.pathsep)
        kept = serve(plan, args.collect)
    print(
        f"seed {args.seed}, {args.calls} calls in one process, {description}, "
        f"gc.collect({args.collect}) around each call; bytes = C heap + {BLOCK_BYTES} B a block"
    )
    bands = " ".join(f"{f'{a + 1}-{b}' if b else f'{a + 1}+':>8}" for a, b in BANDS)
    print(f"{'kind':12} {'leak':>6} {'calls':>5} {'kept/call':>9} | {bands} | blocks/call")
    per_call: dict[str, float] = {}
    for name, calls in kept.items():
        values = [heap + BLOCK_BYTES * blocks for heap, blocks in calls[1:]]
        per_call[name] = statistics.mean(values) if values else 0.0
    for name in sorted(kept, key=lambda name: -per_call[name]):
        calls = kept[name]
        values = [heap + BLOCK_BYTES * blocks for heap, blocks in calls]
        banded = " ".join(mean(values[a:b]) for a, b in BANDS)
        blocks = mean([blocks for _heap, blocks in calls[1:]])
        print(
            f"{name:12} {plan.sizes.get(name, 0):6} {len(calls):5} {per_call[name]:9.0f} | "
            f"{banded} | {blocks}"
        )
    leaks = [name for name in plan.sizes if name in kept]
    smallest = min(leaks, key=lambda name: per_call[name])
    above = [
        name for name in kept if name not in plan.sizes and per_call[name] > per_call[smallest]
    ]
    print(
        f"non-leaks keeping more per call than the smallest leak ({smallest}, "
        f"{per_call[smallest]:.0f} B): {', '.join(sorted(above)) or 'none'}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
