"""A config and dataset small enough for a test."""

from __future__ import annotations

from typing import Any

from sparse_kd.config import ExperimentConfig, config_from_dict
from sparse_kd.data import load_dataset
from sparse_kd.data.schema import RecDataset


def tiny_config(output_dir: str, nproc: int = 2, **sections: Any) -> ExperimentConfig:
    """A config small enough for a test: ~2k interactions, 8-dim embeddings, 3 epochs."""
    raw: dict[str, Any] = {
        "name": "tiny",
        "output_dir": output_dir,
        "nproc": nproc,
        "data": {"synthetic": {"num_users": 60, "num_items": 40, "interactions_per_user": 30, "num_topics": 4}},
        "student": {"embedding_dim": 8, "dense_arch": [16, 8], "over_arch": [16, 1], "teacher_text_dim": 8},
        "train": {"epochs": 3, "batch_size": 64, "sparse_lr": 0.2, "dense_lr": 0.01, "log_every": 5, "eval_batch_size": 256},
    }
    for k, v in sections.items():
        if isinstance(v, dict) and isinstance(raw.get(k), dict):
            raw[k] = {**raw[k], **v}  # one level deep: enough for the tests' overrides
        else:
            raw[k] = v
    return config_from_dict(raw, "<tiny_config>")


def tiny_dataset(cfg: ExperimentConfig | None = None) -> RecDataset:
    return load_dataset((cfg or tiny_config("unused")).data)
