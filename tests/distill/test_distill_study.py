"""The distillation study's choice on validation, its search candidates, and its targets."""

import json
import math

import pytest

from helpers import tiny_config
from sparse_kd.config import ConfigError, replace
from sparse_kd.studies import distill_report as R
from sparse_kd.studies import distill_study as S


def _m(valid, test, cold, valid_cold=None):
    out = {"valid": {"auc": valid}, "test": {"auc": test}, "test_cold": {"auc": cold}}
    if valid_cold is not None:
        out["valid_cold"] = {"auc": valid_cold}
    return out


def test_selection_uses_validation_splits_only():
    assert S.selection_score(_m(0.70, 0.99, 0.99)) == pytest.approx(0.70)
    assert S.selection_score(_m(0.70, 0.10, 0.10, valid_cold=0.60)) == pytest.approx(0.65)
    assert S.selection_score(_m(0.70, 0.5, 0.5, valid_cold=float("nan"))) == pytest.approx(0.70)
    # study.select_on: valid alone ignores valid_cold; test splits cannot be chosen on
    assert S.selection_score(_m(0.70, 0.10, 0.10, valid_cold=0.60), ("valid",)) == pytest.approx(0.70)
    assert S.selection_score(_m(0.70, 0.10, 0.10, valid_cold=0.60), ("valid_cold",)) == pytest.approx(0.60)
    with pytest.raises(ValueError, match="not validation splits"):
        S.selection_score(_m(0.70, 0.10, 0.10), ("test",))
    assert S.choose({"combined": 0.70, "search_0": 0.71, "search_1": float("nan")}) == "search_0"
    assert S.choose({"combined": 0.70, "search_0": 0.70}) == "combined"  # ties keep the earliest


def test_candidates_dedupe_and_bad_overrides_are_config_errors(tmp_path):
    cfg = tiny_config(str(tmp_path), nproc=1, study={"search": [[], ["distill.logit.kd_ratio=0.8"], ["distill.logit.kd_ratio=0.8"]]})
    c = S.candidates(cfg)
    assert list(c) == ["combined", "search_1"]  # [] and the repeat equal earlier candidates
    assert c["search_1"][0].distill.logit.kd_ratio == 0.8
    with pytest.raises(ConfigError, match=r"study.search\[0\].*distill.logit.kd_ratoi"):
        replace(cfg, ["study.search=[[distill.logit.kd_ratoi=0.8]]"])
    with pytest.raises(ConfigError, match=r"study.search\[0\].*distill.KEY=VALUE"):
        replace(cfg, ["study.search=[[train.epochs=9]]"])


def test_seeds_vary_the_data_split_and_the_training_seed(tmp_path):
    cfg = tiny_config(str(tmp_path), nproc=1)
    c = S.seed_config(cfg, 2)
    assert c.train.seed == 2 and c.data.seed == 2 and c.output_dir.endswith("seed_2")


def _per_seed(teacher, base, chosen):
    return {s: {"teacher_ranker": _m(0.7, teacher[k][0], teacher[k][1]), "baseline": _m(0.7, base[k][0], base[k][1]),
                "chosen": _m(0.7, chosen[k][0], chosen[k][1])} for k, s in enumerate((0, 1))}


def test_targets():
    # teacher +0.02 over the baseline: the student needs +0.01 (half of it, more than 0.005)
    t = R.targets(_per_seed([(0.72, 0.6), (0.72, 0.6)], [(0.70, 0.6), (0.70, 0.6)], [(0.711, 0.64), (0.709, 0.62)]))
    assert t["test"]["needed"] == pytest.approx(0.71) and t["test"]["met"]
    assert t["test_cold"]["met"] and t["no_seed_below_baseline"]["met"]
    assert t["teacher"]["gain"] == pytest.approx(0.02) and t["teacher"]["met"] and t["teacher"]["above_every_seed"]
    # teacher barely better: 0.005 is the bar; one seed below its baseline
    t = R.targets(_per_seed([(0.701, 0.6), (0.701, 0.6)], [(0.70, 0.6), (0.70, 0.6)], [(0.708, 0.62), (0.699, 0.62)]))
    assert t["test"]["needed"] == pytest.approx(0.705) and not t["test"]["met"]
    assert not t["test_cold"]["met"] and t["no_seed_below_baseline"]["seeds_below"] == [1]
    assert not t["teacher"]["met"] and t["teacher"]["above_every_seed"]
    t = R.targets(_per_seed([(0.72, 0.6), (0.70, 0.6)], [(0.70, 0.6), (0.70, 0.6)], [(0.70, 0.6), (0.70, 0.6)]))
    assert t["teacher"]["met"] and t["teacher"]["seeds_not_above"] == [1]  # equal is not above


