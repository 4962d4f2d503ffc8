"""Typed, frozen configuration: one dataclass per stage, loaded from YAML with ``key=value`` overrides.

Every stage (data, teacher, student, distill, train, compress, study) has its own frozen
dataclass; :class:`ExperimentConfig` groups them. Defaults live here and only here.
Unknown keys, wrong types and impossible values are :class:`ConfigError` s naming the key
(``train.batch_size``) and, where known, what would be valid.

Example::

    cfg = load_config("configs/demo.yaml", ["train.epochs=2", "student.embedding_dim=32"])
    cfg.train.epochs  # 2
"""

from __future__ import annotations

import dataclasses
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

import yaml


class ConfigError(ValueError):
    """A configuration value is missing, unknown, of the wrong type or impossible."""


SHARDING_TYPES = ("table_wise", "row_wise", "column_wise", "table_row_wise", "data_parallel")
QUANT_DTYPES = ("fp32", "fp16", "int8", "int4", "int2")
FILLS = ("zero", "mean", "text", "cluster", "text_cluster")  # compress.pruned_fill (sparse_kd/compress/prune.py)


@dataclass(frozen=True)
class SyntheticConfig:
    """Sizes and signal of the embedded text-rich synthetic dataset."""

    num_users: int = 600
    num_items: int = 400
    num_topics: int = 8
    interactions_per_user: int = 80
    label_noise: float = 0.1
    seed: int = 0


@dataclass(frozen=True)
class DataConfig:
    """Where interactions come from and how they are split (protocol: ``sparse_kd/data/split.py``).

    source: ``synthetic`` (embedded generator), ``movielens`` (ML-100K folder with u.data, u.item,
    u.user), ``csv`` (folder with interactions.csv, items.csv and optional users.csv) or
    ``parquet`` (a folder written by ``sparse-kd data convert``: streamed, for data of any size;
    its split settings must be those it was converted with).
    split: ``auto`` (by time when there are timestamps, else seeded random), ``time`` or ``random``.
    valid_cold_fraction: share of the cold items whose interactions form ``valid_cold`` (the rest
    form ``test_cold``).
    negatives / train_negatives: implicit feedback only (no label column): sampled negatives per
    positive, and whether training negatives are resampled every epoch or sampled once
    (``sparse_kd/data/negatives.py``).
    """

    source: Literal["synthetic", "movielens", "csv", "parquet"] = "synthetic"
    path: str = ""
    cold_item_fraction: float = 0.1
    valid_cold_fraction: float = 0.5
    valid_fraction: float = 0.1
    test_fraction: float = 0.1
    split: Literal["auto", "time", "random"] = "auto"
    seed: int = 0
    max_text_chars: int = 2000
    negatives: int = 4
    train_negatives: Literal["per_epoch", "fixed"] = "per_epoch"
    # training order (sparse_kd/data/stream.py): blocks of rows permuted, rows shuffled within
    # windows of blocks; memory holds one window whatever the data size
    shuffle_block_rows: int = 65536
    shuffle_window_blocks: int = 16
    # DataLoader worker processes building each rank's batches; -1 (auto): for parquet 1 when
    # training on CUDA, 0 (in the training process) on CPU; 0 for in-memory sources
    loader_workers: int = -1
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)


@dataclass(frozen=True)
class TeacherConfig:
    """The BERT text encoder. ``model: default`` is the packaged all-MiniLM-L6-v2."""

    model: str = "default"
    batch_size: int = 128
    cuda_batch_size: int = 1024  # texts per forward pass when encoding on a GPU (large batches keep it busy)
    max_length: int = 64
    cache_dir: str = ".cache/teacher"
    sort_by_length: bool = True
    num_threads: int = 0  # 0: torch default
    # auto: bf16 weights where the CPU/GPU has native bf16 (mean cosine to fp32 0.99996 on MiniLM),
    # else fp32; pooling always in fp32
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    normalize: bool = True  # L2-normalise, as the sentence-transformers recipe of MiniLM does
    # weights load from safetensors only; true also loads pickled pytorch_model.bin (can run code)
    allow_pickle_weights: bool = False


@dataclass(frozen=True)
class PlannerConfig:
    """Memory the sharding planner may use per rank on CUDA (CPU plans are built by hand).

    0 means: from the machine (GPU memory of the device; host RAM divided by the local processes).
    Tables that do not fit in ``hbm_cap_gb`` get UVM-caching kernels (rows in host memory,
    a cache on the GPU) instead of an out-of-memory at start-up.
    """

    hbm_cap_gb: float = 0.0
    ddr_cap_gb: float = 0.0


