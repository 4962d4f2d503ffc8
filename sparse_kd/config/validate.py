"""Checks across a whole experiment: impossible values and settings that contradict each other, by key."""

from __future__ import annotations

from sparse_kd.config.base import FILLS, SHARDING_TYPES, ConfigError
from sparse_kd.config.coerce import build
from sparse_kd.config.dtypes import dtype_problem, is_tiered
from sparse_kd.config.experiment import ExperimentConfig
from sparse_kd.config.overrides import merge, parse_overrides, to_dict


def validate(cfg: ExperimentConfig) -> None:
    def need(cond: bool, key: str, msg: str) -> None:
        if not cond:
            raise ConfigError(f"{key}: {msg}")

    d, t, s, c = cfg.data, cfg.train, cfg.student, cfg.compress
    need(cfg.nproc == "auto" or cfg.nproc >= 1, "nproc", "must be >= 1 or auto")
    need(d.source == "synthetic" or bool(d.path), "data.path", f"required when data.source is {d.source!r}")
    need(0.0 <= d.cold_item_fraction < 1.0, "data.cold_item_fraction", "must be in [0, 1)")
    need(0.0 <= d.valid_cold_fraction <= 1.0, "data.valid_cold_fraction", "must be in [0, 1]")
    need(d.shuffle_block_rows >= 1, "data.shuffle_block_rows", "must be >= 1")
    need(d.shuffle_window_blocks >= 1, "data.shuffle_window_blocks", "must be >= 1")
    need(d.loader_workers >= -1, "data.loader_workers", "must be >= 0, or -1 (auto)")
    need(d.negatives >= 1, "data.negatives", "must be >= 1 (sampled negatives per positive, implicit feedback)")
    need(0.0 < d.valid_fraction < 0.5, "data.valid_fraction", "must be in (0, 0.5)")
    need(0.0 < d.test_fraction < 0.5, "data.test_fraction", "must be in (0, 0.5)")
    need(d.valid_fraction + d.test_fraction < 0.9, "data.test_fraction", "valid + test must leave >= 10% for training")
    syn = d.synthetic
    for k in ("num_users", "num_items", "num_topics", "interactions_per_user"):
        need(getattr(syn, k) >= 2, f"data.synthetic.{k}", "must be >= 2")
    need(0.0 <= syn.label_noise < 0.5, "data.synthetic.label_noise", "must be in [0, 0.5)")
    need(cfg.teacher.batch_size >= 1, "teacher.batch_size", "must be >= 1")
    need(cfg.teacher.cuda_batch_size >= 1, "teacher.cuda_batch_size", "must be >= 1")
    need(8 <= cfg.teacher.max_length <= 512, "teacher.max_length", "must be in [8, 512] (BERT positions)")
    need(s.embedding_dim >= 4 and s.embedding_dim % 4 == 0, "student.embedding_dim",
         "must be a multiple of 4 (FBGEMM quantized rows), >= 4")
    need(len(s.dense_arch) >= 1 and s.dense_arch[-1] == s.embedding_dim, "student.dense_arch",
         f"the last layer must equal student.embedding_dim ({s.embedding_dim}) for the DLRM interaction")
    need(len(s.over_arch) >= 1 and s.over_arch[-1] == 1, "student.over_arch", "the last layer must be 1 (one logit)")
    # torchrec's OverArch: "OverArch must have multiple layers." (raised only inside the ranks)
    need(len(s.over_arch) >= 2, "student.over_arch", f"{list(s.over_arch)}: needs at least two layers, e.g. [16, 1]")
    for feat, st in s.sharding.items():
        need(st in SHARDING_TYPES, f"student.sharding.{feat}", f"{st!r} is not valid; expected one of {', '.join(SHARDING_TYPES)}")
    need(s.teacher_text_dim >= 1, "student.teacher_text_dim", "must be >= 1")
    need(s.planner.hbm_cap_gb >= 0, "student.planner.hbm_cap_gb", "must be >= 0 (0: the GPU's memory)")
    need(s.planner.ddr_cap_gb >= 0, "student.planner.ddr_cap_gb", "must be >= 0 (0: host RAM / local processes)")
    lk, al = cfg.distill.logit, cfg.distill.align
    need(0.0 <= lk.kd_ratio <= 1.0, "distill.logit.kd_ratio", "must be in [0, 1]")
    need(lk.temperature > 0, "distill.logit.temperature", "must be > 0")
    need(al.weight >= 0, "distill.align.weight", "must be >= 0")
    need(al.temperature > 0, "distill.align.temperature", "must be > 0")
    need(cfg.distill.transfer.scale > 0, "distill.transfer.scale", "must be > 0")
    need(cfg.distill.transfer.refit_min_count >= 1, "distill.transfer.refit_min_count", "must be >= 1")
    need(cfg.distill.transfer.ridge_l2 >= 0, "distill.transfer.ridge_l2", "must be >= 0")
    tr_ = cfg.distill.teacher_ranker
    t_dim = tr_.embedding_dim or s.embedding_dim
    need(tr_.embedding_dim == 0 or tr_.embedding_dim >= 4, "distill.teacher_ranker.embedding_dim", "must be 0 (the student's) or >= 4")
    t_dense = tr_.dense_arch or s.dense_arch
    need(t_dense[-1] == t_dim, "distill.teacher_ranker.dense_arch",
         f"the last layer must equal the teacher ranker's embedding dim ({t_dim}) for the DLRM interaction"
         + ("" if tr_.dense_arch else "; set distill.teacher_ranker.dense_arch too when you widen its tables"))
    need(not tr_.over_arch or tr_.over_arch[-1] == 1, "distill.teacher_ranker.over_arch", "the last layer must be 1 (one logit)")
    need(not tr_.over_arch or len(tr_.over_arch) >= 2, "distill.teacher_ranker.over_arch",
         f"{list(tr_.over_arch)}: needs at least two layers, e.g. [64, 1]")
    need(1 <= tr_.ensemble <= 32, "distill.teacher_ranker.ensemble", f"{tr_.ensemble} is not valid; give 1 (one model) to 32 members")
    need(tr_.dcn_layers >= 1 and tr_.dcn_rank >= 1, "distill.teacher_ranker.dcn_layers", "dcn_layers and dcn_rank must be >= 1")
    need(tr_.text_dim >= -1, "distill.teacher_ranker.text_dim", "must be -1 (every text dim), 0 (student.teacher_text_dim) or > 0")
    k = s.teacher_text_dim if tr_.text_dim == 0 else tr_.text_dim
    need(tr_.features_layout != "sharded" or k == -1 or k % 4 == 0, "distill.teacher_ranker.features_layout",
         f"sharded features live in torchrec's fused tables, whose width must be a multiple of 4; the text dims are {k}: "
         "set distill.teacher_ranker.text_dim (or student.teacher_text_dim) to a multiple of 4, or use replicated")
    if tr_.from_run:
        own = _set_beside_from_run(tr_)
        need(not own, "distill.teacher_ranker.from_run", f"the teacher is the one that run trained, as its config "
             f"defines it; {', '.join(own)} would mean nothing here: remove them (set them in that run's config)")
        need(not cfg.study.teacher_search, "study.teacher_search", "a reused teacher (distill.teacher_ranker.from_run) "
             "is not searched: remove one of the two")
    ha = tr_.history_attention
    for key, v in (("max_len", ha.max_len), ("dim", ha.dim), ("hidden", ha.hidden)):
        need(v >= 1, f"distill.teacher_ranker.history_attention.{key}", f"must be >= 1, got {v}")
    need(not (cfg.distill.transfer.enabled and cfg.distill.transfer.projection == "learned") or t_dim == s.embedding_dim,
         "distill.transfer.projection", f"'learned' maps text to the teacher ranker's rows, which must then have the "
         f"student's dim ({s.embedding_dim}), not {t_dim}: use projection: pca with a wider teacher")
    pk = cfg.distill.pairs
    need(pk.ratio > 0, "distill.pairs.ratio", "must be > 0 (sampled pairs per observed pair)")
    need(pk.weight >= 0, "distill.pairs.weight", "must be >= 0")
    need(pk.temperature > 0, "distill.pairs.temperature", "must be > 0")
    if pk.enabled:
        pool_batch = pk.ratio * t.batch_size
        # nproc: auto (and a torchrun world) is checked once the process count is known: distill.pairs.check_pair_batch
        ranks = 1 if cfg.nproc == "auto" else cfg.nproc
        need(abs(pool_batch - round(pool_batch)) < 1e-9 and round(pool_batch) % ranks == 0 and round(pool_batch) > 0,
             "distill.pairs.ratio",
             f"ratio x train.batch_size ({pk.ratio} x {t.batch_size}) must be a whole multiple of nproc ({cfg.nproc}): "
             "the sampled pairs of a batch are split evenly across ranks")
    need(t.early_stop_patience >= 0, "train.early_stop_patience", "must be >= 0 (0: never stop early)")
    need(t.early_stop_patience == 0 or t.select_best, "train.early_stop_patience",
         "needs train.select_best: true (stopping early keeps the best epoch)")
    for key in ("transfer.features", "transfer.refit_features", "align.features"):
        sec, name = key.split(".")
        for f in getattr(getattr(cfg.distill, sec), name):
            need(f in ("user_id", "item_id"), f"distill.{key}", f"{f!r}: only user_id and item_id have text")
    need(t.epochs >= 1, "train.epochs", "must be >= 1")
    if cfg.nproc != "auto":  # auto: checked once the process count is known (sparse_kd.dist.local_processes)
        need(t.batch_size >= cfg.nproc and t.batch_size % cfg.nproc == 0, "train.batch_size",
             f"must be a positive multiple of nproc ({cfg.nproc}): it is the global batch split across ranks")
    need(t.dense_lr > 0 and t.sparse_lr > 0, "train.dense_lr", "learning rates must be > 0")
    need(t.weight_decay >= 0, "train.weight_decay", "must be >= 0")
    need(t.embedding_l2 >= 0, "train.embedding_l2", "must be >= 0")
    need(t.checkpoint_every >= 0, "train.checkpoint_every", "must be >= 0")
    need(t.keep_checkpoints >= 1, "train.keep_checkpoints", "must be >= 1")
    need(t.collective_timeout_s >= 10, "train.collective_timeout_s", "must be >= 10")
    for feat, dt in c.dtype.items():
        problem = dtype_problem(dt, f"compress.dtype.{feat}")
        need(problem is None, f"compress.dtype.{feat}", str(problem))
    tiered = [f"compress.dtype.{f}" for f, dt in c.dtype.items() if is_tiered(dt)] + [
        "study.dtypes" for dt in cfg.study.dtypes if is_tiered(dt)] + (["compress.planner_tiers"] if c.planner_tiers else [])
    if tiered:
        need(c.row_order == "frequency", "compress.row_order",
             f"precision tiers ({tiered[0]}) put the most-read rows in the first tier and need row_order: frequency")
        need(c.serve_device == "cpu", "compress.serve_device",
             f"precision tiers ({tiered[0]}) are served by the CPU kernel only; use serve_device: cpu")
    need(c.quantizer == "minmax" or c.serve_device == "cpu", "compress.quantizer",
         f"{c.quantizer!r} is built for the CPU kernel; with serve_device: cuda the TBE quantizes rows itself (use minmax)")
    ft = c.finetune
    need(ft.epochs >= 1, "compress.finetune.epochs", "must be >= 1")
    need(ft.batch_size >= 1, "compress.finetune.batch_size", "must be >= 1")
    need(ft.dense_lr > 0 and ft.row_lr > 0, "compress.finetune.dense_lr", "learning rates must be > 0")
    need(0.0 <= ft.kd_weight <= 1.0, "compress.finetune.kd_weight", "must be in [0, 1]")
    need(ft.temperature > 0, "compress.finetune.temperature", "must be > 0")
    need(ft.max_steps >= 0, "compress.finetune.max_steps", "must be >= 0 (0: no cap)")
    need(not ft.enabled or c.serve_device == "cpu", "compress.finetune.enabled",
         "distillation after compression builds the CPU kernel's artifact; use serve_device: cpu")
    for spec in c.planner_tiers:
        problem = dtype_problem(spec, "compress.planner_tiers") or (
            None if is_tiered(spec) else f"{spec!r} is one dtype, not precision tiers")
        need(problem is None, "compress.planner_tiers", str(problem))
    need(0.0 < c.default_keep_ratio <= 1.0, "compress.default_keep_ratio", "must be in (0, 1]")
    for feat, r in c.keep_ratio.items():
        need(0.0 < r <= 1.0, f"compress.keep_ratio.{feat}", "must be in (0, 1]")
    for feat, fill in c.pruned_fill.items():
        need(fill in FILLS, f"compress.pruned_fill.{feat}", f"{fill!r} is not valid; expected one of {', '.join(FILLS)}")
    need(0.0 < c.default_cluster_ratio <= 1.0, "compress.default_cluster_ratio", "must be in (0, 1]")
    for feat, r in c.cluster_ratio.items():
        need(0.0 < r <= 1.0, f"compress.cluster_ratio.{feat}", "must be in (0, 1]")
    need(c.cold_weight >= 0, "compress.cold_weight", "must be >= 0")
    need(c.planner_max_examples >= 0, "compress.planner_max_examples", "must be >= 0 (0: every interaction)")
    need(c.budget_mb >= 0, "compress.budget_mb", "must be >= 0 (0: no budget)")
    need(c.planner_confidence >= 0, "compress.planner_confidence", "must be >= 0 (0: no noise margin)")
    need(c.planner_bootstrap >= 2 or c.planner_confidence == 0, "compress.planner_bootstrap",
         "must be >= 2 resamples when compress.planner_confidence > 0")
    need(c.row_alignment in (1, 2, 4, 8, 16), "compress.row_alignment", f"{c.row_alignment} is not valid; expected 1, 2, 4, 8 or 16")
    need(c.remap != "hash" or c.serve_device == "cuda", "compress.remap",
         "'hash' needs compress.serve_device: cuda (FBGEMM's TBE); the CPU kernels take an array remap (or fold)")
    need(c.row_alignment == 16 or c.serve_device == "cpu", "compress.row_alignment",
         f"{c.row_alignment} is not valid with compress.serve_device: cuda; FBGEMM's GPU kernels need 16")
    for k in cfg.study.keep_ratios:
        need(0.0 < k <= 1.0, "study.keep_ratios", f"{k} is not in (0, 1]")
    for dt in cfg.study.dtypes:
        problem = dtype_problem(dt, "study.dtypes")
        need(problem is None, "study.dtypes", str(problem))
    need(len(cfg.study.seeds) >= 1, "study.seeds", "needs at least one seed")
    need(len(cfg.study.select_on) >= 1 and all(s in ("valid", "valid_cold") for s in cfg.study.select_on),
         "study.select_on", f"{list(cfg.study.select_on)} is not valid; give one or both of valid, valid_cold")
    _check_search(cfg, "search", "distill.", (), "the search varies distillation settings only")
    _check_search(cfg, "baseline_search", "train.", ("train.seed", "train.backend"),
                  "the baseline's search varies its training settings only")
    _check_search(cfg, "teacher_search", ("train.", "distill.teacher_ranker."), ("train.seed", "train.backend"),
                  "the teacher's search varies its training settings and its architecture only")
    for fill in cfg.study.compress_fills:
        need(fill in FILLS, "study.compress_fills", f"{fill!r} is not valid; expected one of {', '.join(FILLS)}")
    for r in cfg.study.compress_budgets:
        need(r > 1.0, "study.compress_budgets", f"{r} is not valid; give compression ratios > 1 (e.g. [10, 30])")
    for rk in cfg.study.compress_remaps:
        need(rk in ("array", "fold"), "study.compress_remaps", f"{rk!r} is not valid; expected array or fold")