def test_summarize_reports_per_seed_choice_and_targets(tmp_path):
    cfg = tiny_config(str(tmp_path / "study"), nproc=1, study={"seeds": [0, 1]})
    for s in (0, 1):
        d = S.seed_dir(cfg, s)
        d.mkdir(parents=True)
        m = {"teacher_ranker": _m(0.72, 0.73, 0.65, 0.64), "baseline": _m(0.70, 0.70, 0.60, 0.61),
             "combined": _m(0.71, 0.72, 0.64, 0.66), "search_0": _m(0.72 - s * 0.02, 0.70, 0.63, 0.66)}
        chosen = "search_0" if s == 0 else "combined"
        m["chosen"] = m[chosen]
        m["search"] = {"chosen": chosen, "scores": {"combined": 0.685, "search_0": 0.69 - s * 0.01},
                       "overrides": {"combined": [], "search_0": ["distill.logit.kd_ratio=0.8"]}, "select_on": ["valid", "valid_cold"]}
        (d / "study_metrics.json").write_text(json.dumps(m))
    summary = R.summarize(cfg, tmp_path / "docs")
    assert summary["chosen"]["test"]["per_seed"] == [0.70, 0.72]
    md = (tmp_path / "docs" / "distill_study_tiny.md").read_text()
    assert "| 0    | search_0" in md and "| 1    | combined" in md
    assert "distill.logit.kd_ratio=0.8" in md and md.count("valid_cold AUC (mean") == 1
    doc = json.loads((tmp_path / "docs" / "distill_study_tiny.json").read_text())
    assert doc["search"]["0"]["chosen"] == "search_0"
    # teacher +0.03: the student needs +0.015, has +0.01 -> not met; cold +0.035 -> met
    assert not doc["targets"]["test"]["met"] and doc["targets"]["test_cold"]["met"]
    assert doc["targets"]["no_seed_below_baseline"]["met"]
    assert not any(math.isnan(v["test"]["mean"]) for v in summary.values())


def test_data_facts_see_cold_items_as_untrained():
    from helpers import tiny_dataset

    facts = S.data_facts(tiny_dataset(tiny_config("unused")))
    assert facts["test_cold"]["rows_with_trained_item"] == 0.0
    assert facts["test"]["rows_with_trained_item"] > 0.5
    assert 0.0 <= facts["valid"]["rows_with_trained_user"] <= 1.0


def test_select_on_is_validated(tmp_path):
    cfg = tiny_config(str(tmp_path))
    assert replace(cfg, ["study.select_on=[valid]"]).study.select_on == ("valid",)
    with pytest.raises(ConfigError, match="study.select_on"):
        replace(cfg, ["study.select_on=[test]"])
    with pytest.raises(ConfigError, match="study.select_on"):
        replace(cfg, ["study.select_on=[]"])


def test_choose_among_variants_lets_a_single_method_win_on_validation(tmp_path):
    cfg = replace(tiny_config(str(tmp_path)), ["study.variants=[baseline,logit,transfer,combined]",
                                               "study.select_on=[valid]"])
    metrics = {"combined": _m(0.70, 0.9, 0.9), "search_0": _m(0.71, 0.1, 0.1), "logit": _m(0.72, 0.5, 0.5),
               "transfer": _m(0.71, 0.5, 0.5), "baseline": _m(0.99, 0.99, 0.99)}
    cands = {"combined": [], "search_0": ["distill.pairs.enabled=true"]}
    scores, _ = S.choice_scores(cfg, metrics, cands)
    assert S.choose(scores) == "search_0" and "logit" not in scores  # off by default
    on = replace(cfg, ["study.choose_among_variants=true"])
    scores, overrides = S.choice_scores(on, metrics, cands)
    assert S.choose(scores) == "logit" and "baseline" not in scores  # never the baseline
    assert overrides["logit"] == ["(study variant: logit alone)"]
    metrics["logit"] = _m(0.71, 0.5, 0.5)  # a tie with search_0: the earlier candidate keeps it
    assert S.choose(S.choice_scores(on, metrics, cands)[0]) == "search_0"


