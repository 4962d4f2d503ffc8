"""GPU check: the CUDA paths of sparse_kd, each check in its own process with its own time limit.

    make gpu-check                                    # .venv-gpu (CUDA stack), then this script
    .venv-gpu/bin/python benchmarks/gpu_check.py --only env serve_cuda_array
    python benchmarks/gpu_check.py --dry-run          # the plan for this machine; runs nothing

The checks are listed in ``CHECKS`` (and by --help). After every check OUT/gpu_check.json is
rewritten atomically (``complete``: false and the ``pending`` checks until the last one), so a
run killed from outside keeps what finished. A check gets min(its limit, what is left of
--budget-s); past it, its process group (torchrun included) is killed and it becomes a FAIL row;
one that no longer fits is ``not run``. Logs: OUT/logs/CHECK.log. Exit status: 0 no FAIL and
nothing left out, 1 otherwise, 2 without a CUDA GPU (nothing is run). docs/GPU.md says more.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import sys
import time
from functools import partial
from pathlib import Path
from typing import Any, Dict, List, Optional

ROOT = Path(__file__).resolve().parents[1]
for p in (ROOT, ROOT / "benchmarks"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from gpu_check_harness import (CONFIG, DEFAULT_BUDGET_S, Check, Ctx, Rows, cli_command, cli_env,  # noqa: E402
                               gpu_count, require_cuda, row, run_cli, run_limited, run_plan, skip_reason,
                               summary_table, timed, write_json)

MIN_VALID_AUC = 0.55  # "above chance" on the demo data after one epoch
MIN_TEACHER_COSINE = 0.99
# int8 on both kernels, same pruning: the TBE keeps fp16 row scales, the CPU ops fp32 ones
SERVE_CPU_LOGIT_TOL = 0.1
SERVE_SAME_BYTES_TOL = 1e-4  # hash vs array remap on the same TBE bytes: only the remap differs
UVM_TOL = 1e-3


def run_child(ctx: Ctx, name: str, limit_s: float) -> Rows:
    """One check in a fresh process (``--run-check NAME``) under its own time limit."""
    rows_file, log = ctx.out / "rows" / f"{name}.json", ctx.out / "logs" / f"{name}.log"
    rows_file.unlink(missing_ok=True)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--run-check", name, "--out", str(ctx.out),
           "--set", *ctx.overrides]
    rc, timed_out, secs = run_limited(cmd, limit_s, log, cli_env())
    rows = json.loads(rows_file.read_text()) if rows_file.is_file() else []
    tail = " | ".join(ln.strip()[:200] for ln in log.read_text(errors="replace").strip().splitlines()[-3:])
    if timed_out:
        return rows + [row(name, False, f"killed after its limit of {limit_s:.0f}s; {log}: {tail}", secs)]
    return rows if rc == 0 and rows else rows + [row(name, False, f"exit {rc}: {tail}", secs)]


# the demo config's outside reference trains on the CPU of rank 0 alone: nothing a GPU check tests
NO_REFERENCE = "train.mf_reference=false"


def train_overrides(ctx: Ctx, nproc: int = 1) -> tuple:
    return (*ctx.overrides, f"nproc={nproc}", f"train.backend={ctx.backend}", "train.epochs=1", NO_REFERENCE)


def _valid_auc(metrics: Dict[str, Any], variant: str) -> float:
    return float(metrics["metrics"][variant]["valid"]["auc"])


def check_train(ctx: Ctx, name: str = "train_gpu", nproc: int = 1) -> Rows:
    t0, out = time.perf_counter(), ctx.out / name
    # the distilled student's alignment targets and the teacher ranker's user features in their
    # sharded tables: the planner's CUDA kernels, nccl's all-to-all of 384-dim and 64-dim rows
    # (the replicated layouts are a plain index_select)
    run_cli(cli_command("train", out, *train_overrides(ctx, nproc), "distill.align.layout=sharded",
                        "distill.teacher_ranker.features_layout=sharded", variants=("baseline", "distilled")))
    metrics = json.loads((out / "metrics.json").read_text())
    rows = []
    for v in metrics["metrics"]:
        auc = _valid_auc(metrics, v)
        eps = float(metrics.get("examples_per_s", {}).get(v, 0.0))
        rows.append(row(f"{name}/{v}", auc > MIN_VALID_AUC, f"{nproc} rank(s), valid AUC {auc:.4f}, {eps:.0f} examples/s",
                        time.perf_counter() - t0, valid_auc=auc, examples_per_s=eps, ranks=nproc))
    return rows


def check_resume_cpu_to_gpu(ctx: Ctx) -> Dict[str, Any]:
    import re

    t0, out = time.perf_counter(), ctx.out / "resume"
    run_cli(cli_command("train", out, *ctx.overrides, "nproc=1", "train.epochs=1", NO_REFERENCE, variants=("baseline",)),
            hide_gpus=True)
    proc = run_cli(cli_command("train", out, *ctx.overrides, "nproc=1", "train.epochs=2", NO_REFERENCE, variants=("baseline",)))
    resumed = re.search(r"resumed from \S+", proc.stderr)
    from sparse_kd import checkpoint as ckpt

    meta = ckpt.read_meta(ckpt.latest(out / "baseline" / "checkpoints"))
    auc = _valid_auc(json.loads((out / "metrics.json").read_text()), "baseline")
    ok = bool(resumed) and meta["epoch"] == 2 and auc > MIN_VALID_AUC
    detail = (f"{'resumed' if resumed else 'did NOT resume'} from the CPU checkpoint; checkpoint at epoch {meta['epoch']}, "
              f"step {meta['global_step']}; valid AUC {auc:.4f}")
    return row("resume_cpu_to_gpu", ok, detail, time.perf_counter() - t0, valid_auc=auc, global_step=meta["global_step"])


def check_env(ctx: Ctx) -> Dict[str, Any]:
    import importlib.metadata as md
    import torch

    t0 = time.perf_counter()
    installed = {d.metadata["Name"].lower().replace("_", "-") for d in md.distributions()}
    clobbered = "fbgemm-gpu-cpu" in installed
    import fbgemm_gpu  # noqa: F401  registers torch.ops.fbgemm
    import torchrec  # noqa: F401

    sums = torch.ops.fbgemm.asynchronous_complete_cumsum(torch.tensor([1, 2, 3], dtype=torch.int32, device=ctx.device))
    op_ok = sums.cpu().tolist() == [0, 1, 3, 6]
    from sparse_kd.teacher.encoder import native_bf16

    cap = torch.cuda.get_device_capability(0)
    bf16 = native_bf16(torch.device("cuda:0"))
    ok = op_ok and not clobbered and bool(torch.version.cuda) and torch.distributed.is_nccl_available()
    detail = (f"torch {torch.__version__} (CUDA {torch.version.cuda}), {gpu_count()} GPU(s), capability "
              f"{cap[0]}.{cap[1]}; fbgemm_gpu CUDA op {'ok' if op_ok else 'WRONG'}"
              f"{'; fbgemm-gpu-cpu is installed over the CUDA fbgemm-gpu' if clobbered else ''}; teacher bf16: {bf16}")
    return row("env", ok, detail, time.perf_counter() - t0, torch=torch.__version__, cuda=torch.version.cuda,
               gpus=gpu_count(), capability=list(cap), native_bf16=bf16, fbgemm_gpu_cpu_installed=clobbered)


def check_teacher(ctx: Ctx, n_texts: int = 4096) -> Dict[str, Any]:
    import torch
    from sparse_kd.config import DataConfig
    from sparse_kd.data import load_dataset
    from sparse_kd.teacher.encoder import TextEncoder

    t0 = time.perf_counter()
    ds = load_dataset(DataConfig())
    base = list(ds.item_text) + list(ds.user_text)
    texts = (base * (n_texts // len(base) + 1))[:n_texts]
    gpu = TextEncoder(device=ctx.device, show_progress=False)
    gpu.encode(texts[:256])  # load + warm-up
    torch.cuda.synchronize()
    t = time.perf_counter()
    gpu.encode(texts)
    tps = len(texts) / (time.perf_counter() - t)  # encode returns CPU tensors: synchronized
    ref = TextEncoder(device="cpu", precision="fp32", show_progress=False).encode(texts[:256])
    cos = torch.nn.functional.cosine_similarity(gpu.encode(texts[:256]).float(), ref.float(), dim=1)
    detail = f"{tps:.0f} texts/s ({gpu.precision}); cosine to CPU fp32: mean {float(cos.mean()):.5f}, min {float(cos.min()):.5f}"
    return row("teacher", float(cos.min()) >= MIN_TEACHER_COSINE, detail, time.perf_counter() - t0, texts_per_s=tps,
               precision=gpu.precision, cosine_mean=float(cos.mean()), cosine_min=float(cos.min()))


def build_artifact(ctx: Ctx, device: str, remap: str) -> Path:
    """``sparse-kd compress`` of train_gpu's baseline (int8, half the rows) -> OUT/artifact_DEVICE_REMAP."""
    dest = ctx.out / f"artifact_{device}_{remap}"
    shutil.rmtree(dest, ignore_errors=True)
    run_cli(cli_command("compress", ctx.out / "train_gpu", *train_overrides(ctx), f"compress.serve_device={device}",
                        f"compress.remap={remap}", "compress.default_dtype=int8", "compress.default_keep_ratio=0.5",
                        extra=("--variant", "baseline", "--out", str(dest))))
    return dest


