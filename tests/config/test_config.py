"""Configs: every YAML in configs/ loads; unknown keys, wrong types and impossible values name the key."""

import dataclasses
from pathlib import Path

import pytest

from sparse_kd.config import ConfigError, ExperimentConfig, load_config, parse_overrides, replace, to_dict

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = sorted((ROOT / "configs").rglob("*.yaml"))


def test_configs_found():
    assert len(CONFIGS) >= 2, CONFIGS


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_config_loads_and_opens_with_its_command(path):
    cfg = load_config(path)
    assert isinstance(cfg, ExperimentConfig)
    first = path.read_text().splitlines()[0]
    assert first.startswith("# ") and ("sparse-kd" in first or "python" in first or "torchx" in first), first
    assert path.name in first or path.stem in first, f"{path}: first line should be the command that runs it"


def test_overrides_apply_and_parse_yaml_values():
    cfg = load_config(ROOT / "configs/demo.yaml", ["train.epochs=7", "student.dense_arch=[8, 16]", "student.embedding_dim=16"])
    assert cfg.train.epochs == 7 and cfg.student.dense_arch == (8, 16)
    assert parse_overrides(["a.b=1", "a.c=x"]) == {"a": {"b": 1, "c": "x"}}


@pytest.mark.parametrize(
    "override,needle",
    [
        ("train.epoch=3", "train.epoch: unknown key. Did you mean 'epochs'?"),
        ("train.epochs=three", "train.epochs: expected an integer"),
        ("train.epochs=true", "train.epochs: expected an integer"),
        ("train.dense_lr=fast", "train.dense_lr: expected a number"),
        ("student.default_sharding=diagonal", "student.default_sharding: 'diagonal' is not valid; expected one of"),
        ("student.sharding.item_id=grid", "student.sharding.item_id: 'grid' is not valid"),
        ("student.embedding_dim=10", "student.embedding_dim: must be a multiple of 4"),
        ("student.over_arch=[8, 2]", "student.over_arch: the last layer must be 1"),
        ("student.over_arch=[1]", "student.over_arch: [1]: needs at least two layers"),
        ("distill.teacher_ranker.over_arch=[1]", "distill.teacher_ranker.over_arch: [1]: needs at least two layers"),
        ("train.batch_size=255", "train.batch_size: must be a positive multiple of nproc"),
        ("data.source=movielens", "data.path: required when data.source is 'movielens'"),
        ("distill.logit.kd_ratio=1.5", "distill.logit.kd_ratio: must be in [0, 1]"),
        ("compress.dtype.item_id=int3", "compress.dtype.item_id: 'int3' is not valid"),
        ("compress.budget_mb=-1", "compress.budget_mb: must be >= 0"),
        ("teacher.allow_pickle_weights=sometimes", "teacher.allow_pickle_weights: expected true or false"),
        ("bogus=1", "bogus: unknown key"),
        ("train=5", "train: expected a mapping"),
        ("train.epochs", "expected key=value"),
    ],
)
def test_invalid_values_name_the_key(override, needle):
    with pytest.raises(ConfigError) as e:
        load_config(ROOT / "configs/demo.yaml", [override])
    assert needle in str(e.value), str(e.value)
    if "=" in override:
        assert "configs/demo.yaml" in str(e.value) or "override" in str(e.value)


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [1, 2\n")
    with pytest.raises(ConfigError, match="bad.yaml: not valid YAML"):
        load_config(bad)
    lst = tmp_path / "list.yaml"
    lst.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(lst)


def test_round_trip_and_replace():
    cfg = load_config(ROOT / "configs/demo.yaml")
    again = replace(cfg, [])
    assert again == cfg
    assert to_dict(replace(cfg, ["train.seed=5"]))["train"]["seed"] == 5
    with pytest.raises(dataclasses.FrozenInstanceError, match="cannot assign to field 'epochs'"):
        cfg.train.epochs = 1  # frozen
