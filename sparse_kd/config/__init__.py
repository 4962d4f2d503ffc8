"""Typed, frozen configuration: one dataclass per stage, loaded from YAML with ``key=value`` overrides.

Every stage (data, teacher, student, distill, train, compress, study) has its own frozen
dataclass; :class:`ExperimentConfig` groups them. Defaults live here and only here.
Unknown keys, wrong types and impossible values are :class:`ConfigError` s naming the key
(``train.batch_size``) and, where known, what would be valid.

Example::

    cfg = load_config("configs/demo.yaml", ["train.epochs=2", "student.embedding_dim=32"])
    cfg.train.epochs  # 2

The sections live one stage per module (``data``, ``model``, ``compress``), the whole in
``experiment``; ``coerce`` checks types, ``validate`` checks values, ``loader`` reads YAML.
"""

from sparse_kd.config.base import FILLS, QUANT_DTYPES, SHARDING_TYPES, ConfigError
from sparse_kd.config.compress import CompressConfig, FinetuneConfig, StudyConfig
from sparse_kd.config.data import DataConfig, SyntheticConfig, TeacherConfig
from sparse_kd.config.experiment import ExperimentConfig
from sparse_kd.config.loader import config_from_dict, load_config, replace
from sparse_kd.config.model import (AlignConfig, DistillConfig, HistoryAttentionConfig, LogitKDConfig, PairKDConfig, PlannerConfig, StudentConfig,
                                    TeacherRankerConfig, TrainConfig, TransferConfig)
from sparse_kd.config.overrides import parse_overrides, to_dict

__all__ = [
    "FILLS", "QUANT_DTYPES", "SHARDING_TYPES", "AlignConfig", "CompressConfig", "ConfigError", "DataConfig", "DistillConfig",
    "ExperimentConfig", "FinetuneConfig", "HistoryAttentionConfig", "LogitKDConfig", "PairKDConfig", "PlannerConfig", "StudentConfig", "StudyConfig", "SyntheticConfig",
    "TeacherConfig", "TeacherRankerConfig", "TrainConfig", "TransferConfig", "config_from_dict", "load_config",
    "parse_overrides", "replace", "to_dict",
]
