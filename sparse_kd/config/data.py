"""Sections for the data and the text teacher: ``data`` (with ``data.synthetic``) and ``teacher``."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

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
