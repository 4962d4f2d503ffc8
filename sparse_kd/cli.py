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
    from sparse_kd.serve.predictor import ArtifactError

    if args.port is not None:
        if args.pairs or args.user or args.item:
            print("error: --port starts the HTTP service; score pairs with --user/--item or --pairs without --port",
                  file=sys.stderr)
            return 2
        return _serve_http(args)
    if not (args.pairs or args.user or args.item):
        print("error: nothing to do: give --port P to start the HTTP service, or --user/--item or --pairs to "
              "score pairs (see `sparse-kd serve --help`)", file=sys.stderr)
        return 2
    from sparse_kd.serve.memory import keep_freed_memory
    from sparse_kd.serve.predictor import Predictor

    if not args.no_malloc_tuning:
        keep_freed_memory()
    try:
        p = Predictor.load(args.artifact, huge_pages=not args.no_huge_pages)
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


def _serve_http(args) -> int:
    """The HTTP ranking service (sparse_kd.serve.server); imports neither transformers nor torchrec."""
    import torch

    from sparse_kd.serve.memory import keep_freed_memory
    from sparse_kd.serve.predictor import ArtifactError
    from sparse_kd.serve.server import implementations, run_server
    from sparse_kd.serve.service import Limits, Service

    malloc_tuned = False if args.no_malloc_tuning else keep_freed_memory()

    try:
        limits = Limits(args.max_candidates, args.max_pairs, args.max_body_bytes, args.max_pending)
        if args.torch_threads < 0:
            raise ValueError(f"--torch-threads must be >= 0, got {args.torch_threads}")
        # unknown ids are counted in /metrics and flagged in every answer: no log line per request
        logging.getLogger("sparse_kd.serve.predictor").setLevel(logging.WARNING)
        workers = args.workers if args.workers is not None else len(os.sched_getaffinity(0))
        service = Service(args.artifact, limits, workers=workers, watch_interval=args.watch,
                          admin_token=args.admin_token, huge_pages=not args.no_huge_pages)
    except (ValueError, ArtifactError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.torch_threads > 0:
        torch.set_num_threads(args.torch_threads)
    uv = logging.getLogger("uvicorn")
    uv.handlers[:] = logging.getLogger("sparse_kd").handlers
    uv.setLevel(logging.INFO if args.access_log else logging.WARNING)
    uv.propagate = False
    auto_http, auto_loop = implementations()
    impl = (auto_http if args.http == "auto" else args.http, auto_loop if args.loop == "auto" else args.loop)
    log.info("torch intra-op threads %d, scoring workers %d, malloc tuning %s, HTTP %s on %s",
             torch.get_num_threads(), workers, "on" if malloc_tuned else "off", *impl)
    try:
        run_server(service, args.host, args.port, access_log=args.access_log, impl=impl)
    except OSError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


def cmd_add_items(args) -> int:
    from sparse_kd.compress.new_items import add_items_from_csv, notify
    from sparse_kd.serve.predictor import ArtifactError

    try:
        res = add_items_from_csv(args.artifact, args.items_csv, args.config, args.out)
    except ArtifactError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(res, indent=1))
    if args.notify:
        try:
            answer = notify(args.notify, res["artifact"], args.admin_token)
        except RuntimeError as e:
            print(f"error: the new artifact is in {res['artifact']}, but the service did not swap it in: {e}",
                  file=sys.stderr)
            return 1
        print(f"service {args.notify}: swapped={answer.get('swapped')} now serving "
              f"{answer.get('artifact', {}).get('id')} (was {answer.get('previous')})")
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
    # read once, before any training: a one-process run sets RANK / LOCAL_RANK itself
    # (sparse_kd.dist.init_distributed), which would later look like a torchrun launch
    launched = _under_torchrun()
    if args.kind == "distill":
        from sparse_kd.studies import distill_study

        if not launched and args.seed is None and (n := _nproc(cfg)) > 1:
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
        if not launched:
            distill_study.summarize(cfg, Path(args.docs))
        return 0
    from sparse_kd.studies.compress_study import run_compress_study_seeds

    run_compress_study_seeds(cfg, Path(args.docs))
    return 0


