"""Embedding memory at scale: >= 40M rows of Criteo-like tables trained over 2 CPU processes.

One command trains the project's student recipe (``build_dlrm`` + ``RankerTrain`` + fused
row-wise Adagrad in backward + hand-built plan + ``DistributedModelParallel`` + sharding-
independent table init + ``TrainPipelineSparseDist``) on synthetic Criteo-like data: 13 dense
features and 26 categorical features, one id per feature per example, ids drawn with a Zipf
skew (hot rows scattered over the table), generated directly as KJT batches. Variants:

* ``1proc``            one process holding every table (the unsharded footprint);
* ``2proc_table_wise`` 2 processes, whole tables placed on the less-loaded rank;
* ``2proc_row_wise``   2 processes, every table split by rows over both;
* ``2proc_data_parallel`` (opt-in, ``--variants``) 2 processes each holding a replica.

Each multi-process variant runs in freshly spawned processes (``sparse_kd.local_launch.spawned``) so that peak
memory is its own; ``1proc`` runs last in this process (no launch). Per rank it records the
bytes of the local table shards (``state_dict`` ``local_shards``) and of the fused optimizer
state, RSS after building the model and peak RSS (``getrusage``) after ``--steps`` timed
training steps, and the examples/s of those steps (median of ``--rounds``). The summary gives
per-process embedding bytes and peak RSS relative to ``1proc`` (target: about 0.5 when sharded).

``--text-users`` (default 1M and 10M users) also measures, per rank of 2, the peak RSS of what a
training run builds besides the model (``text_memory`` in the JSON): the synthetic dataset
(items U/5, 5 interactions per user; user texts blanked as in a log without users.csv), then a
baseline-only run's inputs (no text at all), then the teacher-text stage (distinct texts encoded
across the ranks, the click-history stand-in for user text, the teacher ranker's PCA features),
then a distilled student's spec (alignment and PCA weight transfer), then the student's sharded
model with its alignment targets sharded row_wise and replicated (``distill.align.layout``;
``target_mb``: the target rows this rank holds). The teacher is a stand-in
(random unit vectors, H=384) unless ``--encoder teacher``: 10M texts through MiniLM would take
hours on CPU. ``old_text_mb`` is what every rank held before (user and item embeddings read back
from the file, plus the history rows), even in a baseline-only run.

    python benchmarks/bench_scale.py                # 26 tables, 40.3M rows x dim 16 (2.6 GB fp32)
    python benchmarks/bench_scale.py --dim 32       # 5.2 GB
    python benchmarks/bench_scale.py --quick        # seconds; used by the tests
    python benchmarks/bench_scale.py --variants "" --text-users 1000000   # the text stages only
    python benchmarks/bench_scale.py --variants "" --text-users 10000000 --baseline-only-above 1000000
"""

from __future__ import annotations

import argparse
import gc
import math
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