def _set_beside_from_run(tr) -> list[str]:
    """``distill.teacher_ranker`` keys set to other than their defaults, ``from_run`` aside."""
    from sparse_kd.config.model import TeacherRankerConfig

    mine, default = to_dict(tr), to_dict(TeacherRankerConfig(from_run=tr.from_run))
    # features_layout: where this run holds the features, not which teacher
    return [f"distill.teacher_ranker.{k}" for k in mine if mine[k] != default[k] and k != "features_layout"]


def _check_search(cfg: ExperimentConfig, key: str, prefix: str | tuple[str, ...], excluded: tuple[str, ...], why: str) -> None:
    """Every candidate of ``study.<key>`` overrides only ``<prefix>*`` keys (not ``excluded``) and
    gives a valid config on top of ``cfg``; errors name the candidate."""
    for i, cand in enumerate(getattr(cfg.study, key)):
        for ov in cand:
            name = ov.split("=", 1)[0].strip()
            if "=" not in ov or not name.startswith(prefix) or name in excluded:
                expected = " or ".join(f"{p}KEY=VALUE" for p in ((prefix,) if isinstance(prefix, str) else prefix))
                raise ConfigError(f"study.{key}[{i}]: {ov!r}: expected {expected} ({why})")
        try:
            raw = merge(to_dict(cfg), parse_overrides(list(cand)))
            raw["study"][key] = []
            validate(build(ExperimentConfig, raw))
        except ConfigError as e:
            raise ConfigError(f"study.{key}[{i}] {list(cand)}: {e}") from None
