"""Run every benchmark (``--quick``: the seconds-long variants, as the tests do).

Each benchmark prints its table and writes JSON under runs/bench/; see docs/BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
BENCHES = ["bench_lookup.py", "bench_train.py", "bench_teacher.py", "bench_scale.py", "bench_serve.py", "bench_data.py"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true", help="small sizes, seconds each")
    ap.add_argument("--only", nargs="*", default=None, help=f"subset of {BENCHES}")
    args = ap.parse_args()
    failed = []
    for b in args.only or BENCHES:
        cmd = [sys.executable, str(HERE / b)] + (["--quick"] if args.quick else [])
        print(f"\n=== {' '.join(cmd[1:])}", flush=True)
        t0 = time.perf_counter()
        rc = subprocess.call(cmd)
        print(f"=== {b}: exit {rc} in {time.perf_counter() - t0:.0f}s", flush=True)
        if rc:
            failed.append(b)
    if failed:
        print(f"failed: {failed}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
