"""GPU check: the CUDA paths of sparse_kd on one GPU, in one command, as one table.

    make gpu-check                                    # .venv-gpu (CUDA stack), then this script
    .venv-gpu/bin/python benchmarks/gpu_check.py      # the checks alone, in a CUDA environment
    .venv-gpu/bin/python benchmarks/gpu_check.py --only teacher lookups

Checks, in order (each one a row: check, status, detail, seconds):

* ``train_gpu``          ``sparse-kd train configs/demo.yaml`` on cuda:0 (nproc=1, nccl, one epoch):
                         teacher ranker, baseline and distilled student, sharded by torchrec's
                         planner on a CUDA topology; each must end above chance on valid.
* ``resume_cpu_to_gpu``  the baseline trained one epoch on CPU (GPUs hidden), then a second epoch
                         with the GPU visible: it must resume from the CPU checkpoint (log line),
                         end with a checkpoint of two epochs and a valid AUC above chance.
* ``teacher``            texts/s of the BERT teacher on the GPU (after a warm-up pass), and the
                         cosine of its embeddings to the CPU fp32 ones.
* ``lookup_<dtype>[_pruned]``  the GPU-trained baseline compressed with the project's stage
                         function (fp16 / int8 / int4, all rows or half kept), its FBGEMM table
                         batch rebuilt on the GPU (``EmbeddingLocation.DEVICE``, the same bytes and
                         id remaps): pooled lookups of the same ids must equal the CPU kernel's;
                         reported: relative error against fp32 and ids/s on the GPU (tables of
                         the demo student: small, cache-resident; not a large-table figure).

Prints one table and writes ``OUT/gpu_check.json`` (machine, rows). Exit status 0 only if every
check passed; 2 without a CUDA GPU (nothing is run).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

ROOT = Path(__file__).resolve().parents[1]
for p in (ROOT, ROOT / "benchmarks"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

CONFIG = "configs/demo.yaml"
CHECKS = ("train_gpu", "resume_cpu_to_gpu", "teacher", "lookups")
LOOKUP_DTYPES = ("fp16", "int8", "int4")
LOOKUP_KEEP = (1.0, 0.5)
# GPU and CPU kernels dequantize the same bytes and sum in fp32: only summation order differs
CPU_GPU_RTOL = 1e-3
MIN_VALID_AUC = 0.55  # "above chance" on the demo data after one epoch
MIN_TEACHER_COSINE = 0.99


class NoGPU(SystemExit):
    """No CUDA device: the check cannot run (exit status 2)."""


def require_cuda() -> str:
    """The GPU's name, or :class:`NoGPU` with a message saying what is missing."""
    if not torch.cuda.is_available():
        build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
        print(
            f"error: gpu_check needs a CUDA GPU; torch {torch.__version__} ({build}) sees none. Run it with "
            "`make gpu-check` on a machine with an NVIDIA GPU (it installs the CUDA stack into .venv-gpu).",
            file=sys.stderr,
        )
        raise NoGPU(2)
    return torch.cuda.get_device_name(0)


# ------------------------------------------------------------------------------------------ results


def row(check: str, ok: bool, detail: str, seconds: float, **figures: Any) -> Dict[str, Any]:
    return {"check": check, "status": "ok" if ok else "FAIL", "detail": detail, "seconds": round(seconds, 1), "figures": figures}


def summary_table(rows: List[Dict[str, Any]]) -> str:
    """The rows as one aligned text table (check, status, seconds, detail)."""
    head = ("check", "status", "s", "detail")
    cells = [(r["check"], r["status"], f"{r['seconds']:.1f}", r["detail"]) for r in rows]
    widths = [max(len(head[i]), *(len(c[i]) for c in cells)) if cells else len(head[i]) for i in range(3)]
    line = lambda c: f"{c[0]:<{widths[0]}}  {c[1]:<{widths[1]}}  {c[2]:>{widths[2]}}  {c[3]}"  # noqa: E731
    return "\n".join([line(head), line(tuple("-" * w for w in widths) + ("-" * 6,))] + [line(c) for c in cells])


def result_doc(rows: List[Dict[str, Any]], machine: Dict[str, Any]) -> Dict[str, Any]:
    return {"machine": machine, "passed": all(r["status"] == "ok" for r in rows), "rows": rows}


