"""bench_scale's text stages (``--text-users``): per rank of 2, the peak RSS of what a training run
builds besides the model (the data, a baseline-only run's inputs, the teacher-text stage, a distilled
student's spec, the student's sharded model with its alignment targets, the teacher ranker's sharded
model with its users' text features replicated or split over the ranks), with a stand-in teacher.
``benchmarks/bench_scale.py`` says what each stage holds and runs them."""

from __future__ import annotations

import argparse
import gc
import time
from pathlib import Path
from typing import Any, Callable, Dict, List

import torch

from machine import quiet, reset_peak_rss, rss_mb

class StandInEncoder:
    """A teacher stand-in for the memory runs: a random unit vector per text, H = 384 (MiniLM's)."""

    dim = 384

    @classmethod
    def from_config(cls, cfg: Any, **overrides: Any) -> "StandInEncoder":
        return cls()

    def identity(self) -> Dict[str, Any]:
        return {"model": "stand-in", "model_fingerprint": "0" * 64}

    def encode(self, texts: List[str]) -> torch.Tensor:
        g = torch.Generator().manual_seed(len(texts))
        return torch.nn.functional.normalize(torch.randn(len(texts), self.dim, generator=g), dim=1)


def _process_peak(rec: Dict[str, Any]) -> float:
    """The process's peak RSS: the highest of its stages' peaks (each stage resets VmHWM, and on
    Linux that resets getrusage's ru_maxrss too, so neither holds the whole life's peak)."""
    return max(v["peak_mb"] for v in rec.values() if isinstance(v, dict) and "peak_mb" in v)


