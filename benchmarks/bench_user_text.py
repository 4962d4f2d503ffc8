"""Per-rank memory of the users' own text rows and the items': kept split over the ranks, or gathered (issue 20, 4b).

Two ranks prepare a run whose users each have their own distinct text (U users, U/5 items, 5
interactions per user; the synthetic generator's user texts made distinct by the user's number)
and whose teacher ranker reads them through its PCA features; the distilled student learns by
logit KD, alignment to the text (targets in a row_wise table) and PCA weight transfer, on users
and items (``sparse_kd.text_stage.users_stay_sharded`` and ``items_stay_sharded`` keep such rows
sharded). With ``--user-text history`` the users have no text of their own and are described by
their clicks, and every item has its own text: the items' rows stay split where there are more
items than users (``--items``), and the users' history rows are computed split from them
(``history_split``). Per layout, in freshly
spawned ranks:

* ``sharded``: each rank keeps its share of the distinct user and item rows (``ShardedRows``),
  the PCA is reduced where the rows lie, rank 0 streams the cache files and the run's text file,
  and each rank gets the rows of its own table shards in one all-to-all;
* ``gathered``: every rank holds every user's and item's row (what every run did before).

Stages, each with the peak RSS above what the rank held before it (VmHWM reset per stage) and
the absolute peak, per rank, and the process peak (the highest stage peak): ``data`` (generate and split), ``teacher_text`` (encode on a cache miss, write the run's
text file, the teacher ranker's features), ``teacher_text_hit`` (the same again, the cache file
now there), ``distilled_spec`` (the PCA transfer's statistics), ``student_model`` (the distilled
student's sharded model, its rows seeded and its alignment targets written; ``target_mb``: the
target rows this rank holds). The teacher is a stand-in (random unit vectors, H = 384, MiniLM's size): 1M texts
through MiniLM take hours on CPU. Memory figures do not depend on the machine's load; seconds do.

    python benchmarks/bench_user_text.py                       # 1M users, both layouts
    python benchmarks/bench_user_text.py --users 200000 --out runs/bench/user_text.json
    python benchmarks/bench_user_text.py --quick               # seconds; used by the tests
    python benchmarks/bench_user_text.py --user-text history --users 200000 --items 1000000  # click histories
"""

from __future__ import annotations

import argparse
import gc
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

