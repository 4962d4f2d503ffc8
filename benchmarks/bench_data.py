"""Data of any size: sharded Parquet conversion and streamed training against the in-memory path.

One synthetic interaction log in the CSV format (``users.csv``, ``items.csv``,
``interactions.csv`` with labels and timestamps; users and items fixed, interactions drawn
chunk by chunk with a seed per chunk, so a smaller set is a prefix of a larger one) is written
at three sizes: ``--rows`` (the big set), ``--rss-small`` and ``--subset`` rows. Measured, each
in a fresh process:

* **convert**: ``sparse-kd data convert`` (``sparse_kd.data.convert``) time and peak RSS, at the
  big and the small size (peak memory should not grow with the rows); for reference the
  in-memory CSV loader's time and peak RSS at the small size;
* **throughput**: training examples/s of the project's loop (``build_sharded`` +
  ``TrainPipelineSparseDist`` + the data source ``train_ranker`` asks for its batches) on the
  ``--subset`` rows, in memory (CSV loaded whole) vs streamed from Parquet (``data.loader_workers``, auto by default),
  ``--nproc`` processes, one epoch after warm-up steps, median of ``--rounds``.
  Target: streamed >= 0.9x in memory;
* **peak RSS per training process**, streamed, at ``--rss-small`` vs ``--rows`` interactions
  (same users and items, so the same model): training steps crossing at least one shuffle
  window, evaluation not included (it reads each evaluated split whole). Target: <= 1.1x.

    python benchmarks/bench_data.py                 # 50M interactions (writes docs/bench/bench_data.json)
    python benchmarks/bench_data.py --quick         # seconds; used by the tests
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

ROOT = Path(__file__).resolve().parents[1]
for p in (ROOT, ROOT / "benchmarks"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

import numpy as np  # noqa: E402

from machine import machine_info, write_json  # noqa: E402

LATENT = 4  # latent dims of the synthetic users/items: labels have some signal


# ----------------------------------------------------------------------------------------------
# Synthetic CSV in bounded memory


def _world(users: int, items: int, seed: int):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(users, LATENT)).astype(np.float32), rng.normal(size=(items, LATENT)).astype(np.float32)


def write_csv(folder: Path, rows: int, users: int, items: int, seed: int, chunk: int) -> float:
    """The log's first ``rows`` interactions (a prefix of any larger log of the same seed). Returns MB."""
    folder.mkdir(parents=True, exist_ok=True)
    uvec, ivec = _world(users, items, seed)
    with open(folder / "items.csv", "w") as f:
        f.write("item_id,text,category\n")
        for lo in range(0, items, chunk):
            f.write("".join(f"i{i},Item number {i} of category {i % 50},c{i % 50}\n" for i in range(lo, min(items, lo + chunk))))
    with open(folder / "users.csv", "w") as f:
        f.write("user_id,text,region\n")
        for lo in range(0, users, chunk):
            f.write("".join(f"u{u},,r{u % 20}\n" for u in range(lo, min(users, lo + chunk))))
    pop = 1.0 / np.arange(1, items + 1) ** 0.8  # Zipf-like item popularity
    cdf = np.cumsum(pop / pop.sum())
    with open(folder / "interactions.csv", "w") as f:
        f.write("user_id,item_id,label,timestamp\n")
        for k, lo in enumerate(range(0, rows, chunk)):
            n = min(chunk, rows - lo)
            rng = np.random.default_rng([seed, k])
            u = rng.integers(0, users, n)
            i = np.minimum(np.searchsorted(cdf, rng.random(n)), items - 1)
            p = 1.0 / (1.0 + np.exp(-(np.sum(uvec[u] * ivec[i], axis=1) - 1.0)))
            y = (rng.random(n) < p).astype(np.int8)
            ts = 1_600_000_000 + lo + np.arange(n) + rng.integers(0, 1000, n)  # roughly in file order
            f.write("".join(f"u{a},i{b},{c},{d}\n" for a, b, c, d in zip(u.tolist(), i.tolist(), y.tolist(), ts.tolist())))
    return sum(p.stat().st_size for p in folder.iterdir()) / 2**20


def _du_mb(path: Path) -> float:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) / 2**20


# ----------------------------------------------------------------------------------------------
# Measured children


