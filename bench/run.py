"""Run every benchmark in bench/ (files named bench_*.py), one after the other."""

from __future__ import annotations

import runpy
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main() -> int:
    benches = sorted(HERE.glob("bench_*.py"))
    if not benches:
        print("no benchmarks yet")
    for bench in benches:
        print(f"== {bench.name}", flush=True)
        runpy.run_path(str(bench), run_name="__main__")
    return 0


if __name__ == "__main__":
    sys.exit(main())
