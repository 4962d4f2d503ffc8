"""Embedding lookup throughput: fp32 nn.EmbeddingBag vs the CPU serving lookup (plain and pruned).

One command measures, in one process and interleaved round by round (so that load from other
jobs hits every variant alike):

* ``embbag_fp32``      plain ``torch.nn.EmbeddingBag`` (mode sum), one per table, fed the batch's
                       int64 ids: the floor every target is a ratio to;
* ``embbag_fp32_i32``  the same fed int32 ids and offsets (for reference: the serving lookup is
                       fed int32 ids, as the predictor keeps a CPU artifact's entity bags; each
                       target also reports its ratio to this floor);
* ``{dt}``             the CPU serving lookup of compressed artifacts,
                       :class:`sparse_kd.serve.cpu_model.QuantizedLookup`, ``torch.jit.script``-ed,
                       ``num_workers`` = threads (forked runs of samples, intra-op threads 1, as
                       ``sparse-kd serve`` runs it): PyTorch's quantized EmbeddingBag operators
                       (FBGEMM's JIT CPU kernels; fp16 through ``embedding_bag``), dt in
                       fp16/int8/int4/int2, rows quantized exactly as ``sparse-kd compress`` does;
* ``{dt}+prune``       the same built from the kept rows only (``embedding_bag_rowwise_prune``,
                       ``--keep`` of each table, the ones Zipf ids hit most); ids go through the
                       remap (to their row, or to one all-zero row) into the same operators;
* ``{dt}+prune/fold``  the same pruned tables served with ``compress.remap: fold``: the remap
                       is composed into the entity bags, so ids arrive as stored rows and the
                       tables hold no remap (pruned ids point at the all-zero row here, so the
                       lookup reads as many ids as with the array remap);
* ``fp32``             the serving lookup of an uncompressed (fp32) artifact, for reference: what
                       the serving layout alone gives, with no quantization;

With ``--layout served`` (the default) the serving lookups are laid out as ``sparse-kd compress``
and ``sparse-kd serve`` lay them out: rows stored hot-first (:mod:`sparse_kd.compress.layout`,
ordered by read counts of an independent ``--train-ids`` sample of each table's ids, standing
for the training log; the ids of a table kept whole arrive already permuted, as the artifact's
entity bags hold them, so the permutation costs nothing in the timed call) and the tables on
transparent huge pages (:mod:`sparse_kd.serve.memory`); and the process's malloc keeps freed
blocks (:func:`sparse_kd.serve.memory.keep_freed_memory`, as ``sparse-kd serve`` sets it: the
floors, measured in the same process, get it too). ``--layout plain``: id order, the pages
``torch.jit.load`` gives, malloc as it comes. The ``embbag_fp32`` floor is always plain
``nn.EmbeddingBag`` (id order, ordinary pages).
* with ``--tbe``: ``ebc_fp32`` (torchrec ``EmbeddingBagCollection``) and ``{dt}_tbe`` /
  ``{dt}_tbe+prune``, torchrec's quantized EBC on FBGEMM's ``IntNBitTableBatchedEmbeddingBagsCodegen``
  (the kernel artifacts served on CPU before format version 2; now the GPU path);

at each thread count (``torch.set_num_threads`` for the floors, workers for the serving lookup), plus the machine's copy bandwidth
(``dst.copy_(src)``, read + write bytes). Variants are built one dtype at a time and measured in
rounds together with the fp32 floors, so each ratio to the floor is paired.

Reported per variant and thread count: ids/s (median over rounds; best too), effective GB/s
(bytes of rows actually read: ids that hit a stored row x row bytes, scale/bias included; pruned
ids read no row), that as a fraction of the copy bandwidth at the same thread count, and the
paired ratio to ``embbag_fp32``.

At several threads every variant is measured two ways, paired round by round with the floor
measured the same way: **split** (one batch across the cores: the floor's OpenMP threads, the
serving lookup's forked runs) and **streams** (one thread per core, each looking up its own
batches, intra-op threads 1 and one worker: how ``sparse-kd serve`` uses the cores, one request
per scoring thread). ``vs_embbag_fp32_best`` divides each side's better rate by the floor's
better rate in the same round. Targets (all cores, on that ratio): int8 and int4 >= 1.5x, pruned
int8 and int4 >= 1.2x the floor. Python's cyclic GC is off inside every timed sample (as
``timeit`` does).

    python benchmarks/bench_lookup.py --tables 4 --out docs/bench/lookup.json   # 4 x 2M x 64, Zipf ids
    python benchmarks/bench_lookup.py --tbe               # also the torchrec / TBE variants
    python benchmarks/bench_lookup.py --quick             # seconds; used by the tests
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

ROOT = Path(__file__).resolve().parents[1]
for p in (ROOT, ROOT / "benchmarks"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

import torch  # noqa: E402

import fbgemm_gpu  # noqa: E402,F401  (registers torch.ops.fbgemm)

from sparse_kd.compress import cpu_kernel as CK  # noqa: E402
from sparse_kd.config.dtypes import dtype_problem, is_tiered  # noqa: E402
from sparse_kd.serve import cpu_model as CM  # noqa: E402
from sparse_kd.serve.memory import keep_freed_memory, place_on_huge_pages, thp_mode  # noqa: E402

from lookup_tables import (Batch, build_fp32, hot_first_tables, lookup_row_bytes, make_batches,  # noqa: E402
                           prune_tables, quantize, serving_lookup, tbe_row_bytes, tier_name, without_remap,
                           zipf_sampler)
from lookup_timing import FLOOR, Variant, measure_rounds, profile_lookup  # noqa: E402
from machine import machine_info, read as _read, write_json  # noqa: E402

DTYPES: Dict[str, torch.dtype] = {
    "fp32": torch.float,
    "fp16": torch.half,
    "int8": torch.qint8,
    "int4": torch.quint4x2,
    "int2": torch.quint2x4,
}
TARGETS = (("int8", 1.5), ("int4", 1.5), ("int8+prune", 1.2), ("int4+prune", 1.2),
           ("int8+prune/fold", 1.2), ("int4+prune/fold", 1.2))


# ----------------------------------------------------------------------------------------------
# Main


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tables", type=int, default=4)
    p.add_argument("--rows", type=int, default=2_000_000)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--batch", type=int, default=2048)
    p.add_argument("--bag", type=int, default=20, help="mean ids per bag (sizes uniform in [bag/2, 3bag/2])")
    p.add_argument("--dist", choices=("zipf", "uniform"), default="zipf")
    p.add_argument("--zipf-a", type=float, default=1.05, help="Zipf exponent of the ids (--dist zipf)")
    p.add_argument("--keep", type=float, default=0.5, help="fraction of rows kept by the pruned variants")
    p.add_argument("--dtypes", default="fp32,fp16,int8,int4,int2",
                   help="serving lookups to measure (fp32: an uncompressed artifact, for reference)")
    p.add_argument("--tiers", default="int8:0.05,int4:0.25,int2",
                   help="';'-separated precision tiers to measure too (sparse_kd/compress/tiers.py: the hottest 5%% of "
                        "stored rows int8, the next 25%% int4, the rest int2); '' for none")
    p.add_argument("--layout", choices=("served", "plain"), default="served",
                   help="served: hot-first rows on huge pages, as sparse-kd compress/serve lay tables out; "
                        "plain: id order, ordinary pages")
    p.add_argument("--train-ids", type=int, default=4_000_000,
                   help="ids per table drawn (independently of the batches) to count reads for the hot-first order")
    p.add_argument("--threads", default="", help="comma list (default: 1 and all usable cores)")
    p.add_argument("--rounds", type=int, default=7, help="interleaved rounds; medians are over rounds")
    p.add_argument("--sample-s", type=float, default=0.2, help="seconds of lookups per sample")
    p.add_argument("--num-batches", type=int, default=32, help="distinct pre-generated batches, cycled")
    p.add_argument("--copy-mb", type=int, default=1024, help="size of the copy-bandwidth tensor")
    p.add_argument("--no-profile", action="store_true", help="skip the torch.profiler pass")
    p.add_argument("--tbe", action="store_true", help="also measure torchrec's EBC and quantized EBC (FBGEMM TBE)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="runs/bench/lookup.json")
    p.add_argument("--quick", action="store_true", help="small tables and few rounds: seconds")
    args = p.parse_args(argv)
    if args.quick:
        given = set(a.split("=")[0] for a in (argv if argv is not None else sys.argv[1:]))
        quick = {"--tables": 4, "--rows": 20_000, "--dim": 32, "--batch": 256, "--bag": 8, "--rounds": 2,
                 "--sample-s": 0.01, "--num-batches": 4, "--copy-mb": 32, "--train-ids": 20_000}
        for flag, val in quick.items():
            if flag not in given:
                setattr(args, flag[2:].replace("-", "_"), val)
    if args.dim % 4:
        p.error("--dim must be a multiple of 4 (FBGEMM int2 rows)")
    if not 0 < args.keep <= 1:
        p.error("--keep must be in (0, 1]")
    args.dtype_list = [d for d in args.dtypes.split(",") if d]
    for d in args.dtype_list:
        if d not in DTYPES:
            p.error(f"--dtypes: {d!r} is not one of {', '.join(DTYPES)}")
    args.tier_list = [t.strip() for t in args.tiers.split(";") if t.strip()]
    for t in args.tier_list:
        problem = dtype_problem(t, "--tiers")
        if problem or not is_tiered(t):
            p.error(f"--tiers: {problem or repr(t) + ' is one dtype, not precision tiers'}")
    args.dtype_list += args.tier_list
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    args.thread_list = [int(x) for x in args.threads.split(",") if x] or sorted({1, cores})
    return args


def summarize(v: Variant, th: int, copy_gbps: float) -> Dict[str, Any]:
    s = v.samples[th]
    med = statistics.median(s)
    gb = statistics.median(v.gbps[th])
    return {
        "variant": v.name,
        "dtype": v.dtype,
        "remap": v.remap,
        "parallel": v.parallel,
        "threads": th,
        "ids_per_s": med,
        "ids_per_s_best": max(s),
        "ids_per_s_samples": s,
        "row_bytes": v.row_bytes,
        "weight_gb": round(v.weight_bytes / 1e9, 3),
        "row_gb_per_s": gb,
        "frac_of_copy_bw": gb / copy_gbps if copy_gbps else None,
        "vs_embbag_fp32": statistics.median(v.paired[th]) if v.paired.get(th) else None,
        "kernel": v.kernel,
        "iters_per_sample": v.iters.get(th),
        "cpu_per_wall": statistics.median(v.cpu_util[th]),
        "ids_per_cpu_s": statistics.median(v.per_cpu[th]),
        "ids_per_s_streams": statistics.median(v.stream_samples[th]) if v.stream_samples.get(th) else None,
        "vs_embbag_fp32_streams": statistics.median(v.stream_paired[th]) if v.stream_paired.get(th) else None,
        "vs_embbag_fp32_best": statistics.median(v.best_paired[th]) if v.best_paired.get(th) else None,
    }


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    malloc_tuned = keep_freed_memory() if args.layout == "served" else False
    gen = torch.Generator().manual_seed(args.seed)
    info = machine_info()
    t_start = time.time()
    T, B = args.tables, args.batch
    a = args.zipf_a if args.dist == "zipf" else 0.0
    print(
        f"# {T} tables x {args.rows} rows x {args.dim} dims fp32 ({T * args.rows * args.dim * 4 / 1e9:.2f} GB), "
        f"batch {B} x ~{args.bag} ids, ids {args.dist}{f' a={a}' if a else ''}, threads {args.thread_list}, "
        f"{info['usable_cpus']} cores, torch {info['torch']}, fbgemm {info['fbgemm_gpu']}, torchrec {info['torchrec']}",
        flush=True,
    )
    samplers = [zipf_sampler(args.rows, a, gen) for _ in range(T)]
    batches = make_batches(args, samplers, gen)
    ebc = build_fp32(args, gen)
    fp32_bytes = args.dim * 4
    bags = [ebc.embedding_bags[f"t{t}"] for t in range(T)]

    def call_embbag(b: Batch) -> Any:
        return [bag(ids, off) for bag, (ids, off) in zip(bags, b.per_table)]

    def call_embbag_i32(b: Batch) -> Any:
        return [bag(ids, off) for bag, (ids, off) in zip(bags, b.per_table_i32)]

    weight_fp32 = T * args.rows * fp32_bytes
    floors = [
        Variant(FLOOR, call_embbag, lambda b: b.ids * fp32_bytes, dtype="fp32", remap=False, parallel=False,
                row_bytes=fp32_bytes, weight_bytes=weight_fp32, kernel="nn.EmbeddingBag"),
        Variant("embbag_fp32_i32", call_embbag_i32, lambda b: b.ids * fp32_bytes, dtype="fp32", remap=False,
                parallel=False, row_bytes=fp32_bytes, weight_bytes=weight_fp32, kernel="nn.EmbeddingBag"),
    ]
    if args.tbe:
        floors.append(Variant("ebc_fp32", lambda b: ebc(b.kjt), lambda b: b.ids * fp32_bytes, dtype="fp32", remap=False,
                              parallel=False, row_bytes=fp32_bytes, weight_bytes=weight_fp32, kernel="torchrec EBC"))
    copy_samples: Dict[int, List[float]] = {}
    copy_bytes = args.copy_mb * 2**20
    results: List[Variant] = list(floors)
    profiles: Dict[str, Any] = {}
    loads: List[float] = []  # 1-minute load average at the start of each round
    cpu0 = time.process_time()
    top = max(args.thread_list)

    pruned = remaps = None
    if args.keep < 1.0:
        pruned, remaps = prune_tables(ebc, args.keep, samplers, gen)
        for b in batches:  # ids that hit a kept row, per table: the rows the kernel actually reads
            b.kept_per_table = [  # type: ignore[attr-defined]
                int((remaps[t][ids] >= 0).sum()) for t, (ids, _off) in enumerate(b.per_table)
            ]

    # the tables the serving lookups are built from (--layout served: hot-first)
    serve_whole, serve_pruned, serve_remaps = ebc, pruned, remaps
    if args.layout == "served":
        t0 = time.time()
        train = [samplers[t](args.train_ids) for t in range(T)]  # drawn after the batches: independent
        serve_whole, perms = hot_first_tables(ebc, None, train)
        for b in batches:  # whole tables: ids arrive permuted, as the artifact's entity bags hold them
            b.served_values = torch.cat([perms[t][ids].int() if perms[t] is not None else ids.int()
                                         for t, (ids, _off) in enumerate(b.per_table)])
        if pruned is not None:
            serve_pruned, serve_remaps = hot_first_tables(pruned, remaps, train)
        del train
        print(f"# served layout: hot-first rows from {args.train_ids} training ids per table, huge pages "
              f"(THP {thp_mode()}); {time.time() - t0:.1f}s", flush=True)

    def read_bytes(rb: List[int], with_remap: bool) -> Callable[[Batch], int]:
        if with_remap:
            return lambda b: sum(k * r for k, r in zip(b.kept_per_table, rb))  # type: ignore[attr-defined]
        return lambda b: sum(k * r for k, r in zip(b.ids_per_table, rb))

    for dt in args.dtype_list:
        t0 = time.time()
        group: List[Variant] = []
        for mode in (["whole", "array", "fold"] if pruned is not None else ["whole"]):
            with_remap = mode != "whole"
            name = (tier_name(dt) if is_tiered(dt) else dt) + {"whole": "", "array": "+prune", "fold": "+prune/fold"}[mode]
            lookup = serving_lookup(serve_pruned if with_remap else serve_whole, dt,
                                    list(serve_remaps) if with_remap else None)
            if mode == "fold":
                # remap: fold: the remap lives in the entity bags, the tables hold none; ids arrive
                # as stored rows (pruned ones at the all-zero row, kept in their bags: the real
                # fold drops them, so this reads as many ids as the array remap does)
                folds = [t.mapping.clone() for t in lookup.tables]
                lookup = CM.QuantizedLookup([without_remap(t) for t in lookup.tables])
                for b in batches:
                    if not hasattr(b, "folded_values"):
                        b.folded_values = torch.cat([folds[t][ids] for t, (ids, _o) in enumerate(b.per_table)])
            rb = lookup_row_bytes(lookup)
            wbytes = sum(CK.cpu_table_bytes(t)["total"] for t in lookup.tables)
            sm = torch.jit.script(lookup)
            del lookup
            if args.layout == "served":
                place_on_huge_pages(sm)

            def ids_of(b: Batch, mode: str = mode) -> torch.Tensor:
                return {"whole": b.served_values, "array": b.values32, "fold": getattr(b, "folded_values", None)}[mode]

            group.append(Variant(name, lambda b, m=sm, f=ids_of: m.pooled(f(b), b.lengths), read_bytes(rb, with_remap),
                                 dtype=dt, remap=with_remap, parallel=True, row_bytes=rb[0], weight_bytes=wbytes,
                                 set_workers=sm.set_num_workers,
                                 kernel="torch.ops.quantized" if dt not in ("fp32", "fp16") else "embedding_bag"))
            # more workers must not change a bit of the result. Intra-op threads at 1 here too, as
            # in every timed call: the first fork creates TorchScript's inter-op pool, whose
            # threads keep the intra-op thread count of that moment for good (at::init_num_threads),
            # and a forked run should not start an OpenMP team of its own (sparse-kd serve forks
            # only after setting --torch-threads 1)
            prev_threads = torch.get_num_threads()
            torch.set_num_threads(1)
            sm.set_num_workers(1)
            ref = sm(ids_of(batches[0]), batches[0].lengths)
            sm.set_num_workers(top)
            got = sm(ids_of(batches[0]), batches[0].lengths)
            torch.set_num_threads(prev_threads)
            if not torch.equal(ref, got):
                raise SystemExit(f"{name}: {top} workers differ from 1 (max |diff| {(ref - got).abs().max()})")
            if not args.no_profile and (dt in ("int8", "int4") or is_tiered(dt)) and mode == ("array" if pruned is not None else "whole"):
                # one worker: torch.profiler's result parser crashed now and then (SIGSEGV in
                # _parse_kineto_results) on events of tasks forked onto the inter-op pool
                n_prof = 3 if args.quick else 20
                sm.set_num_workers(1)
                profiles[f"{name}, 1 worker, {top} intra-op threads"] = profile_lookup(
                    lambda b, m=sm, f=ids_of: m.pooled(f(b), b.lengths), batches, top, n_prof, 8)
            if args.tbe and dt != "fp32" and not is_tiered(dt) and mode != "fold":  # the TBE takes no tiers
                qebc = quantize(pruned if with_remap else ebc, DTYPES[dt])
                if with_remap:
                    for tbe in qebc._emb_modules:
                        tbe.set_index_remappings_array(list(remaps))  # features in table order
                trb = tbe_row_bytes(qebc)
                group.append(Variant(f"{dt}_tbe" + ("+prune" if with_remap else ""), lambda b, m=qebc: m(b.kjt),
                                     read_bytes(trb, with_remap), dtype=dt, remap=with_remap, parallel=False,
                                     row_bytes=trb[0], weight_bytes=sum(int(t.weights_host.numel()) for t in qebc._emb_modules),
                                     kernel="FBGEMM TBE"))
                del qebc
        print(f"# built {dt} in {time.time() - t0:.1f}s; measuring", flush=True)
        measure_rounds(floors + group, batches, args.thread_list, args.rounds, args.sample_s, copy_samples, copy_bytes,
                       loads)
        for v in group:  # release this dtype's models before building the next
            v.call = v.set_workers = None  # type: ignore[assignment]
        results.extend(group)
        del group, sm
    if not args.dtype_list:
        measure_rounds(floors, batches, args.thread_list, args.rounds, args.sample_s, copy_samples, copy_bytes, loads)

    copy_gbps = {th: statistics.median(s) for th, s in copy_samples.items()}
    rows = [summarize(v, th, copy_gbps[th]) for th in args.thread_list for v in results]
    by = {(r["variant"], r["threads"]): r for r in rows}
    targets = {}
    tier_targets = [(tier_name(spec) + sfx, 1.2) for spec in args.tier_list for sfx in ("", "+prune", "+prune/fold")]
    for name, goal in (*TARGETS, *tier_targets):
        r = by.get((name, top))
        if r:
            i32 = by.get(("embbag_fp32_i32", top))
            # at all cores, each side's better way of using them: one batch split across the cores
            # (the floor: its OpenMP threads; the lookup: forked runs) or one stream of batches per
            # core (as `sparse-kd serve` scores requests); paired per round. At 1 core: the one way.
            ratio = r["vs_embbag_fp32_best"] if r.get("vs_embbag_fp32_best") is not None else r["vs_embbag_fp32"]
            targets[f"{name} / {FLOOR} @ {top} threads"] = {
                "ratio": ratio, "target": goal, "met": bool(ratio and ratio >= goal),
                "ratio_split": r["vs_embbag_fp32"], "ratio_streams": r.get("vs_embbag_fp32_streams"),
                # split mode against the floor fed int32 ids too (the serving lookup gets int32 ids)
                "ratio_vs_embbag_fp32_i32": (r["ids_per_s"] / i32["ids_per_s"]) if i32 else None,
            }

    # table
    print()
    print(f"{'variant':<18} {'thr':>3} {'M ids/s':>8} {'best':>7} {'vs fp32':>8} {'row B':>5} {'GB/s':>6} {'of copy':>7} {'cpu/wall':>8} {'M ids/cpu-s':>11}"
          f" {'streams':>8} {'vs fp32':>8} {'best/best':>9}")
    for th in args.thread_list:
        for r in rows:
            if r["threads"] != th:
                continue
            print(
                f"{r['variant']:<18} {th:>3} {r['ids_per_s'] / 1e6:8.1f} {r['ids_per_s_best'] / 1e6:7.1f} "
                f"{(r['vs_embbag_fp32'] or 0):7.2f}x {r['row_bytes']:>5} {r['row_gb_per_s']:6.2f} {100 * (r['frac_of_copy_bw'] or 0):6.1f}%"
                f" {r['cpu_per_wall']:8.2f} {r['ids_per_cpu_s'] / 1e6:11.1f}"
                + (f" {r['ids_per_s_streams'] / 1e6:8.1f} {r['vs_embbag_fp32_streams']:7.2f}x {r['vs_embbag_fp32_best']:8.2f}x"
                   if r.get("vs_embbag_fp32_best") is not None else "")
            )
        print(f"{'copy (r+w)':<18} {th:>3} {'':>8} {'':>7} {'':>8} {'':>5} {copy_gbps[th]:6.2f} {'100.0%':>7}")
    print()
    print(f"load average (1 min) during the rounds: {min(loads):.1f} to {max(loads):.1f} on {info['usable_cpus']} cores")
    # Single-thread variants should get a whole core; when they got much less, other jobs held
    # the CPUs (and usually the memory bus), and ratios at several threads are not trustworthy.
    one = [r["cpu_per_wall"] for r in rows if r["threads"] == 1]
    busy = bool(one) and statistics.median(one) < 0.9
    if busy:
        print(f"WARNING: the machine was busy (single-thread variants got {statistics.median(one):.2f} CPU-s per "
              "second): rates are depressed and the ratios below are not trustworthy; rerun on a quiet machine")
    for k, v in targets.items():
        modes = (f" (split {v['ratio_split']:.2f}x, streams {v['ratio_streams']:.2f}x)"
                 if v.get("ratio_streams") is not None else "")
        print(f"target {k}: {v['ratio']:.2f}x (goal {v['target']}x) {'MET' if v['met'] else 'not met'}{modes}"
              + (f"; split {v['ratio_vs_embbag_fp32_i32']:.2f}x the floor fed int32 ids" if v.get("ratio_vs_embbag_fp32_i32") else ""))
    for k, prof in profiles.items():
        print(f"\nprofile: {k}")
        for e in prof:
            print(f"  {e['self_cpu_pct']:5.1f}%  {e['self_cpu_ms']:9.2f} ms  {e['calls']:>5}x  {e['op']}")

    info["loadavg_end"] = _read("/proc/loadavg")
    info["loadavg_1m_per_round"] = loads
    elapsed = time.time() - t_start
    # this process's CPU seconds per wall second: well under the thread count means other
    # jobs held the cores (and every number above is depressed accordingly)
    info["process_cpu_per_wall"] = round((time.process_time() - cpu0) / max(elapsed, 1e-9), 2)
    out = {
        "benchmark": "lookup",
        "command": " ".join([Path(sys.argv[0]).name] + (argv if argv is not None else sys.argv[1:])),
        "machine": info,
        "config": {
            "tables": T, "rows": args.rows, "dim": args.dim, "batch": B, "bag": args.bag, "dist": args.dist,
            "zipf_a": a, "keep": args.keep, "threads": args.thread_list, "rounds": args.rounds,
            "layout": args.layout, "train_ids": args.train_ids, "thp": thp_mode(), "malloc_tuned": malloc_tuned,
            "sample_s": args.sample_s, "num_batches": args.num_batches, "quick": args.quick, "seed": args.seed,
            "fp32_gb": T * args.rows * fp32_bytes / 1e9,
        },
        "copy_gb_per_s": {str(k): v for k, v in copy_gbps.items()},
        "copy_gb_per_s_samples": {str(k): v for k, v in copy_samples.items()},
        "results": rows,
        "targets": targets,
        "machine_busy": busy,
        "profiles": profiles,
        "notes": [
            "ids_per_s: median over interleaved rounds; vs_embbag_fp32: median of per-round ratios to embbag_fp32",
            "row_gb_per_s counts ids that hit a stored row x padded row bytes (pruned ids read no row; the "
            "4-byte remap entry read per id is not counted)",
            "{dt}, {dt}+prune: sparse_kd.serve.cpu_model.QuantizedLookup (the CPU serving lookup), "
            "torch.jit.script-ed, workers = threads, torch intra-op threads 1 during its samples (an OpenMP team "
            "spinning between the caller's parallel ops slows the forked workers); it is fed int32 ids (the "
            "predictor keeps a CPU artifact's entity bags as int32); its timed call includes the offsets "
            "and returns one (B, D) tensor per table (QuantizedLookup.pooled, what the serving model's "
            "interaction reads; views of one (B, F, D) tensor when split across workers), as the floors do",
            "embbag_fp32 gets the batch's int64 ids; embbag_fp32_i32 int32 ids and offsets (reference only)",
            "layout served: the serving lookups' rows are stored hot-first (read counts of an independent sample "
            "of train_ids ids per table) and their buffers are on transparent huge pages; fp32 is the serving lookup "
            "of an uncompressed artifact in that layout (what the layout alone gives); the embbag_fp32 floor is "
            "plain nn.EmbeddingBag in id order on ordinary pages",
            "{dt}_tbe (--tbe): torchrec quantized EBC on FBGEMM's TBE, the CPU serving path before artifact format 2",
            "cpu_per_wall: this process's CPU seconds per wall second during the samples (median); well below "
            "the thread count means other jobs held the cores and the rates are depressed",
            "ids_per_cpu_s: ids per CPU-second of this process (all its threads, OpenMP spinning included); at 1 "
            "thread a load-robust estimate of one core's lookup rate",
        ],
        "elapsed_s": round(elapsed, 1),
    }
    write_json(args.out, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())