ROOT = Path(__file__).resolve().parents[1]
for p in (ROOT, ROOT / "benchmarks"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

import torch  # noqa: E402

from machine import machine_info, quiet, read as _read, reset_peak_rss, rss_mb, usable_cpus, write_json  # noqa: E402
from scale_text import run_text  # noqa: E402

# Criteo-like cardinalities (the Kaggle set has a few tables of ~10M rows and many small ones):
# 40.3M rows in all with the default --scale 1.
TABLE_ROWS = [
    10_000_000, 10_000_000, 8_000_000, 6_000_000, 3_000_000, 2_000_000, 1_000_000,
    100_000, 50_000, 20_000, 10_000, 5_000, 5_000, 3_000, 2_000, 1_000, 1_000,
    500, 300, 200, 100, 100, 50, 30, 20, 10,
]
DENSE = 13
VARIANTS = ("1proc", "2proc_table_wise", "2proc_row_wise", "2proc_data_parallel")
DEFAULT_VARIANTS = ("1proc", "2proc_table_wise", "2proc_row_wise")


def table_rows(scale: float) -> List[int]:
    return [max(4, int(round(r * scale))) for r in TABLE_ROWS]


def _zipf_ids(rows: int, n: int, a: float, gen: torch.Generator, salt: int) -> torch.Tensor:
    """n ids in [0, rows): rank ~ continuous Zipf(a) (inverse CDF), rank r -> row (r * P + salt) % rows
    with P a large prime (hot rows scattered, no permutation table to hold)."""
    u = torch.rand(n, generator=gen, dtype=torch.float64)
    if a <= 0:
        rank = (u * rows).long()
    elif abs(a - 1.0) < 1e-9:
        rank = torch.exp(u * math.log(rows + 1)).long() - 1
    else:
        e = 1.0 - a
        rank = ((u * ((rows + 1) ** e - 1) + 1) ** (1.0 / e)).long() - 1
    rank = rank.clamp_(0, rows - 1)
    return (rank * 2_147_483_647 + salt) % rows


def make_batches(rows: List[int], per_rank: int, n: int, a: float, seed: int, rank: int) -> List[Any]:
    from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

    from sparse_kd.data.batching import KDBatch

    gen = torch.Generator().manual_seed(seed * 1000 + rank)
    keys = [f"c{t}" for t in range(len(rows))]
    out = []
    for _ in range(n):
        values = torch.cat([_zipf_ids(r, per_rank, a, gen, salt=17 * t + 3) for t, r in enumerate(rows)])
        kjt = KeyedJaggedTensor.from_lengths_sync(keys, values, torch.ones(len(rows) * per_rank, dtype=torch.int32))
        dense = torch.log1p(torch.empty(per_rank, DENSE).exponential_(generator=gen) * 10)
        labels = (torch.rand(per_rank, generator=gen) < 0.25).float()
        zero = torch.zeros(per_rank, dtype=torch.int64)
        out.append(KDBatch(dense, kjt, labels, zero, zero, torch.zeros(per_rank)))
    return out


def _bytes(obj: Any) -> int:
    """Bytes of the tensors in obj (this rank's local shards of sharded tensors), recursively."""
    if hasattr(obj, "local_shards"):
        return sum(s.tensor.numel() * s.tensor.element_size() for s in obj.local_shards())
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_bytes(v) for v in obj)
    return 0


def run_one(opts: Dict[str, Any], sharding: str, env) -> Dict[str, Any]:
    """Build, initialise and train one sharding of the model in this rank; its memory and speed."""
    import torch.distributed as dist
    from torchrec.distributed.model_parallel import DistributedModelParallel
    from torchrec.distributed.train_pipeline import TrainPipelineSparseDist
    from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward

    from sparse_kd.config import config_from_dict
    from sparse_kd.distill.module import RankerTrain
    from sparse_kd.student.model import build_dlrm
    from sparse_kd.student.sharding import build_plan
    from sparse_kd.student.init import write_tables
    from sparse_kd.student.optim import combined_optimizer, sparse_optimizer

    world, rank = env.world_size, env.rank
    rows = opts["rows"]
    cfg = config_from_dict({
        "nproc": world,
        "student": {"embedding_dim": opts["dim"], "dense_arch": [64, opts["dim"]], "over_arch": [128, 64, 1],
                    "default_sharding": sharding},
        "train": {"batch_size": opts["batch"], "sparse_lr": 0.05, "dense_lr": 0.001},
    }, "<bench_scale>")
    gc.collect()
    peak_reset = reset_peak_rss()
    mem: Dict[str, Any] = {"start": rss_mb()}
    t0 = time.perf_counter()
    # the recipe of sparse_kd.student.train.train_ranker (see bench_train.build_project)
    feats = {f"c{t}": r for t, r in enumerate(rows)}
    dlrm = build_dlrm(feats, DENSE, cfg.student, device="meta")
    module = RankerTrain(dlrm, cfg.distill, list(feats))
    opt_cls, opt_kwargs = sparse_optimizer(cfg.train)
    apply_optimizer_in_backward(opt_cls, module.model.sparse_arch.parameters(), opt_kwargs)
    plan = build_plan(module, cfg.student, world, env.device.type)
    dmp = DistributedModelParallel(module=module, device=env.device, plan=plan)
    t_dmp = time.perf_counter() - t0
    write_tables(dmp, cfg.train.seed, {})
    optimizer, _ = combined_optimizer(dmp, cfg.train)
    build_s = time.perf_counter() - t0
    mem["built"] = rss_mb()

    emb_bytes, emb_rows, tables_here = 0, 0, 0
    for key, value in dmp.state_dict().items():
        if "embedding_bags" in key and key.endswith(".weight"):
            b = _bytes(value)
            emb_bytes += b
            emb_rows += b // (opts["dim"] * 4)
            tables_here += int(b > 0)
    per_rank = opts["batch"] // world
    batches = make_batches(rows, per_rank, opts["num_batches"], opts["zipf_a"], opts["seed"], rank)
    pipeline = TrainPipelineSparseDist(dmp, optimizer, env.device)
    dmp.train()

    def cycle():
        while True:
            yield from batches

    it = cycle()
    for _ in range(opts["warmup"]):
        pipeline.progress(it)
    secs = []
    loss = None
    for _ in range(opts["rounds"]):
        if world > 1:
            dist.barrier()
        t = time.perf_counter()
        for _ in range(opts["steps"]):
            loss, _logits, _labels = pipeline.progress(it)
        if world > 1:
            dist.barrier()
        secs.append(time.perf_counter() - t)
    opt_bytes = _bytes(dmp.fused_optimizer.state_dict().get("state", {}))
    mem["end"] = rss_mb()
    out = {
        "rank": rank,
        "world": world,
        "sharding": sharding,
        "threads": torch.get_num_threads(),
        "tables_local": tables_here,
        "emb_rows_local": int(emb_rows),
        "emb_bytes_local": int(emb_bytes),
        "opt_state_bytes_local": int(opt_bytes),
        "rss_mb_start": mem["start"]["rss_mb"],
        "rss_mb_built": mem["built"]["rss_mb"],
        "rss_mb_end": mem["end"]["rss_mb"],
        "peak_rss_mb": mem["end"]["peak_rss_mb"],
        "peak_is_this_variant": peak_reset or mem["start"]["peak_rss_mb"] <= mem["start"]["rss_mb"] + 1,
        "ru_maxrss_mb": mem["end"]["ru_maxrss_mb"],
        "dmp_s": round(t_dmp, 2),
        "build_s": round(build_s, 2),
        "step_seconds": secs,
        "examples_per_s": statistics.median(opts["batch"] * opts["steps"] / s for s in secs),
        "final_loss": float(loss) if loss is not None else None,
    }
    if world > 1:  # everyone done with the collectives of this model before it is freed
        dist.barrier()
    del pipeline, optimizer, dmp, module, dlrm, batches, it
    gc.collect()
    return out


