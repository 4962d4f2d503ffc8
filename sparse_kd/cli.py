"""``sparse-kd``: one subcommand per stage, plus ``pipeline`` that runs them all.

Every subcommand takes a YAML config (see configs/) followed by ``key=value`` overrides, e.g.
``sparse-kd train configs/demo.yaml train.epochs=1 nproc=1``. Stages that train re-launch
themselves under ``torch.distributed.run`` with ``nproc`` processes when not already under
torchrun, so one command is enough on a laptop; on a cluster, use the torchx components in
launch/ (same code, another scheduler).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

log = logging.getLogger("sparse_kd")


def _setup_logging(verbose: bool = False) -> None:
    rank = int(os.environ.get("RANK", "0"))
    handler = logging.StreamHandler(sys.stderr)
    prefix = f"[rank{rank}] " if "RANK" in os.environ and int(os.environ.get("WORLD_SIZE", "1")) > 1 else ""
    handler.setFormatter(logging.Formatter(f"%(asctime)s {prefix}%(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
    root = logging.getLogger("sparse_kd")
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG if verbose else (logging.INFO if rank == 0 else logging.WARNING))
    root.propagate = False
    import warnings

    warnings.filterwarnings("ignore")
    for noisy in ("torchrec", "torch.distributed", "fbgemm_gpu"):
        logging.getLogger(noisy).setLevel(logging.ERROR)


def _load(args):
    from sparse_kd.config import load_config

    cfg = load_config(args.config, args.overrides)
    if _under_torchrun():  # WORLD_SIZE, not the config, splits the batch: they must agree
        from sparse_kd.dist import check_world_size

        check_world_size(cfg, int(os.environ["WORLD_SIZE"]))
    return cfg


def _nproc(cfg) -> int:
    """Local processes to re-launch with (``nproc`` resolved: auto, one per GPU, batch divisible)."""
    from sparse_kd.dist import local_processes

    return local_processes(cfg)


def _under_torchrun() -> bool:
    return "RANK" in os.environ and "LOCAL_RANK" in os.environ


def _relaunch(nproc: int, max_restarts: int = 0, extra: tuple[str, ...] = ()) -> int:
    """Run this same command line (plus ``extra``) under torch.distributed.run with ``nproc`` local processes."""
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
        f"--max-restarts={max_restarts}", "-m", "sparse_kd.cli", *sys.argv[1:], *extra,
    ]
    log.info("launching %d processes: %s", nproc, " ".join(cmd[2:]))
    return subprocess.call(cmd)


# ------------------------------------------------------------------------------------------ commands


def cmd_data(args) -> int:
    from sparse_kd.data import convert, load_dataset

    if args.config == "convert":  # sparse-kd data convert CONFIG [overrides] --out FOLDER
        if not args.overrides or "=" in args.overrides[0]:
            print("error: usage: sparse-kd data convert CONFIG [key=value ...] --out FOLDER", file=sys.stderr)
            return 2
        args.config, args.overrides = args.overrides[0], args.overrides[1:]
        if not args.out:
            print("error: sparse-kd data convert needs --out FOLDER (where the Parquet folder goes)", file=sys.stderr)
            return 2
        cfg = _load(args)
        m = convert(cfg.data, args.out)
        print(json.dumps({"converted": args.out, "users": m["num_users"], "items": m["num_items"],
                          "implicit": m["implicit"], "splits": {k: v["rows"] for k, v in m["splits"].items()},
                          "conversion": m["conversion"], "train with": f"data.source=parquet data.path={args.out}"}, indent=1))
        return 0
    cfg = _load(args)
    ds = load_dataset(cfg.data)
    print(json.dumps({"summary": ds.summary(), "report": ds.report}, indent=1))
    return 0


def cmd_encode(args) -> int:
    from sparse_kd.data import load_dataset
    from sparse_kd.teacher import encode_texts

    cfg = _load(args)
    ds = load_dataset(cfg.data)
    t0 = time.perf_counter()
    item = encode_texts(cfg.teacher, ds.item_text, "items")
    user = encode_texts(cfg.teacher, ds.user_text, "users")
    dt = time.perf_counter() - t0
    print(f"teacher embeddings: items {tuple(item.shape)}, users {tuple(user.shape)} in {dt:.1f}s "
          f"({(len(ds.item_text) + len(ds.user_text)) / max(dt, 1e-9):.0f} texts/s incl. cache hits)")
    return 0


def cmd_train(args) -> int:
    cfg = _load(args)
    if not _under_torchrun() and (n := _nproc(cfg)) > 1:
        from sparse_kd.pipeline import check_before_training

        check_before_training(cfg, tuple(args.variants), args.seed)  # refuse before torchrun starts
        return _relaunch(n, args.max_restarts)
    from sparse_kd.pipeline import run_training

    run_training(cfg, tuple(args.variants), seed=args.seed)
    return 0


def cmd_compress(args) -> int:
    from sparse_kd.compress.stage import compress_run
    from sparse_kd.run_folder import check_same_experiment

    cfg = _load(args)
    check_same_experiment(cfg)
    run = Path(cfg.output_dir)
    out = Path(args.out) if args.out else run / "artifact" / args.variant
    compress_run(run, args.variant, cfg.compress, out)
    return 0


def cmd_serve(args) -> int:
    from sparse_kd.serve.predictor import ArtifactError, Predictor

    try:
        p = Predictor.load(args.artifact)
    except ArtifactError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.pairs:
        import csv

        with open(args.pairs, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            missing = [c for c in ("user_id", "item_id") if c not in (reader.fieldnames or [])]
            if missing:
                print(f"error: {args.pairs}, line 1: column(s) {missing} not found; found {reader.fieldnames}. "
                      "Fix: give the pairs file a header with user_id and item_id columns.", file=sys.stderr)
                return 2
            rows = list(reader)
        users, items = [r["user_id"] for r in rows], [r["item_id"] for r in rows]
    else:
        users, items = args.user, args.item
        if len(users) != len(items):
            print("error: give as many --user as --item values", file=sys.stderr)
            return 2
    scores = p.score(users, items)
    for u, i, s in zip(users, items, scores):
        print(f"{u}\t{i}\t{float(s):.6f}")
    return 0


def cmd_pipeline(args) -> int:
    """Train (under torchrun), compress the distilled student, reload it in a fresh process."""
    cfg = _load(args)
    if not _under_torchrun():
        t0 = time.perf_counter()
        if (n := _nproc(cfg)) > 1:
            from sparse_kd.pipeline import check_before_training

            check_before_training(cfg)  # refuse before torchrun starts
            rc = _relaunch(n, args.max_restarts)
        else:
            from sparse_kd.pipeline import run_training

            run_training(cfg)
            rc = 0
        if rc != 0:
            log.error("training failed (exit %d)", rc)
            return rc
        from sparse_kd.compress.stage import compress_run

        run = Path(cfg.output_dir)
        art = run / "artifact" / "distilled"
        compress_run(run, "distilled", cfg.compress, art)
        # reload in a fresh process: no training code, no transformers
        rc = subprocess.call([sys.executable, "-m", "sparse_kd.serve.check", str(art), str(run)])
        log.info("pipeline finished in %.0fs; outputs in %s", time.perf_counter() - t0, run)
        return rc
    from sparse_kd.pipeline import run_training

    run_training(cfg)
    return 0


def cmd_study(args) -> int:
    cfg = _load(args)
    if args.kind == "distill":
        from sparse_kd.studies import distill_study

        if not _under_torchrun() and args.seed is None and (n := _nproc(cfg)) > 1:
            for seed in cfg.study.seeds:  # refuse before torchrun starts
                distill_study.check_seed(cfg, seed)
            for seed in cfg.study.seeds:
                rc = _relaunch(n, extra=("--seed", str(seed)))
                if rc:
                    return rc
            distill_study.summarize(cfg, Path(args.docs))
            return 0
        seeds = [args.seed] if args.seed is not None else list(cfg.study.seeds)
        for seed in seeds:
            distill_study.run_seed(cfg, seed)
        if not _under_torchrun():
            distill_study.summarize(cfg, Path(args.docs))
        return 0
    from sparse_kd.studies.compress_study import run_compress_study_seeds

    run_compress_study_seeds(cfg, Path(args.docs))
    return 0


# ------------------------------------------------------------------------------------------ parser


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="sparse-kd",
        description=(
            "Distil a BERT text teacher into a sharded torchrec DLRM student, then prune and quantize its "
            "embedding tables onto FBGEMM for serving. Every command takes a YAML config (configs/*.yaml) "
            "and key=value overrides, e.g. `sparse-kd train configs/demo.yaml train.epochs=1`."
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name, fn, help_, config=True):
        sp = sub.add_parser(name, help=help_, description=help_)
        if config:
            sp.add_argument("config", help="experiment YAML (see configs/)")
            sp.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.epochs=2 nproc=1")
        sp.set_defaults(fn=fn)
        return sp

    sp = add("data", cmd_data, "Load and split the dataset; print its summary and what was skipped. "
             "`sparse-kd data convert CONFIG [key=value ...] --out FOLDER` instead writes the data as sharded "
             "Parquet (ids mapped, splits assigned, bounded memory) for data.source=parquet data.path=FOLDER.")
    sp.add_argument("--out", default=None, help="convert: the folder to write")
    add("encode", cmd_encode, "Encode user and item text with the BERT teacher (cached on disk).")
    sp = add("train", cmd_train, "Train the teacher ranker, the baseline and the distilled student (nproc processes).")
    sp.add_argument("--variants", nargs="+", default=["teacher_ranker", "baseline", "distilled"],
                    choices=["teacher_ranker", "baseline", "distilled"], help="which rankers to train")
    sp.add_argument("--seed", type=int, default=None, help="override train.seed")
    sp.add_argument("--max-restarts", type=int, default=0, help="torchrun restarts after a failed rank (resumes from the last checkpoint)")
    sp = add("compress", cmd_compress, "Prune + quantize a trained variant's tables into a serving artifact "
             "(compress.budget_mb=N asks the planner for a plan that fits N MB).")
    sp.add_argument("--variant", default="distilled", help="trained variant folder inside output_dir")
    sp.add_argument("--out", default=None, help="artifact folder (default OUTPUT_DIR/artifact/VARIANT)")
    sp = add("serve", cmd_serve, "Score (user, item) pairs with a saved artifact, without training code or BERT.", config=False)
    sp.add_argument("artifact", help="artifact folder written by `sparse-kd compress`")
    sp.add_argument("--pairs", help="CSV with user_id,item_id columns")
    sp.add_argument("--user", nargs="*", default=[], help="raw user ids")
    sp.add_argument("--item", nargs="*", default=[], help="raw item ids")
    sp = add("pipeline", cmd_pipeline, "Everything: teacher -> teacher ranker -> baseline + distilled student -> compress -> serve check.")
    sp.add_argument("--max-restarts", type=int, default=0, help="torchrun restarts after a failed rank")
    sp = sub.add_parser("study", help="Sweeps: `study distill` (variants x seeds) or `study compress` (keep ratio x bit width).",
                        description="Sweeps: `study distill` (variants x seeds) or `study compress` (keep ratio x bit width).")
    sp.add_argument("kind", choices=["distill", "compress"])
    sp.add_argument("config", help="experiment YAML")
    sp.add_argument("overrides", nargs="*", help="key=value overrides")
    sp.add_argument("--seed", type=int, default=None, help=argparse.SUPPRESS)
    sp.add_argument("--docs", default="docs", help="where the study writes its tables and plots (default docs/)")
    sp.set_defaults(fn=cmd_study)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _setup_logging(args.verbose)
    from sparse_kd.config import ConfigError
    from sparse_kd.checkpoint import CheckpointError
    from sparse_kd.data.schema import DataError
    from sparse_kd.run_folder import StaleRunError
    from sparse_kd.teacher.encoder import TeacherModelError
    from sparse_kd.serve.format import ArtifactError

    try:
        return args.fn(args) or 0
    except (ConfigError, DataError, FileNotFoundError, CheckpointError, StaleRunError, TeacherModelError,
            ArtifactError) as e:
        if int(os.environ.get("RANK", "0")) == 0:  # under torchrun every rank stops; one says why
            print(f"error: {e}", file=sys.stderr, flush=True)
        if getattr(e, "on_every_rank", False):  # no rank exits (and gets the others killed) before that
            from sparse_kd.dist import barrier

            barrier()
        return 2


if __name__ == "__main__":
    sys.exit(main())