# ------------------------------------------------------------------------------------------ parser


SERVE_EPILOG = """\
HTTP service (with --port); JSON in and out, details in docs/SERVING.md:
  POST /rank          {"user": "u1", "items": ["i1", "i2", ...], "top_k": 10}
                      -> {"scores": [...] (request order), "order": [indices, best first],
                          "unknown_user": bool, "unknown_items": [indices], "artifact": id}
  POST /score         {"pairs": [["u1", "i1"], ...]}
                      -> {"scores": [...], "unknown_users": [...], "unknown_items": [...], "artifact": id}
  GET  /health        the artifact served (id, path, tables, fallback for unknown ids), limits
  GET  /metrics       Prometheus text: requests by route/status, latency histograms, reloads
  POST /admin/reload  {"path": "DIR"} (default: ARTIFACT again): load, verify and swap in; requests
                      in flight finish on the old artifact; a corrupt one is refused (422) and the
                      old one keeps serving
Unknown ids get the artifact's fallback (empty embedding bags, zero dense features) and are
flagged. Bad requests get 4xx with {"error": message}; 503 only when --max-pending jobs wait.
Stop with Ctrl-C / SIGTERM (requests in flight finish first).

examples:
  sparse-kd serve runs/demo/artifact/distilled --user u00012 --item i00007
  sparse-kd serve runs/demo/artifact/distilled --port 8000
  curl -s localhost:8000/rank -d '{"user": "u00012", "items": ["i00007", "i00042"]}'
"""

ADD_ITEMS_EPILOG = """\
items.csv: header item_id,text; one row per new item; ids must be new to the artifact; text
non-empty (cut to the run's data.max_text_chars). Errors name the file, line and column.
The new artifact reaches a running service through --notify URL, or by itself when the service
watches the folder (serve --watch, on by default).

example:
  sparse-kd add-items runs/demo/artifact/distilled new_items.csv --notify http://127.0.0.1:8000
"""


