"""distill.teacher_ranker.from_run: students learn from a teacher another run trained, which this
run reads (each ensemble member from its final checkpoint) and never trains or writes."""

import hashlib
import json
from pathlib import Path

import pytest
import torch
import yaml

from helpers.tiny import tiny_config
from sparse_kd import pipeline as P
from sparse_kd.config import ConfigError


def _snapshot(folder: Path) -> dict:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_from_run_refuses_teacher_keys_beside_it_and_a_teacher_search():
    with pytest.raises(ConfigError, match=r"distill.teacher_ranker.ensemble would mean nothing"):
        tiny_config("unused", distill={"teacher_ranker": {"from_run": "runs/a", "ensemble": 3}})
    with pytest.raises(ConfigError, match="study.teacher_search"):
        tiny_config("unused", distill={"teacher_ranker": {"from_run": "runs/a"}},
                    study={"teacher_search": [["train.dense_lr=0.1"]]})


def test_an_unset_from_run_leaves_fingerprints_as_before():
    cfg = tiny_config("unused", distill={"logit": {"enabled": True}})
    for fp in (P.variant_fingerprint(cfg, P.TEACHER, cfg.distill, 0), P.variant_fingerprint(cfg, "distilled", cfg.distill, 0)):
        assert "from_run" not in str(fp)  # folders trained before the key existed still match


@pytest.mark.slow
def test_a_smaller_student_learns_from_another_runs_ensemble_teacher(tmp_path, monkeypatch, one_process):
    seen: dict = {"members": []}
    real_train, real_spec = P.train_variant, P.distilled_spec

    def train_spy(cfg, ds, spec, env, seed, want_train_logits=False):
        res = real_train(cfg, ds, spec, env, seed, want_train_logits=want_train_logits)
        if spec.name.startswith(P.TEACHER):
            seen["members"].append(res.train_logits)
        return res

    def spec_spy(*a, **k):
        spec = real_spec(*a, **k)
        seen["student_targets"] = spec.teacher_logits
        return spec

    monkeypatch.setattr(P, "train_variant", train_spy)
    monkeypatch.setattr(P, "distilled_spec", spec_spy)
    src = tmp_path / "big" / "seed_0"
    big = tiny_config(str(src), nproc=1, train={"epochs": 2},
                      distill={"teacher_ranker": {"ensemble": 2, "embedding_dim": 16, "dense_arch": [16, 16]}})
    first = P.run_training(big, (P.TEACHER,))
    assert len(seen["members"]) == 2
    before = _snapshot(src)

    small = tiny_config(str(tmp_path / "small"), nproc=1, train={"epochs": 2},
                        student={"embedding_dim": 4, "dense_arch": [16, 4]},
                        distill={"logit": {"enabled": True}, "transfer": {"enabled": False},
                                 "teacher_ranker": {"from_run": str(tmp_path / "big" / "seed_{seed}")}})
    second = P.run_training(small, (P.TEACHER, "distilled"))
    assert len(seen["members"]) == 2  # nothing trained a teacher this time
    assert second[P.TEACHER] == first[P.TEACHER]  # the same ensemble, evaluated from its checkpoints
    mean = torch.stack(seen["members"]).mean(0)
    assert torch.allclose(seen["student_targets"], mean, atol=1e-6)  # logit KD: the members' mean, row for row
    assert 0.0 < second["distilled"]["test"]["auc"] < 1.0
    speeds = [json.loads((d / "metrics.json").read_text())["examples_per_s"][P.TEACHER] for d in (src, tmp_path / "small")]
    assert speeds[0] > 0 and speeds[1] == pytest.approx(speeds[0])  # the cost table shows what the source measured
    assert _snapshot(src) == before  # the source folder is read, never written
    assert not (tmp_path / "small" / P.TEACHER).exists()

    # refused before anything is trained, each naming what differs and how to fix it
    other_data = tiny_config(str(tmp_path / "c"), nproc=1, data={"seed": 5},
                             distill={"logit": {"enabled": True}, "teacher_ranker": {"from_run": str(src)}})
    with pytest.raises(ConfigError, match=r"data.seed: 0 there, 5 here"):
        P.run_training(other_data, ("distilled",))
    missing = tiny_config(str(tmp_path / "d"), nproc=1,
                          distill={"logit": {"enabled": True}, "teacher_ranker": {"from_run": str(tmp_path / "nowhere")}})
    with pytest.raises(ConfigError, match="config.yaml does not exist"):
        P.run_training(missing, ("distilled",))
    doc = yaml.safe_load((src / "config.yaml").read_text())
    doc["train"]["epochs"] = 4  # the source would train on: its teacher is not finished
    (src / "config.yaml").write_text(yaml.safe_dump(doc))
    with pytest.raises(ConfigError, match=r"is at epoch 2 of 4: it has not finished training"):
        P.run_training(small, ("distilled",))
    assert not (tmp_path / "c").exists() or not any((tmp_path / "c").glob("distilled*"))


def reuse_worker(big, small) -> dict:
    """Rank's view: train the source teacher on 2 ranks, then the student reusing it on 2 ranks."""
    import logging
    import warnings

    from sparse_kd import pipeline as P

    warnings.filterwarnings("ignore")
    logging.getLogger("torchrec").setLevel(logging.ERROR)
    first = P.run_training(big, (P.TEACHER,))
    second = P.run_training(small, (P.TEACHER, "distilled"))
    return {"first": first, "second": second}


@pytest.mark.slow
def test_a_reused_teacher_on_two_ranks(tmp_path):
    """Two ranks: the reused ensemble's metrics equal the source's on both ranks (each member
    evaluated from its row_wise-sharded checkpoint, rank 0 alone reading the source's files)."""
    from sparse_kd.local_launch import launch_local

    big = tiny_config(str(tmp_path / "big"), nproc=2, train={"epochs": 1}, teacher={"cache_dir": str(tmp_path / "cache")},
                      distill={"teacher_ranker": {"ensemble": 2}})
    small = tiny_config(str(tmp_path / "small"), nproc=2, train={"epochs": 1}, teacher={"cache_dir": str(tmp_path / "cache")},
                        student={"embedding_dim": 4, "dense_arch": [16, 4]},
                        distill={"logit": {"enabled": True}, "teacher_ranker": {"from_run": str(tmp_path / "big")}})
    out = launch_local(reuse_worker, 2, big, small)
    for rank in (0, 1):
        assert out[rank]["second"][P.TEACHER] == out[0]["first"][P.TEACHER]
        assert out[rank]["second"]["distilled"] == out[0]["second"]["distilled"]
    assert not (tmp_path / "small" / P.TEACHER).exists()
