"""The ``sparse-kd`` argument parser: one subcommand per stage; building it imports no torch."""

from __future__ import annotations

import argparse

from sparse_kd.cli.run_commands import (TEACHER_SHRINK_EPILOG, cmd_compress, cmd_data, cmd_encode, cmd_pipeline,
                                       cmd_study, cmd_teacher_shrink, cmd_train)
from sparse_kd.cli.serve_commands import ADD_ITEMS_EPILOG, ADMIN_TOKEN_ENV, SERVE_EPILOG, cmd_add_items, cmd_serve

# defaults of sparse_kd.serve.requests.Limits, repeated here so that building the parser imports no torch
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
    sp = add("teacher-shrink", cmd_teacher_shrink, "Make a smaller, faster teacher: keep --layers of the configured "
             "teacher's transformer layers and tune them to its embeddings of the data's item and user texts; write a "
             "BERT folder that teacher.model=FOLDER selects everywhere (encode, train, add-items).",
             epilog=TEACHER_SHRINK_EPILOG)
    sp.add_argument("--layers", type=int, required=True,
                    help="transformer layers to keep (evenly spaced, the last included: 2 of 6 keeps layers 3 and 6)")
    sp.add_argument("--out", required=True,
                    help="the model folder to write (atomically; a folder an earlier teacher-shrink wrote is replaced)")
    sp.add_argument("--epochs", type=int, default=10, help="passes over the tuning texts (default %(default)s)")
    sp.add_argument("--lr", type=float, default=1e-3, help="AdamW peak learning rate (default %(default)s)")
    sp.add_argument("--batch-size", type=int, default=32, help="texts per step (default %(default)s)")
    sp.add_argument("--seed", type=int, default=0, help="held-out split, sample and batch order (default %(default)s)")
    sp.add_argument("--held-out", type=float, default=0.1,
                    help="share of the distinct texts never tuned on, for the reported cosine (default %(default)s)")
    sp.add_argument("--max-texts", type=int, default=10000,
                    help="tune on a seeded sample of at most this many distinct texts; 0: all (default %(default)s)")
    sp.add_argument("--threads", type=int, default=None,
                    help="torch threads while tuning (default: teacher.num_threads; 1 is often faster on a busy machine)")
    sp.add_argument("--train-word-embeddings", action="store_true",
                    help="also tune the word-embedding table (slower; off keeps the teacher's)")
    sp.add_argument("--token-loss", type=float, default=1.0,
                    help="weight of the token-level term (1 - cosine of each token's last hidden state to the "
                         "teacher's); 0: embeddings only (default %(default)s)")
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
    g.add_argument("--admin-token-file", default=None, metavar="PATH",
                   help=f"require the token in this file (first line) in the X-Admin-Token header of POST "
                        f"/admin/reload; or set {ADMIN_TOKEN_ENV}. Needed with a --host other than loopback")
    g.add_argument("--allow-open-admin", action="store_true",
                   help="serve on a non-loopback --host without an admin token: anyone who reaches the port can "
                        "swap the artifact (only behind a proxy that guards /admin)")
    g.add_argument("--admin-token", default=None, help=argparse.SUPPRESS)  # refused: visible in ps
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
    sp.add_argument("--admin-token-file", default=None, metavar="PATH",
                    help=f"file holding the X-Admin-Token for --notify (or set {ADMIN_TOKEN_ENV})")
    sp.add_argument("--admin-token", default=None, help=argparse.SUPPRESS)  # refused: visible in ps
    sp = add("pipeline", cmd_pipeline, "Everything: teacher -> teacher ranker -> baseline + distilled student -> compress -> serve check.")
    sp.add_argument("--max-restarts", type=int, default=0, help="torchrun restarts after a failed rank")
    sp = sub.add_parser("study", help="Sweeps: `study distill` (variants x seeds) or `study compress` (keep ratio x bit width).",
                        description="Sweeps: `study distill` (variants x seeds) or `study compress` (keep ratio x bit width).")
    sp.add_argument("kind", choices=["distill", "compress"])
    sp.add_argument("config", help="experiment YAML")
    sp.add_argument("overrides", nargs="*", help="key=value overrides")
    sp.add_argument("--seed", type=int, default=None, help=argparse.SUPPRESS)
    sp.add_argument("--docs", default="docs", help="where the study writes its tables and plots (default docs/)")
    sp.add_argument("--report-only", action="store_true",
                    help="distill: train nothing; write the report again from every seed's study_metrics.json (all "
                         "seeds must have run), e.g. after the report gained a section")
    sp.set_defaults(fn=cmd_study)
    return p

