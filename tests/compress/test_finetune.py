"""compress.finetune: the compressed model trained to the student moves its predictions toward
the student's, the result is rebuilt with the same pruning, and the stage keeps it only when
validation says so."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sparse_kd.compress.finetune import finetune
from sparse_kd.compress.importance import table_importance
from sparse_kd.compress.prune import prune_tables
from sparse_kd.compress.stage import compress_model, compress_run, model_weights, serving_builder, serving_dataset
from sparse_kd.config import CompressConfig, FinetuneConfig
from sparse_kd.metrics import fp32_forward, predict_split, serving_forward, split_batches

SETTINGS = {
    "user_id": {"keep_ratio": 0.5, "dtype": "int2", "fill": "zero"},
    "item_id": {"keep_ratio": 1.0, "dtype": "int4:0.3,int2", "fill": "zero"},
    "age": {"keep_ratio": 1.0, "dtype": "int2", "fill": "zero"},
    "tags": {"keep_ratio": 1.0, "dtype": "int2", "fill": "zero"},
}


def _gap(comp, model, ds, builder, split="train"):
    """Mean squared difference of the compressed model's logits to the student's on a split."""
    sds = serving_dataset(ds, comp)
    got = predict_split(serving_forward(comp.serving), split_batches(sds, serving_builder(ds, comp, builder), split))
    want = predict_split(fp32_forward(model), split_batches(ds, builder, split))
    return float((got - want).pow(2).mean())


def test_finetune_moves_the_compressed_model_toward_the_student(tiny):
    ds, text, model, builder = tiny
    w0 = {f: w.clone() for f, w in model_weights(model).items()}
    imps = table_importance("frequency", model_weights(model), ds, text)
    pruned = prune_tables(model_weights(model), imps, {f: s["keep_ratio"] for f, s in SETTINGS.items()},
                          {f: s["fill"] for f, s in SETTINGS.items()}, text)
    plain = compress_model(model, ds, SETTINGS, importances=imps, text=text)
    res = finetune(model, ds, builder, pruned, {f: s["dtype"] for f, s in SETTINGS.items()},
                   {f: imps[f].freq for f in pruned}, epochs=6, batch_size=64, dense_lr=3e-3, row_lr=0.05, kd_weight=1.0)
    assert all(torch.equal(w0[f], w) for f, w in model_weights(model).items())  # the student is untouched
    assert len(res.history) == 6 and res.history[-1]["loss"] < res.history[0]["loss"]
    tuned = compress_model(res.model, ds, SETTINGS, importances=imps, text=text)
    # same pruning and bytes; the pruned ids' rows untouched
    assert tuned.embedding_bytes == plain.embedding_bytes
    for f in SETTINGS:
        assert tuned.tables[f"t_{f}"]["rows_kept"] == plain.tables[f"t_{f}"]["rows_kept"]
    tw = model_weights(res.model)["user_id"]
    dropped = (pruned["user_id"].remap < 0).nonzero().squeeze(1)
    assert torch.equal(tw[dropped], w0["user_id"][dropped])
    assert _gap(tuned, model, ds, builder) < _gap(plain, model, ds, builder)


def test_the_stage_records_the_finetune_and_keeps_it_only_if_valid_agrees(run_folder, tmp_path):
    run, ds, _ = run_folder
    cfg = CompressConfig(default_dtype="int2", keep_ratio={"user_id": 0.5},
                         finetune=FinetuneConfig(enabled=True, epochs=2, batch_size=64))
    rep = compress_run(run, "baseline", cfg, tmp_path / "art")
    ft = rep["finetune"]
    assert ft is not None and len(ft["history"]) == 2 and np.isfinite(ft["valid_score_after"])
    assert ft["kept"] == (ft["valid_score_after"] >= ft["valid_score_before"])
    chosen = ft["metrics_with"] if ft["kept"] else ft["metrics_without"]
    assert rep["metrics"]["after"]["test"]["auc"] == pytest.approx(chosen["test"]["auc"], abs=1e-12)


def test_finetune_config_is_checked():
    from sparse_kd.config import ConfigError, config_from_dict

    c = config_from_dict({"compress": {"finetune": {"enabled": True, "epochs": 2}}})
    assert c.compress.finetune.enabled and c.compress.finetune.epochs == 2
    for raw, key in [({"finetune": {"epochs": 0}}, "compress.finetune.epochs"),
                     ({"finetune": {"kd_weight": 2}}, "compress.finetune.kd_weight"),
                     ({"finetune": {"enabled": True}, "serve_device": "cuda"}, "compress.finetune.enabled")]:
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            config_from_dict({"compress": raw})


def test_study_shows_tiered_and_finetuned_points(run_folder, tmp_path):
    """The compression study's grid takes precision tiers as dtypes (their own plot series), and
    with compress.finetune each plan also appears distilled after compression (kind plan+ft),
    with the same bytes as its plan."""
    from sparse_kd.config import StudyConfig
    from sparse_kd.studies.compress_study import run_compress_study

    run, _, _ = run_folder
    study = StudyConfig(keep_ratios=(1.0,), dtypes=("fp32", "int4", "int4:0.3,int2"), compress_budgets=(6,),
                        compress_remaps=("fold",))
    base = CompressConfig(finetune=FinetuneConfig(enabled=True, epochs=1, batch_size=64), planner_bootstrap=5)
    rows = run_compress_study(run, ["distilled"], study, tmp_path, base=base)
    kinds = [(r["kind"], r["dtype"]) for r in rows]
    assert ("grid", "int4:0.3,int2") in kinds and ("plan", "plan") in kinds and ("plan+ft", "plan") in kinds
    plan = next(r for r in rows if r["kind"] == "plan")
    ft = next(r for r in rows if r["kind"] == "plan+ft")
    assert ft["embedding_bytes"] == plan["embedding_bytes"] and ft["test_auc"] != plan["test_auc"]
    md = (tmp_path / "compress_study.md").read_text()
    assert "plan+ft" in md and "+ finetune" in md
    assert (tmp_path / "compress_study.png").stat().st_size > 5000