def test_summary_reports_the_baselines_search_cost_and_transferability(tmp_path):
    cfg = tiny_config(str(tmp_path / "study"), nproc=1, study={"seeds": [0, 1]})
    cost = {"teacher_ranker": {"params": 1000, "table_params": 400, "dense_params": 600, "macs_per_example": 900,
                               "embedding_dim": 32, "train_examples_per_s": 1234.0},
            "student": {"params": 100, "table_params": 80, "dense_params": 20, "macs_per_example": 30, "embedding_dim": 8}}
    for s in (0, 1):
        d = S.seed_dir(cfg, s)
        d.mkdir(parents=True)
        tuned = _m(0.71, 0.71, 0.60, 0.61)
        m = {"teacher_ranker": _m(0.74, 0.75, 0.65, 0.64), "baseline": tuned, "baseline_default": _m(0.70, 0.70, 0.6, 0.6),
             "baseline_search_0": tuned, "combined": _m(0.73, 0.73, 0.64, 0.66)}
        m["chosen"] = m["combined"]
        m["search"] = {"chosen": "combined", "scores": {"combined": 0.73}, "overrides": {"combined": []}, "select_on": ["valid"]}
        m["baseline_search"] = {"chosen": "baseline_search_0", "scores": {"baseline_default": 0.70, "baseline_search_0": 0.71},
                                "overrides": {"baseline_default": [], "baseline_search_0": ["train.dense_lr=0.01"]}}
        m["teacher_search"] = {"chosen": "teacher_ranker_search_0",
                               "scores": {"teacher_ranker": 0.73, "teacher_ranker_search_0": 0.7400},
                               "overrides": {"teacher_ranker": [], "teacher_ranker_search_0": ["train.embedding_l2=0.0003"]}}
        m["cost"] = cost
        m["teacher_members"] = [_m(0.72, 0.72 + 0.02 * s, 0.6, 0.6), _m(0.72, 0.73, 0.6, 0.6)]  # an ensemble of 2
        (d / "study_metrics.json").write_text(json.dumps(m))
    R.summarize(cfg, tmp_path / "docs")
    md = (tmp_path / "docs" / "distill_study_tiny.md").read_text()
    # the members alone, beside their ensemble; not a variant of the quality table
    assert "members (2 per seed), each alone: test AUC mean 0.7300 (min 0.7200, max 0.7400)" in md, md
    assert "| teacher_members" not in md
    assert "train.dense_lr=0.01" in md and "0.7100 *" in md  # the tuned baseline, marked
    assert "The teacher ranker's own search" in md and "train.embedding_l2=0.0003" in md and "0.7400 *" in md
    assert "10.0x the student in parameters and 30.0x in multiply-adds" in md
    assert "| teacher ranker          | 32 | 1,000  | 400          | 600          | 0.00    | 900            | 1,234" in md
    assert md.rstrip().count("n/a") >= 1  # the student's speed was not recorded here
    doc = json.loads((tmp_path / "docs" / "distill_study_tiny.json").read_text())
    # teacher +0.04 over the tuned baseline, chosen +0.02: half of the teacher's gain carried over
    assert doc["transferability"]["value"] == pytest.approx(0.5)
    assert doc["summary"]["baseline"]["test"]["mean"] == pytest.approx(0.71)  # the tuned one, not the default


def test_transferability_is_undefined_without_a_teacher_gain():
    s = {"baseline": {"test": {"mean": 0.70}}, "teacher_ranker": {"test": {"mean": 0.69}}, "chosen": {"test": {"mean": 0.71}}}
    t = R.transferability(s)
    assert t["value"] is None and "not above the baseline" in t["text"]