@dataclass(frozen=True)
class StudentConfig:
    """The DLRM student (and the teacher ranker, which shares its architecture).

    sharding: per-feature sharding type; features not named use ``default_sharding``.
    planner: memory caps for torchrec's planner on CUDA (does not change what training computes).
    """

    embedding_dim: int = 16
    dense_arch: tuple[int, ...] = (32, 16)
    over_arch: tuple[int, ...] = (64, 32, 1)
    default_sharding: Literal["table_wise", "row_wise", "column_wise", "table_row_wise", "data_parallel"] = "table_wise"
    sharding: dict[str, str] = field(default_factory=dict)
    teacher_text_dim: int = 64  # teacher ranker: text embeddings are PCA-reduced to this many dims
    planner: PlannerConfig = field(default_factory=PlannerConfig)


@dataclass(frozen=True)
class LogitKDConfig:
    enabled: bool = False
    kd_ratio: float = 0.5
    temperature: float = 2.0


@dataclass(frozen=True)
class AlignConfig:
    enabled: bool = False
    weight: float = 0.1
    kind: Literal["cosine", "mse", "infonce"] = "cosine"
    temperature: float = 0.1
    features: tuple[str, ...] = ("item_id", "user_id")


@dataclass(frozen=True)
class TransferConfig:
    """Weight transfer: ID rows from projected text.

    init: before training, rows are seeded through ``projection`` (pca, or learned = ridge fit to
    the teacher ranker's rows) at RMS ``scale``. refit: after training, rows of entities with
    fewer than ``refit_min_count`` training interactions (never-seen items) are replaced by a
    ridge regression from text to the student's own trained rows (fitted on the others), so
    cold rows say what the text says, in the space the student actually learned.
    """

    enabled: bool = False
    init: bool = True
    projection: Literal["pca", "learned"] = "pca"
    scale: float = 0.05  # RMS of the seeded rows
    refit: bool = True
    refit_features: tuple[str, ...] = ("item_id",)
    refit_min_count: int = 1
    ridge_l2: float = 1.0
    features: tuple[str, ...] = ("item_id", "user_id")


@dataclass(frozen=True)
class PairKDConfig:
    """Logit KD beyond the observed pairs: every training batch also carries ``ratio`` times as
    many sampled (user, item) pairs that are not training interactions, with the teacher
    ranker's logits on them as the only target (weight ``weight``, temperature ``temperature``).

    Users are drawn with probability proportional to (train interactions + 1)^``user_power``,
    items to (train interactions + 1)^``item_power``: 0 draws uniformly over the whole catalogue
    (never-seen items included), so rarely clicked items get far more teacher targets than
    clicks. The pool is drawn once per run (seeded) and reshuffled every epoch.
    """

    enabled: bool = False
    ratio: float = 1.0
    weight: float = 0.5
    temperature: float = 1.0
    user_power: float = 1.0
    item_power: float = 0.0


@dataclass(frozen=True)
class TeacherRankerConfig:
    """The text-aware teacher ranker (the student's architecture plus text as dense features).

    history_pair: add a dense pair feature, the mean cosine between the item's text and the
    texts of the other items the user clicked in train (see :mod:`sparse_kd.distill.history`).
    """

    history_pair: bool = False


