"""The budget planner: exact choice, budget respected by the real model, clear infeasibility error."""

from __future__ import annotations

import itertools
import random

import pytest

from sparse_kd.compress.importance import table_importance
from sparse_kd.compress.planner import MB, BudgetError, Option, choose, plan_budget
from sparse_kd.compress.stage import compress_model, model_weights


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


def test_plan_fits_budget_and_real_model_agrees(tiny):
    ds, text, model, builder = tiny
    imps = table_importance("frequency", model_weights(model), ds, text)
    fills = {f: "zero" for f in imps}
    full = compress_model(model, ds, {f: {"keep_ratio": 1.0, "dtype": "fp32", "fill": "zero"} for f in imps})
    budgets = [full.embedding_bytes * 0.6 / MB, full.embedding_bytes * 0.4 / MB]
    sizes = []
    for b in budgets:
        plan = plan_budget(model, ds, builder, imps, fills, b, "array", text, keep_ratios=(1.0, 0.5, 0.25),
                           dtypes=("fp32", "fp16", "int8", "int4"))
        assert plan.bytes <= b * MB
        settings = {f: {"keep_ratio": o.keep_ratio, "dtype": o.dtype, "fill": "zero"} for f, o in plan.choices.items()}
        comp = compress_model(model, ds, settings, importances=imps)
        assert comp.embedding_bytes == plan.bytes <= b * MB  # the real FBGEMM buffers, not a formula
        assert "budget" in plan.table() and set(plan.choices) == set(imps)
        sizes.append(plan.bytes)
    assert sizes[1] < sizes[0]


def test_infeasible_budget_names_the_key_and_the_smallest_size(tiny):
    ds, text, model, builder = tiny
    imps = table_importance("frequency", model_weights(model), ds, text)
    fills = {f: "zero" for f in imps}
    with pytest.raises(BudgetError, match=r"compress\.budget_mb=1e-05.*smallest feasible.*MB") as e:
        plan_budget(model, ds, builder, imps, fills, 1e-5, "array", text)
    smallest = float(str(e.value).split("storage is ")[1].split(" MB")[0])
    plan = plan_budget(model, ds, builder, imps, fills, smallest, "array", text)  # exactly the minimum fits
    assert plan.bytes == round(smallest * MB)