def timed(check: str, fn: Callable[[], List[Dict[str, Any]] | Dict[str, Any]]) -> List[Dict[str, Any]]:
    """Run one check; an exception becomes a FAIL row with its first line."""
    t0 = time.perf_counter()
    try:
        out = fn()
    except Exception as e:  # one broken check must not hide the others
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        return [row(check, False, f"{type(e).__name__}: {first[:240]}", time.perf_counter() - t0)]
    return out if isinstance(out, list) else [out]


# ------------------------------------------------------------------------------------------ training


def cli_command(subcommand: str, output_dir: Path, *overrides: str, variants: tuple[str, ...] = ()) -> List[str]:
    """``python -m sparse_kd.cli SUBCOMMAND configs/demo.yaml output_dir=... OVERRIDES [--variants ...]``."""
    cmd = [sys.executable, "-m", "sparse_kd.cli", subcommand, CONFIG, f"output_dir={output_dir}", *overrides]
    return cmd + (["--variants", *variants] if variants else [])


def run_cli(cmd: List[str], hide_gpus: bool = False, timeout: int = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    if hide_gpus:
        env["CUDA_VISIBLE_DEVICES"] = ""
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        tail = " | ".join(proc.stderr.strip().splitlines()[-3:])
        raise RuntimeError(f"exit {proc.returncode}: {tail}")
    return proc


def _valid_auc(metrics: Dict[str, Any], variant: str) -> float:
    return float(metrics["metrics"][variant]["valid"]["auc"])


def check_train_gpu(out: Path, overrides: tuple[str, ...] = (), backend: str = "nccl") -> List[Dict[str, Any]]:
    t0 = time.perf_counter()
    run_cli(cli_command("train", out, *overrides, "nproc=1", f"train.backend={backend}", "train.epochs=1",
                        variants=("baseline", "distilled")))
    metrics = json.loads((out / "metrics.json").read_text())
    rows = []
    for v in metrics["metrics"]:
        auc = _valid_auc(metrics, v)
        eps = float(metrics.get("examples_per_s", {}).get(v, 0.0))
        rows.append(row(f"train_gpu/{v}", auc > MIN_VALID_AUC, f"valid AUC {auc:.4f}, {eps:.0f} examples/s",
                        time.perf_counter() - t0, valid_auc=auc, examples_per_s=eps))
    return rows


def check_resume_cpu_to_gpu(out: Path, overrides: tuple[str, ...] = ()) -> Dict[str, Any]:
    t0 = time.perf_counter()
    run_cli(cli_command("train", out, *overrides, "nproc=1", "train.epochs=1", variants=("baseline",)), hide_gpus=True)
    proc = run_cli(cli_command("train", out, *overrides, "nproc=1", "train.epochs=2", variants=("baseline",)))
    resumed = re.search(r"resumed from \S+", proc.stderr)
    from sparse_kd import checkpoint as ckpt

    meta = ckpt.read_meta(ckpt.latest(out / "baseline" / "checkpoints"))
    auc = _valid_auc(json.loads((out / "metrics.json").read_text()), "baseline")
    ok = bool(resumed) and meta["epoch"] == 2 and auc > MIN_VALID_AUC
    detail = (f"{'resumed' if resumed else 'did NOT resume'} from the CPU checkpoint; checkpoint at epoch {meta['epoch']}, "
              f"step {meta['global_step']}; valid AUC {auc:.4f}")
    return row("resume_cpu_to_gpu", ok, detail, time.perf_counter() - t0, valid_auc=auc, global_step=meta["global_step"])


# ------------------------------------------------------------------------------------------ teacher


def check_teacher(n_texts: int = 4096) -> Dict[str, Any]:
    from sparse_kd.config import DataConfig
    from sparse_kd.data import load_dataset
    from sparse_kd.teacher.encoder import TextEncoder

    t0 = time.perf_counter()
    ds = load_dataset(DataConfig())
    base = list(ds.item_text) + list(ds.user_text)
    texts = (base * (n_texts // len(base) + 1))[:n_texts]
    gpu = TextEncoder(device="cuda", show_progress=False)
    gpu.encode(texts[:256])  # load + warm-up
    torch.cuda.synchronize()
    t = time.perf_counter()
    gpu.encode(texts)
    torch.cuda.synchronize()
    tps = len(texts) / (time.perf_counter() - t)
    ref = TextEncoder(device="cpu", precision="fp32", show_progress=False).encode(texts[:256])
    cos = torch.nn.functional.cosine_similarity(gpu.encode(texts[:256]).cpu().float(), ref.float(), dim=1)
    ok = float(cos.min()) >= MIN_TEACHER_COSINE
    detail = f"{tps:.0f} texts/s ({gpu.precision}); cosine to CPU fp32: mean {float(cos.mean()):.5f}, min {float(cos.min()):.5f}"
    return row("teacher", ok, detail, time.perf_counter() - t0, texts_per_s=tps, precision=gpu.precision,
               cosine_mean=float(cos.mean()), cosine_min=float(cos.min()))


# ------------------------------------------------------------------------------------------ lookups


def rebuild_tbe(tbe, remaps: List[Optional[torch.Tensor]], device: torch.device):
    """A copy of an FBGEMM ``IntNBitTableBatchedEmbeddingBagsCodegen`` on ``device``: same tables,
    same quantized bytes per row (scale/bias and codes), same id remaps (one per table, None = not
    pruned). On CUDA the rows live in GPU memory (``EmbeddingLocation.DEVICE``) with FBGEMM's
    16-byte row alignment."""
    from fbgemm_gpu.split_embedding_configs import SparseType
    from fbgemm_gpu.split_table_batched_embeddings_ops_common import EmbeddingLocation
    from fbgemm_gpu.split_table_batched_embeddings_ops_inference import IntNBitTableBatchedEmbeddingBagsCodegen

    loc = EmbeddingLocation.DEVICE if device.type == "cuda" else EmbeddingLocation.HOST
    specs = [(name, rows, dim, ty, loc) for (name, rows, dim, ty, _) in tbe.embedding_specs]
    out = IntNBitTableBatchedEmbeddingBagsCodegen(
        embedding_specs=specs,
        pooling_mode=tbe.pooling_mode,
        device=device,
        output_dtype=SparseType.from_int(tbe.output_dtype),
        # FBGEMM's row alignment for the target (16 bytes on GPUs); rows keep their bytes,
        # only the zero padding at their end may differ
    )
    out.initialize_weights()
    for (dst, _), (src, _) in zip(out.split_embedding_weights(split_scale_shifts=False),
                                  tbe.split_embedding_weights(split_scale_shifts=False)):
        if dst.shape[0] != src.shape[0]:
            raise ValueError(f"{device} table has {dst.shape[0]} rows, the source {src.shape[0]}")
        width = min(dst.shape[1], src.shape[1])  # scale/bias + codes, then padding
        dst.zero_()
        dst[:, :width].copy_(src[:, :width].to(device))
    if any(r is not None for r in remaps):
        out.set_index_remappings_array([None if r is None else r.to(device=device, dtype=torch.int32) for r in remaps])
    return out


def lookup_batch(num_ids: List[int], batch: int, bag: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Uniform ids, ``bag`` per bag, ``batch`` bags per table: (indices (T*B*L,) int32, offsets (T*B+1,) int32)."""
    g = torch.Generator().manual_seed(seed)
    idx = torch.cat([torch.randint(0, n, (batch * bag,), generator=g) for n in num_ids]).to(torch.int32)
    offsets = torch.arange(0, len(num_ids) * batch * bag + 1, bag, dtype=torch.int32)
    return idx, offsets


def fp32_reference(weights: List[torch.Tensor], remaps: List[Optional[torch.Tensor]], idx: torch.Tensor, bag: int) -> torch.Tensor:
    """Pooled fp32 lookups (B, T*D) of the original tables for :func:`lookup_batch`'s ids (equal
    bags of ``bag`` ids, table after table); pruned ids (remap -1) give zero rows."""
    per_table = idx.numel() // len(weights)
    outs = []
    for t, (w, r) in enumerate(zip(weights, remaps)):
        w = w.float()
        if r is not None:
            w = w * (r.to(w.device) >= 0).unsqueeze(1).to(w.dtype)
        ids = idx[t * per_table:(t + 1) * per_table].long()
        offsets = torch.arange(0, per_table, bag, device=ids.device)
        outs.append(torch.nn.functional.embedding_bag(ids, w, offsets, mode="sum"))
    return torch.cat(outs, dim=1)


def compare_lookup(tbe, remaps, weights, device: torch.device, batch: int = 2048, bag: int = 20, reps: int = 20) -> Dict[str, Any]:
    """Rebuild ``tbe`` on ``device``; the same ids through both: max relative difference, relative
    error of ``device`` against fp32, and ids/s on ``device``."""
    num_ids = [int(r.numel()) if r is not None else int(spec[1]) for r, spec in zip(remaps, tbe.embedding_specs)]
    idx, offsets = lookup_batch(num_ids, batch, bag)
    here = tbe(idx, offsets).float()
    there_tbe = rebuild_tbe(tbe, remaps, device)
    di, do = idx.to(device), offsets.to(device)
    there = there_tbe(di, do).float()
    ref = fp32_reference([w.to(device) for w in weights], remaps, di, bag).float()
    scale = float(here.abs().max()) or 1.0
    diff = float((there.cpu() - here).abs().max()) / scale
    err = float((there - ref).norm() / ref.norm().clamp_min(1e-12))
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    there_tbe(di, do)
    sync()
    t = time.perf_counter()
    for _ in range(reps):
        there_tbe(di, do)
    sync()
    ids_per_s = reps * idx.numel() / (time.perf_counter() - t)
    return {"max_rel_diff_vs_cpu": diff, "rel_err_vs_fp32": err, "ids_per_s": ids_per_s}


def check_lookups(trained: Path, device: torch.device, dtypes=LOOKUP_DTYPES, keeps=LOOKUP_KEEP) -> List[Dict[str, Any]]:
    """The trained baseline of ``trained`` (a run folder), compressed per dtype x keep ratio."""
    from sparse_kd.compress.quantize import table_name, tbe_of
    from sparse_kd.compress.stage import compress_model, model_weights
    from sparse_kd.config import load_config
    from sparse_kd.data import load_dataset
    from sparse_kd.student.export import load_dlrm

    model = load_dlrm(trained / "baseline")
    ds = load_dataset(load_config(trained / "config.yaml").data)
    weights = model_weights(model)
    rows = []
    for dtype in dtypes:
        for keep in keeps:
            t0 = time.perf_counter()
            name = f"lookup_{dtype}" + ("" if keep == 1.0 else f"_keep{keep:g}")
            settings = {f: {"keep_ratio": keep, "dtype": dtype, "fill": "zero"} for f in weights}
            # the TBE: what GPU serving runs; id order, since the check looks ids up directly (a
            # hot-first layout moves whole tables' rows and keeps the permutation in the entity bags)
            comp = compress_model(model, ds, settings, kernel="fbgemm_tbe", row_order="id")
            tbe = tbe_of(comp.serving)
            feats = [spec[0][2:] if spec[0].startswith("t_") else spec[0] for spec in tbe.embedding_specs]
            remaps = [comp.remaps.get(table_name(f)) for f in feats]
            res = compare_lookup(tbe, remaps, [weights[f] for f in feats], device)
            ok = res["max_rel_diff_vs_cpu"] <= CPU_GPU_RTOL
            detail = (f"vs CPU kernel: max rel diff {res['max_rel_diff_vs_cpu']:.1e}; vs fp32: rel err "
                      f"{res['rel_err_vs_fp32']:.4f}; {res['ids_per_s'] / 1e6:.1f}M ids/s")
            rows.append(row(name, ok, detail, time.perf_counter() - t0, dtype=dtype, keep_ratio=keep, **res))
    return rows


# ------------------------------------------------------------------------------------------ main


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/gpu_check", help="folder for the runs and gpu_check.json")
    ap.add_argument("--only", nargs="+", choices=CHECKS, default=list(CHECKS), help="run only these checks")
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                    help="config overrides for every training, e.g. data.synthetic.num_users=2000")
    args = ap.parse_args(argv)
    try:
        gpu = require_cuda()
    except NoGPU as e:
        return int(e.code)
    from machine import machine_info, write_json

    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    device = torch.device("cuda", 0)
    print(f"gpu_check on {gpu} (torch {torch.__version__}, CUDA {torch.version.cuda}); outputs in {out}", flush=True)
    rows: List[Dict[str, Any]] = []
    steps = {
        "train_gpu": lambda: check_train_gpu(out / "train_gpu", tuple(args.set)),
        "resume_cpu_to_gpu": lambda: check_resume_cpu_to_gpu(out / "resume", tuple(args.set)),
        "teacher": check_teacher,
        "lookups": lambda: check_lookups(out / "train_gpu", device),
    }
    for name in CHECKS:
        if name in args.only:
            new = timed(name, steps[name])
            rows += new
            for r in new:
                print(f"  {r['check']}: {r['status']} ({r['detail']})", flush=True)
    print("\n" + summary_table(rows))
    doc = result_doc(rows, machine_info({"gpu": gpu, "cuda_version": torch.version.cuda}))
    write_json(out / "gpu_check.json", doc)
    return 0 if doc["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