@dataclass(frozen=True)
class DistillConfig:
    """Knowledge distillation from the text teacher; each method on/off and weighted.

    user_text: what stands for a user's text wherever user text is used (teacher ranker inputs,
    alignment targets, weight transfer): ``text`` (the user's own text), ``history`` (the mean
    teacher embedding of the items the user clicked in train), ``both`` (the two concatenated),
    or ``auto`` (``history`` when the dataset has no user text, else ``text``).
    """

    user_text: Literal["auto", "text", "history", "both"] = "auto"
    teacher_ranker: TeacherRankerConfig = field(default_factory=TeacherRankerConfig)
    logit: LogitKDConfig = field(default_factory=LogitKDConfig)
    pairs: PairKDConfig = field(default_factory=PairKDConfig)
    align: AlignConfig = field(default_factory=AlignConfig)
    transfer: TransferConfig = field(default_factory=TransferConfig)

    @property
    def any_enabled(self) -> bool:
        return self.logit.enabled or self.pairs.enabled or self.align.enabled or self.transfer.enabled


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation and run control. ``batch_size`` is global (split across ranks)."""

    epochs: int = 3
    batch_size: int = 256
    dense_lr: float = 0.005
    sparse_lr: float = 0.05
    sparse_optimizer: Literal["rowwise_adagrad", "adagrad", "sgd"] = "rowwise_adagrad"
    seed: int = 0
    backend: Literal["auto", "gloo", "nccl"] = "auto"
    checkpoint_every: int = 0  # steps; 0: at the end of each epoch only
    keep_checkpoints: int = 2
    log_every: int = 20
    eval_batch_size: int = 4096
    collective_timeout_s: int = 300
    # auto: deterministic kernels on CPU; on CUDA only when CUBLAS_WORKSPACE_CONFIG is set (cuBLAS needs
    # it, and deterministic CUDA kernels cost speed); true / false force it
    deterministic: Union[bool, Literal["auto"]] = "auto"
    # model selection on valid (the ``valid`` split's AUC): keep the epoch with the best score as
    # the result, and stop after ``early_stop_patience`` epochs without improvement (0: never)
    select_best: bool = False
    early_stop_patience: int = 0


@dataclass(frozen=True)
class CompressConfig:
    """Row pruning + quantization of the student's embedding tables.

    keep_ratio / dtype / pruned_fill / cluster_ratio map a feature name to a value; ``default_*``
    applies to the rest. ``budget_mb`` > 0 asks the planner to choose keep ratio, dtype and fill
    per table to fit that many MB of embedding storage, scoring each choice by its loss of
    ``valid`` AUC plus ``cold_weight`` times its loss of ``valid_cold`` AUC.
    """

    default_dtype: Literal["fp32", "fp16", "int8", "int4", "int2"] = "int8"
    dtype: dict[str, str] = field(default_factory=dict)
    default_keep_ratio: float = 1.0
    keep_ratio: dict[str, float] = field(default_factory=dict)
    importance: Literal["frequency", "l2", "distill"] = "frequency"
    default_pruned_fill: Literal["zero", "mean", "text", "cluster", "text_cluster"] = "zero"
    pruned_fill: dict[str, str] = field(default_factory=dict)
    # cluster fills: ceil(ratio * rows) shared rows for a table's pruned ids (sparse_kd/compress/prune.py)
    default_cluster_ratio: float = 0.05
    cluster_ratio: dict[str, float] = field(default_factory=dict)
    budget_mb: float = 0.0
    # planner objective: valid AUC loss + cold_weight * valid_cold AUC loss (0: warm items only)
    cold_weight: float = 0.5
    # planner: measure each option on at most this many interactions per split (seeded subset; 0: all)
    planner_max_examples: int = 200000
    # fold (default): the remap is composed into the entity -> id bags the server holds anyway
    # (mappings.json), so the model holds none: no remap bytes and no remap read per lookup
    # (sparse_kd/compress/prune.py; docs/BENCHMARKS.md section 1 measures it); array: an int32
    # remap in the model; hash: TBE only (serve_device cuda)
    remap: Literal["array", "hash", "fold"] = "fold"
    # stored row order: frequency = hot rows first (fewer cache lines and pages per lookup; exact,
    # scores unchanged; sparse_kd/compress/layout.py), id = the trained order
    row_order: Literal["frequency", "id"] = "frequency"
    # where the artifact is served: cpu -> PyTorch's quantized EmbeddingBag ops (FBGEMM CPU kernels),
    # cuda -> FBGEMM's TBE on the GPU (see sparse_kd/compress/quantize.py)
    serve_device: Literal["cpu", "cuda"] = "cpu"
    # bytes each TBE row is padded to (serve_device cuda; its GPU kernels need 16); the CPU kernels
    # store rows unpadded and ignore it
    row_alignment: int = 16
    dense_int8: bool = False  # torch.ao dynamic int8 on the dense layers (off: the dense layers are small)


@dataclass(frozen=True)
class StudyConfig:
    """Sweeps: seeds for the distillation study, grid for the compression study."""

    seeds: tuple[int, ...] = (0, 1, 2)
    keep_ratios: tuple[float, ...] = (1.0, 0.5, 0.25)
    dtypes: tuple[str, ...] = ("fp32", "fp16", "int8", "int4", "int2")
    variants: tuple[str, ...] = ("baseline", "logit", "align", "transfer", "combined")
    compress_variants: tuple[str, ...] = ("baseline", "distilled")  # trained variant folders to sweep
    compress_fills: tuple[str, ...] = ("zero",)
    # distillation study: candidate settings for the ``chosen`` student, each a list of
    # ``key=value`` overrides applied on top of the config's ``distill`` section (``[]``: the
    # config as it is); per seed, the candidate with the best valid AUC is chosen
    search: tuple[tuple[str, ...], ...] = ()
    # validation splits whose mean AUC picks the ``chosen`` candidate per seed (those the dataset
    # has): valid alone ranks by warm items, as the study's main target (test AUC) does; adding
    # valid_cold trades warm AUC for cold-start AUC
    select_on: tuple[str, ...] = ("valid", "valid_cold")
    # also let ``chosen`` be any single-method study variant (logit, pairs, align, transfer), not
    # only ``combined`` and the search candidates: the study trains them anyway
    choose_among_variants: bool = False
    # planner points of the compression study: embedding storage = fp32 bytes / ratio, one plan per
    # ratio x remap kind (chosen on valid + valid_cold, then evaluated like every grid point)
    compress_budgets: tuple[float, ...] = ()
    compress_remaps: tuple[str, ...] = ("array",)


@dataclass(frozen=True)
class ExperimentConfig:
    """A whole experiment: one section per stage plus where its outputs go."""

    name: str = "experiment"
    output_dir: str = "runs/experiment"
    # local processes when a command re-launches itself; auto: one per GPU when training on CUDA, else 2
    nproc: Union[int, Literal["auto"]] = 2
    data: DataConfig = field(default_factory=DataConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    student: StudentConfig = field(default_factory=StudentConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    compress: CompressConfig = field(default_factory=CompressConfig)
    study: StudyConfig = field(default_factory=StudyConfig)


# --------------------------------------------------------------------------------------------
# Loading and validation


def _type_name(tp: Any) -> str:
    if get_origin(tp) is Literal:
        return "one of " + ", ".join(repr(a) for a in get_args(tp))
    return getattr(tp, "__name__", str(tp)).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against type ``tp`` and convert lists to tuples; raise naming ``key``."""
    origin = get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping of {tp.__name__} fields, got {type(value).__name__} {value!r}")
        return _build(tp, value, key)
    if origin is Literal:
        if value not in get_args(tp):
            raise ConfigError(f"{key}: {value!r} is not valid; expected {_type_name(tp)}")
        return value
    if origin in (Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError("; ".join(errors))
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {type(value).__name__} {value!r}")
        (elem, *_rest) = get_args(tp)
        return tuple(_coerce(v, elem, f"{key}[{i}]") for i, v in enumerate(value))
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {type(value).__name__} {value!r}")
        kt, vt = get_args(tp)
        return {_coerce(k, kt, f"{key}") : _coerce(v, vt, f"{key}.{k}") for k, v in value.items()}
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {type(value).__name__} {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {type(value).__name__} {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {type(value).__name__} {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {type(value).__name__} {value!r}")
        return value
    raise ConfigError(f"{key}: unsupported field type {tp}")  # pragma: no cover - programming error


def _build(cls: type, raw: dict[str, Any], prefix: str = "") -> Any:
    hints = get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for k, v in raw.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if k not in names:
            import difflib

            close = difflib.get_close_matches(str(k), sorted(names), n=1)
            hint = f" Did you mean '{close[0]}'?" if close else ""
            raise ConfigError(f"{key}: unknown key.{hint} Valid keys here: {', '.join(sorted(names))}")
        kwargs[k] = _coerce(v, hints[k], key)
    return cls(**kwargs)


def _validate(cfg: ExperimentConfig) -> None:
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
    pk = cfg.distill.pairs
    need(pk.ratio > 0, "distill.pairs.ratio", "must be > 0 (sampled pairs per observed pair)")
    need(pk.weight >= 0, "distill.pairs.weight", "must be >= 0")
    need(pk.temperature > 0, "distill.pairs.temperature", "must be > 0")
    if pk.enabled:
        pool_batch = pk.ratio * t.batch_size
        need(abs(pool_batch - round(pool_batch)) < 1e-9 and round(pool_batch) % cfg.nproc == 0 and round(pool_batch) > 0,
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
    need(t.checkpoint_every >= 0, "train.checkpoint_every", "must be >= 0")
    need(t.keep_checkpoints >= 1, "train.keep_checkpoints", "must be >= 1")
    need(t.collective_timeout_s >= 10, "train.collective_timeout_s", "must be >= 10")
    for feat, dt in c.dtype.items():
        need(dt in QUANT_DTYPES, f"compress.dtype.{feat}", f"{dt!r} is not valid; expected one of {', '.join(QUANT_DTYPES)}")
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
    need(c.row_alignment in (1, 2, 4, 8, 16), "compress.row_alignment", f"{c.row_alignment} is not valid; expected 1, 2, 4, 8 or 16")
    need(c.remap != "hash" or c.serve_device == "cuda", "compress.remap",
         "'hash' needs compress.serve_device: cuda (FBGEMM's TBE); the CPU kernels take an array remap (or fold)")
    need(c.row_alignment == 16 or c.serve_device == "cpu", "compress.row_alignment",
         f"{c.row_alignment} is not valid with compress.serve_device: cuda; FBGEMM's GPU kernels need 16")
    for k in cfg.study.keep_ratios:
        need(0.0 < k <= 1.0, "study.keep_ratios", f"{k} is not in (0, 1]")
    for dt in cfg.study.dtypes:
        need(dt in QUANT_DTYPES, "study.dtypes", f"{dt!r} is not valid; expected one of {', '.join(QUANT_DTYPES)}")
    need(len(cfg.study.seeds) >= 1, "study.seeds", "needs at least one seed")
    need(len(cfg.study.select_on) >= 1 and all(s in ("valid", "valid_cold") for s in cfg.study.select_on),
         "study.select_on", f"{list(cfg.study.select_on)} is not valid; give one or both of valid, valid_cold")
    for i, cand in enumerate(cfg.study.search):
        for ov in cand:
            need("=" in ov and ov.split("=", 1)[0].strip().startswith("distill."), f"study.search[{i}]",
                 f"{ov!r}: expected distill.KEY=VALUE (the search varies distillation settings only)")
        try:
            raw = _merge(to_dict(cfg), parse_overrides(list(cand)))
            raw["study"]["search"] = []
            _validate(_build(ExperimentConfig, raw))
        except ConfigError as e:
            raise ConfigError(f"study.search[{i}] {list(cand)}: {e}") from None
    for fill in cfg.study.compress_fills:
        need(fill in FILLS, "study.compress_fills", f"{fill!r} is not valid; expected one of {', '.join(FILLS)}")
    for r in cfg.study.compress_budgets:
        need(r > 1.0, "study.compress_budgets", f"{r} is not valid; give compression ratios > 1 (e.g. [10, 30])")
    for rk in cfg.study.compress_remaps:
        need(rk in ("array", "fold"), "study.compress_remaps", f"{rk!r} is not valid; expected array or fold")


def _set_path(raw: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = raw
    for p in parts[:-1]:
        nxt = node.setdefault(p, {})
        if not isinstance(nxt, dict):
            raise ConfigError(f"{dotted}: cannot set a key inside {p!r}, which is not a section")
        node = nxt
    node[parts[-1]] = value


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """``["train.epochs=2", "student.dense_arch=[64,16]"]`` -> nested dict (values parsed as YAML)."""
    raw: dict[str, Any] = {}
    for ov in overrides:
        if "=" not in ov:
            raise ConfigError(f"override {ov!r}: expected key=value, e.g. train.epochs=2")
        k, v = ov.split("=", 1)
        try:
            val = yaml.safe_load(v) if v != "" else ""
        except yaml.YAMLError as e:
            raise ConfigError(f"override {ov!r}: value is not valid YAML: {e}") from None
        _set_path(raw, k.strip(), val)
    return raw


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in extra.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v)
        else:
            out[k] = v
    return out


def config_from_dict(raw: dict[str, Any], source: str = "<dict>") -> ExperimentConfig:
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: the top level must be a mapping of sections, got {type(raw).__name__}")
    try:
        cfg = _build(ExperimentConfig, raw)
        _validate(cfg)
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None
    return cfg


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> ExperimentConfig:
    """Load a YAML experiment config, apply ``key=value`` overrides, validate. Errors name the key."""
    raw: dict[str, Any] = {}
    source = "<defaults>"
    if path is not None:
        p = Path(path)
        source = str(p)
        if not p.is_file():
            raise ConfigError(f"{p}: config file not found")
        try:
            raw = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{p}: not valid YAML: {e}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{p}: the top level must be a mapping of sections")
    if overrides:
        raw = _merge(raw, parse_overrides(overrides))
    return config_from_dict(raw, source)


def to_dict(cfg: Any) -> Any:
    """A plain, YAML/JSON-serialisable dict of a config (tuples become lists)."""
    if dataclasses.is_dataclass(cfg):
        return {f.name: to_dict(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}
    if isinstance(cfg, (list, tuple)):
        return [to_dict(v) for v in cfg]
    if isinstance(cfg, dict):
        return {k: to_dict(v) for k, v in cfg.items()}
    return cfg


def replace(cfg: ExperimentConfig, overrides: list[str]) -> ExperimentConfig:
    """A copy of ``cfg`` with ``key=value`` overrides applied and validated."""
    return config_from_dict(_merge(to_dict(cfg), parse_overrides(overrides)), "<overrides>")