def _fresh(ctx: Ctx, artifact: Path) -> bool:
    """An artifact written after train_gpu's run finished (not one left by an earlier gpu_check)."""
    model, metrics = artifact / "model.pt", ctx.out / "train_gpu" / "metrics.json"
    return model.is_file() and metrics.is_file() and model.stat().st_mtime >= metrics.stat().st_mtime


def check_serve(ctx: Ctx, remap: str, pairs: int = 4096, reps: int = 10) -> Dict[str, Any]:
    import numpy as np
    from sparse_kd.serve import Predictor, verify_artifact

    t0, name = time.perf_counter(), f"serve_{ctx.device}_{remap}"
    art = build_artifact(ctx, ctx.device, remap)
    manifest = verify_artifact(art)
    pred = Predictor.load(art)
    rng = random.Random(0)
    users, items = list(pred.user_index), list(pred.item_index)
    us, its = [rng.choice(users) for _ in range(pairs)], [rng.choice(items) for _ in range(pairs)]
    logits = pred.score_logits(us, its)
    t = time.perf_counter()
    for _ in range(reps):
        pred.score_logits(us, its)
    pairs_per_s = reps * pairs / (time.perf_counter() - t)
    ref_dir = ctx.out / "artifact_cpu_array"  # the same settings on the CPU kernels
    if ref_dir != art and (remap == "array" or not _fresh(ctx, ref_dir)):
        build_artifact(ctx, "cpu", "array")
    vs_cpu = float(np.abs(logits - Predictor.load(ref_dir).score_logits(us, its)).max())
    figs = {"device": str(pred.device), "kernel": manifest["serving"]["kernel"], "max_logit_diff_vs_cpu": vs_cpu,
            "pairs_per_s": pairs_per_s, "artifact": str(art)}
    ok = str(pred.device).startswith(ctx.device) and bool(np.isfinite(logits).all()) and vs_cpu <= SERVE_CPU_LOGIT_TOL
    detail = f"served on {pred.device} ({figs['kernel']}); vs CPU artifact: max logit diff {vs_cpu:.2e}"
    same = ctx.out / f"artifact_{ctx.device}_array"
    if remap != "array" and _fresh(ctx, same):
        figs["max_logit_diff_vs_array"] = float(np.abs(logits - Predictor.load(same).score_logits(us, its)).max())
        ok = ok and figs["max_logit_diff_vs_array"] <= SERVE_SAME_BYTES_TOL
        detail += f"; vs array remap: {figs['max_logit_diff_vs_array']:.1e}"
    return row(name, ok, f"{detail}; {pairs_per_s:.0f} pairs/s", time.perf_counter() - t0, **figs)


