"""The outside reference of the distillation study: plain MF with biases (issue 21, item 3)."""

import json
import math

import numpy as np
import pytest

from helpers import tiny_config
from sparse_kd.config import ConfigError, replace
from sparse_kd.data.interactions import TRAIN, VALID_COLD, TEST_COLD, Interactions
from sparse_kd.data.negatives import NegativeSampler
from sparse_kd.data.schema import RecDataset
from sparse_kd.studies import distill_report as R
from sparse_kd.studies import distill_study as S
from sparse_kd import mf_reference as M


def _split(user, item, label) -> Interactions:
    return Interactions(np.asarray(user, dtype=np.int64), np.asarray(item, dtype=np.int64),
                        np.asarray(label, dtype=np.float32), np.zeros(len(user), dtype=np.int64))


def _latent(n_users=120, n_items=80, per_user=40, rank=3, seed=0, reverse_valid=False) -> RecDataset:
    """Labels from a rank-3 dot product (plus noise): MF can learn them. Items 70.. are cold
    (valid_cold / test_cold only). ``reverse_valid``: valid labels are the opposite of the signal,
    so valid AUC is best before the model has learnt anything (test is then a copy of valid)."""
    rng = np.random.default_rng(seed)
    pu, qi = rng.normal(size=(n_users, rank)), rng.normal(size=(n_items, rank))
    warm = n_items - 10
    user = np.repeat(np.arange(n_users), per_user)
    item = np.concatenate([rng.choice(warm, per_user, replace=False) for _ in range(n_users)])
    label = ((pu[user] * qi[item]).sum(1) + 0.3 * rng.normal(size=len(user)) > 0).astype(np.float32)
    part = rng.random(len(user))
    sp = {name: _split(user[m], item[m], label[m]) for name, m in
          (("train", part < 0.8), ("valid", (part >= 0.8) & (part < 0.9)), ("test", part >= 0.9))}
    if reverse_valid:
        v = sp["valid"]
        sp["valid"] = _split(v.user, v.item, 1 - v.label)
        sp["test"] = sp["valid"]
    cu = rng.integers(0, n_users, 200)
    ci = rng.integers(warm, n_items, 200)
    cl = ((pu[cu] * qi[ci]).sum(1) > 0).astype(np.float32)
    sp["valid_cold"], sp["test_cold"] = _split(cu[:100], ci[:100], cl[:100]), _split(cu[100:], ci[100:], cl[100:])
    return RecDataset([str(u) for u in range(n_users)], [str(i) for i in range(n_items)], [""] * n_users, [""] * n_items,
                      [], sp)


def test_mf_learns_a_synthetic_signal():
    ds = _latent()
    r = M.train_mf(ds, dim=8, lr=0.03, weight_decay=0.01, batch_size=256, max_epochs=30, patience=3, seed=0)
    assert r["test"]["auc"] > 0.75 and r["valid"]["auc"] > 0.75, (r["valid"], r["test"])
    # cold items keep their random rows and zero bias: no signal
    assert abs(r["test_cold"]["auc"] - 0.5) < 0.15
    assert set(M.EVAL_SPLITS) <= set(r) and r["test"]["n"] == len(ds.splits["test"])
    assert r["params"] == (120 + 80) * 9 + 1  # P, Q, both biases, the global bias
    assert r["settings"]["dim"] == 8 and 1 <= r["best_epoch"] <= r["epochs"] <= 30


def test_best_epoch_is_chosen_on_valid_and_its_weights_are_the_ones_evaluated():
    ds = _latent(reverse_valid=True)  # learning the train signal makes valid worse
    r = M.train_mf(ds, dim=8, lr=0.03, weight_decay=0.0, batch_size=256, max_epochs=30, patience=2, seed=0)
    hist = r["valid_auc"]
    assert r["best_epoch"] == 1 + int(np.argmax(hist)) and r["best_epoch"] <= 2
    assert r["epochs"] == r["best_epoch"] + 2 < 30 and r["stopped_early"]  # by patience, not by the cap
    assert r["valid"]["auc"] == pytest.approx(max(hist))
    assert r["test"]["auc"] == pytest.approx(r["valid"]["auc"])  # test is valid's copy: the best epoch's weights
    assert hist[-1] < max(hist) - 0.01


