"""The commands that train and compress: ``data``, ``encode``, ``teacher-shrink``, ``train``,
``compress``, ``pipeline`` and ``study``. Heavy modules are imported inside each command."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import time
from pathlib import Path

from sparse_kd.cli.common import load, nproc, relaunch, under_torchrun

log = logging.getLogger("sparse_kd")


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
        cfg = load(args)
        m = convert(cfg.data, args.out)
        print(json.dumps({"converted": args.out, "users": m["num_users"], "items": m["num_items"],
                          "implicit": m["implicit"], "splits": {k: v["rows"] for k, v in m["splits"].items()},
                          "conversion": m["conversion"], "train with": f"data.source=parquet data.path={args.out}"}, indent=1))
        return 0
    cfg = load(args)
    ds = load_dataset(cfg.data)
    print(json.dumps({"summary": ds.summary(), "report": ds.report}, indent=1))
    return 0



def cmd_encode(args) -> int:
    from sparse_kd.data import load_dataset
    from sparse_kd.teacher import encode_texts

    cfg = load(args)
    ds = load_dataset(cfg.data)
    t0 = time.perf_counter()
    item = encode_texts(cfg.teacher, ds.item_text, "items")
    user = encode_texts(cfg.teacher, ds.user_text, "users")
    dt = time.perf_counter() - t0
    print(f"teacher embeddings: items {tuple(item.shape)}, users {tuple(user.shape)} in {dt:.1f}s "
          f"({(len(ds.item_text) + len(ds.user_text)) / max(dt, 1e-9):.0f} texts/s incl. cache hits)")
    return 0



TEACHER_SHRINK_EPILOG = """\
The texts are the data section's item and user texts (deduplicated; a --held-out share is never
tuned on and measures the result). The targets are the configured teacher's fp32 embeddings
(cached in teacher.cache_dir); the loss is 1 - cosine of the pooled, normalised embeddings,
computed exactly as the teacher computes them, plus --token-loss x (1 - cosine) of each token's
last hidden state to the teacher's. The folder holds config.json, model.safetensors,
the teacher's tokenizer files and shrink.json (source model and fingerprint, kept layers, the
data tuned on, held-out cosines). It is built in a hidden temp folder beside --out and renamed
into place, so a failed run never leaves a half-written folder at --out.

examples:
  sparse-kd teacher-shrink configs/ml1m_text.yaml --layers 2 --out models/minilm-l2-ml1m
  sparse-kd encode configs/ml1m_text.yaml teacher.model=models/minilm-l2-ml1m
  # or in the YAML:  teacher: {model: models/minilm-l2-ml1m}

Measured (benchmarks/bench_teacher.py: tuned on 3600 synthetic texts, 8 epochs, 5-6 minutes on 1
thread): 2 of MiniLM's 6 layers reach a mean cosine of 0.9934 to the fp32 teacher on texts never
tuned on, 3 layers 0.9952; in bf16 they encode about 2.8x and 1.9x as fast as the 6-layer default.
Tuning takes about 8 ms per text and epoch for 2 layers on 1 thread (--threads 1 on a busy machine).
"""


def cmd_teacher_shrink(args) -> int:
    from sparse_kd.data import load_dataset
    from sparse_kd.teacher.shrink import ShrinkError, check_settings, shrink_teacher

    cfg = load(args)
    try:  # before loading the data: a bad --layers / --out is named at once
        check_settings(cfg.teacher, args.layers, args.out, args.epochs, args.lr, args.batch_size, args.held_out)
    except ShrinkError as e:
        print(f"error: teacher-shrink: {e}", file=sys.stderr)
        return 2
    ds = load_dataset(cfg.data)
    info = {"config": str(args.config), "overrides": list(args.overrides), "source": cfg.data.source,
            "path": cfg.data.path, "items": len(ds.item_text), "users": len(ds.user_text)}
    rep = shrink_teacher(cfg.teacher, list(ds.item_text) + list(ds.user_text), args.layers, args.out,
                         epochs=args.epochs, lr=args.lr, batch_size=args.batch_size, seed=args.seed,
                         held_out_fraction=args.held_out, max_texts=args.max_texts or None,
                         train_word_embeddings=args.train_word_embeddings, token_loss=args.token_loss,
                         num_threads=args.threads, data_info=info)
    print(json.dumps(rep, indent=1))
    print(f"use it with: teacher.model={args.out}  (e.g. sparse-kd encode {args.config} teacher.model={args.out})")
    return 0


def cmd_train(args) -> int:
    cfg = load(args)
    if not under_torchrun() and (n := nproc(cfg)) > 1:
        from sparse_kd.pipeline import check_before_training

        check_before_training(cfg, tuple(args.variants), args.seed)  # refuse before torchrun starts
        return relaunch(n, args.max_restarts)
    from sparse_kd.pipeline import run_training

    run_training(cfg, tuple(args.variants), seed=args.seed)
    return 0



def cmd_compress(args) -> int:
    from sparse_kd.compress.stage import compress_run
    from sparse_kd.run_folder import check_same_experiment

    cfg = load(args)
    check_same_experiment(cfg)
    run = Path(cfg.output_dir)
    out = Path(args.out) if args.out else run / "artifact" / args.variant
    compress_run(run, args.variant, cfg.compress, out)
    return 0



def cmd_pipeline(args) -> int:
    """Train (under torchrun), compress the distilled student, reload it in a fresh process."""
    cfg = load(args)
    if not under_torchrun():
        from sparse_kd.compress.kernel import require_device

        require_device(cfg.compress.serve_device)  # a GPU artifact needs a GPU: say so before training
        t0 = time.perf_counter()
        if (n := nproc(cfg)) > 1:
            from sparse_kd.pipeline import check_before_training

            check_before_training(cfg)  # refuse before torchrun starts
            rc = relaunch(n, args.max_restarts)
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
    cfg = load(args)
    # read once, before any training: a one-process run sets RANK / LOCAL_RANK itself
    # (sparse_kd.dist.init_distributed), which would later look like a torchrun launch
    launched = under_torchrun()
    if args.kind == "distill":
        from sparse_kd.studies import distill_report, distill_study

        if args.report_only:
            distill_report.summarize(cfg, Path(args.docs), from_records=True)
            return 0
        if not launched and args.seed is None and (n := nproc(cfg)) > 1:
            for seed in cfg.study.seeds:  # refuse before torchrun starts
                distill_study.check_seed(cfg, seed)
            for seed in cfg.study.seeds:
                rc = relaunch(n, extra=("--seed", str(seed)))
                if rc:
                    return rc
            distill_report.summarize(cfg, Path(args.docs))
            return 0
        seeds = [args.seed] if args.seed is not None else list(cfg.study.seeds)
        for seed in seeds:
            distill_study.run_seed(cfg, seed)
        if not launched:
            distill_report.summarize(cfg, Path(args.docs))
        return 0
    from sparse_kd.studies.compress_study import run_compress_study_seeds

    run_compress_study_seeds(cfg, Path(args.docs))
    return 0

