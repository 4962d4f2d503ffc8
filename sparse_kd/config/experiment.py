"""The whole experiment: one section per stage plus where its outputs go."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Union

from sparse_kd.config.compress import CompressConfig, StudyConfig
from sparse_kd.config.data import DataConfig, TeacherConfig
from sparse_kd.config.model import DistillConfig, StudentConfig, TrainConfig


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