def test_deterministic_for_a_seed():
    ds = _latent()
    kw = dict(dim=8, lr=0.03, weight_decay=0.01, batch_size=256, max_epochs=5, patience=2)
    a, b, c = M.train_mf(ds, seed=3, **kw), M.train_mf(ds, seed=3, **kw), M.train_mf(ds, seed=4, **kw)
    assert a["valid_auc"] == b["valid_auc"] and a["test"] == b["test"] and a["train_loss"] == b["train_loss"]
    assert a["valid_auc"] != c["valid_auc"]


def test_grid_is_chosen_on_valid_only():
    ds = _latent()
    grid = {"lr": [0.0001, 0.03], "weight_decay": [0.0, 0.01]}
    r = M.tuned_mf(ds, dim=8, grid=grid, batch_size=256, max_epochs=10, patience=2, seed=0)
    assert len(r["grid"]) == 4
    best = max(r["grid"], key=lambda g: g["valid_auc"])
    assert (r["settings"]["lr"], r["settings"]["weight_decay"]) == (best["lr"], best["weight_decay"])
    assert r["valid"]["auc"] == pytest.approx(best["valid_auc"]) and r["settings"]["lr"] == 0.03


def test_per_epoch_negatives_are_the_rankers_examples():
    """Implicit feedback with per-epoch negatives: the train split holds positives only and MF sees
    each positive with k negatives drawn like the rankers' (the same multiset of examples)."""
    from sparse_kd.data.stream import Rows, train_source

    ds = _latent()
    pos = {n: sp.subset(np.flatnonzero(sp.label > 0)) for n, sp in ds.splits.items()}
    code = np.full(ds.num_items, TRAIN)
    code[70:75], code[75:] = VALID_COLD, TEST_COLD
    allp = list(pos.values())
    ds.sampler = NegativeSampler.build(code, ds.num_users, np.concatenate([p.user for p in allp]),
                                       np.concatenate([p.item for p in allp]), k=2)
    ds.splits["train"], ds.implicit, ds.negatives = pos["train"], True, 2
    user, item, label = M.train_rows(ds, 5, 1)
    cfg = tiny_config("unused", nproc=1)
    rows = Rows.concat(list(train_source(ds, replace(cfg, ["data.shuffle_block_rows=7"]).data).stream.windows(1, 5)))
    key = lambda u, i, y: sorted(zip(u.tolist(), i.tolist(), y.tolist()))  # noqa: E731
    assert key(user, item, label) == key(rows.user, rows.item, rows.label)
    assert len(user) > len(pos["train"]) and label.sum() == len(pos["train"])
    r = M.train_mf(ds, dim=8, lr=0.03, weight_decay=0.01, batch_size=256, max_epochs=10, patience=2, seed=0)
    assert r["valid"]["auc"] > 0.6


def test_config_key():
    cfg = tiny_config("unused")
    assert cfg.study.mf_reference is True
    assert replace(cfg, ["study.mf_reference=false"]).study.mf_reference is False
    with pytest.raises(ConfigError, match="study.mf_reference"):
        replace(cfg, ["study.mf_reference=3"])


def _m(valid, test, cold=0.6):
    return {sp: {"auc": a, "logloss": 0.5, "n": 10} for sp, a in
            (("valid", valid), ("test", test), ("valid_cold", cold), ("test_cold", cold))}


def _write_seeds(cfg, mf_test):
    for s, mt in zip((0, 1), mf_test):
        d = S.seed_dir(cfg, s)
        d.mkdir(parents=True)
        m = {"teacher_ranker": _m(0.72, 0.73), "baseline": _m(0.70, 0.70), "combined": _m(0.71, 0.72)}
        m["chosen"] = m["combined"]
        m["search"] = {"chosen": "combined", "scores": {"combined": 0.71}, "overrides": {"combined": []}, "select_on": ["valid"]}
        if mt is not None:
            m["mf_reference"] = mt if isinstance(mt, dict) else {
                **_m(0.69, mt, 0.5), "best_epoch": 4 + 3 * s, "epochs": 7, "stopped_early": s == 0, "params": 99,
                "settings": {"dim": 8, "lr": 0.01, "weight_decay": 0.03}, "grid": []}
        (d / "study_metrics.json").write_text(json.dumps(m))


