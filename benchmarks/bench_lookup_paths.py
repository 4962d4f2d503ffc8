"""Why the CPU serving lookup is built the way it is: the alternatives, measured side by side.

Same tables and batches as ``bench_lookup.py`` (4 x 2M x 64, batch 2048 x ~20 Zipf ids), int8
and int4 (``--dtypes``), interleaved rounds, medians of M ids/s:

* ``threads``: :class:`sparse_kd.serve.cpu_model.QuantizedLookup` at 1 and at all cores'
  workers (forked runs of samples), with torch's intra-op threads at 1 and at all cores;
* ``independent``: the same cores each running their own batches (one Python thread per core,
  1 worker, intra-op threads 1): the ceiling a split of one batch could reach;
* ``pruned``: a table keeping half its rows, looked up (1 thread) through the operators' own
  ``compressed_indices_mapping`` (``pruned_weights=True``) and through ``index_select`` on the
  remap (-1 to one all-zero row) into the dense operator, which the lookup uses; sums checked equal.

    python benchmarks/bench_lookup_paths.py --out docs/bench/lookup_paths.json
    python benchmarks/bench_lookup_paths.py --quick
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

ROOT = Path(__file__).resolve().parents[1]
for p in (ROOT, ROOT / "benchmarks"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

import torch  # noqa: E402

from lookup_tables import build_fp32, make_batches, prune_tables, serving_lookup, zipf_sampler  # noqa: E402
from machine import machine_info, write_json  # noqa: E402

OPS = {"int8": torch.ops.quantized.embedding_bag_byte_rowwise_offsets,
       "int4": torch.ops.quantized.embedding_bag_4bit_rowwise_offsets,
       "int2": torch.ops.quantized.embedding_bag_2bit_rowwise_offsets}


def rate(call: Callable[[int], Any], ids: List[int], seconds: float) -> float:
    """M ids/s of ``call(batch_index)`` over ``seconds`` (batches cycled)."""
    call(0)
    n, done, t0 = 0, 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        call(n % len(ids))
        done += ids[n % len(ids)]
        n += 1
    return done / (time.perf_counter() - t0) / 1e6


def independent(call: Callable[[int], Any], ids: List[int], seconds: float, threads: int) -> float:
    """Sum over ``threads`` Python threads, each calling on its own batches, of their M ids/s."""
    out: List[float] = []
    lock = threading.Lock()

    def work(k: int) -> None:
        r = rate(lambda i: call((i + k * 7) % len(ids)), ids, seconds)
        with lock:
            out.append(r)

    ts = [threading.Thread(target=work, args=(k,)) for k in range(threads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    return sum(out)


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tables", type=int, default=4)
    p.add_argument("--rows", type=int, default=2_000_000)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--batch", type=int, default=2048)
    p.add_argument("--bag", type=int, default=20)
    p.add_argument("--zipf-a", type=float, default=1.05)
    p.add_argument("--keep", type=float, default=0.5)
    p.add_argument("--dtypes", default="int8,int4")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--seconds", type=float, default=0.5, help="per sample")
    p.add_argument("--num-batches", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="small tables, one short round")
    p.add_argument("--out", default="runs/bench/lookup_paths.json")
    args = p.parse_args(argv)
    if args.quick:
        args.rows, args.rounds, args.seconds, args.num_batches = 20_000, 1, 0.05, 4
    args.dist = "zipf"
    cores = len(os.sched_getaffinity(0))
    gen = torch.Generator().manual_seed(args.seed)
    info = machine_info()
    samplers = [zipf_sampler(args.rows, args.zipf_a, gen) for _ in range(args.tables)]
    batches = make_batches(args, samplers, gen)
    ids = [b.ids for b in batches]
    ebc = build_fp32(args, gen)
    pruned_ebc, remaps = prune_tables(ebc, args.keep, samplers, gen)
    default_threads = torch.get_num_threads()
    samples: Dict[str, List[float]] = {}

    def add(name: str, value: float) -> None:
        samples.setdefault(name, []).append(value)

    print(f"# {args.tables} tables x {args.rows} rows x {args.dim}, batch {args.batch} x ~{args.bag} Zipf ids, "
          f"{cores} cores, dtypes {args.dtypes}", flush=True)
    models = {dt: torch.jit.script(serving_lookup(ebc, dt, None)) for dt in args.dtypes.split(",")}
    # the pruned comparison: per table, the packed rows (zero row last) and the remap with -1 kept
    pruned_paths = {}
    for dt in models:
        lk = serving_lookup(pruned_ebc, dt, list(remaps))
        tabs = list(lk.tables)
        raw = [(t.weight[:-1].contiguous() if bool(t.zero_row) else t.weight, r.to(torch.int32)) for t, r in zip(tabs, remaps)]
        per = [[(i.int(), torch.cat([o, o.new_tensor([i.numel()])]).int()) for i, o in b.per_table] for b in batches]
        op = OPS[dt]

        def via_mapping(i: int, raw=raw, per=per, op=op) -> Any:
            return [op(w, ids_, off, False, 0, True, None, r, True) for (w, r), (ids_, off) in zip(raw, per[i])]

        def via_index_select(i: int, tabs=tabs, per=per) -> Any:
            return [t(ids_, off) for t, (ids_, off) in zip(tabs, per[i])]

        same = all(torch.equal(a, b) for a, b in zip(via_mapping(0), via_index_select(0)))
        if not same:
            raise SystemExit(f"{dt}: index_select path differs from compressed_indices_mapping")
        pruned_paths[dt] = (via_mapping, via_index_select)

    for rnd in range(args.rounds):
        for dt, m in models.items():
            def call(i: int, m=m) -> Any:
                b = batches[i]
                return m(b.values, b.lengths)
            for intra in sorted({1, cores}):
                torch.set_num_threads(intra)
                for workers in sorted({1, cores}):
                    m.set_num_workers(workers)
                    add(f"{dt} workers {workers}, intra-op threads {intra}", rate(call, ids, args.seconds))
            torch.set_num_threads(1)
            m.set_num_workers(1)
            add(f"{dt} {cores} independent threads, each its own batches", independent(call, ids, args.seconds, cores))
            via_mapping, via_index_select = pruned_paths[dt]
            add(f"{dt} pruned, 1 thread, compressed_indices_mapping", rate(via_mapping, ids, args.seconds))
            add(f"{dt} pruned, 1 thread, index_select + dense operator", rate(via_index_select, ids, args.seconds))
        torch.set_num_threads(default_threads)
        print(f"round {rnd + 1}/{args.rounds} done (load {os.getloadavg()[0]:.2f})", flush=True)
    torch.set_num_threads(default_threads)
    med = {k: round(statistics.median(v), 2) for k, v in samples.items()}
    print()
    for k, v in med.items():
        print(f"{v:8.1f} M ids/s  {k}")
    write_json(args.out, {
        "benchmark": "lookup_paths",
        "command": " ".join([Path(sys.argv[0]).name] + (argv if argv is not None else sys.argv[1:])),
        "machine": info, "config": vars(args), "m_ids_per_s_median": med,
        "m_ids_per_s_samples": samples, "loadavg_end": os.getloadavg()[0],
        "notes": ["pruned variants: sums equal (torch.equal) between the two paths, checked before timing"],
    })
    return 0


if __name__ == "__main__":
    sys.exit(main())
