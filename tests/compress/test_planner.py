"""The budget planner: exact choice, budget respected by the real model, clear infeasibility error,
cluster fills and folded remaps among the options, valid_cold in the objective and never test."""

from __future__ import annotations

import dataclasses
import itertools
import random

import numpy as np
import pytest

from sparse_kd.compress.importance import table_importance
from sparse_kd.compress.planner import MB, BudgetError, Option, choose, plan_budget, sensitivity
from sparse_kd.compress.prune import table_settings
from sparse_kd.compress.stage import compress_model, model_weights, serving_builder, serving_dataset
from sparse_kd.config import CompressConfig
from sparse_kd.metrics import evaluate, fp32_forward, serving_forward


def _settings(imps) -> dict:
    return table_settings(CompressConfig(), list(imps))


class _NoTest(dict):
    """Splits that refuse to hand out test and test_cold (the planner must never read them)."""

    def __getitem__(self, k):
        if k in ("test", "test_cold"):
            raise AssertionError(f"the planner read {k}")
        return super().__getitem__(k)


def _with_valid_cold(ds):
    """The tiny dataset with half of its cold items' interactions moved to valid_cold."""
    tc = ds.splits["test_cold"]
    items = np.unique(tc.item)
    vc = np.isin(tc.item, items[::2])
    splits = {**ds.splits, "valid_cold": tc.subset(np.flatnonzero(vc)), "test_cold": tc.subset(np.flatnonzero(~vc))}
    return dataclasses.replace(ds, splits=splits)


def test_choose_is_exact_against_brute_force():
    rnd = random.Random(0)
    options = {
        f: [Option(f, 1.0, str(k), 0, rnd.randint(10, 100), loss=rnd.random() * 0.05) for k in range(4)]
        for f in ("a", "b", "c")
    }
    for budget in (40, 90, 150, 300):
        combos = [c for c in itertools.product(*options.values()) if sum(o.bytes for o in c) <= budget]
        if not combos:
            with pytest.raises(BudgetError):
                choose(options, budget)
            continue
        best = min(sum(o.loss for o in c) for c in combos)
        got = choose(options, budget)
        assert sum(o.bytes for o in got.values()) <= budget
        assert sum(o.loss for o in got.values()) == pytest.approx(best)


def test_prefer_larger_among_equal_losses_is_exact_too():
    rnd = random.Random(1)
    options = {f: [Option(f, 1.0, str(k), 0, rnd.randint(10, 100), loss=rnd.choice([0.0, 0.0, 0.01, 0.02])) for k in range(4)]
               for f in ("a", "b", "c")}
    for budget in (60, 120, 200, 300):
        combos = [c for c in itertools.product(*options.values()) if sum(o.bytes for o in c) <= budget]
        if not combos:
            continue
        least = min(sum(o.loss for o in c) for c in combos)
        largest = max(sum(o.bytes for o in c) for c in combos if sum(o.loss for o in c) <= least + 1e-12)
        smallest = min(sum(o.bytes for o in c) for c in combos if sum(o.loss for o in c) <= least + 1e-12)
        big, small = choose(options, budget, prefer_larger=True), choose(options, budget)
        assert sum(o.loss for o in big.values()) == pytest.approx(least) == sum(o.loss for o in small.values())
        assert (sum(o.bytes for o in big.values()), sum(o.bytes for o in small.values())) == (largest, smallest)


def test_gains_count_as_zero_and_the_plan_uses_its_budget():
    from sparse_kd.compress.planner import Sensitivity

    # table t: a small option that measured better than fp32 (noise) and a large one that cost nothing
    small = Option("t", 0.1, "int2", 10, 100, measured_loss=-0.004, loss=0.0)
    large = Option("t", 1.0, "int8", 50, 400, measured_loss=0.0, loss=0.0)
    worse = Option("t", 1.0, "int4", 50, 200, measured_loss=0.001, loss=0.001)
    sens = Sensitivity({"t": [small, large, worse]}, {id(o): {"array": o.bytes} for o in (small, large, worse)},
                       0.7, float("nan"), 0.0, 0.0)
    assert sens.plan(500 / MB).choices["t"].dtype == "int8"  # both free: the one that uses the budget
    assert sens.plan(300 / MB).choices["t"].dtype == "int2"  # int8 does not fit; int4 costs more than int2
    assert "measured loss" in sens.plan(500 / MB).table()