def _run_child(args: List[str]) -> Dict[str, Any]:
    """Run this script as a child with ``args``; return its JSON line plus wall time and peak RSS."""
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), *args], stdout=subprocess.PIPE, text=True)
    out = proc.stdout.read() if proc.stdout else ""
    _, status, usage = os.wait4(proc.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"child {args} failed: {out[-2000:]}")
    doc = json.loads(out.strip().splitlines()[-1])
    doc.update(wall_s=round(time.perf_counter() - t0, 2), peak_rss_mb=round(usage.ru_maxrss / 1024, 1))
    return doc


def child_convert(src: str, out: str, block_rows: int) -> Dict[str, Any]:
    from sparse_kd.config import DataConfig
    from sparse_kd.data import convert

    t0 = time.perf_counter()
    m = convert(DataConfig(source="csv", path=src, shuffle_block_rows=block_rows), out)
    return {"seconds": round(time.perf_counter() - t0, 2), "rows": sum(s["rows"] for s in m["splits"].values())}


def child_load(src: str, block_rows: int) -> Dict[str, Any]:
    from sparse_kd.config import DataConfig
    from sparse_kd.data import load_dataset

    t0 = time.perf_counter()
    ds = load_dataset(DataConfig(source="csv", path=src, shuffle_block_rows=block_rows))
    return {"seconds": round(time.perf_counter() - t0, 2), "rows": sum(len(s) for s in ds.splits.values())}


def _config(data: Dict[str, Any], opts: Dict[str, Any]):
    from sparse_kd.config import config_from_dict

    return config_from_dict({
        "name": "bench_data", "output_dir": opts["out_dir"], "nproc": opts["nproc"],
        "data": data,
        "student": {"embedding_dim": 16, "dense_arch": [32, 16], "over_arch": [64, 32, 1]},
        "train": {"batch_size": opts["batch"], "epochs": 1, "backend": "gloo"},
    }, "<bench_data>")


def train_worker(data: Dict[str, Any], opts: Dict[str, Any]) -> Dict[str, Any]:
    """In every rank: the project's training loop over ``opts['steps']`` steps after warm-up."""
    import resource
    import warnings

    import torch
    from torchrec.distributed.train_pipeline import TrainPipelineSparseDist

    from machine import quiet, rss_mb
    from sparse_kd.data import load_dataset
    from sparse_kd.data.batching import count_dense
    from sparse_kd.data.stream import train_source
    from sparse_kd.dist import init_distributed
    from sparse_kd.student.train import RankerSpec, build_sharded

    warnings.filterwarnings("ignore")
    quiet()
    torch.set_num_threads(opts["threads"])
    cfg = _config(data, opts)
    env = init_distributed("gloo", 300)
    t0 = time.perf_counter()
    ds = load_dataset(cfg.data)
    load_s = time.perf_counter() - t0
    spec = RankerSpec("baseline", *count_dense(ds))
    builder, _, dmp, optimizer, _ = build_sharded(cfg, ds, spec, env, 0)
    pipeline = TrainPipelineSparseDist(dmp, optimizer, env.device)
    source = train_source(ds, cfg.data)
    spe = source.steps_per_epoch(cfg.train.batch_size)
    steps = min(opts["steps"] or spe, spe) - opts["warmup"]
    rounds = []
    for r in range(opts["rounds"]):
        it = source.batches(builder, cfg.train.batch_size, env.rank, env.world_size, epoch=r, seed=0)
        for _ in range(opts["warmup"]):
            pipeline.progress(it)
        torch.distributed.barrier()
        t = time.perf_counter()
        for _ in range(steps - 1):  # the pipeline holds one batch back: stop before the last
            pipeline.progress(it)
        torch.distributed.barrier()
        rounds.append((steps - 1) * cfg.train.batch_size / (time.perf_counter() - t))
        del it
        pipeline = TrainPipelineSparseDist(dmp, optimizer, env.device)  # drop the held-back batch
    mem = rss_mb()
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    return {"rank": env.rank, "examples_per_s": round(statistics.median(rounds), 1),
            "examples_per_s_samples": [round(x, 1) for x in rounds], "steps": steps - 1, "load_s": round(load_s, 2),
            "train_examples": source.num_examples, "peak_rss_mb": mem["ru_maxrss_mb"],
            "loader_worker_peak_rss_mb": round(children, 1),
            "loader_workers": source.workers}


def child_train(spec_json: str) -> Dict[str, Any]:
    from sparse_kd.local_launch import spawned as launch

    spec = json.loads(spec_json)
    res = launch(train_worker, spec["opts"]["nproc"], spec["data"], spec["opts"])
    ranks = [res[r] for r in sorted(res)]
    return {"ranks": ranks}


