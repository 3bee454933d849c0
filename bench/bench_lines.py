"""Where the retaining line of every leak kind ranks: sampled tracing's --detail and leakhunt.

On the accuracy project (bench/accuracy), for every leak kind: where the first line of its
leak function (accuracysite/leaks.py, keep_*) ranks among the sites `leakreport --detail`
lists after a load under Gunicorn sync with TRACE_SAMPLE_RATE = 0.05, and among the lines
`leakhunt` names; and, for every non-leak, which lines leakhunt flags (none is the target).
Also the order of `leakreport --sort retained`.

    python bench/bench_lines.py [--calls 4000] [--seed N] [--requests 200] [--skip-server]

Run it under `flock /tmp/leakguard-bench.lock` on a shared machine.
"""

from __future__ import annotations

import argparse
import ast
import json
import random
import re
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT)]

from bench.accuracy import harness, workload  # noqa: E402

LEAKS_FILE = harness.PROJECT / "accuracysite" / "leaks.py"
# The function that keeps each leak kind's memory: its lines are the retaining lines.
FUNCTIONS = {
    "tuples": "keep_rows",
    "loggers": "keep_loggers",
    "receivers": "keep_receiver",
    "native": "keep_native",
    "async": "keep_event",
    "db": "keep_export",
    "dict": "keep_profile",
}
PYTHON_LEAKS = tuple(name for name in FUNCTIONS if name != "native")
RATE = "0.05"
LINE = re.compile(r"^\s*(\d+)\. (\S+):(\d+)\s+(.*)$", re.MULTILINE)


def retaining_lines() -> dict[str, range]:
    tree = ast.parse(LEAKS_FILE.read_text())
    spans = {
        node.name: range(node.body[0].lineno, (node.end_lineno or node.lineno) + 1)
        for node in tree.body
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
    }
    return {kind: spans[function] for kind, function in FUNCTIONS.items()}


def rank_of(sites: list[tuple[str, int]], lines: range) -> int | None:
    for rank, (filename, lineno) in enumerate(sites, 1):
        if filename == "accuracysite/leaks.py" and lineno in lines:
            return rank
    return None


def hunt_path(kind: workload.Kind) -> str:
    # One id would repeat: a leak per new id needs {n}; a cache's range is wider than its bound.
    return kind.path.replace("{m}", "{n}").replace("{pk}", "3")


def run_leakhunt(env: dict[str, str], path: str, requests: int) -> list[tuple[str, int, str]]:
    output = harness.manage(
        env, "leakhunt", path, "--force", "--requests", str(requests), timeout=900
    )
    return [(m[2], int(m[3]), m[4]) for m in LINE.finditer(output)]


def leakhunt_table(plan: workload.Plan, requests: int, lines: dict[str, range]) -> list[str]:
    rows = []
    with (
        tempfile.TemporaryDirectory(prefix="lines-") as folder,
        harness.fresh_database(Path(folder), None) as (url, _),
    ):
        env = harness.project_env(url, plan)
        harness.manage(env, "migrate", "--noinput", "-v", "0")
        for kind in workload.KINDS:
            started = time.monotonic()
            found = run_leakhunt(env, hunt_path(kind), requests)
            seconds = time.monotonic() - started
            if kind.leak:
                rank = rank_of([(f, n) for f, n, _ in found], lines[kind.name])
                c_memory = any("C memory" in rest for *_, rest in found[:1])
                shown = "not named" if rank is None else f"#{rank}"
                if rank == 1 and c_memory:
                    shown += " (C memory)"
                rows.append(
                    f"| {kind.name} (leak) | {hunt_path(kind)} | {shown} | {seconds:.0f} s |"
                )
            else:
                flagged = ", ".join(f"{f}:{n}" for f, n, _ in found) or "none"
                rows.append(
                    f"| {kind.name} | {hunt_path(kind)} | flagged: {flagged} | {seconds:.0f} s |"
                )
            print(rows[-1], flush=True)
    return rows


def tracing_tables(plan: workload.Plan, lines: dict[str, range]) -> list[str]:
    collected: dict[str, Any] = {}

    def after(env: dict[str, str]) -> None:
        collected["retained"] = json.loads(
            harness.manage(
                env,
                "leakreport",
                "--format",
                "json",
                "--limit",
                "0",
                "--kind",
                "request",
                "--since",
                "1d",
                "--sort",
                "retained",
            )
        )["rows"]
        for name in PYTHON_LEAKS:
            if name in plan.sizes:
                route = workload.BY_NAME[name].route
                collected[name] = json.loads(
                    harness.manage(
                        env,
                        "leakreport",
                        "--detail",
                        route,
                        "--kind",
                        "request",
                        "--since",
                        "1d",
                        "--format",
                        "json",
                    )
                )["details"]

    postgres = harness.POSTGRES_URL if harness.reachable(harness.POSTGRES_URL) else None
    harness.run(
        "gunicorn-sync",
        plan,
        postgres=postgres,
        extra_env={"LEAKGUARD_TRACE_SAMPLE_RATE": RATE},
        after=after,
    )
    rows = [
        "| leak | kept/call | traced calls | retained/call (traced) | rank of its line in "
        "--detail | top site |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for name in PYTHON_LEAKS:
        details = collected.get(name) or []
        if not details:
            rows.append(f"| {name} | {plan.sizes.get(name, 0):,} B | 0 | n/a | n/a | n/a |")
            continue
        detail = details[0]
        sites = [(s["filename"], s["lineno"]) for s in detail["sites"]]
        rank = rank_of(sites, lines[name])
        top = f"{sites[0][0]}:{sites[0][1]}" if sites else "none"
        rows.append(
            f"| {name} | {plan.sizes[name]:,} B | {detail['traced_calls']} | "
            f"{detail['retained_per_call_bytes']} B | "
            f"{'not listed' if rank is None else f'#{rank}'} | {top} |"
        )
    order = [
        (row["key"], row.get("retained_per_call_bytes"))
        for row in collected.get("retained", [])
        if row.get("traced_calls")
    ]
    leak_routes = {workload.BY_NAME[n].route: n for n in plan.sizes}
    rows.append("")
    rows.append(
        "--sort retained (traced keys, best first): "
        + ", ".join(
            f"{leak_routes.get(key, key)}{'*' if key in leak_routes else ''} ({value} B)"
            for key, value in order
        )
    )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--calls", type=int, default=4000)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--requests", type=int, default=200, help="leakhunt's --requests")
    parser.add_argument("--skip-server", action="store_true", help="leakhunt only")
    parser.add_argument("--skip-hunt", action="store_true", help="sampled tracing only")
    args = parser.parse_args()
    seed = args.seed if args.seed is not None else random.randrange(1 << 30)
    plan = workload.draw(seed, args.calls, max(100, args.calls // 6))
    lines = retaining_lines()
    print(
        f"seed {seed}; kept per call: "
        + ", ".join(f"{name} {size:,} B" for name, size in plan.sizes.items())
    )
    if not args.skip_hunt:
        print(f"\nleakhunt ({args.requests} requests; rank of the leak function's line):")
        print("| kind | path | result | time |\n| --- | --- | --- | --- |")
        leakhunt_table(plan, args.requests, lines)
    if not args.skip_server:
        print(
            f"\nsampled tracing, Gunicorn sync, TRACE_SAMPLE_RATE = {RATE}, {args.calls:,} calls:"
        )
        print("\n".join(tracing_tables(plan, lines)))


if __name__ == "__main__":
    main()