def test_transferability_is_undefined_when_the_teacher_is_not_above_on_every_seed():
    """A mean teacher gain of +0.0011 made of one seed above and two below once gave "258%"."""
    s = {"baseline": {"test": {"mean": 0.8516, "per_seed": [0.8459, 0.8553, 0.8536]}},
         "teacher_ranker": {"test": {"mean": 0.8527, "per_seed": [0.8497, 0.8549, 0.8535]}},
         "chosen": {"test": {"mean": 0.8544}}}
    t = R.transferability(s)
    assert t["value"] is None and "on every seed" in t["text"] and "-0.0004" in t["text"]
    s["teacher_ranker"]["test"]["per_seed"] = [0.8497, 0.8563, 0.8546]  # above on every seed: defined
    s["teacher_ranker"]["test"]["mean"] = 0.8535
    assert R.transferability(s)["value"] == pytest.approx((0.8544 - 0.8516) / (0.8535 - 0.8516))


def test_baseline_search_takes_training_settings_only():
    cfg = tiny_config("unused", nproc=1, study={"baseline_search": [["train.dense_lr=0.01", "train.weight_decay=0.001"]]})
    assert cfg.study.baseline_search == (("train.dense_lr=0.01", "train.weight_decay=0.001"),)
    with pytest.raises(ConfigError, match=r"study\.baseline_search\[0\].*train\.KEY=VALUE"):
        tiny_config("unused", nproc=1, study={"baseline_search": [["distill.logit.enabled=true"]]})
    with pytest.raises(ConfigError, match=r"study\.baseline_search\[0\].*train\.weight_decay: must be >= 0"):
        tiny_config("unused", nproc=1, study={"baseline_search": [["train.weight_decay=-1"]]})


def test_report_only_rewrites_the_report_from_the_seeds_results(tmp_path):
    """`sparse-kd study distill CONFIG --report-only` trains nothing and writes the same report."""
    import yaml

    from sparse_kd.cli import main
    from sparse_kd.config import to_dict

    cfg = tiny_config(str(tmp_path / "study"), nproc=1, study={"seeds": [0]})
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(to_dict(cfg)))
    assert main(["study", "distill", str(path), "--report-only", "--docs", str(tmp_path / "docs")]) != 0  # no seed ran
    d = S.seed_dir(cfg, 0)
    d.mkdir(parents=True)
    m = {"teacher_ranker": _m(0.72, 0.73, 0.65, 0.64), "baseline": _m(0.70, 0.70, 0.60, 0.61),
         "combined": _m(0.71, 0.72, 0.64, 0.66)}
    m["chosen"] = m["combined"]
    (d / "study_metrics.json").write_text(json.dumps(m))
    assert main(["study", "distill", str(path), "--report-only", "--docs", str(tmp_path / "docs")]) == 0
    md = (tmp_path / "docs" / "distill_study_tiny.md").read_text()
    assert "| chosen" in md
    assert "(this page: `--report-only`, from each seed's `study_metrics.json`)" in md  # says what made it


def test_baseline_candidates_train_as_baselines(tmp_path, monkeypatch, one_process):
    """A study.baseline_search candidate is the baseline with other training settings: no
    distillation, whatever the config's distill section enables (it once trained as `combined`)."""
    import torch

    from sparse_kd import pipeline as P
    from sparse_kd.student.spec import RankerResult

    cfg = tiny_config(str(tmp_path / "study"), nproc=1,
                      distill={"logit": {"enabled": True}, "transfer": {"enabled": True}},
                      study={"seeds": [0], "variants": ["baseline", "combined"], "mf_reference": False,
                             "baseline_search": [["train.embedding_l2=0.001"]]})
    cand = S.baseline_candidate(cfg, ["train.embedding_l2=0.001"])
    assert not cand.distill.any_enabled and cand.train.embedding_l2 == 0.001
    specs = {}

    def fake_train(vcfg, ds, spec, env, seed, want_train_logits=False):
        specs[spec.name] = (spec, vcfg)
        n = len(ds.splits["train"])
        return RankerResult(spec.name, {"valid": {"auc": 0.7}, "valid_cold": {"auc": 0.6}}, None,
                            torch.zeros(n) if want_train_logits else None, 1.0)

    monkeypatch.setattr(P, "train_variant", fake_train)
    monkeypatch.setattr(P, "text_embeddings", lambda c, ds, env, **kw: (torch.randn(ds.num_users, 8), torch.randn(ds.num_items, 8)))
    S.run_seed(cfg, 0)
    base, bcfg = specs["baseline_search_0"]
    assert bcfg.train.embedding_l2 == 0.001 and not bcfg.distill.any_enabled
    assert base.teacher_logits is None and not base.init_rows and base.refit is None
    assert specs["combined"][0].teacher_logits is not None  # the students still distill