def test_plan_fits_budget_and_real_model_agrees(tiny):
    ds, text, model, builder = tiny
    imps = table_importance("frequency", model_weights(model), ds, text)
    full = compress_model(model, ds, {f: {"keep_ratio": 1.0, "dtype": "fp32", "fill": "zero"} for f in imps})
    budgets = [full.embedding_bytes * 0.5 / MB, full.embedding_bytes * 0.2 / MB]
    sizes = []
    sens = sensitivity(model, ds, builder, imps, _settings(imps), ("array", "fold"), text, keep_ratios=(1.0, 0.5, 0.25),
                       dtypes=("fp32", "int8", "int4"), cluster_ratios=(0.1,))
    for b in budgets:
        for remap in ("array", "fold"):
            plan = sens.plan(b, remap)
            assert plan.bytes <= b * MB
            comp = compress_model(model, ds, plan.settings(), importances=imps, remap=remap, text=text)
            assert comp.embedding_bytes == plan.bytes <= b * MB  # the real kernel buffers, not a formula
            assert "budget" in plan.table() and set(plan.choices) == set(imps)
            if remap == "array":
                sizes.append(plan.bytes)
    assert sizes[1] < sizes[0]


def test_infeasible_budget_names_the_key_and_the_smallest_size(tiny):
    ds, text, model, builder = tiny
    imps = table_importance("frequency", model_weights(model), ds, text)
    small = dict(keep_ratios=(1.0, 0.5), dtypes=("int8", "int2"), cluster_ratios=(0.1,))
    with pytest.raises(BudgetError, match=r"compress\.budget_mb=1e-05.*smallest feasible.*MB") as e:
        plan_budget(model, ds, builder, imps, _settings(imps), 1e-5, "array", text, **small)
    smallest = float(str(e.value).split("storage is ")[1].split(" MB")[0])
    plan = plan_budget(model, ds, builder, imps, _settings(imps), smallest, "array", text, **small)  # the minimum fits
    assert plan.bytes == round(smallest * MB)


def test_options_span_cluster_fills_and_fold_saves_exactly_the_remap(tiny):
    ds, text, model, builder = tiny
    imps = table_importance("frequency", model_weights(model), ds, text)
    sens = sensitivity(model, ds, builder, imps, _settings(imps), ("array", "fold"), text, keep_ratios=(1.0, 0.5),
                       dtypes=("int8",), fills=("zero", "cluster"), cluster_ratios=(0.1, 0.2))
    plans = {remap: sens.plan(1.0, remap) for remap in ("array", "fold")}
    # the loss of an option does not depend on the remap: one plan_budget call agrees with the shared sensitivity
    one = plan_budget(model, ds, builder, imps, _settings(imps), 1.0, "fold", text, keep_ratios=(1.0, 0.5),
                      dtypes=("int8",), fills=("zero", "cluster"), cluster_ratios=(0.1, 0.2))
    assert [(o.feature, o.keep_ratio, o.fill, o.clusters, o.bytes, o.loss) for o in one.options] == \
        [(o.feature, o.keep_ratio, o.fill, o.clusters, o.bytes, o.loss) for o in plans["fold"].options]
    opts = {remap: {(o.feature, o.keep_ratio, o.fill, o.clusters): o for o in p.options} for remap, p in plans.items()}
    n = ds.num_items
    got = {(k[2], k[3]) for k in opts["array"] if k[0] == "item_id" and k[1] == 0.5}
    configured = CompressConfig().default_cluster_ratio  # the config's ratio is a candidate too
    assert got == {("zero", 0)} | {("cluster", int(np.ceil(r * n))) for r in (0.1, 0.2, configured)}
    for key, o in opts["array"].items():
        f = opts["fold"][key]
        # same lookups either way; an int8 table's array remap costs 4 bytes per original id when
        # pruned, plus the one all-zero row (D codes + fp32 scale and bias) its -1 ids read
        assert (o.valid_auc, o.loss) == (f.valid_auc, f.loss)
        n_ids, dim = model_weights(model)[key[0]].shape
        zero_row = dim + 8 if key[2] == "zero" else 0
        assert o.bytes - f.bytes == (4 * n_ids + zero_row if key[1] < 1.0 else 0), key