def check_uvm_caching(ctx: Ctx, rows_uvm: int = 200_000, dim: int = 64, batch: int = 1024, bag: int = 8,
                      steps: int = 4, lr: float = 0.1) -> Dict[str, Any]:
    """One process, world size 1: ``t_uvm`` forced onto FUSED_UVM_CACHING (cache: 20% of its rows),
    ``t_hbm`` on FUSED, fused EXACT_SGD. Each step's pooled lookups must equal an fp32 reference
    table that gets the same SGD update (loss = sum of outputs: every looked-up row loses lr per use)."""
    import socket
    import torch
    import torch.distributed as dist
    from fbgemm_gpu.split_embedding_configs import EmbOptimType
    from torchrec import EmbeddingBagCollection, EmbeddingBagConfig, KeyedJaggedTensor
    from torchrec.distributed.embedding_types import EmbeddingComputeKernel as K
    from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
    from torchrec.distributed.model_parallel import DistributedModelParallel
    from torchrec.distributed.planner import EmbeddingShardingPlanner, ParameterConstraints, Topology
    from torchrec.distributed.types import CacheParams

    t0, dev = time.perf_counter(), torch.device(ctx.device, 0)
    torch.cuda.set_device(dev)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        sizes = {"t_uvm": rows_uvm, "t_hbm": 1000}
        tables = [EmbeddingBagConfig(name=t, embedding_dim=dim, num_embeddings=n, feature_names=[f"f_{t[2:]}"])
                  for t, n in sizes.items()]
        cons = {"t_uvm": ParameterConstraints(sharding_types=["table_wise"], compute_kernels=[K.FUSED_UVM_CACHING.value],
                                              cache_params=CacheParams(load_factor=0.2)),
                "t_hbm": ParameterConstraints(sharding_types=["table_wise"], compute_kernels=[K.FUSED.value])}
        sharder = EmbeddingBagCollectionSharder(fused_params={"optimizer": EmbOptimType.EXACT_SGD, "learning_rate": lr})
        ebc = EmbeddingBagCollection(tables=tables, device=torch.device("meta"))
        plan = EmbeddingShardingPlanner(topology=Topology(world_size=1, compute_device="cuda"), constraints=cons).plan(
            ebc, [sharder])
        kernels = {t: ps.compute_kernel for mp in plan.plan.values() for t, ps in mp.items()}
        model = DistributedModelParallel(ebc, device=dev, plan=plan, sharders=[sharder])
        ref = {}
        for key, v in model.state_dict().items():
            t = next((t for t in sizes if key.endswith(f"{t}.weight")), None)
            if t is not None:
                v = v.local_shards()[0].tensor if hasattr(v, "local_shards") else getattr(v, "to_local", lambda: v)()
                ref[t] = v.detach().to(dev, torch.float32).clone()
        g, worst = torch.Generator().manual_seed(0), 0.0
        for _ in range(steps):  # uniform ids over the whole table: most miss the cache
            ids = {t: torch.randint(0, n, (batch * bag,), generator=g) for t, n in sizes.items()}
            kjt = KeyedJaggedTensor.from_lengths_sync(
                keys=[f"f_{t[2:]}" for t in sizes], values=torch.cat(list(ids.values())).to(dev),
                lengths=torch.full((len(sizes) * batch,), bag, dtype=torch.int32, device=dev))
            out = model(kjt)  # a KeyedTensor (torchrec's LazyAwaitable resolves on first use)
            got = out.to_dict()
            for t in sizes:
                i = ids[t].to(dev)
                want = torch.nn.functional.embedding_bag(i, ref[t], torch.arange(0, i.numel(), bag, device=dev), mode="sum")
                worst = max(worst, float((got[f"f_{t[2:]}"].float() - want).abs().max()))
                ref[t].index_add_(0, i, torch.full((i.numel(), dim), -lr, device=dev))  # the fused SGD step
            out.values().sum().backward()  # d/d(pooled) = 1: each row gets its use count as gradient
        torch.cuda.synchronize()
    finally:
        dist.destroy_process_group()
    ok = kernels.get("t_uvm") == K.FUSED_UVM_CACHING.value and worst <= UVM_TOL
    detail = (f"kernels {kernels}; {steps} steps of {batch}x{bag} ids over {rows_uvm} rows (cache 20%): "
              f"max diff to fp32 reference {worst:.1e}")
    return row("uvm_caching", ok, detail, time.perf_counter() - t0, kernels=kernels, max_abs_diff=worst)