def test_summary_has_the_reference_row_and_its_target(tmp_path):
    cfg = tiny_config(str(tmp_path / "study"), nproc=1, study={"seeds": [0, 1]})
    _write_seeds(cfg, [0.68, 0.71])  # seed 1: MF beats the baseline on test
    summary = R.summarize(cfg, tmp_path / "docs")
    assert summary["mf_reference"]["test"]["per_seed"] == [0.68, 0.71]
    md = (tmp_path / "docs" / "distill_study_tiny.md").read_text()
    assert "| mf_reference" in md and "lr 0.01, weight_decay 0.03, best epoch 4 of 7;" in md
    assert "best epoch 7 of 7 (epoch cap reached)" in md
    line = next(ln for ln in md.splitlines() if ln.startswith("- baseline ≥ MF reference"))
    assert "seed 1 valid 0.7000 vs 0.6900, test 0.7000 vs 0.7100" in line and "**not met**" in line
    doc = json.loads((tmp_path / "docs" / "distill_study_tiny.json").read_text())
    assert doc["mf_target"]["seeds_below"] == [1] and not doc["mf_target"]["met"]
    assert doc["mf_reference"]["0"]["best_epoch"] == 4
    assert not any(math.isnan(v["test"]["mean"]) for v in summary.values())


def test_summary_target_met_and_missing_or_failed_references(tmp_path):
    cfg = tiny_config(str(tmp_path / "a"), nproc=1, study={"seeds": [0, 1]})
    _write_seeds(cfg, [0.68, 0.70])  # a tie counts as at or above
    R.summarize(cfg, tmp_path / "docs_a")
    doc = json.loads((tmp_path / "docs_a" / "distill_study_tiny.json").read_text())
    assert doc["mf_target"]["met"]
    cfg = tiny_config(str(tmp_path / "b"), nproc=1, study={"seeds": [0, 1]})
    _write_seeds(cfg, [0.68, {"error": "RuntimeError: boom"}])  # one seed failed: no row, no target
    summary = R.summarize(cfg, tmp_path / "docs_b")
    md = (tmp_path / "docs_b" / "distill_study_tiny.md").read_text()
    assert "mf_reference" not in summary and "seed 1: failed (RuntimeError: boom)" in md
    assert "baseline ≥ MF reference" not in md and "valid_cold AUC" in md
    cfg = tiny_config(str(tmp_path / "c"), nproc=1, study={"seeds": [0, 1]})
    _write_seeds(cfg, [None, None])  # studies run before the reference existed
    summary = R.summarize(cfg, tmp_path / "docs_c")
    assert "mf_reference" not in summary
    assert "MF reference" not in (tmp_path / "docs_c" / "distill_study_tiny.md").read_text()


def _rank_worker(out_dir: str) -> dict:
    """What ``run_seed`` does with the reference: rank 0 trains it (here slower than the default
    group's 2 s collective timeout), the other rank waits on the long-wait group; then a
    collective on the default group must still work."""
    import time

    from helpers import tiny_dataset
    from sparse_kd.dist import barrier, init_distributed, on_main

    env = init_distributed("gloo", 2)
    cfg = tiny_config(out_dir, nproc=2)
    ds = tiny_dataset(cfg)
    r = on_main(lambda: (time.sleep(4), S.mf_reference(cfg, ds, 0))[1])
    barrier()
    return {"rank": env.rank, "test": r["test"]["auc"], "settings": r["settings"]}


def test_ranks_wait_for_rank0s_reference_past_the_collective_timeout(tmp_path):
    from sparse_kd.local_launch import launch_local

    res = launch_local(_rank_worker, 2, str(tmp_path))
    assert res[0]["test"] == res[1]["test"] and res[0]["settings"]["dim"] == 8
    assert res[0]["test"] > 0.55