def test_loss_is_valid_plus_weighted_valid_cold_and_test_is_never_read(tiny):
    ds, text, model, builder = tiny
    ds = _with_valid_cold(ds)
    imps = table_importance("frequency", model_weights(model), ds, text)
    guarded = dataclasses.replace(ds, splits=_NoTest(ds.splits))
    w = 0.7
    plan = plan_budget(model, guarded, builder, imps, _settings(imps), 1.0, "fold", text, keep_ratios=(1.0, 0.3),
                       dtypes=("int4",), fills=("zero", "cluster"), cluster_ratios=(0.1,), cold_weight=w)
    base = evaluate(fp32_forward(model), ds, builder, splits=("valid", "valid_cold"))
    assert plan.base_valid_auc == pytest.approx(base["valid"]["auc"]) and plan.cold_weight == w
    assert plan.base_valid_cold_auc == pytest.approx(base["valid_cold"]["auc"])
    checked = 0
    for o in plan.options:
        if o.feature != "item_id" or o.keep_ratio == 1.0:
            continue
        # the same option built for real (others fp32), served from its folded bags
        settings = {f: {"keep_ratio": 1.0, "dtype": "fp32", "fill": "zero"} for f in imps}
        settings[o.feature] = {"keep_ratio": o.keep_ratio, "dtype": o.dtype, "fill": o.fill, "cluster_ratio": o.cluster_ratio or 0.1}
        comp = compress_model(model, ds, settings, importances=imps, remap="fold", text=text)
        m = evaluate(serving_forward(comp.serving), serving_dataset(ds, comp), serving_builder(ds, comp, builder),
                     splits=("valid", "valid_cold"))
        assert o.valid_auc == pytest.approx(m["valid"]["auc"], abs=1e-6)
        assert o.valid_cold_auc == pytest.approx(m["valid_cold"]["auc"], abs=1e-6)
        expect = (base["valid"]["auc"] - m["valid"]["auc"]) + w * (base["valid_cold"]["auc"] - m["valid_cold"]["auc"])
        assert o.measured_loss == pytest.approx(expect, abs=1e-6)
        assert o.loss_se > 0 and o.loss == pytest.approx(max(expect + o.loss_se, 0.0), abs=1e-6)  # z = 1 by default
        checked += 1
    assert checked == 3  # zero, and cluster at 0.1 and at the configured ratio
    # a dataset without valid_cold interactions: valid alone
    plain = plan_budget(model, ds_without_cold(ds), builder, imps, _settings(imps), 1.0, "array", text,
                        keep_ratios=(1.0,), dtypes=("int4",), cold_weight=w)
    assert plain.cold_weight == 0.0
    assert all(o.measured_loss == pytest.approx(plain.base_valid_auc - o.valid_auc) for o in plain.options)


def ds_without_cold(ds):
    from sparse_kd.data.schema import Interactions

    return dataclasses.replace(ds, splits={**ds.splits, "valid_cold": Interactions.empty()})


def test_max_examples_measures_a_fixed_seeded_subset(tiny):
    from sparse_kd.compress.planner import _subsampled

    ds, text, model, builder = tiny
    ds = _with_valid_cold(ds)
    cut = _subsampled(ds, ["valid", "valid_cold"], 40)
    assert len(cut.splits["valid"]) == 40 and len(cut.splits["valid_cold"]) == min(40, len(ds.splits["valid_cold"]))
    again = _subsampled(ds, ["valid", "valid_cold"], 40)
    assert np.array_equal(cut.splits["valid"].user, again.splits["valid"].user)
    assert cut.splits["test"] is ds.splits["test"] and _subsampled(ds, ["valid"], 0) is ds
    imps = table_importance("frequency", model_weights(model), ds, text)
    sens = sensitivity(model, ds, builder, imps, _settings(imps), ("array",), text, keep_ratios=(1.0,), dtypes=("int8",),
                       max_examples=40)
    want = evaluate(fp32_forward(model), cut, builder, splits=("valid", "valid_cold"))
    assert sens.base_valid_auc == pytest.approx(want["valid"]["auc"]) and \
        sens.base_valid_cold_auc == pytest.approx(want["valid_cold"]["auc"])


def test_noise_margin_grows_with_what_an_option_changes(tiny):
    """The bootstrap error of an option's loss is 0 for the fp32 table itself and larger for int2
    than for int8 (more predictions move), so within noise the planner keeps more bits; with
    confidence 0 the loss is the measured one."""
    ds, text, model, builder = tiny
    imps = table_importance("frequency", model_weights(model), ds, text)
    sens = sensitivity(model, ds, builder, imps, _settings(imps), ("array",), text, keep_ratios=(1.0,),
                       dtypes=("fp32", "int8", "int2"), bootstrap=40)
    by = {o.dtype: o for o in sens.options["item_id"]}
    assert by["fp32"].loss_se == 0.0 and by["fp32"].measured_loss == 0.0
    assert 0 < by["int8"].loss_se < by["int2"].loss_se
    for o in by.values():
        assert o.loss == pytest.approx(max(o.measured_loss + o.loss_se, 0.0))
    plain = sensitivity(model, ds, builder, imps, _settings(imps), ("array",), text, keep_ratios=(1.0,),
                        dtypes=("int2",), confidence=0.0)
    o = plain.options["item_id"][0]
    assert o.loss_se == 0.0 and o.loss == pytest.approx(max(o.measured_loss, 0.0))
