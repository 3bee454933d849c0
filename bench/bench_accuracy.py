"""Where leakreport ranks known leaks among non-leaks, per server, over repeated runs.

The accuracy project (bench/accuracy) has seven kinds of leak (small tuples, a logger per new
id, receivers piling up, C-level malloc, an async view, a database view with CONN_MAX_AGE = 0,
a dict entry per new id) and eight non-leaks (a 30 MiB transient spike, an lru_cache and a
deque that level off, two database views, three plain views, one of them async). Each run draws
its own seed: what each leak keeps per call (about 100 B to 50 KiB) and the traffic mix (most
calls to non-leaks; the hottest leak keeps the least). Each server serves each run in a fresh
database, workers recycled by MAX_REQUESTS; then `leakreport --format json --limit 0` ranks by
the default (heap kept). A table per server gives every leak's rank and the non-leaks ranked
above any leak; a last scenario serves a 48 KiB/call database view among the non-leaks.

    python bench/bench_accuracy.py [--runs 3] [--servers gunicorn-sync,uwsgi] [--quick]
        [--seed N] [--rows]

--rows also prints every key's row of each run (rank, heap and pymalloc blocks per call,
calls, readings): where the offsets and the non-leaks' figures show.

Run it under `flock /tmp/leakguard-bench.lock` on a shared machine.
"""

from __future__ import annotations

import argparse
import math
import random
import sys
import time
from collections.abc import Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT)]

from bench.accuracy import harness, workload  # noqa: E402
from bench.accuracy.harness import Outcome  # noqa: E402

CONN_SCENARIO = "conn-max-age-0"
CHOICES = (*harness.SETUPS, CONN_SCENARIO)
# Targets: every run clean on these; on gthread, clean in two runs of three and never more
# than one non-leak above a leak.
STRICT = ("gunicorn-sync", "uwsgi", "uwsgi-router", "uvicorn", "celery")
DB_LEAK_BYTES = 48 * 1024
DB_VIEW_LIMIT = 4 * 1024


def format_bytes(value: float | None) -> str:
    if value is None or math.isinf(value):
        return "n/a"
    if abs(value) < 1024:
        return f"{value:.0f} B"
    return f"{value / 1024:.1f} KiB"