def check_parquet_pinned(ctx: Ctx, workers: int = 2) -> Dict[str, Any]:
    import torch

    t0, pq, run = time.perf_counter(), ctx.out / "parquet_data", ctx.out / "parquet_train"
    shutil.rmtree(pq, ignore_errors=True)
    run_cli([sys.executable, "-m", "sparse_kd.cli", "data", "convert", CONFIG, *ctx.overrides, "--out", str(pq)])
    run_cli(cli_command("train", run, *train_overrides(ctx), "data.source=parquet", f"data.path={pq}",
                        f"data.loader_workers={workers}", variants=("baseline",)))
    auc = _valid_auc(json.loads((run / "metrics.json").read_text()), "baseline")
    # the loader as training builds it: one batch of rank 0, epoch 0
    from sparse_kd.config import load_config
    from sparse_kd.data import load_dataset
    from sparse_kd.data.batching import BatchBuilder
    from sparse_kd.data.stream import train_source

    cfg = load_config(run / "config.yaml")
    ds = load_dataset(cfg.data)
    src = train_source(ds, cfg.data)
    ed = torch.load(run / "data" / "entity_dense.pt", weights_only=True)
    batch = next(iter(src.batches(BatchBuilder(ds, ed["user"], ed["item"]), cfg.train.batch_size, 0, 1, 0, cfg.train.seed)))
    pinned = bool(batch.labels.is_pinned())
    ok = auc > MIN_VALID_AUC and src.workers == workers and (pinned or ctx.device != "cuda")
    detail = f"1 epoch from Parquet, {src.workers} loader workers, batches pinned: {pinned}; valid AUC {auc:.4f}"
    return row("parquet_pinned", ok, detail, time.perf_counter() - t0, valid_auc=auc, workers=src.workers, pinned=pinned)


