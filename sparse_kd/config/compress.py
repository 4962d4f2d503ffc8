"""Sections for what follows training: ``compress`` (pruning, quantization, artifact) and ``study``."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

@dataclass(frozen=True)
class FinetuneConfig:
    """Distillation after compression (sparse_kd/compress/finetune.py): train the compressed model
    (kept rows through a straight-through quantizer, dense layers) to the uncompressed student's
    soft predictions and the labels, quantize again, keep it if valid (+ cold_weight x valid_cold)
    is not worse."""

    enabled: bool = False
    epochs: int = 1
    batch_size: int = 1024
    dense_lr: float = 1e-4  # Adam on the dense and over archs
    row_lr: float = 0.01  # row-wise Adagrad on the kept rows
    kd_weight: float = 0.5  # share of the soft-prediction loss (the rest: labels)
    temperature: float = 2.0
    seed: int = 0  # order of the training examples
    max_steps: int = 0  # a cap on the steps (0: none)


@dataclass(frozen=True)
class CompressConfig:
    """Row pruning + quantization of the student's embedding tables.

    keep_ratio / dtype / pruned_fill / cluster_ratio map a feature name to a value; ``default_*``
    applies to the rest. ``budget_mb`` > 0 asks the planner to choose keep ratio, dtype and fill
    per table to fit that many MB of embedding storage, scoring each choice by its loss of
    ``valid`` AUC plus ``cold_weight`` times its loss of ``valid_cold`` AUC.
    """

    default_dtype: Literal["fp32", "fp16", "int8", "int4", "int2"] = "int8"
    # per table: one dtype, or precision tiers "int8:0.05,int4:0.25,int2" (sparse_kd/config/dtypes.py)
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
    # the planner's noise margin: an option's validation loss counts z = planner_confidence
    # bootstrap standard errors (planner_bootstrap resamples of the validation rows) above what was
    # measured, so that a plan is not the one luckiest on validation (0: the measured loss alone)
    planner_confidence: float = 1.0
    planner_bootstrap: int = 30
    # precision tiers the planner may also give a table, each like "int8:0.05,int4:0.25,int2" (the
    # hottest 5% of stored rows int8, the next 25% int4, the rest int2; sparse_kd/compress/tiers.py)
    planner_tiers: tuple[str, ...] = ()
    # fold (default): the remap is composed into the entity -> id bags the server holds anyway
    # (mappings.json), so the model holds none: no remap bytes and no remap read per lookup
    # (sparse_kd/compress/prune.py; docs/BENCHMARKS.md section 1 measures it); array: an int32
    # remap in the model; hash: TBE only (serve_device cuda)
    remap: Literal["array", "hash", "fold"] = "fold"
    # stored row order: frequency = hot rows first (fewer cache lines and pages per lookup; exact,
    # scores unchanged; sparse_kd/compress/layout.py), id = the trained order
    row_order: Literal["frequency", "id"] = "frequency"
    # how a row's fp16 scale and bias are set for int8/int4/int2: minmax = FBGEMM's own (range of
    # the row), mse = fitted per row to squared error, never worse row by row (sparse_kd/compress/row_fit.py)
    quantizer: Literal["minmax", "mse"] = "minmax"
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    # where the artifact is served: cpu -> PyTorch's quantized EmbeddingBag ops (FBGEMM CPU kernels),
    # cuda -> FBGEMM's TBE on the GPU (see sparse_kd/compress/tbe.py)
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
    # candidate training settings for the baseline, each a list of ``train.*`` overrides (learning
    # rates, weight decay); per seed the baseline is the best of the config as it is and these, by
    # the same validation score as ``chosen`` -- the same search budget as the students get, so
    # that a student's gain is not a weak baseline's loss. ``sparse-kd train`` and ``pipeline``
    # search them too, on valid AUC (sparse_kd.baseline_search); the other rankers keep ``train``
    baseline_search: tuple[tuple[str, ...], ...] = ()
    # distillation study: candidate settings for the teacher ranker, each a list of ``train.*`` or
    # ``distill.teacher_ranker.*`` overrides; per seed the students learn from the best of the
    # config as it is and these, by the same validation score (a teacher trained to its best too)
    teacher_search: tuple[tuple[str, ...], ...] = ()
    # validation splits whose mean AUC picks the ``chosen`` candidate per seed (those the dataset
    # has): valid alone ranks by warm items, as the study's main target (test AUC) does; adding
    # valid_cold trades warm AUC for cold-start AUC
    select_on: tuple[str, ...] = ("valid", "valid_cold")
    # also let ``chosen`` be any single-method study variant (logit, pairs, align, transfer), not
    # only ``combined`` and the search candidates: the study trains them anyway
    choose_among_variants: bool = False
    # distillation study: also train the outside reference, plain matrix factorisation with biases
    # on the same splits (sparse_kd/mf_reference.py: student.embedding_dim dims, lr x
    # weight_decay grid and best epoch chosen on valid), on rank 0 while the other ranks wait
    mf_reference: bool = True
    # planner points of the compression study: embedding storage = fp32 bytes / ratio, one plan per
    # ratio x remap kind (chosen on valid + valid_cold, then evaluated like every grid point)
    compress_budgets: tuple[float, ...] = ()
    compress_remaps: tuple[str, ...] = ("array",)