# defaults of sparse_kd.serve.service.Limits, repeated here so that building the parser imports no torch
# (a test checks that they agree)
SERVE_LIMITS = {"max_candidates": 1000, "max_pairs": 10000, "max_body_bytes": 1 << 20, "max_pending": 64}


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

    def add(name, fn, help_, config=True, epilog=None):
        sp = sub.add_parser(name, help=help_, description=help_, epilog=epilog,
                            formatter_class=argparse.RawDescriptionHelpFormatter if epilog else argparse.HelpFormatter)
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
    sp = add("serve", cmd_serve, "Score (user, item) pairs with a saved artifact (--user/--item or --pairs), or start "
             "the HTTP ranking service (--port), without training code or BERT.", config=False, epilog=SERVE_EPILOG)
    sp.add_argument("artifact", help="artifact folder written by `sparse-kd compress`")
    g = sp.add_argument_group("scoring from the command line")
    g.add_argument("--pairs", help="CSV with user_id,item_id columns")
    g.add_argument("--user", nargs="*", default=[], help="raw user ids")
    g.add_argument("--item", nargs="*", default=[], help="raw item ids")
    g = sp.add_argument_group("HTTP service (docs/SERVING.md)")
    g.add_argument("--port", type=int, default=None,
                   help="start the HTTP service on this port (0: any free port; the address is logged)")
    g.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    g.add_argument("--max-candidates", type=int, default=SERVE_LIMITS["max_candidates"],
                   help="most items in one /rank request; more is a 413 (default %(default)s)")
    g.add_argument("--max-pairs", type=int, default=SERVE_LIMITS["max_pairs"],
                   help="most pairs in one /score request; more is a 413 (default %(default)s)")
    g.add_argument("--max-body-bytes", type=int, default=SERVE_LIMITS["max_body_bytes"],
                   help="largest request body; more is a 413 (default %(default)s)")
    g.add_argument("--max-pending", type=int, default=SERVE_LIMITS["max_pending"],
                   help="scoring jobs allowed to wait; beyond, requests get 503 + Retry-After (default %(default)s)")
    g.add_argument("--workers", type=int, default=None,
                   help="scoring threads: requests scored at once (default: the usable CPU cores; torch "
                        "releases the GIL inside the model; 0 scores on the event loop)")
    g.add_argument("--no-huge-pages", action="store_true",
                   help="keep the tables where torch.jit.load put them (default: on transparent huge pages when "
                        "the kernel allows it: fewer TLB misses per lookup; sparse_kd/serve/memory.py)")
    g.add_argument("--no-malloc-tuning", action="store_true",
                   help="leave glibc malloc's thresholds alone (default: keep freed blocks for reuse, so that a "
                        "lookup's temporaries do not fault in fresh pages on every request; sparse_kd/serve/memory.py)")
    g.add_argument("--torch-threads", type=int, default=1,
                   help="torch intra-op threads (default %(default)s: a 1 x 500 ranking is too small to split; "
                        "0 keeps torch's default)")
    g.add_argument("--watch", type=float, default=2.0,
                   help="seconds between checks of ARTIFACT/manifest.json; a replaced artifact (e.g. by add-items) "
                        "is loaded and swapped in (0: off; default %(default)s)")
    g.add_argument("--admin-token", default=None,
                   help="require this value in the X-Admin-Token header of POST /admin/reload (default: no token; "
                        "keep the default --host then)")
    g.add_argument("--access-log", action="store_true", help="log every request (costs time per request)")
    g.add_argument("--http", choices=("auto", "httptools", "h11"), default="auto",
                   help="uvicorn's HTTP parser (default auto: httptools when installed, else h11)")
    g.add_argument("--loop", choices=("auto", "uvloop", "asyncio"), default="auto",
                   help="uvicorn's event loop (default auto: uvloop when installed, else asyncio)")
    sp = add("add-items", cmd_add_items, "Add items known only by their text to an artifact: encode items.csv's "
             "texts with the teacher, compute their rows through the artifact's text map, write the artifact "
             "atomically, and optionally tell a running service to swap it in.", config=False, epilog=ADD_ITEMS_EPILOG)
    sp.add_argument("artifact", help="artifact folder (replaced atomically unless --out)")
    sp.add_argument("items_csv", help="CSV with header item_id,text (UTF-8; other columns are ignored)")
    sp.add_argument("--config", default=None,
                    help="YAML of the run that trained the model (for the teacher settings); default: the run's "
                         "config.yaml named by the artifact's manifest (config.source.run_dir)")
    sp.add_argument("--out", default=None, help="write the new artifact here instead of replacing ARTIFACT")
    sp.add_argument("--notify", default=None, metavar="URL",
                    help="base URL of a running service (e.g. http://127.0.0.1:8000): POST URL/admin/reload with "
                         "the new artifact's path")
    sp.add_argument("--admin-token", default=None, help="X-Admin-Token for --notify (when the service has one)")
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


def _user_errors() -> tuple[type, ...]:
    """Exceptions that are the user's to fix: printed as one line, exit 2 (imported only when one is
    raised, so that `serve` does not import the training code)."""
    from sparse_kd.checkpoint import CheckpointError
    from sparse_kd.config import ConfigError
    from sparse_kd.data.schema import DataError
    from sparse_kd.run_folder import StaleRunError
    from sparse_kd.teacher.encoder import TeacherModelError
    from sparse_kd.serve.format import ArtifactError

    return (ConfigError, DataError, FileNotFoundError, CheckpointError, StaleRunError, TeacherModelError, ArtifactError)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _setup_logging(args.verbose)
    try:
        return args.fn(args) or 0
    except Exception as e:
        if not isinstance(e, _user_errors()):
            raise
        if int(os.environ.get("RANK", "0")) == 0:  # under torchrun every rank stops; one says why
            print(f"error: {e}", file=sys.stderr, flush=True)
        if getattr(e, "on_every_rank", False):  # no rank exits (and gets the others killed) before that
            from sparse_kd.dist import barrier

            barrier()
        return 2


if __name__ == "__main__":
    sys.exit(main())
