"""The teacher ranker can be larger than the student (wider tables, deeper MLPs, a DCN
interaction, every text dim), its size is measured, and a variant reloads with its own
architecture (issue 21, item 1)."""

import dataclasses

import pytest
import torch
from torchrec.models.dlrm import DLRM_DCN
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from sparse_kd.config import ConfigError, load_config
from sparse_kd.student.cost import cost_table, ranker_cost
from sparse_kd.student.model import Arch, arch_of, build_dlrm, teacher_arch

TABLES = {"user_id": 50, "item_id": 80}
WIDE = ["distill.teacher_ranker.embedding_dim=64", "distill.teacher_ranker.dense_arch=[128,64]",
        "distill.teacher_ranker.over_arch=[256,64,1]", "distill.teacher_ranker.interaction=dcn",
        "distill.teacher_ranker.text_dim=-1"]


def test_teacher_arch_defaults_to_the_students_and_widens_on_request():
    cfg = load_config("configs/demo.yaml")
    # the student's architecture, except student.dot_logit (the student's own; configs/demo.yaml sets it)
    assert cfg.student.dot_logit
    assert teacher_arch(cfg.student, cfg.distill.teacher_ranker) == dataclasses.replace(arch_of(cfg.student), dot_logit=False)
    wide = load_config("configs/demo.yaml", WIDE)
    a = teacher_arch(wide.student, wide.distill.teacher_ranker)
    assert (a.embedding_dim, a.dense_arch, a.over_arch, a.interaction) == (64, (128, 64), (256, 64, 1), "dcn")
    assert Arch.from_dict(a.to_dict()) == a
    assert Arch.from_dict({"embedding_dim": 16, "dense_arch": [32, 16], "over_arch": [1]}).interaction == "dot"


@pytest.mark.parametrize("overrides, key", [
    (["distill.teacher_ranker.embedding_dim=64"], "distill.teacher_ranker.dense_arch"),
    (["distill.teacher_ranker.over_arch=[8,2]"], "distill.teacher_ranker.over_arch"),
    (["distill.teacher_ranker.text_dim=-2"], "distill.teacher_ranker.text_dim"),
    (["distill.teacher_ranker.embedding_dim=64", "distill.teacher_ranker.dense_arch=[64]",
      "distill.transfer.enabled=true", "distill.transfer.projection=learned"], "distill.transfer.projection"),
])
def test_bad_teacher_settings_name_the_key(overrides, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config("configs/demo.yaml", overrides)


def test_dcn_teacher_runs_and_costs_more_than_the_student():
    wide = load_config("configs/demo.yaml", WIDE)
    a = teacher_arch(wide.student, wide.distill.teacher_ranker)
    m = build_dlrm(TABLES, 10, a, device="cpu")
    assert isinstance(m, DLRM_DCN)
    kjt = KeyedJaggedTensor.from_lengths_sync(keys=list(TABLES), values=torch.tensor([1, 2, 3, 4]),
                                              lengths=torch.ones(4, dtype=torch.int32))
    assert m(torch.randn(2, 10), kjt).shape == (2, 1)
    student = ranker_cost(TABLES, 2, arch_of(wide.student))
    teacher = ranker_cost(TABLES, 10, a)
    assert student["table_params"] == (50 + 80) * wide.student.embedding_dim
    assert student["params"] == student["table_params"] + sum(
        p.numel() for n, p in build_dlrm(TABLES, 2, wide.student, device="cpu").named_parameters()
        if not n.startswith("sparse_arch."))
    # the dense MLPs alone: every Linear's in x out, counted by hand for the student
    lin = sum(mod.in_features * mod.out_features for mod in build_dlrm(TABLES, 2, wide.student, device="cpu").modules()
              if isinstance(mod, torch.nn.Linear))
    assert student["macs_per_example"] >= lin
    assert teacher["params"] > 10 * student["params"] and teacher["macs_per_example"] > 10 * student["macs_per_example"]
    table = cost_table({"baseline": student, "teacher_ranker": teacher}, {"baseline": 10.0})
    assert "teacher_ranker" in table and "1.0x / 1.0x" in table