def worker(opts: Dict[str, Any]) -> Dict[str, Any]:
    """Every sharding in ``opts["shardings"]``, one after another, in this rank. Returns, per
    sharding, every rank's record (rank 0's return value is the one that is read)."""
    import torch.distributed as dist

    from sparse_kd.dist import init_distributed

    quiet()
    torch.set_num_threads(opts["threads"])
    env = init_distributed("gloo", 600)
    out: Dict[str, List[Dict[str, Any]]] = {}
    for sharding in opts["shardings"]:
        mine = run_one(opts, sharding, env)
        gathered: List[Any] = [None] * env.world_size
        if env.world_size > 1:
            dist.all_gather_object(gathered, mine)
        else:
            gathered = [mine]
        out[sharding] = gathered
    if env.world_size > 1:
        dist.barrier()
    dist.destroy_process_group()
    return out


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scale", type=float, default=1.0, help="multiplies every table's rows (1: 40.3M rows)")
    p.add_argument("--dim", type=int, default=16)
    p.add_argument("--batch", type=int, default=4096, help="global batch")
    p.add_argument("--zipf-a", type=float, default=1.05, help="Zipf exponent of the ids (<= 0: uniform)")
    p.add_argument("--variants", default=",".join(DEFAULT_VARIANTS), help=f"comma list of {', '.join(VARIANTS)}")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=10, help="timed steps per round")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--num-batches", type=int, default=8, help="distinct pre-generated batches per rank, cycled")
    p.add_argument("--threads", type=int, default=1,
                   help="intra-op threads per process (0: usable cores / nproc); see bench_train.py --threads")
    p.add_argument("--share-processes", action="store_true",
                   help="run the 2-process variants one after another in one launch (default in --quick)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="runs/bench/scale.json")
    p.add_argument("--text-users", default="1000000,10000000",
                   help="comma list of user counts for the per-rank memory of the text stages ('' to skip)")
    p.add_argument("--baseline-only-above", type=int, default=0,
                   help="above this many users measure only the data and baseline-only stages (the text stages "
                        "hold every user's teacher row on every rank: 10M users need ~21 GB per rank); 0: all stages")
    p.add_argument("--encoder", choices=("stand-in", "teacher"), default="stand-in",
                   help="teacher for --text-users: a random stand-in (default) or the configured MiniLM")
    p.add_argument("--quick", action="store_true", help="small tables, few steps: seconds (used by the tests)")
    args = p.parse_args(argv)
    if args.quick:
        given = set(a.split("=")[0] for a in (argv if argv is not None else sys.argv[1:]))
        quick = {"--scale": 0.002, "--batch": 256, "--warmup": 1, "--steps": 2, "--rounds": 1, "--num-batches": 2,
                 "--text-users": "2000"}
        for flag, val in quick.items():
            if flag not in given:
                setattr(args, flag[2:].replace("-", "_"), val)
        args.share_processes = True
    args.variant_list = [v for v in args.variants.split(",") if v]
    args.text_user_list = [int(float(u)) for u in args.text_users.split(",") if u.strip()]
    for v in args.variant_list:
        if v not in VARIANTS:
            p.error(f"--variants: {v!r} is not one of {', '.join(VARIANTS)}")
    if args.dim % 8:
        p.error("--dim must be a multiple of 8")
    return args


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    info = machine_info()
    t_start = time.time()

    from sparse_kd.local_launch import spawned as launch

    quiet()
    rows = table_rows(args.scale)
    total_rows = sum(rows)
    full_bytes = total_rows * args.dim * 4
    print(
        f"# {len(rows)} tables, {total_rows / 1e6:.2f}M rows x dim {args.dim} fp32 = {full_bytes / 2**30:.2f} GiB "
        f"(+ {total_rows * 4 / 2**30:.2f} GiB row-wise Adagrad state); global batch {args.batch}, Zipf a={args.zipf_a}; "
        f"{info['usable_cpus']} cores, {info['memory_gb']} GB, torch {info['torch']}, torchrec {info['torchrec']}, "
        f"fbgemm {info['fbgemm_gpu']}",
        flush=True,
    )
    cores = usable_cpus()
    # multi-process variants under sparse_kd.local_launch.spawned: one launch per variant (fresh
    # processes, so the peaks are the variant's own), or all in one launch with --share-processes
    # (peak RSS reset between variants; the quick mode: a launch costs ~10 s); 1proc last, in
    # this process.
    multi = [v for v in args.variant_list if v != "1proc"]
    groups = [multi] if (args.share_processes and multi) else [[v] for v in multi]
    if "1proc" in args.variant_list:
        groups.append(["1proc"])
    results: Dict[str, Dict[str, Any]] = {}
    for group in groups:
        nproc = 1 if group == ["1proc"] else 2
        shardings = ["table_wise" if v == "1proc" else v.split("_", 1)[1] for v in group]
        opts = {
            "rows": rows, "dim": args.dim, "batch": args.batch, "shardings": shardings, "zipf_a": args.zipf_a,
            "warmup": args.warmup, "steps": args.steps, "rounds": args.rounds, "num_batches": args.num_batches,
            "threads": args.threads or max(1, cores // nproc), "seed": args.seed,
        }
        t0 = time.time()
        res = worker(opts) if nproc == 1 else launch(worker, nproc, opts)[0]
        wall = round(time.time() - t0, 1)
        for v, sh in zip(group, shardings):
            results[v] = {"variant": v, "nproc": nproc, "sharding": sh, "ranks": res[sh], "wall_s": wall,
                          "shared_processes": len(group) > 1, "loadavg_end": _read("/proc/loadavg")}
            ranks = res[sh]
            print(f"# {v}: built in {max(r['build_s'] for r in ranks)}s; peak RSS per rank "
                  f"{[r['peak_rss_mb'] for r in ranks]} MB", flush=True)
        print(f"# {', '.join(group)}: {wall}s in all", flush=True)
    text_memory = run_text(args, launch)

    rows_out: List[Dict[str, Any]] = []
    base = results.get("1proc")
    base_emb = base["ranks"][0]["emb_bytes_local"] if base else None
    base_peak = base["ranks"][0]["peak_rss_mb"] if base else None
    base_built = base["ranks"][0]["rss_mb_built"] - base["ranks"][0]["rss_mb_start"] if base else None
    for v in args.variant_list:
        res = results[v]
        for r in res["ranks"]:
            grew = r["rss_mb_built"] - r["rss_mb_start"]
            rows_out.append({
                "variant": v, "nproc": res["nproc"], "sharding": res["sharding"], "rank": r["rank"],
                "tables_local": r["tables_local"], "emb_rows_local": r["emb_rows_local"],
                "emb_mb_local": round(r["emb_bytes_local"] / 2**20, 1),
                "opt_state_mb_local": round(r["opt_state_bytes_local"] / 2**20, 1),
                "rss_mb_start": r["rss_mb_start"], "rss_mb_built": r["rss_mb_built"], "rss_mb_model": round(grew, 1),
                "rss_mb_end": r["rss_mb_end"], "peak_rss_mb": r["peak_rss_mb"],
                "emb_vs_1proc": r["emb_bytes_local"] / base_emb if base_emb else None,
                "rss_model_vs_1proc": grew / base_built if base_built else None,
                "peak_rss_vs_1proc": r["peak_rss_mb"] / base_peak if base_peak else None,
                "examples_per_s": r["examples_per_s"], "build_s": r["build_s"], "final_loss": r["final_loss"],
            })
    summary = []
    for v in args.variant_list:
        rs = [r for r in rows_out if r["variant"] == v]
        summary.append({
            "variant": v,
            "max_emb_mb_per_process": max(r["emb_mb_local"] for r in rs),
            "max_emb_vs_1proc": max(r["emb_vs_1proc"] for r in rs) if base_emb else None,
            "max_peak_rss_mb_per_process": max(r["peak_rss_mb"] for r in rs),
            "max_peak_rss_vs_1proc": max(r["peak_rss_vs_1proc"] for r in rs) if base_peak else None,
            "total_peak_rss_mb": round(sum(r["peak_rss_mb"] for r in rs), 1),
            "examples_per_s": rs[0]["examples_per_s"],
        })

    print()
    print(f"{'variant':<20} {'rank':>4} {'tables':>6} {'rows':>11} {'emb MB':>8} {'opt MB':>7} {'model RSS':>9} "
          f"{'peak RSS':>8} {'emb/1p':>6} {'peak/1p':>7} {'ex/s':>7}")
    for r in rows_out:
        print(f"{r['variant']:<20} {r['rank']:>4} {r['tables_local']:>6} {r['emb_rows_local']:>11,} {r['emb_mb_local']:8.1f} "
              f"{r['opt_state_mb_local']:7.1f} {r['rss_mb_model']:9.1f} {r['peak_rss_mb']:8.1f} "
              f"{(r['emb_vs_1proc'] or 0):6.2f} {(r['peak_rss_vs_1proc'] or 0):7.2f} {r['examples_per_s']:7.0f}")
    print()
    for s in summary:
        print(f"{s['variant']:<20} per process: embeddings <= {s['max_emb_mb_per_process']:.0f} MB"
              + (f" ({s['max_emb_vs_1proc']:.2f}x 1proc)" if s["max_emb_vs_1proc"] else "")
              + f", peak RSS <= {s['max_peak_rss_mb_per_process']:.0f} MB"
              + (f" ({s['max_peak_rss_vs_1proc']:.2f}x 1proc)" if s["max_peak_rss_vs_1proc"] else "")
              + f"; all processes {s['total_peak_rss_mb']:.0f} MB; {s['examples_per_s']:.0f} examples/s")

    info["loadavg_end"] = _read("/proc/loadavg")
    out = {
        "benchmark": "scale",
        "command": " ".join([Path(sys.argv[0]).name] + (argv if argv is not None else sys.argv[1:])),
        "machine": info,
        "config": {
            "tables": len(rows), "table_rows": rows, "total_rows": total_rows, "dim": args.dim,
            "fp32_table_bytes": full_bytes, "dense_features": DENSE, "global_batch": args.batch, "zipf_a": args.zipf_a,
            "variants": args.variant_list, "warmup": args.warmup, "steps": args.steps, "rounds": args.rounds,
            "num_batches": args.num_batches, "quick": args.quick, "scale": args.scale,
        },
        "results": rows_out,
        "summary": summary,
        "text_memory": text_memory,
        "runs": results,
        "notes": [
            "emb_mb_local: bytes of this rank's local shards of the embedding weights (state_dict local_shards)",
            "opt_state_mb_local: this rank's fused optimizer state (row-wise Adagrad: one float per row)",
            "rss_mb_model: RSS growth from process start (after imports) to the built, initialised model",
            "peak_rss_mb: getrusage ru_maxrss / VmHWM after the timed steps; 1proc ran in the launcher process",
            "text_memory: per rank of 2; per stage peak_above_start_mb (VmHWM reset before the stage) and held_mb; "
            "old_text_mb: the (2U + I) x 384 fp32 every rank held before (user, item and history rows)",
        ],
        "elapsed_s": round(time.time() - t_start, 1),
    }
    write_json(args.out, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