CHECKS = (
    Check("env", 60, check_env, "torch's CUDA build, an fbgemm_gpu CUDA operator, no fbgemm-gpu-cpu over fbgemm-gpu, "
          "torchrec, NCCL, the teacher's bf16 decision for cuda:0"),
    Check("train_gpu", 180, partial(check_train, name="train_gpu", nproc=1), "`sparse-kd train configs/demo.yaml` on "
          "1 GPU (nccl), one epoch: baseline, distilled and the teacher ranker they need, each above chance on valid"),
    Check("train_2ranks", 180, partial(check_train, name="train_2ranks", nproc=2), "the same with 2 ranks on 2 GPUs: "
          "row_wise tables (all-to-all over NCCL) in a cpu:gloo,cuda:nccl group", gpus=2),
    Check("serve_cuda_array", 120, partial(check_serve, remap="array"), "`sparse-kd compress` of train_gpu's baseline, "
          "serve_device=cuda, remap=array, int8, half the rows -> artifact -> verify_artifact -> Predictor on the GPU; "
          "logits vs a CPU-served artifact; pairs/s", after="train_gpu"),
    Check("serve_cuda_hash", 90, partial(check_serve, remap="hash"), "the same with remap=hash; also vs the array "
          "artifact (same bytes)", after="train_gpu"),
    Check("uvm_caching", 90, check_uvm_caching, "a torchrec table forced onto FUSED_UVM_CACHING (cache: 20% of its "
          "rows) beside a FUSED one: lookups and fused SGD steps over the whole table vs an fp32 reference"),
    Check("parquet_pinned", 150, check_parquet_pinned, "`sparse-kd data convert`, then one epoch streamed from Parquet "
          "through 2 DataLoader workers; batches must come out pinned"),
    Check("teacher", 90, check_teacher, "BERT teacher texts/s on the GPU, cosine to the CPU fp32 embeddings"),
    Check("resume_cpu_to_gpu", 150, check_resume_cpu_to_gpu, "one epoch on CPU (GPUs hidden), a second on the GPU "
          "resuming from it"),
)
NAMES = tuple(c.name for c in CHECKS)