def test_teacher_search_trains_each_candidate_and_students_learn_from_the_valid_choice(tmp_path, monkeypatch, one_process):
    """study.teacher_search: the teacher ranker as configured and each candidate are trained (a
    fresh spec each, its own folder and fingerprint); the one best on valid is the teacher the
    students distill from, and the teacher_ranker row of the study."""
    import torch

    from sparse_kd import pipeline as P
    from sparse_kd.student.spec import RankerResult

    cfg = tiny_config(str(tmp_path / "study"), nproc=1, distill={"logit": {"enabled": True}},
                      study={"seeds": [0], "variants": ["baseline", "combined"], "mf_reference": False,
                             "select_on": ["valid"],
                             "teacher_search": [["train.embedding_l2=0.001"], ["distill.teacher_ranker.text_dim=-1"]]})
    valid = {P.TEACHER: 0.70, f"{P.TEACHER}_search_0": 0.75, f"{P.TEACHER}_search_1": 0.72}
    specs, logits = {}, {}

    def fake_train(vcfg, ds, spec, env, seed, want_train_logits=False):
        specs[spec.name] = (spec, vcfg)
        n = len(ds.splits["train"])
        logits[spec.name] = torch.full((n,), float(len(logits))) if want_train_logits else None
        return RankerResult(spec.name, {"valid": {"auc": valid.get(spec.name, 0.6)}, "test": {"auc": 0.5}}, None,
                            logits[spec.name], 1.0)

    monkeypatch.setattr(P, "train_variant", fake_train)
    monkeypatch.setattr(P, "text_embeddings", lambda c, ds, env, **kw: (torch.randn(ds.num_users, 8), torch.randn(ds.num_items, 8)))
    out = S.run_seed(cfg, 0)
    assert specs[f"{P.TEACHER}_search_0"][1].train.embedding_l2 == 0.001
    assert specs[f"{P.TEACHER}_search_1"][1].distill.teacher_ranker.text_dim == -1
    # three distinct specs: a candidate's modules are never the ones another teacher trained
    assert len({id(specs[n][0]) for n in valid}) == 3
    assert out["teacher_search"]["chosen"] == f"{P.TEACHER}_search_0"
    assert out[P.TEACHER]["valid"]["auc"] == 0.75 and out["teacher_default"]["valid"]["auc"] == 0.70
    assert torch.equal(specs["combined"][0].teacher_logits, logits[f"{P.TEACHER}_search_0"])
    # every candidate folder is fingerprinted with the teacher's settings, its overrides included
    fp0 = P.variant_fingerprint(specs[f"{P.TEACHER}_search_1"][1], f"{P.TEACHER}_search_1", cfg.distill, 0)
    assert fp0["teacher_ranker"]["text_dim"] == -1


def test_teacher_search_takes_training_and_teacher_ranker_settings_only():
    cfg = tiny_config("unused", nproc=1, study={"teacher_search": [["train.dense_lr=0.01", "distill.teacher_ranker.dcn_layers=2"]]})
    assert cfg.study.teacher_search == (("train.dense_lr=0.01", "distill.teacher_ranker.dcn_layers=2"),)
    with pytest.raises(ConfigError, match=r"study\.teacher_search\[0\].*distill\.teacher_ranker\.KEY=VALUE"):
        tiny_config("unused", nproc=1, study={"teacher_search": [["distill.logit.enabled=true"]]})
    with pytest.raises(ConfigError, match=r"study\.teacher_search\[0\].*train\.seed"):
        tiny_config("unused", nproc=1, study={"teacher_search": [["train.seed=3"]]})
