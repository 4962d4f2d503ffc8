"""Student training throughput: the project's loop vs a plain torchrec loop, with and without distillation.

One command measures examples/s of the training step at 1 and 2 CPU processes, for table_wise,
row_wise and column_wise sharding of every table, in these variants:

* ``plain``    torchrec's minimum: ``torchrec.models.dlrm.DLRMTrain`` (same DLRM, same tables) +
               the same fused in-backward row-wise Adagrad + the same hand-built plan +
               ``DistributedModelParallel`` + ``TrainPipelineSparseDist``, fed with plain
               ``torchrec.datasets.utils.Batch`` es prebuilt in memory (cycled);
* ``project``  the project's recipe as ``sparse_kd.student.train.train_ranker`` runs it: batches
               built on the fly by ``train_batches`` / ``BatchBuilder`` (CSR gathers, KJT
               construction), the ``RankerTrain`` wrapper, the loop's per-step bookkeeping;
* ``distill``  the same with logit KD + feature alignment (cosine, user_id and item_id) + weight
               transfer (PCA) on, from random stand-in text embeddings (``--text-dim``, MiniLM's
               384 by default) and random teacher logits, so no BERT is needed;
* ``teacher``  the teacher ranker's step (not in the default list): the student's architecture
               plus the stand-in text, PCA-reduced, as dense features, its users' part held as
               ``--features-layout`` says (``distill.teacher_ranker.features_layout``).

Every variant of one process count is built in the same processes and measured in interleaved
rounds (``--steps`` timed steps per variant per round, between barriers, after ``--warmup``
untimed steps), so that load from other jobs hits every variant alike. Reported: the median
examples/s over rounds (global batch x steps / seconds) and the median of per-round paired
ratios ``project / plain`` (target >= 0.9) and ``distill / project`` (target >= 0.9, i.e.
distillation costs <= 10%). ``--profile`` adds ``torch.profiler`` tables of the steps.
Processes run 1 intra-op thread each by default (``--threads``); 2 processes are launched with
``sparse_kd.local_launch.spawned``, 1 process runs in this one.

    python benchmarks/bench_train.py                 # 20000 users x 5000 items x 50, batch 2048
    python benchmarks/bench_train.py --nprocs 2 --shardings row_wise --profile
    python benchmarks/bench_train.py --quick         # seconds; used by the tests
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from machine import machine_info, quiet, read as _read, rss_mb, write_json  # noqa: E402
from train_runners import Runner, build_plain, build_project, profile_steps  # noqa: E402

SHARDINGS = ("table_wise", "row_wise", "column_wise")
VARIANTS = ("plain", "project", "distill", "teacher")
TARGETS = {"project/plain": 0.9, "distill/project": 0.9}


# ----------------------------------------------------------------------------------------------
# Worker: one process count, every variant, interleaved rounds


def worker(opts: Dict[str, Any], ds, stand_in) -> Dict[str, Any]:
    import torch.distributed as dist

    from sparse_kd.dist import init_distributed

    quiet()
    torch.set_num_threads(opts["threads"])
    env = init_distributed("gloo", 300)
    world = env.world_size

    def barrier() -> None:
        if world > 1:
            dist.barrier()

    t0 = time.perf_counter()
    runners: List[Runner] = []
    for sh in opts["shardings"]:
        for v in opts["variants"]:
            if v == "plain":
                runners.append(build_plain(opts, ds, env, sh, opts["prebuilt"]))
            else:
                runners.append(build_project(opts, ds, env, sh, v, stand_in))
    build_s = time.perf_counter() - t0
    for r in runners:  # warm-up: pipeline fill, lazy optimizer state, allocator
        for _ in range(opts["warmup"]):
            r.step()
    barrier()
    loads: List[str] = []
    for rnd in range(opts["rounds"]):
        loads.append(_read("/proc/loadavg").split(" ")[0])
        k = rnd % len(runners)
        for r in runners[k:] + runners[:k]:  # rotate: no variant always runs first
            barrier()
            t, c = time.perf_counter(), time.process_time()
            for _ in range(opts["steps"]):
                r.step()
            r.cpu_seconds.append(time.process_time() - c)
            barrier()
            r.seconds.append(time.perf_counter() - t)
    profiles: Dict[str, Any] = {}
    if opts["profile"]:
        for r in runners:  # the first sharding only: the step's composition barely depends on it
            if r.name in opts["profile_variants"] and r.sharding == opts["shardings"][0]:
                profiles[f"{r.key} nproc={world}"] = profile_steps(r, opts["profile_steps"], opts["profile_top"], env.is_main)
    mem = rss_mb()
    mems: List[Any] = [None] * world
    cpus: List[Any] = [None] * world
    cpu = {r.key: r.cpu_seconds for r in runners}
    if world > 1:
        dist.all_gather_object(mems, mem)
        dist.all_gather_object(cpus, cpu)
    else:
        mems, cpus = [mem], [cpu]
    out = {
        "rank": env.rank,
        "world": world,
        "threads": torch.get_num_threads(),
        "build_s": round(build_s, 2),
        "seconds": {r.key: r.seconds for r in runners},
        # CPU seconds of all ranks together, per round: less sensitive than wall time to other jobs
        "cpu_seconds": {r.key: [sum(c[r.key][i] for c in cpus) for i in range(len(r.seconds))] for r in runners},
        "loadavg_1m_per_round": loads,
        "memory_per_rank": mems,
        "profiles": profiles,
    }
    if world > 1:
        dist.barrier()
    dist.destroy_process_group()
    return out


# ----------------------------------------------------------------------------------------------
# Main


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--users", type=int, default=20000)
    p.add_argument("--items", type=int, default=5000)
    p.add_argument("--per-user", type=int, default=50, help="interactions per user")
    p.add_argument("--batch", type=int, default=2048, help="global batch (split across processes)")
    p.add_argument("--dim", type=int, default=16, help="embedding dim")
    p.add_argument("--text-dim", type=int, default=384, help="stand-in teacher embedding dim (MiniLM: 384)")
    p.add_argument("--align-kind", default="cosine", choices=("cosine", "mse", "infonce"))
    p.add_argument("--align-layout", default="replicated", choices=("replicated", "sharded"),
                   help="distill.align.layout: alignment targets on every rank, or in a row_wise sharded table")
    p.add_argument("--features-layout", default="replicated", choices=("replicated", "sharded"),
                   help="distill.teacher_ranker.features_layout of the teacher variant: its users' text features "
                        "on every rank, or in a row_wise sharded table")
    p.add_argument("--distill", default="logit,align,transfer", help="distillation methods on in the distill variant")
    p.add_argument("--nprocs", default="1,2")
    p.add_argument("--threads", type=int, default=1,
                   help="intra-op threads per process (0: usable cores / nproc). Default 1: on a shared machine "
                        "OpenMP's spin-waiting makes 2 threads in one process up to ~10x slower (OMP_WAIT_POLICY=PASSIVE avoids it)")
    p.add_argument("--shardings", default=",".join(SHARDINGS))
    p.add_argument("--variants", default="plain,project,distill", help=f"comma list of {', '.join(VARIANTS)}")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps per variant before the rounds")
    p.add_argument("--steps", type=int, default=10, help="timed steps per variant per round")
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--prebuilt", type=int, default=64, help="distinct prebuilt batches of the plain loop (cycled)")
    p.add_argument("--profile", action="store_true",
                   help="torch.profiler table of the profiled variants (first sharding, every process count)")
    p.add_argument("--profile-variants", default="plain,project,distill")
    p.add_argument("--profile-steps", type=int, default=20)
    p.add_argument("--profile-top", type=int, default=25)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="runs/bench/train.json")
    p.add_argument("--quick", action="store_true", help="tiny data, few steps: seconds (used by the tests)")
    args = p.parse_args(argv)
    if args.quick:
        given = set(a.split("=")[0] for a in (argv if argv is not None else sys.argv[1:]))
        quick = {"--users": 500, "--items": 200, "--per-user": 20, "--batch": 256, "--warmup": 2, "--steps": 3,
                 "--rounds": 2, "--prebuilt": 4, "--profile-steps": 2, "--text-dim": 32}
        for flag, val in quick.items():
            if flag not in given:
                setattr(args, flag[2:].replace("-", "_"), val)
    args.nproc_list = [int(x) for x in args.nprocs.split(",") if x]
    args.distill_parts = [d for d in args.distill.split(",") if d]
    for d in args.distill_parts:
        if d not in ("logit", "align", "transfer"):
            p.error(f"--distill: {d!r} is not one of logit, align, transfer")
    args.sharding_list = [s for s in args.shardings.split(",") if s]
    args.variant_list = [v for v in args.variants.split(",") if v]
    for s in args.sharding_list:
        if s not in SHARDINGS:
            p.error(f"--shardings: {s!r} is not one of {', '.join(SHARDINGS)}")
    for v in args.variant_list:
        if v not in VARIANTS:
            p.error(f"--variants: {v!r} is not one of {', '.join(VARIANTS)}")
    for n in args.nproc_list:
        if n < 1 or args.batch % n:
            p.error(f"--batch {args.batch} must split evenly over {n} processes")
    return args


def _median_ratio(a: List[float], b: List[float]) -> Optional[float]:
    """Median over rounds of (examples/s of a) / (examples/s of b) = time_b / time_a, paired by round."""
    if not a or not b:
        return None
    return statistics.median(tb / ta for ta, tb in zip(a, b))


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    info = machine_info()
    t_start = time.time()
    from sparse_kd.config import DataConfig, SyntheticConfig
    from sparse_kd.data import load_dataset
    from sparse_kd.local_launch import spawned as launch

    quiet()
    syn = {"num_users": args.users, "num_items": args.items, "interactions_per_user": args.per_user}
    t0 = time.time()
    ds = load_dataset(DataConfig(synthetic=SyntheticConfig(**syn)))
    n_train = len(ds.splits["train"])
    g = torch.Generator().manual_seed(args.seed + 1)
    stand_in = (
        torch.randn(ds.num_users, args.text_dim, generator=g),
        torch.randn(ds.num_items, args.text_dim, generator=g),
        2 * torch.randn(n_train, generator=g),
    )
    print(
        f"# synthetic data: {ds.num_users} users, {ds.num_items} items, {n_train} train examples, "
        f"{len(ds.features)} sparse features ({time.time() - t0:.1f}s); global batch {args.batch}, dim {args.dim}, "
        f"text {args.text_dim}, distill {'+'.join(args.distill_parts)} (align targets {args.align_layout}); {info['usable_cpus']} cores, torch {info['torch']}, torchrec {info['torchrec']}, "
        f"fbgemm {info['fbgemm_gpu']}",
        flush=True,
    )
    cores = info["usable_cpus"]
    per_nproc: Dict[int, Dict[str, Any]] = {}
    # multi-process runs under sparse_kd.local_launch.spawned (fresh processes); 1 process last, in this
    # process (a launch costs ~10 s of process start-up and imports)
    for n in sorted(args.nproc_list, key=lambda n: (n == 1, n)):
        opts = {
            "synthetic": syn, "batch": args.batch, "dim": args.dim, "align_kind": args.align_kind,
            "align_layout": args.align_layout, "features_layout": args.features_layout,
            "distill_parts": args.distill_parts,
            "shardings": args.sharding_list, "variants": args.variant_list, "warmup": args.warmup,
            "steps": args.steps, "rounds": args.rounds, "prebuilt": args.prebuilt, "threads": args.threads or max(1, cores // n),
            "profile": args.profile, "profile_variants": [v for v in args.profile_variants.split(",") if v],
            "profile_steps": args.profile_steps, "profile_top": args.profile_top,
        }
        t0 = time.time()
        res = {0: worker(opts, ds, stand_in)} if n == 1 else launch(worker, n, opts, ds, stand_in)
        per_nproc[n] = res[0]
        print(f"# {n} process(es), {res[0]['threads']} thread(s) each: built in {res[0]['build_s']}s, "
              f"{time.time() - t0:.1f}s in all", flush=True)

    per_nproc = dict(sorted(per_nproc.items()))
    rows: List[Dict[str, Any]] = []
    ratios: List[Dict[str, Any]] = []
    for n, res in per_nproc.items():
        secs, cpu = res["seconds"], res["cpu_seconds"]
        for sh in args.sharding_list:
            for v in args.variant_list:
                s = secs[f"{sh}/{v}"]
                eps = [args.batch * args.steps / x for x in s]
                rows.append({
                    "nproc": n, "sharding": sh, "variant": v, "examples_per_s": statistics.median(eps),
                    "examples_per_s_samples": [round(e, 1) for e in eps],
                    "step_ms": 1e3 * statistics.median(s) / args.steps,
                    "cpu_ms_per_step": 1e3 * statistics.median(cpu[f"{sh}/{v}"]) / args.steps,
                    "vs_plain": _median_ratio(s, secs.get(f"{sh}/plain", [])) if v != "plain" else 1.0,
                    "vs_plain_cpu": _median_ratio(cpu[f"{sh}/{v}"], cpu.get(f"{sh}/plain", [])) if v != "plain" else 1.0,
                })
            for num, den in (("project", "plain"), ("distill", "project")):
                if f"{sh}/{num}" in secs and f"{sh}/{den}" in secs:
                    r = _median_ratio(secs[f"{sh}/{num}"], secs[f"{sh}/{den}"])
                    rc = _median_ratio(cpu[f"{sh}/{num}"], cpu[f"{sh}/{den}"])
                    goal = TARGETS[f"{num}/{den}"]
                    ratios.append({"nproc": n, "sharding": sh, "ratio": f"{num}/{den}", "value": r, "value_cpu": rc,
                                   "target": goal, "met": bool(r is not None and r >= goal)})

    print()
    def _x(v: Optional[float]) -> str:
        return f"{v:7.2f}x" if v is not None else f"{'-':>8}"

    print(f"{'nproc':>5} {'sharding':<12} {'variant':<8} {'examples/s':>10} {'ms/step':>8} {'vs plain':>8} "
          f"{'CPU ms':>7} {'CPU vs':>8}")
    for r in rows:
        print(f"{r['nproc']:>5} {r['sharding']:<12} {r['variant']:<8} {r['examples_per_s']:10.0f} {r['step_ms']:8.1f} "
              f"{_x(r['vs_plain'])} {r['cpu_ms_per_step']:7.1f} {_x(r['vs_plain_cpu'])}")
    print("(ms/step: wall time of a global step; CPU ms: CPU time of all processes per step; vs plain: paired "
          "per-round ratio of speeds)")
    print()
    for r in ratios:
        print(f"{r['nproc']} proc {r['sharding']:<12} {r['ratio']:<16} {r['value']:.3f} (target >= {r['target']}) "
              f"{'MET' if r['met'] else 'NOT MET'}; by CPU time {r['value_cpu']:.3f}")
    for n, res in per_nproc.items():
        print(f"{n} proc: peak RSS per rank (MB): {[m['peak_rss_mb'] for m in res['memory_per_rank']]}; "
              f"load avg (1 min) per round: {res['loadavg_1m_per_round']}")
        for k, prof in res["profiles"].items():
            print(f"\nprofile: {k} ({args.profile_steps} steps, self CPU per step)")
            for e in prof:
                print(f"  {e['self_cpu_pct']:5.1f}%  {e['self_cpu_ms_per_step']:8.3f} ms  {e['calls_per_step']:>6}x  {e['op']}")

    info["loadavg_end"] = _read("/proc/loadavg")
    out = {
        "benchmark": "train",
        "command": " ".join([Path(sys.argv[0]).name] + (argv if argv is not None else sys.argv[1:])),
        "machine": info,
        "config": {
            "synthetic": syn, "train_examples": n_train, "features": ds.feature_names,
            "table_rows": {f.name: f.num_embeddings for f in ds.features}, "global_batch": args.batch,
            "dim": args.dim, "text_dim": args.text_dim, "align_kind": args.align_kind, "align_layout": args.align_layout,
            "features_layout": args.features_layout,
            "distill": args.distill_parts, "nprocs": args.nproc_list,
            "shardings": args.sharding_list, "variants": args.variant_list, "warmup": args.warmup,
            "steps": args.steps, "rounds": args.rounds, "prebuilt": args.prebuilt, "quick": args.quick,
            "threads_per_proc": {str(n): r["threads"] for n, r in per_nproc.items()},
        },
        "results": rows,
        "ratios": ratios,
        "targets": TARGETS,
        "memory_per_rank": {str(n): r["memory_per_rank"] for n, r in per_nproc.items()},
        "loadavg_1m_per_round": {str(n): r["loadavg_1m_per_round"] for n, r in per_nproc.items()},
        "profiles": {k: v for r in per_nproc.values() for k, v in r["profiles"].items()},
        "notes": [
            "examples_per_s: global batch x timed steps / seconds between barriers, median over interleaved rounds",
            "vs_plain and ratios: median of per-round paired ratios (same round, same processes)",
            "cpu_ms_per_step, vs_plain_cpu, value_cpu: the same from the CPU time of all processes (time.process_time "
            "over the timed steps, barriers excluded): less sensitive to other jobs on the machine than wall time",
            "plain: DLRMTrain + same plan/optimizer + TrainPipelineSparseDist over prebuilt torchrec Batches",
            "threads_per_proc: intra-op threads; with other jobs on the cores, 2 OpenMP threads in one process "
            "spin-wait for each other (measured ~10x slower steps unless OMP_WAIT_POLICY=PASSIVE), so 1 is the default",
        ],
        "elapsed_s": round(time.time() - t_start, 1),
    }
    write_json(args.out, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