# ----------------------------------------------------------------------------------------------


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=50_000_000, help="interactions of the big set")
    p.add_argument("--rss-small", type=int, default=5_000_000, help="interactions of the small set (peak RSS baseline)")
    p.add_argument("--subset", type=int, default=2_000_000, help="interactions for the in-memory vs streamed throughput")
    p.add_argument("--users", type=int, default=1_000_000)
    p.add_argument("--items", type=int, default=100_000)
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--threads", type=int, default=1, help="torch threads per training process")
    p.add_argument("--workers", type=int, default=-1,
                   help="data.loader_workers when streaming (default -1: auto, 0 on CPU, 1 on CUDA)")
    p.add_argument("--batch", type=int, default=2048, help="global batch")
    p.add_argument("--block-rows", type=int, default=65536, help="data.shuffle_block_rows")
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--steps", type=int, default=0, help="steps per round (0: one epoch)")
    p.add_argument("--rss-steps", type=int, default=600, help="steps for the peak-RSS runs (cross a window)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--chunk", type=int, default=1_000_000, help="rows per generated chunk")
    p.add_argument("--work", default="runs/bench/data_work", help="where the generated CSV and Parquet go")
    p.add_argument("--keep", action="store_true", help="keep the generated files")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="JSON path (default docs/bench/bench_data.json; quick: runs/bench/data_quick.json)")
    p.add_argument("--quick", action="store_true", help="tiny sizes, seconds (used by the tests)")
    p.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick:
        given = set(a.split("=")[0] for a in (argv if argv is not None else sys.argv[1:]))
        quick = {"--rows": 60_000, "--rss-small": 6_000, "--subset": 20_000, "--users": 2_000, "--items": 500, "--nproc": 1,
                 "--batch": 256, "--block-rows": 2048, "--warmup": 3, "--steps": 25, "--rss-steps": 20, "--rounds": 1,
                 "--chunk": 10_000, "--work": "runs/bench/data_work_quick"}
        for flag, val in quick.items():
            if flag not in given:
                setattr(args, flag[2:].replace("-", "_"), val)
    if args.out is None:
        args.out = "runs/bench/data_quick.json" if args.quick else "docs/bench/bench_data.json"
    return args


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    if args.child:  # measured child: print one JSON line
        kind, *rest = args.child
        fn = {"convert": lambda: child_convert(rest[0], rest[1], int(rest[2])),
              "load": lambda: child_load(rest[0], int(rest[1])),
              "train": lambda: child_train(rest[0])}[kind]
        print(json.dumps(fn()), flush=True)
        return 0

    work = Path(args.work)
    info = machine_info()
    sizes = {"big": args.rows, "small": args.rss_small, "subset": args.subset}
    print(f"bench_data: {args.rows:,} / {args.rss_small:,} / {args.subset:,} interactions, {args.users:,} users, "
          f"{args.items:,} items; {args.nproc} training process(es), batch {args.batch}, block {args.block_rows} rows", flush=True)
    csv_mb = {}
    for name, n in sizes.items():
        t = time.perf_counter()
        csv_mb[name] = round(write_csv(work / f"csv_{name}", n, args.users, args.items, args.seed, args.chunk), 1)
        print(f"  wrote {name} CSV: {n:,} rows, {csv_mb[name]} MB in {time.perf_counter() - t:.0f}s", flush=True)

    convert_rows = []
    for name in ("big", "small", "subset"):
        out = work / f"parquet_{name}"
        shutil.rmtree(out, ignore_errors=True)
        r = _run_child(["--child", "convert", str(work / f"csv_{name}"), str(out), str(args.block_rows)])
        convert_rows.append({"set": name, "interactions": sizes[name], "csv_mb": csv_mb[name], "parquet_mb": round(_du_mb(out), 1),
                             "seconds": r["seconds"], "peak_rss_mb": r["peak_rss_mb"],
                             "rows_per_s": round(sizes[name] / max(r["seconds"], 1e-9))})
        print(f"  convert {name}: {r['seconds']}s, peak RSS {r['peak_rss_mb']} MB", flush=True)
    r = _run_child(["--child", "load", str(work / "csv_small"), str(args.block_rows)])
    in_memory_load = {"interactions": args.rss_small, "seconds": r["seconds"], "peak_rss_mb": r["peak_rss_mb"]}
    print(f"  in-memory CSV load (small): {r['seconds']}s, peak RSS {r['peak_rss_mb']} MB", flush=True)

    def train(name: str, data: Dict[str, Any], steps: int, rounds: int) -> Dict[str, Any]:
        opts = {"nproc": args.nproc, "batch": args.batch, "threads": args.threads, "warmup": args.warmup, "steps": steps,
                "rounds": rounds, "out_dir": str(work / f"run_{name}")}
        res = _run_child(["--child", "train", json.dumps({"data": data, "opts": opts})])
        ranks = res["ranks"]
        row = {"variant": name, "examples_per_s": round(sum(r["examples_per_s"] for r in ranks) / len(ranks), 1),
               "peak_rss_mb_per_process": max(r["peak_rss_mb"] for r in ranks),
               "loader_worker_peak_rss_mb": max(r["loader_worker_peak_rss_mb"] for r in ranks),
               "ranks": ranks}
        print(f"  train {name}: {row['examples_per_s']:,.0f} ex/s, peak RSS per process {row['peak_rss_mb_per_process']} MB "
              f"(loader workers {row['loader_worker_peak_rss_mb']} MB)", flush=True)
        return row

    block = {"shuffle_block_rows": args.block_rows}
    mem = train("in_memory_subset", {"source": "csv", "path": str(work / "csv_subset"), **block}, args.steps, args.rounds)
    streamed = train("streamed_subset", {"source": "parquet", "path": str(work / "parquet_subset"), "loader_workers": args.workers,
                                         **block}, args.steps, args.rounds)
    rss_small = train("streamed_small", {"source": "parquet", "path": str(work / "parquet_small"), "loader_workers": args.workers,
                                         **block}, args.rss_steps + args.warmup, 1)
    rss_big = train("streamed_big", {"source": "parquet", "path": str(work / "parquet_big"), "loader_workers": args.workers,
                                     **block}, args.rss_steps + args.warmup, 1)
    ratio = streamed["examples_per_s"] / mem["examples_per_s"]
    rss_ratio = rss_big["peak_rss_mb_per_process"] / rss_small["peak_rss_mb_per_process"]
    worker_ratio = (rss_big["loader_worker_peak_rss_mb"] / rss_small["loader_worker_peak_rss_mb"]
                    if rss_small["loader_worker_peak_rss_mb"] else float("nan"))
    conv_rss_ratio = convert_rows[0]["peak_rss_mb"] / convert_rows[1]["peak_rss_mb"]
    summary = {
        "streamed_vs_in_memory_examples_per_s": round(ratio, 3), "target_streamed_vs_in_memory": 0.9,
        "met_streamed_vs_in_memory": ratio >= 0.9,
        "train_peak_rss_big_vs_small": round(rss_ratio, 3), "target_train_peak_rss_big_vs_small": 1.1,
        "met_train_peak_rss": rss_ratio <= 1.1,
        "loader_worker_peak_rss_big_vs_small": round(worker_ratio, 3),
        "convert_peak_rss_big_vs_small": round(conv_rss_ratio, 3),
    }
    print("\n| measure | value | target |\n|---|---|---|")
    print(f"| streamed / in-memory examples/s ({args.subset:,} rows) | {ratio:.3f} | >= 0.9 |")
    print(f"| training peak RSS per process, {args.rows:,} / {args.rss_small:,} rows | {rss_ratio:.3f} | <= 1.1 |")
    print(f"| DataLoader worker peak RSS, {args.rows:,} / {args.rss_small:,} rows | {worker_ratio:.3f} | |")
    print(f"| convert {args.rows:,} rows | {convert_rows[0]['seconds']} s, peak RSS {convert_rows[0]['peak_rss_mb']} MB | |")
    print(f"| convert peak RSS, {args.rows:,} / {args.rss_small:,} rows | {conv_rss_ratio:.3f} | |")
    doc = {
        "benchmark": "bench_data",
        "command": "python benchmarks/bench_data.py" + (" --quick" if args.quick else ""),
        "machine": info,
        "config": {k: v for k, v in vars(args).items() if k != "child"},
        "convert": convert_rows,
        "in_memory_load": in_memory_load,
        "train": [mem, streamed, rss_small, rss_big],
        "summary": summary,
    }
    doc["machine"]["loadavg_end"] = open("/proc/loadavg").read().strip() if Path("/proc/loadavg").exists() else ""
    write_json(args.out, doc)
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
