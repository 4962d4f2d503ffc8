"""What a local multi-rank launch costs: ``sparse_kd.local_launch.launch_local`` with ranks forked
from a forkserver that imported torch, torchrec and fbgemm_gpu once, against spawned ranks that
import everything themselves (what the multi-rank tests paid before).

Each round launches 2 ranks that import torchrec, join a gloo process group and meet at a barrier.
Wall seconds per launch, from the call to the returned results; the first forkserver launch
(which starts the server) is reported on its own.

    python benchmarks/bench_launch.py --out docs/bench/launch.json
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import List, Optional

ROOT = Path(__file__).resolve().parents[1]
for p in (ROOT, ROOT / "benchmarks"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

from machine import machine_info, write_json  # noqa: E402


def rank_work() -> int:
    """What every multi-rank test's rank does first: import the stack, join the group."""
    import torch.distributed as dist
    import torchrec  # noqa: F401

    from sparse_kd.dist import init_distributed

    env = init_distributed("gloo", 60)
    dist.barrier()
    return env.rank


def timed(method: str, nproc: int) -> float:
    from sparse_kd.local_launch import launch_local

    t0 = time.perf_counter()
    out = launch_local(rank_work, nproc, start_method=method)
    assert sorted(out) == list(range(nproc)) and sorted(out.values()) == list(range(nproc)), out
    return time.perf_counter() - t0


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=5, help="launches per start method (after forkserver's first)")
    p.add_argument("--nproc", type=int, default=2, help="ranks per launch")
    p.add_argument("--out", default="runs/bench/launch.json", help="JSON path")
    args = p.parse_args(argv)
    info = machine_info()
    first = timed("forkserver", args.nproc)  # starts the server: imports once
    times = {"spawn": [], "forkserver": []}
    for _ in range(args.rounds):  # interleaved, so drift in the machine's load hits both
        for method in times:
            times[method].append(timed(method, args.nproc))
    med = {m: statistics.median(t) for m, t in times.items()}
    print(f"# {args.nproc} ranks per launch, {args.rounds} rounds; first forkserver launch (starts the server) {first:.2f} s")
    print("| start method | median s per launch | min | max |\n|---|---|---|---|")
    for m, t in times.items():
        print(f"| {m} | {med[m]:.2f} | {min(t):.2f} | {max(t):.2f} |")
    print(f"# spawn / forkserver: {med['spawn'] / med['forkserver']:.1f}x")
    write_json(args.out, {
        "benchmark": "launch", "command": "python benchmarks/bench_launch.py " + " ".join(argv or sys.argv[1:]),
        "machine": info, "nproc": args.nproc, "rounds": args.rounds,
        "first_forkserver_launch_s": round(first, 3), "seconds": {m: [round(x, 3) for x in t] for m, t in times.items()},
        "median_s": {m: round(v, 3) for m, v in med.items()}, "spawn_over_forkserver": round(med["spawn"] / med["forkserver"], 2),
    })
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