def text_worker(opts: Dict[str, Any]) -> List[Dict[str, Any]]:
    """Peak RSS of each stage of a run's preparation in this rank (see the module doc); every
    rank's record, in rank order."""
    import sparse_kd.teacher as teacher
    from sparse_kd import pipeline as P
    from sparse_kd.config import config_from_dict
    from sparse_kd.data import load_dataset
    from sparse_kd.dist import init_distributed, long_all_gather_object

    quiet()
    env = init_distributed("gloo", 600)
    if opts["encoder"] == "stand-in":
        teacher.TextEncoder = StandInEncoder
    users = opts["users"]
    cfg = config_from_dict({
        "output_dir": opts["run_dir"], "nproc": env.world_size,
        "data": {"synthetic": {"num_users": users, "num_items": max(100, users // 5), "interactions_per_user": 5}},
        "teacher": {"cache_dir": opts["cache_dir"]},
        "distill": {"align": {"enabled": True}, "transfer": {"enabled": True, "projection": "pca"}},
    }, "<bench_scale text>")
    Path(opts["run_dir"], "data").mkdir(parents=True, exist_ok=True)
    rec: Dict[str, Any] = {"rank": env.rank, "users": users}
    held: List[Any] = []

    def stage(name: str, fn: Callable[[], Any]) -> Any:
        gc.collect()
        reset_peak_rss()
        before, t0 = rss_mb()["rss_mb"], time.perf_counter()
        print(f"# rank {env.rank}, {users:,} users: {name} ...", flush=True)
        out = fn()
        after = rss_mb()
        print(f"# rank {env.rank}, {users:,} users: {name} done in {time.perf_counter() - t0:.1f}s, "
              f"peak {after['peak_rss_mb']:.0f} MB", flush=True)
        rec[name] = {"peak_mb": after["peak_rss_mb"], "peak_above_start_mb": round(after["peak_rss_mb"] - before, 1),
                     "held_mb": round(after["rss_mb"] - before, 1), "seconds": round(time.perf_counter() - t0, 1)}
        return out

    ds = stage("data", lambda: load_dataset(cfg.data))
    ds.user_text = [""] * ds.num_users  # a log without users.csv: distill.user_text auto -> click history
    rec.update(items=ds.num_items, interactions=sum(len(s) for s in ds.splits.values()),
               old_text_mb=round((2 * ds.num_users + ds.num_items) * StandInEncoder.dim * 4 / 2**20, 1))
    assert not P.uses_text(cfg, ("baseline",))
    held.append(stage("baseline_only", lambda: P.baseline_spec(ds)))
    if not opts["text_stages"]:  # --baseline-only-above: the text stages would not fit this machine
        rec["peak_rss_mb"] = _process_peak(rec)
        rec["text_stages"] = "not run (--baseline-only-above)"
        return long_all_gather_object(rec)

    def text_stage() -> tuple:
        user, item = P.text_embeddings(cfg, ds, env)
        user = P.user_text_for(cfg, ds, user, item, env)
        return user, item, P.teacher_spec(cfg, ds, user, item)

    user, item, _ = stage("teacher_text", text_stage)  # the teacher spec it built is dropped: the teacher stages below build theirs
    spec = stage("distilled_spec", lambda: P.distilled_spec(cfg, ds, user, item, None, env=env))
    held.append(spec)
    from dataclasses import replace

    from sparse_kd.checkpoint import frozen
    from sparse_kd.student.train import build_sharded

    for layout in ("sharded", "replicated"):  # the distilled student's sharded model, per target layout
        c = replace(cfg, distill=replace(cfg.distill, align=replace(cfg.distill.align, layout=layout)))
        spec.distill = c.distill
        dmp = stage(f"student_model_{layout}", lambda: build_sharded(c, ds, spec, env, 0).dmp)
        module = dmp.module
        targets = [b for n, b in module.named_buffers() if n in ("user_text", "item_text")]
        targets += [s.tensor for k, v in dmp.state_dict().items() if frozen(k) and k.endswith(".weight")
                    for s in v.local_shards()]
        rec[f"student_model_{layout}"]["target_mb"] = round(sum(t.numel() * t.element_size() for t in targets) / 2**20, 1)
        del dmp, module, targets
        gc.collect()
    held.remove(spec)
    spec = None  # not held beside the teachers
    for layout in ("sharded", "replicated"):  # the teacher ranker's user features (features_layout)
        tr = replace(cfg.distill.teacher_ranker, features_layout=layout)
        c = replace(cfg, distill=replace(cfg.distill, teacher_ranker=tr))

        def teacher_model() -> Any:
            ts = P.teacher_spec(c, ds, user, item, world_size=env.world_size)
            dmp = build_sharded(c, ds, ts, env, 0).dmp
            rows = [ts.user_dense] + [s.tensor for k, v in dmp.state_dict().items() if frozen(k) and k.endswith(".weight")
                                      for s in v.local_shards()]
            return dmp, round(sum(t.numel() * t.element_size() for t in rows) / 2**20, 1)

        dmp, features_mb = stage(f"teacher_model_{layout}", teacher_model)
        rec[f"teacher_model_{layout}"]["features_mb"] = features_mb
        del dmp
        gc.collect()
    rec["peak_rss_mb"] = _process_peak(rec)
    return long_all_gather_object(rec)


def run_text(args: argparse.Namespace, launch: Callable[..., Any]) -> List[Dict[str, Any]]:
    import shutil
    import tempfile

    out: List[Dict[str, Any]] = []
    for users in args.text_user_list:
        tmp = Path(tempfile.mkdtemp(prefix="bench_scale_text_"))
        try:
            opts = {"users": users, "encoder": args.encoder, "run_dir": str(tmp / "run"), "cache_dir": str(tmp / "cache"),
                    "text_stages": not (args.baseline_only_above and users > args.baseline_only_above)}
            t0 = time.time()
            ranks = launch(text_worker, 2, opts)[0]
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        for r in ranks:
            r["wall_s"] = round(time.time() - t0, 1)
            if "teacher_text" not in r:
                print(f"# {users:,} users, rank {r['rank']}: data {r['data']['held_mb']:.0f} MB held, peak "
                      f"{r['data']['peak_above_start_mb']:.0f} MB above the start; baseline-only "
                      f"{r['baseline_only']['peak_above_start_mb']:.0f} MB; process peak {r['peak_rss_mb']:.0f} MB; "
                      f"text stages not run (before: {r['old_text_mb']:.0f} MB of text on every rank)", flush=True)
                continue
            print(f"# text stages, {users:,} users, rank {r['rank']}: data {r['data']['held_mb']:.0f} MB; peak above "
                  f"the data: baseline-only {r['baseline_only']['peak_above_start_mb']:.0f} MB, teacher text "
                  f"{r['teacher_text']['peak_above_start_mb']:.0f} MB (held {r['teacher_text']['held_mb']:.0f}), "
                  f"distilled spec {r['distilled_spec']['peak_above_start_mb']:.0f} MB; process peak "
                  f"{r['peak_rss_mb']:.0f} MB (before: {r['old_text_mb']:.0f} MB of text on every rank); the student's "
                  f"model holds {r['student_model_sharded']['target_mb']:.0f} MB of alignment targets sharded "
                  f"(held {r['student_model_sharded']['held_mb']:.0f} MB), "
                  f"{r['student_model_replicated']['target_mb']:.0f} MB replicated "
                  f"(held {r['student_model_replicated']['held_mb']:.0f} MB); the teacher ranker's user features "
                  f"{r['teacher_model_sharded']['features_mb']:.0f} MB split over the ranks (model stage peak "
                  f"{r['teacher_model_sharded']['peak_above_start_mb']:.0f} MB), "
                  f"{r['teacher_model_replicated']['features_mb']:.0f} MB replicated "
                  f"({r['teacher_model_replicated']['peak_above_start_mb']:.0f} MB)", flush=True)
        out += ranks
    return out