def main(argv: Optional[List[str]] = None) -> int:
    checks = "\n".join(f"  {c.name:<18} {c.limit_s:>3}s  {c.doc}" for c in CHECKS)
    ap = argparse.ArgumentParser(description=__doc__, epilog=f"checks, in order, with their time limits:\n{checks}",
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/gpu_check", help="folder for the runs, logs and gpu_check.json")
    ap.add_argument("--only", nargs="+", choices=NAMES, default=list(NAMES), metavar="CHECK", help="run only these checks")
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                    help="config overrides for every training, e.g. data.synthetic.num_users=2000")
    ap.add_argument("--budget-s", type=float, default=DEFAULT_BUDGET_S,
                    help=f"seconds for all checks together (default {DEFAULT_BUDGET_S}); each also has its own limit")
    ap.add_argument("--dry-run", action="store_true", help="print the plan for this machine; run and write nothing")
    ap.add_argument("--run-check", choices=NAMES, help=argparse.SUPPRESS)  # a child: one check, rows to OUT/rows/
    args = ap.parse_args(argv)
    out = Path(args.out).resolve()
    ctx = Ctx(out, tuple(args.set))
    plan = [c for c in CHECKS if c.name in args.only]
    if args.dry_run:
        gpus, status = gpu_count(), {}
        for c in plan:
            why = skip_reason(c, gpus, status, float("inf"))
            print(f"{c.name:<18} limit {c.limit_s:>4}s  {why[0] + ': ' + why[1] if why else 'runs'}")
        print(f"budget {args.budget_s:.0f}s, {gpus} GPU(s) visible, outputs in {out}")
        return 0
    gpu = require_cuda()
    if gpu is None:
        return 2
    if args.run_check:
        rows = timed(args.run_check, lambda: next(c for c in CHECKS if c.name == args.run_check).fn(ctx))
        write_json(out / "rows" / f"{args.run_check}.json", rows)  # type: ignore[arg-type]
        return 0
    import torch
    from machine import machine_info

    out.mkdir(parents=True, exist_ok=True)
    print(f"gpu_check on {gpu} (torch {torch.__version__}, CUDA {torch.version.cuda}); outputs in {out}", flush=True)
    machine = machine_info({"gpu": gpu, "gpus": gpu_count(), "cuda_version": torch.version.cuda})
    doc = run_plan(plan, lambda name, limit: run_child(ctx, name, limit), out / "gpu_check.json", machine,
                   args.budget_s, gpu_count())
    print("\n" + summary_table(doc["rows"]) + f"\n\nwrote {out / 'gpu_check.json'}")
    return 0 if doc["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