ROOT = Path(__file__).resolve().parents[1]
for p in (ROOT, ROOT / "benchmarks"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

from machine import machine_info, quiet, reset_peak_rss, rss_mb, write_json  # noqa: E402

LAYOUTS = ("sharded", "gathered")
PCA_DIM = 32  # the teacher ranker's text features per entity (student.teacher_text_dim's default)


def worker(opts: Dict[str, Any]) -> List[Dict[str, Any]]:
    """This rank's stages (see the module doc); every rank's record, in rank order."""
    import sparse_kd.teacher as teacher
    from scale_text import StandInEncoder
    from sparse_kd import pipeline as P
    from sparse_kd.config import config_from_dict
    from sparse_kd.data import load_dataset
    from sparse_kd.dist import init_distributed, long_all_gather_object

    quiet()
    env = init_distributed("gloo", 600)
    teacher.TextEncoder = StandInEncoder
    users, sharded, own = opts["users"], opts["layout"] == "sharded", opts["user_text"] == "text"
    items = opts["items"] or max(100, users // 5)
    cfg = config_from_dict({
        "output_dir": opts["run_dir"], "nproc": env.world_size,
        "data": {"synthetic": {"num_users": users, "num_items": items, "interactions_per_user": 5}},
        "teacher": {"cache_dir": opts["cache_dir"]},
        "student": {"teacher_text_dim": PCA_DIM},
        "distill": {"user_text": opts["user_text"], "logit": {"enabled": True},
                    "align": {"enabled": True, "layout": "sharded"}, "transfer": {"enabled": True}},
    }, "<bench_user_text>")
    Path(opts["run_dir"], "data").mkdir(parents=True, exist_ok=True)
    rec: Dict[str, Any] = {"rank": env.rank, "users": users, "items": items, "user_text": opts["user_text"],
                           "layout": opts["layout"]}

    def stage(name: str, fn: Callable[[], Any]) -> Any:
        gc.collect()
        reset_peak_rss()
        before, t0 = rss_mb()["rss_mb"], time.perf_counter()
        out = fn()
        after = rss_mb()
        rec[name] = {"peak_mb": after["peak_rss_mb"], "peak_above_start_mb": round(after["peak_rss_mb"] - before, 1),
                     "held_mb": round(after["rss_mb"] - before, 1), "seconds": round(time.perf_counter() - t0, 1)}
        print(f"# rank {env.rank}, {users:,} users, {opts['layout']}: {name} {rec[name]}", flush=True)
        return out

    def load():
        ds = load_dataset(cfg.data)
        if own:
            ds.user_text = [f"{t} (user {u})" for u, t in enumerate(ds.user_text)]  # every user's own text
        else:  # every item's own text: the generator's repeat (2,048 distinct at 1M items), held once each when split
            ds.item_text = [f"{t} (item {i})" for i, t in enumerate(ds.item_text)]
        return ds

    ds = stage("data", load)
    assert P.users_stay_sharded(cfg, ds, env.world_size) == own and P.items_stay_sharded(cfg, ds, env.world_size)  # as run_training

    def text_stage() -> Any:
        user, item = P.text_embeddings(cfg, ds, env, shard_users=sharded and own, shard_items=sharded)
        user = P.user_text_for(cfg, ds, user, item, env)
        rec["user_rows"], rec["item_rows"] = type(user).__name__, type(item).__name__
        spec = P.teacher_spec(cfg, ds, user, item)
        return user, item, spec

    held = stage("teacher_text", text_stage)
    del held
    user, item, t_spec = stage("teacher_text_hit", text_stage)
    rec["user_rows_mb_whole"] = round(users * StandInEncoder.dim * 4 / 2**20, 1)
    rec["item_rows_mb_whole"] = round(ds.num_items * StandInEncoder.dim * 4 / 2**20, 1)
    rec["teacher_features_mb"] = round(t_spec.user_dense.numel() * 4 / 2**20, 1)
    from dataclasses import replace

    scfg = replace(cfg, distill=replace(cfg.distill, logit=replace(cfg.distill.logit, enabled=False)))  # no teacher trained here
    spec = stage("distilled_spec", lambda: P.distilled_spec(scfg, ds, user, item, None, env=env))

    def model() -> Any:
        from sparse_kd.checkpoint import frozen
        from sparse_kd.student.train import build_sharded

        dmp = build_sharded(scfg, ds, spec, env, 0).dmp
        shards = [s.tensor for k, v in dmp.state_dict().items() if frozen(k) and k.endswith(".weight")
                  for s in v.local_shards()]
        rec["target_mb"] = round(sum(t.numel() * t.element_size() for t in shards) / 2**20, 1)
        return dmp

    stage("student_model", model)
    rec["peak_rss_mb"] = max(v["peak_mb"] for v in rec.values() if isinstance(v, dict) and "peak_mb" in v)
    return long_all_gather_object(rec)


def run(args: argparse.Namespace) -> List[Dict[str, Any]]:
    from sparse_kd.local_launch import spawned

    out: List[Dict[str, Any]] = []
    for users in args.user_list:
        for layout in args.layout_list:
            tmp = Path(tempfile.mkdtemp(prefix="bench_user_text_"))
            t0 = time.time()
            try:
                opts = {"users": users, "items": args.items, "user_text": args.user_text, "layout": layout,
                        "run_dir": str(tmp / "run"), "cache_dir": str(tmp / "cache")}
                ranks = spawned(worker, 2, opts)[0]
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
            for r in ranks:
                r["wall_s"] = round(time.time() - t0, 1)
            out += ranks
    return out


def summary(records: List[Dict[str, Any]]) -> List[str]:
    lines = ["| users | items | user text | layout | rank | teacher text: peak above start (miss / hit) | held after | distilled spec | "
             "student model (targets held) | process peak | wall |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in records:
        lines.append(f"| {r['users']:,} | {r.get('items', 0):,} | {r.get('user_text', 'text')} | {r['layout']} | {r['rank']} | "
                     f"{r['teacher_text']['peak_above_start_mb']:.0f} / {r['teacher_text_hit']['peak_above_start_mb']:.0f} MB | "
                     f"{r['teacher_text_hit']['held_mb']:.0f} MB | {r['distilled_spec']['peak_above_start_mb']:.0f} MB | "
                     f"{r['student_model']['peak_above_start_mb']:.0f} MB ({r['target_mb']:.0f} MB) | {r['peak_rss_mb']:.0f} MB | "
                     f"{r['wall_s']:.0f} s |")
    return lines


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--users", default="1000000", help="comma list of user counts")
    p.add_argument("--layouts", default=",".join(LAYOUTS), help=f"comma list of {', '.join(LAYOUTS)}")
    p.add_argument("--items", type=int, default=0, help="items in the catalogue (0: users / 5, at least 100)")
    p.add_argument("--user-text", default="text", choices=("text", "history"),
                   help="text: every user has an own text (default); history: users described by their clicks "
                        "(the items' rows stay split, and the history rows with them, only with more items than users)")
    p.add_argument("--out", default="runs/bench/user_text.json")
    p.add_argument("--quick", action="store_true", help="2,000 users: seconds (used by the tests)")
    args = p.parse_args(argv)
    if args.quick:
        args.users = "2000"
    args.user_list = [int(float(u)) for u in args.users.split(",") if u.strip()]
    args.layout_list = [v for v in args.layouts.split(",") if v]
    for v in args.layout_list:
        if v not in LAYOUTS:
            p.error(f"--layouts: {v!r} is not one of {', '.join(LAYOUTS)}")
    return args


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    info = machine_info()
    t0 = time.time()
    records = run(args)
    for line in summary(records):
        print(line)
    doc = {"benchmark": "bench_user_text", "machine": info, "args": {k: v for k, v in vars(args).items()},
           "wall_s": round(time.time() - t0, 1), "records": records}
    print(f"# wrote {write_json(args.out, doc)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
