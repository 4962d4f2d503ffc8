"""Loading an experiment config from YAML plus ``key=value`` overrides, validated."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from sparse_kd.config.base import ConfigError
from sparse_kd.config.coerce import build
from sparse_kd.config.experiment import ExperimentConfig
from sparse_kd.config.overrides import merge, parse_overrides, to_dict
from sparse_kd.config.validate import validate


def config_from_dict(raw: dict[str, Any], source: str = "<dict>") -> ExperimentConfig:
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: the top level must be a mapping of sections, got {type(raw).__name__}")
    try:
        cfg = build(ExperimentConfig, raw)
        validate(cfg)
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
        raw = merge(raw, parse_overrides(overrides))
    return config_from_dict(raw, source)


def replace(cfg: ExperimentConfig, overrides: list[str]) -> ExperimentConfig:
    """A copy of ``cfg`` with ``key=value`` overrides applied and validated."""
    return config_from_dict(merge(to_dict(cfg), parse_overrides(overrides)), "<overrides>")