def draw_plan(seed: int, calls: int, scenario: str) -> workload.Plan:
    max_requests = max(100, calls // 6)
    if scenario == CONN_SCENARIO:
        return workload.draw(
            seed, calls, max_requests, sizes={"db": DB_LEAK_BYTES}, leak_share=(0.05, 0.1)
        )
    return workload.draw(seed, calls, max_requests)


def print_legend() -> None:
    print("\nKinds (leaks first):")
    for kind in workload.KINDS:
        print(f"  {kind.name:<12} {'leak    ' if kind.leak else 'non-leak'} {kind.route:<28} "
              f"{kind.about}")  # fmt: skip


def print_table(scenario: str, outcomes: Sequence[Outcome]) -> None:
    first = outcomes[0]
    about = (
        "Gunicorn sync, 2 workers, 2 clients"
        if scenario == CONN_SCENARIO
        else harness.SETUPS[scenario].about
    )
    print(
        f"\n== {scenario}: {about}; {first.database}; {len(first.plan.calls)} calls a run, "
        f"MAX_REQUESTS {first.plan.max_requests} (jitter 10 %); rows ranked by {first.kind}"
    )
    column = 25
    print(f"{'run (seed)':<12}" + "".join(
        f" | {f'{i + 1} ({o.plan.seed})':<{column}}" for i, o in enumerate(outcomes)
    ))  # fmt: skip
    print(f"{'leak':<12}" + f" | {'kept/call':>9} {'calls':>6} {'rank':>6}  " * len(outcomes))
    for name in first.plan.leaks():
        cells = "".join(
            f" | {format_bytes(o.plan.sizes[name]):>9} {o.calls(name):>6} "
            f"{o.rank(name) or '-':>6}  "
            for o in outcomes
        )
        print(f"{name:<12}{cells}")
    for name in workload.DB_VIEWS:
        cells = (
            f"{format_bytes(o.heap_per_call(name))}/call, {o.heap_readings(name)} readings"
            for o in outcomes
        )
        print(f"{name:<12}" + "".join(f" | {cell:<{column}}" for cell in cells))
    print(f"{'stored/sent':<12}" + "".join(
        f" | {f'{o.stored} / {o.sent}':<{column}}" for o in outcomes
    ))  # fmt: skip
    print(f"{'workers':<12}" + "".join(
        f" | {o.workers if o.workers is not None else 'n/a':<{column}}" for o in outcomes
    ))  # fmt: skip
    print(f"{'run time':<12}" + "".join(
        f" | {f'{o.seconds:.0f} s':<{column}}" for o in outcomes
    ))  # fmt: skip
    for i, outcome in enumerate(outcomes):
        if outcome.kept_log:
            print(f"run {i + 1}: {outcome.sent - outcome.stored} calls went unrecorded; the "
                  f"server's log: {outcome.kept_log}")  # fmt: skip
    print("non-leaks ranked above a leak (their rank), per run:")
    for i, outcome in enumerate(outcomes):
        above = outcome.non_leaks_above()
        listed = ", ".join(f"{name} ({outcome.rank(name)})" for name in above) or "none"
        print(f"  run {i + 1}: {listed}")


def print_rows(outcomes: Sequence[Outcome]) -> None:
    """Every key's row of each run, as leakreport ranked it: what the summary leaves out."""
    names = {kind.key(outcome.kind): kind.name for outcome in outcomes for kind in workload.KINDS}
    for outcome in outcomes:
        print(
            f"rows of seed {outcome.plan.seed}: rank, kind, heap/call, blocks/call, calls, "
            "readings"
        )
        for row in outcome.rows:
            readings = row.get("heap_calls") or 0
            blocks = row.get("blocks_growth") or 0
            print(
                f"  {row['rank']:>3}  {names.get(row['key'], row['key']):<12} "
                f"{format_bytes(row.get('heap_growth_per_call_bytes')):>10} "
                f"{blocks / readings if readings else 0:>8.1f} {row['calls']:>6} {readings:>6}"
            )


def verdict(scenario: str, outcomes: Sequence[Outcome]) -> str:
    runs = len(outcomes)
    clean = sum(outcome.clean for outcome in outcomes)
    worst = max(len(outcome.non_leaks_above()) for outcome in outcomes)
    if scenario == CONN_SCENARIO:
        ranks = [outcome.rank("db") for outcome in outcomes]
        # A view without a heap reading cannot show the target is met.
        heaps = [
            max(outcome.heap_per_call(name) or math.inf for name in workload.DB_VIEWS)
            for outcome in outcomes
        ]
        holds = all(rank == 1 for rank in ranks) and all(heap < DB_VIEW_LIMIT for heap in heaps)
        return (
            f"{scenario}: the 48 KiB/call view ranks {ranks}, the plain database views are "
            f"charged at most {', '.join(format_bytes(h) for h in heaps)} per call: target "
            f"(rank 1, under 4 KiB) {'HOLDS' if holds else 'MISSED'}"
        )
    if scenario in STRICT:
        holds = clean == runs
        target = "every leak above every non-leak in every run"
    else:
        holds = clean >= math.ceil(2 * runs / 3) and worst <= 1
        target = "clean in 2 runs of 3, never more than one non-leak above a leak"
    return (
        f"{scenario}: every leak above every non-leak in {clean} of {runs} runs, at most "
        f"{worst} non-leak(s) above a leak; target ({target}) {'HOLDS' if holds else 'MISSED'}"
    )


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument(
        "--servers",
        default=",".join(CHOICES),
        help=f"comma-separated, from {', '.join(CHOICES)} (default: all)",
    )
    parser.add_argument("--quick", action="store_true", help="a small load (600 calls a run)")
    parser.add_argument("--calls", type=int, help="calls a run (default 3000)")
    parser.add_argument("--seed", type=int, help="the first run's seed (default: random)")
    parser.add_argument(
        "--sqlite", action="store_true", help="SQLite even when PostgreSQL is reachable"
    )
    parser.add_argument(
        "--rows", action="store_true", help="also print every key's row of each run"
    )
    options = parser.parse_args(argv)
    chosen = [name.strip() for name in options.servers.split(",") if name.strip()]
    unknown = sorted(set(chosen) - set(CHOICES))
    if unknown:
        parser.error(f"unknown server(s) {', '.join(unknown)}; choose from {', '.join(CHOICES)}")
    calls = options.calls or (600 if options.quick else 3000)
    seed = options.seed if options.seed is not None else random.SystemRandom().randrange(10**6)
    seeds = [seed + run for run in range(options.runs)]
    postgres = None
    if not options.sqlite and harness.reachable(harness.POSTGRES_URL):
        postgres = harness.POSTGRES_URL
    print(
        f"accuracy: {options.runs} run(s) per server, {calls} calls a run, seeds {seeds}; "
        f"database: {'PostgreSQL at 127.0.0.1:5432' if postgres else 'SQLite'}; "
        "ranking: leakreport's default (heap kept)"
    )
    print_legend()
    verdicts = []
    for scenario in chosen:
        setup = "gunicorn-sync" if scenario == CONN_SCENARIO else scenario
        if harness.SETUPS[setup].tasks and not harness.reachable(harness.redis_url()):
            verdicts.append(f"{scenario}: not run, Redis at {harness.redis_url()} is unreachable")
            continue
        outcomes = []
        for run_seed in seeds:
            plan = draw_plan(run_seed, calls, scenario)
            started = time.monotonic()
            try:
                outcomes.append(harness.run(setup, plan, postgres=postgres))
            except Exception as exc:
                print(f"{scenario} (seed {run_seed}) failed after "
                      f"{time.monotonic() - started:.0f} s: {exc}", flush=True)  # fmt: skip
                break
            print(f"  {scenario}, seed {run_seed}: {time.monotonic() - started:.0f} s",
                  flush=True)  # fmt: skip
        if len(outcomes) < len(seeds):
            verdicts.append(f"{scenario}: FAILED to run (see above)")
            continue
        print_table(scenario, outcomes)
        if options.rows:
            print_rows(outcomes)
        verdicts.append(verdict(scenario, outcomes))
    print("\nSummary")
    for line in verdicts:
        print(f"  {line}")


if __name__ == "__main__":
    # No sys.exit: bench/run.py runs every benchmark in one process, one after the other.
    main()
