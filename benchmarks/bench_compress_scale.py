"""Compression at the sizes users have (issue 22, item 5): the 1M-user case, step by step.

The case of the issue: a 5M-interaction log of ~1M users (993k of them with interactions) and
200k items in the CSV format, written as ``benchmarks/bench_data.py`` writes its logs (Zipf item
popularity, labels from latent vectors, timestamps); a run folder over it as training leaves one
(``config.yaml``, ``data/entity_dense.pt``, ``data/text_embeddings.safetensors``, a DCP checkpoint
of a ``distilled`` DLRM with dim-64 tables); then, in a fresh process, exactly what
``sparse-kd compress CONFIG compress.keep_ratio.user_id=0.2 compress.default_pruned_fill=cluster
--variant distilled`` runs (:func:`sparse_kd.compress.stage.compress_run`), with each step of the
stage timed and its peak RSS measured:

``load`` (config, the CSV re-read into the dataset, text, model), ``importance``,
``evaluate_fp32``, ``compress_model`` (containing ``prune``, itself containing ``kmeans``, then
``layout``, ``fold``, ``quantize``), ``evaluate_compressed``, ``mappings``, ``artifact``.

Peak RSS per step is exact for nested steps: the kernel's high-water mark (VmHWM) is read and reset
(``/proc/self/clear_refs``) at every step boundary and charged to every step open in between
(where the reset is refused, each step reports the process peak so far). The whole command's peak
is the largest of those readings (resetting VmHWM resets ``ru_maxrss`` too). Targets: under 5 minutes and under 8 GB peak on the 2-core machine.

The tables are random (N(0, 0.1)), not trained: this measures time and memory, not quality (the
AUC before / after is recorded but means nothing here). Text embeddings are a stand-in (random unit
vectors, H = 384, MiniLM's width) unless ``--no-text``; with text, the stage also fits the
text -> row ridge maps of ``user_id`` and ``item_id``, as it does for a distilled run.

    python benchmarks/bench_compress_scale.py           # the 1M-user case (run it alone); docs/bench/compress_scale.json
    python benchmarks/bench_compress_scale.py --quick   # 50k users, about a minute; used by the tests
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Union

ROOT = Path(__file__).resolve().parents[1]
for p in (ROOT, ROOT / "benchmarks"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

from machine import machine_info, read as _read, reset_peak_rss, write_json  # noqa: E402

VARIANT = "distilled"
TEXT_DIM = 384
TARGET_S, TARGET_GB = 300.0, 8.0


# ----------------------------------------------------------------------------------------------
# Memory per step


def _status_mb(key: str) -> Optional[float]:
    for line in _read("/proc/self/status").splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    return None


class Steps:
    """Time and peak RSS of named steps, nested or not (module doc)."""

    def __init__(self) -> None:
        self.active: List[str] = []
        self.rec: Dict[str, Dict[str, Any]] = {}
        self.order: List[str] = []
        self.peak = 0.0  # the process peak: resetting VmHWM resets ru_maxrss too, so it is kept here
        self.exact = reset_peak_rss()

    def _boundary(self) -> None:
        import resource

        hwm = _status_mb("VmHWM") if self.exact else None
        if hwm is None:
            hwm = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        self.peak = max(self.peak, hwm)
        for name in self.active:
            r = self.rec[name]
            r["peak_rss_mb"] = round(max(r["peak_rss_mb"], hwm), 1)
        if self.exact:
            reset_peak_rss()

    def wrap(self, name: Union[str, Callable[[int], str]], fn: Callable) -> Callable:
        calls = [0]

        def timed(*args: Any, **kwargs: Any) -> Any:
            step = name(calls[0]) if callable(name) else name
            calls[0] += 1
            self._boundary()
            if step not in self.rec:
                self.order.append(step)
                self.rec[step] = {"step": step, "within": self.active[-1] if self.active else None, "seconds": 0.0,
                                  "calls": 0, "peak_rss_mb": 0.0, "rss_start_mb": _status_mb("VmRSS")}
            self.active.append(step)
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self._boundary()
                self.active.pop()
                r = self.rec[step]
                r["seconds"] = round(r["seconds"] + time.perf_counter() - t0, 2)
                r["calls"] += 1
                r["rss_end_mb"] = _status_mb("VmRSS")

        return timed

    def table(self) -> List[Dict[str, Any]]:
        return [self.rec[s] for s in self.order]


def child_compress(run_dir: str, out_dir: str, result: str, threads: int) -> None:
    """In a fresh process: ``compress_run`` as ``sparse-kd compress`` runs it, steps instrumented."""
    import torch

    if threads > 0:
        torch.set_num_threads(threads)
    from sparse_kd.cli.common import setup_logging

    setup_logging()  # the command's INFO progress lines, on stderr
    import sparse_kd.compress.prune as P
    import sparse_kd.compress.quantize as Q
    import sparse_kd.compress.stage as S
    from sparse_kd.config import load_config

    steps = Steps()
    S.load_run = steps.wrap("load", S.load_run)
    S.table_importance = steps.wrap("importance", S.table_importance)
    S.evaluate = steps.wrap(lambda i: "evaluate_fp32" if i == 0 else "evaluate_compressed", S.evaluate)
    S.plan_budget = steps.wrap("planner", S.plan_budget)
    S.compress_model = steps.wrap("compress_model", S.compress_model)
    S.prune_tables = steps.wrap("prune", S.prune_tables)
    P.kmeans = steps.wrap("kmeans", P.kmeans)
    S.reorder_tables = steps.wrap("layout", S.reorder_tables)
    S.fold_remaps = steps.wrap("fold", S.fold_remaps)
    Q.quantize_dlrm = steps.wrap("quantize", Q.quantize_dlrm)
    S._mappings = steps.wrap("mappings", S._mappings)
    S.save_artifact = steps.wrap("artifact", S.save_artifact)
    cfg = load_config(Path(run_dir) / "config.yaml")
    t0 = time.perf_counter()
    report = S.compress_run(Path(run_dir), VARIANT, cfg.compress, Path(out_dir))
    seconds = time.perf_counter() - t0
    steps._boundary()
    keep = {k: report[k] for k in ("tables", "bytes", "metrics", "notes")}
    Path(result).write_text(json.dumps({"steps": steps.table(), "seconds": round(seconds, 2), "report": keep,
                                        "peak_rss_mb": round(steps.peak, 1), "per_step_peak_exact": steps.exact,
                                        "threads": torch.get_num_threads()}))


# ----------------------------------------------------------------------------------------------
# The run folder


def prepare(args: argparse.Namespace, work: Path) -> Dict[str, Any]:
    """The CSV log and a run folder with a random ``distilled`` DLRM; returns what was made."""
    import hashlib

    import torch
    import torch.distributed.checkpoint as dcp
    import yaml
    from safetensors.torch import save_file

    from bench_data import write_csv
    from sparse_kd import checkpoint as ckpt
    from sparse_kd.config import config_from_dict, to_dict
    from sparse_kd.data import load_dataset
    from sparse_kd.data.batching import count_dense
    from sparse_kd.student.export import write_model_meta
    from sparse_kd.student.model import build_dlrm

    out: Dict[str, Any] = {}
    t0 = time.perf_counter()
    out["csv_mb"] = round(write_csv(work / "csv", args.interactions, args.users, args.items, args.seed, 1_000_000), 1)
    out["generate_s"] = round(time.perf_counter() - t0, 1)
    print(f"# generated {args.interactions:,} interactions ({out['csv_mb']} MB CSV) in {out['generate_s']}s", flush=True)
    run = work / "run"
    raw = {
        "name": "compress_scale", "output_dir": str(run), "nproc": 1,
        "data": {"source": "csv", "path": str(work / "csv")},
        "student": {"embedding_dim": args.dim, "dense_arch": [2 * args.dim, args.dim], "over_arch": [128, 64, 1]},
        "compress": {"keep_ratio": {"user_id": args.keep_user}, "default_pruned_fill": args.fill,
                     "default_cluster_ratio": args.cluster_ratio},
    }
    cfg = config_from_dict(raw, "<bench_compress_scale>")
    t0 = time.perf_counter()
    ds = load_dataset(cfg.data)
    (run / "data").mkdir(parents=True, exist_ok=True)
    (run / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    ub, ib = count_dense(ds)
    torch.save({"user": ub, "item": ib}, run / "data" / "entity_dense.pt")
    g = torch.Generator().manual_seed(args.seed)
    if args.text:
        def unit(n: int) -> torch.Tensor:
            return torch.nn.functional.normalize(torch.randn(n, TEXT_DIM, generator=g), dim=1)

        save_file({"user": unit(ds.num_users), "item": unit(ds.num_items)}, str(run / "data" / "text_embeddings.safetensors"))
    sizes = {f.name: f.num_embeddings for f in ds.features}
    model = build_dlrm(sizes, ub.shape[1] + ib.shape[1], cfg.student, device="cpu")
    with torch.no_grad():
        for name, prm in model.named_parameters():
            if "embedding_bags" in name:
                prm.copy_(0.1 * torch.randn(prm.shape, generator=g))
    vd = run / VARIANT
    write_model_meta(vd, sizes, ub.shape[1] + ib.shape[1], to_dict(cfg.student))
    path = vd / "checkpoints" / "step_00000001"
    dcp.save({"model": {f"model.{k}": v.detach().clone() for k, v in model.state_dict().items()}},
             checkpoint_id=str(path), no_dist=True)
    files = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(path.iterdir()) if p.is_file()}
    (path / "meta.json").write_text(json.dumps({"format_version": ckpt.FORMAT_VERSION, "epoch": 1, "step_in_epoch": 0,
                                                "global_step": 1, "files": files}))
    out.update(run_folder_s=round(time.perf_counter() - t0, 1), users=ds.num_users, items=ds.num_items,
               interactions={s: len(v) for s, v in ds.splits.items()}, tables=sizes, run_dir=str(run))
    print(f"# run folder: {ds.num_users:,} users, {ds.num_items:,} items, tables {sizes} ({out['run_folder_s']}s)", flush=True)
    return out


# ----------------------------------------------------------------------------------------------


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--users", type=int, default=1_000_000)
    p.add_argument("--items", type=int, default=200_000)
    p.add_argument("--interactions", type=int, default=5_000_000)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--keep-user", type=float, default=0.2, help="compress.keep_ratio.user_id")
    p.add_argument("--fill", default="cluster", help="compress.default_pruned_fill")
    p.add_argument("--cluster-ratio", type=float, default=0.05, help="compress.default_cluster_ratio")
    p.add_argument("--no-text", dest="text", action="store_false", help="no text embeddings in the run folder")
    p.add_argument("--threads", type=int, default=0, help="torch threads of the compress process (0: torch's default)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--work", default="runs/bench/compress_scale_work", help="where the CSV, run folder and artifact go")
    p.add_argument("--keep", action="store_true", help="keep the generated files (the run folder can then be "
                   "compressed again with the printed sparse-kd command)")
    p.add_argument("--out", default=None, help="JSON (default docs/bench/compress_scale.json; --quick: "
                   "runs/bench/compress_scale_quick.json)")
    p.add_argument("--quick", action="store_true", help="50k users, 10k items, 250k interactions (used by the tests)")
    p.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick:
        given = {a.split("=")[0] for a in (argv if argv is not None else sys.argv[1:])}
        for flag, val in {"--users": 50_000, "--items": 10_000, "--interactions": 250_000}.items():
            if flag not in given:
                setattr(args, flag[2:], val)
    if args.out is None:
        args.out = "runs/bench/compress_scale_quick.json" if args.quick else "docs/bench/compress_scale.json"
    return args


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    if args.child:
        child_compress(args.child[0], args.child[1], args.child[2], int(args.child[3]))
        return 0
    info = machine_info()
    work = Path(args.work)
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    try:
        made = prepare(args, work)
        gc.collect()
        run, art, result = work / "run", work / "artifact", work / "steps.json"
        command = (f"sparse-kd compress {run / 'config.yaml'} compress.keep_ratio.user_id={args.keep_user} "
                   f"compress.default_pruned_fill={args.fill} --variant {VARIANT} --out {art}")
        print(f"# compressing in a fresh process, as: {command}", flush=True)
        t0 = time.perf_counter()
        proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--child", str(run), str(art), str(result),
                                 str(args.threads)], cwd=ROOT)
        _, status, _usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
        if os.waitstatus_to_exitcode(status) != 0:
            raise SystemExit(f"the compress process failed (exit {os.waitstatus_to_exitcode(status)})")
        child = json.loads(result.read_text())
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    peak_mb = child["peak_rss_mb"]
    steps = child["steps"]
    print(f"\n{'step':<22} {'within':<15} {'seconds':>8} {'peak RSS MB':>12} {'RSS after MB':>13}")
    for s in steps:
        print(f"{s['step']:<22} {s['within'] or '':<15} {s['seconds']:8.1f} {s['peak_rss_mb']:12.0f} "
              f"{(s.get('rss_end_mb') or 0):13.0f}")
    b = child["report"]["bytes"]
    met_s, met_gb = wall <= TARGET_S, peak_mb * 2**20 / 1e9 <= TARGET_GB
    print(f"{'compress (process)':<22} {'':<15} {wall:8.1f} {peak_mb:12.0f}")
    print(f"\nembedding storage {b['fp32_mb']:.1f} MB fp32 -> {b['total_mb']:.1f} MB ({b['ratio']:.2f}x); "
          f"targets: {wall:.0f}s of {TARGET_S:.0f}s {'met' if met_s else 'MISSED'}, peak "
          f"{peak_mb * 2**20 / 1e9:.2f} GB of {TARGET_GB:.0f} GB {'met' if met_gb else 'MISSED'}")
    info["loadavg_end"] = _read("/proc/loadavg")
    doc = {
        "benchmark": "compress_scale",
        "command": " ".join([Path(sys.argv[0]).name] + (argv if argv is not None else sys.argv[1:])),
        "compress_command": command,
        "machine": info,
        "config": {"users": args.users, "items": args.items, "interactions": args.interactions, "dim": args.dim,
                   "keep_ratio_user_id": args.keep_user, "fill": args.fill, "cluster_ratio": args.cluster_ratio,
                   "text": args.text, "text_dim": TEXT_DIM if args.text else 0, "seed": args.seed, "quick": args.quick,
                   "threads": child["threads"]},
        "data": made,
        "steps": steps,
        "total": {"seconds": round(wall, 1), "stage_seconds": child["seconds"], "peak_rss_mb": round(peak_mb, 1),
                  "peak_rss_gb": round(peak_mb * 2**20 / 1e9, 2), "target_seconds": TARGET_S, "target_gb": TARGET_GB,
                  "met_seconds": met_s, "met_memory": met_gb},
        "per_step_peak_exact": child["per_step_peak_exact"],
        "tables": child["report"]["tables"],
        "bytes": b,
        "metrics": child["report"]["metrics"],
        "notes": [
            "tables are random N(0, 0.1) and text embeddings random unit vectors: time and memory only, AUC is meaningless",
            "steps nest (within): compress_model holds prune, layout, fold, quantize; prune holds kmeans",
            "peak_rss_mb per step: VmHWM reset at every step boundary and charged to every open step; "
            "total.peak_rss_mb: the compress process's peak (the largest VmHWM reading; ru_maxrss is reset with it)",
            "total.seconds: the compress process from start to exit (imports included); stage_seconds: compress_run",
        ],
    }
    write_json(args.out, doc)
    return 0


if __name__ == "__main__":
    sys.exit(main())
