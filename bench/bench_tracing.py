"""Added time per request of sampled allocation tracing (LEAKGUARD["TRACE_SAMPLE_RATE"]).

One WSGI handler with LeakGuardMiddleware serves a minimal view at TRACE_SAMPLE_RATE 0 and
0.01, and a handler without middleware serves it as the baseline, in one process. Rounds are
interleaved in a shuffled order so that drift hits every variant alike. A traced request costs
far more than an untraced one, so the mean over all requests is what matters, next to the
median of the rounds; both are reported. Flushing is excluded (FLUSH_INTERVAL is an hour).

    python bench/bench_tracing.py [--view minimal|db]

--view db serves bench_middleware's view that queries the database and renders a template.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE)]

from bench_middleware import handler, setup, time_round  # noqa: E402  (after the path is set)

ROUNDS = 31
REQUESTS_PER_ROUND = 2000
TRACED_REQUESTS = 300
RATES = {"TRACE_SAMPLE_RATE=0": 0.0, "TRACE_SAMPLE_RATE=0.01": 0.01}


def leakguard(rate: float) -> dict[str, Any]:
    return {"FLUSH_INTERVAL": 3600, "TRACE_SAMPLE_RATE": rate}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--view", choices=("minimal", "db"), default="minimal")
    view = parser.parse_args().view
    label = "a minimal view" if view == "minimal" else "a query-and-template view"
    setup(view)
    from django.test import override_settings

    from django_leakguard.recorder_process import get_recorder

    bare = handler([])
    guarded = handler(["django_leakguard.middleware.LeakGuardMiddleware"])

    def run(name: str, n: int) -> float:
        if name == "no middleware":
            return time_round(bare, n)
        with override_settings(LEAKGUARD=leakguard(RATES[name])):
            return time_round(guarded, n)

    variants = ["no middleware", *RATES]
    for name in variants:  # warm up
        run(name, 500)
    with override_settings(LEAKGUARD=leakguard(1.0)):
        time_round(guarded, 50)  # the first traces import and fill caches
        traced = [time_round(guarded, 1) for _ in range(TRACED_REQUESTS)]
    get_recorder().discard()

    samples: dict[str, list[float]] = {name: [] for name in variants}
    shuffler = random.Random(0)
    for _ in range(ROUNDS):
        shuffler.shuffle(variants)
        for name in variants:
            samples[name].append(run(name, REQUESTS_PER_ROUND))
    traced_calls = sum(
        aggregate.traced_calls
        for bucket in get_recorder().pending().values()
        for aggregate in bucket.values()
    )
    get_recorder().discard()

    base = samples["no middleware"]
    view_median = statistics.median(base)
    view_mean = statistics.fmean(base)
    print(
        f"{ROUNDS} interleaved rounds of {REQUESTS_PER_ROUND} requests to {label}; "
        "per request: median and mean of the rounds, and the mean added to no middleware"
    )
    print(f"{'variant':<24} {'median':>10} {'mean':>10} {'added (mean)':>14} {'of the view':>12}")
    for name in ["no middleware", *RATES]:
        values = samples[name]
        median, mean = statistics.median(values), statistics.fmean(values)
        added = mean - view_mean
        shown = "" if name == "no middleware" else f"{added * 1e6:+10.2f} µs"
        share = "" if name == "no middleware" else f"{added / view_mean:+11.1%}"
        print(f"{name:<24} {median * 1e6:7.2f} µs {mean * 1e6:7.2f} µs {shown:>14} {share:>12}")
    tracing_added = statistics.fmean(samples["TRACE_SAMPLE_RATE=0.01"]) - statistics.fmean(
        samples["TRACE_SAMPLE_RATE=0"]
    )
    print(
        f"tracing at 0.01 adds {tracing_added * 1e6:+.2f} µs per request on average over rate 0: "
        f"{tracing_added / view_mean:+.1%} of the view's {view_median * 1e6:.1f} µs "
        f"(median); {traced_calls} of {ROUNDS * REQUESTS_PER_ROUND} requests were traced"
    )
    untraced = statistics.median(samples["TRACE_SAMPLE_RATE=0"])
    extra = statistics.fmean(traced) - untraced
    fraction = traced_calls / (ROUNDS * REQUESTS_PER_ROUND)
    print(
        f"one traced request (rate 1, {TRACED_REQUESTS} requests): median "
        f"{statistics.median(traced) * 1e6:.0f} µs, mean {statistics.fmean(traced) * 1e6:.0f} µs"
        f"; so the share traced x the extra cost = {fraction * extra * 1e6:+.2f} µs per request, "
        f"{fraction * extra / view_median:+.1%} of the view"
    )


if __name__ == "__main__":
    main()
