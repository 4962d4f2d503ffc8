"""An ensemble teacher (distill.teacher_ranker.ensemble): members trained from their own seeds,
combined by their mean logit; the students learn from that mean."""

import pytest
import torch

from helpers import tiny_config, tiny_dataset
from sparse_kd.metrics import EVAL_SPLITS, binary_metrics
from sparse_kd.student.ensemble import combine, member_name, member_seed
from sparse_kd.student.spec import RankerResult


def test_combine_scores_the_mean_logit_of_the_members():
    """Two members, each wrong on its own half of every split, are right together: the ensemble's
    AUC is computed from the mean of the logits the members kept (not averaged from their AUCs)."""
    ds = tiny_dataset(tiny_config("unused", nproc=1))

    def logits(sign: float) -> dict:
        out = {}
        for s in EVAL_SPLITS:
            sp = ds.splits[s]
            y = torch.from_numpy(sp.label).float() * 2 - 1  # (N,) +-1
            e = 3.0 * torch.randn(len(sp), generator=torch.Generator().manual_seed(len(sp)))
            out[s] = y + sign * e  # the errors cancel in the mean
        return out

    members = [(RankerResult("t", {"test": {"auc": 0.6 + k / 10}}, f"ck{k}", torch.full((5,), float(k)), 100.0,
                             eval_logits=logits(sign)), s)
               for k, (s, sign) in enumerate((("a", 1.0), ("b", -1.0)))]
    res = combine("t", members, ds)
    for s in EVAL_SPLITS:
        sp = ds.splits[s]
        if len(sp) and 0 < sp.label.mean() < 1:
            one = binary_metrics(members[0][0].eval_logits[s], torch.from_numpy(sp.label))["auc"]
            assert res.metrics[s]["auc"] == pytest.approx(1.0) and one < 0.9
    assert torch.equal(res.train_logits, torch.full((5,), 0.5))  # the mean of 0 and 1
    assert res.members == [("a", "ck0"), ("b", "ck1")] and res.checkpoint == "ck0"
    assert res.member_metrics == [{"test": {"auc": 0.6}}, {"test": {"auc": 0.7}}]  # each member's own, in order
    assert res.examples_per_s == pytest.approx(50.0)  # members train one after the other
    with pytest.raises(ValueError, match="at least one"):
        combine("t", [], ds)
    members[1][0].eval_logits = None  # a member trained without keeping its logits: refused, not skipped
    with pytest.raises(ValueError, match="kept no split logits"):
        combine("t", members, ds)


def test_members_have_their_own_folder_and_seed():
    assert member_name("teacher_ranker", 0) == "teacher_ranker" and member_seed(7, 0) == 7
    assert member_name("teacher_ranker", 2) == "teacher_ranker_member_2" and member_seed(7, 2) != member_seed(7, 1) != 7


def test_ensemble_teacher_in_a_study_seed(tmp_path, monkeypatch, one_process):
    """ensemble: 2 -> two teacher trainings (folders teacher_ranker, teacher_ranker_member_1; two
    seeds), the teacher row is the mean logit's, the students' KD targets are the members' mean
    (train logits and sampled pairs), and the cost counts both members."""
    from sparse_kd import pipeline as P
    from sparse_kd.studies import distill_study as S

    cfg = tiny_config(str(tmp_path / "study"), nproc=1,
                      distill={"logit": {"enabled": True}, "pairs": {"enabled": True}, "teacher_ranker": {"ensemble": 2}},
                      study={"seeds": [0], "variants": ["baseline", "combined"], "mf_reference": False})
    calls, specs = [], {}

    def fake_train(vcfg, ds, spec, env, seed, want_train_logits=False):
        calls.append((spec.name, seed))
        specs[spec.name] = spec
        n = len(ds.splits["train"])
        k = 1.0 if spec.name.endswith("member_1") else 0.0
        split_logits = {s: torch.full((len(ds.splits[s]),), k) for s in EVAL_SPLITS} if want_train_logits else None
        return RankerResult(spec.name, {"valid": {"auc": 0.7}, "test": {"auc": 0.7}}, tmp_path / spec.name,
                            torch.full((n,), k) if want_train_logits else None, 10.0, eval_logits=split_logits)

    def fake_predict(cfg_, ds, spec, checkpoint, rows, env, seed):  # the teacher members on the sampled-pair pool
        return torch.full((len(rows),), 4.0 if checkpoint.name.endswith("member_1") else 2.0)

    monkeypatch.setattr(P, "train_variant", fake_train)
    monkeypatch.setattr(P, "predict_checkpoint", fake_predict)
    monkeypatch.setattr(P, "text_embeddings", lambda c, ds, env, **kw: (torch.randn(ds.num_users, 8), torch.randn(ds.num_items, 8)))
    out = S.run_seed(cfg, 0)
    teachers = [c for c in calls if c[0].startswith(P.TEACHER)]
    assert teachers == [(P.TEACHER, 0), (f"{P.TEACHER}_member_1", member_seed(0, 1))]
    assert specs[P.TEACHER] is not specs[f"{P.TEACHER}_member_1"]  # two models, not one trained twice
    # ... over one copy of the text features (PCA reduced once, not once per member)
    assert specs[P.TEACHER].user_dense is specs[f"{P.TEACHER}_member_1"].user_dense
    assert specs[P.TEACHER].item_dense is specs[f"{P.TEACHER}_member_1"].item_dense
    student = specs["combined"]
    assert torch.allclose(student.teacher_logits, torch.full_like(student.teacher_logits, 0.5))
    assert torch.allclose(student.kd_pool_logits, torch.full_like(student.kd_pool_logits, 3.0))
    assert set(out[P.TEACHER]) == set(EVAL_SPLITS)  # the ensemble's own metrics, from the mean logit
    assert out[P.TEACHER]["test"]["n"] == len(tiny_dataset(cfg).splits["test"])
    assert out["teacher_members"] == [{"valid": {"auc": 0.7}, "test": {"auc": 0.7}}] * 2  # the members' own
    single = P.spec_cost(cfg, tiny_dataset(cfg), specs[P.TEACHER])
    assert out["cost"][P.TEACHER]["params"] == 2 * single["params"]
    assert out["cost"][P.TEACHER]["macs_per_example"] == 2 * single["macs_per_example"]
    # one member is one model whatever K: member 0's fingerprint is the single teacher's
    one = P.variant_fingerprint(tiny_config("unused", nproc=1), P.TEACHER, cfg.distill, 0)
    assert P.variant_fingerprint(cfg, P.TEACHER, cfg.distill, 0)["teacher_ranker"] == one["teacher_ranker"]
