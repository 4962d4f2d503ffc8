"""The teacher ranker's target attention over a user's clicks (issue 21: user behaviour as a
sequence): which clicks each example sees, against brute force, and that it trains in the pipeline."""

import numpy as np
import pytest
import torch

from helpers.tiny import tiny_config, tiny_dataset
from sparse_kd import pipeline as P
from sparse_kd.data.batching import NO_TIME
from sparse_kd.data.schema import Interactions, RecDataset
from sparse_kd.data.split import id_feature
from sparse_kd.distill.attention import HistoryAttention, PairFeatures
from sparse_kd.distill.history import HistoryPairFeature

U, I = 5, 12


def _ds(timed: bool, seed: int = 0) -> RecDataset:
    rng = np.random.default_rng(seed)
    n = 60
    user, item = rng.integers(0, U - 1, n), rng.integers(0, I, n)  # user U - 1 has nothing in train
    label = (rng.random(n) < 0.7).astype(np.float32)
    ts = rng.integers(1, 20, n) * 1000 if timed else np.zeros(n, dtype=np.int64)  # ties on purpose
    tr = Interactions(user, item, label, ts.astype(np.int64))
    va = Interactions(np.array([0, 1]), np.array([3, 4]), np.array([1.0, 0.0], dtype=np.float32),
                      np.array([10**6, 10**6]) if timed else np.zeros(2, dtype=np.int64))
    users, items = [f"u{k}" for k in range(U)], [f"i{k}" for k in range(I)]
    return RecDataset(users, items, [""] * U, [f"item {k}" for k in range(I)],
                      [id_feature("user_id", "user", users), id_feature("item_id", "item", items)],
                      {"train": tr, "valid": va, "test": Interactions.empty(), "test_cold": Interactions.empty()})


def _brute(ds: RecDataset, u: int, i: int, t, max_len: int) -> list[int]:
    """The items (u, i, t) attends to: the items u first clicked in train strictly before t (all
    when t is None), by the time then stored order of that first click, without item i, the last
    max_len of them."""
    tr = ds.splits["train"]
    rows = [k for k in range(len(tr)) if tr.user[k] == u and tr.label[k] > 0]
    rows.sort(key=lambda k: (tr.timestamp[k], k))
    first = {}
    for k in rows:
        first.setdefault(int(tr.item[k]), k)
    kept = sorted((k for j, k in first.items() if j != i and (t is None or tr.timestamp[k] < t)),
                  key=lambda k: (tr.timestamp[k], k))
    return [int(tr.item[k]) for k in kept][-max_len:]


@pytest.mark.parametrize("timed", [True, False])
@pytest.mark.parametrize("max_len", [1, 3, 50])
def test_each_example_sees_only_other_earlier_clicks(timed, max_len):
    ds = _ds(timed)
    att = HistoryAttention(ds, torch.randn(I, 6), max_len=max_len, dim=4)
    assert att.timed == timed
    tr = ds.splits["train"]
    # every training row (its own time), every pair at a few times, and pairs without a time
    user = np.concatenate([tr.user, np.repeat(np.arange(U), I), np.arange(U)])
    item = np.concatenate([tr.item, np.tile(np.arange(I), U), np.zeros(U, dtype=np.int64)])
    times = np.concatenate([tr.timestamp, np.repeat(np.arange(U), I) * 4000 + 500, np.full(U, NO_TIME)])
    ids, mask = att.window(torch.from_numpy(user), torch.from_numpy(item), torch.from_numpy(times))
    for k in range(len(user)):
        t = None if (not timed or times[k] == NO_TIME) else int(times[k])
        got = ids[k][mask[k]].tolist()
        assert got == _brute(ds, int(user[k]), int(item[k]), t, max_len), (k, user[k], item[k], t)
    # no time given: every click (still without the item itself)
    ids, mask = att.window(torch.from_numpy(tr.user), torch.from_numpy(tr.item), None)
    for k in range(len(tr)):
        assert ids[k][mask[k]].tolist() == _brute(ds, int(tr.user[k]), int(tr.item[k]), None, max_len)


def test_a_click_and_a_non_click_see_as_many_items():
    """The target item is dropped before the window is cut: a training click (whose item is in its
    own history) must not attend to fewer items than its negatives, or the count would leak the label."""
    ds = _ds(False)
    att = HistoryAttention(ds, torch.randn(I, 6), max_len=3, dim=4)
    tr = ds.splits["train"]
    k = next(k for k in range(len(tr)) if tr.label[k] > 0 and
             len(_brute(ds, int(tr.user[k]), -1, None, 100)) > 3)  # a click of a user with > 3 clicks
    u, clicked = int(tr.user[k]), int(tr.item[k])
    other = next(j for j in range(I) if j not in _brute(ds, u, -1, None, 100))
    _, mask = att.window(torch.tensor([u, u]), torch.tensor([clicked, other]), None)
    assert mask.sum(1).tolist() == [3, 3]


@pytest.mark.parametrize("kind", ["din", "dot"])
def test_features_pool_the_history_and_train(kind):
    ds = _ds(True)
    att = HistoryAttention(ds, torch.randn(I, 6), max_len=4, dim=5, kind=kind)
    user, item = torch.tensor([0, 1, U - 1]), torch.tensor([2, 5, 1])
    out = att(user, item, torch.full((3,), NO_TIME))
    assert out.shape == (3, att.dim) == (3, 2 * 5 + 1)
    assert torch.all(out[2] == 0)  # no click in train: nothing pooled, count log(1) = 0
    ids, mask = att.window(user, item, None)
    assert out[0, -1].item() == pytest.approx(float(np.log1p(mask[0].sum().item())))
    out[:2].sum().backward()
    trained = [att.proj.weight, att.item_emb.weight] + ([att.unit[0].weight] if kind == "din" else [])
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in trained)
    both = PairFeatures([HistoryPairFeature(ds, torch.randn(I, 6)), att])
    assert both(user, item, None).shape == (3, 2 + att.dim)


def test_bad_attention_settings_name_the_key():
    from sparse_kd.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=r"distill\.teacher_ranker\.history_attention\.max_len"):
        load_config("configs/demo.yaml", ["distill.teacher_ranker.history_attention.max_len=0"])
    with pytest.raises(ValueError, match="kind"):
        HistoryAttention(_ds(False), torch.randn(I, 6), kind="rnn")


@pytest.mark.slow
def test_teacher_with_history_attention_trains_and_scores_from_its_checkpoint(tmp_path, one_process):
    """The teacher ranker trains with the attention (its weights in the checkpoint), its logits for
    the students come from the reloaded checkpoint, and its cost counts the attention."""
    cfg = tiny_config(str(tmp_path / "run"), nproc=1, train={"epochs": 1},
                      distill={"logit": {"enabled": True}, "transfer": {"enabled": False},
                               "teacher_ranker": {"history_attention": {"enabled": True, "max_len": 8, "dim": 8}}})
    metrics = P.run_training(cfg, (P.TEACHER, "distilled"))
    assert 0.0 < metrics[P.TEACHER]["valid"]["auc"] < 1.0 and 0.0 < metrics["distilled"]["valid"]["auc"] < 1.0
    ds = tiny_dataset(cfg)
    ut, it = torch.randn(ds.num_users, 16), torch.randn(ds.num_items, 16)
    spec = P.teacher_spec(cfg, ds, ut, it)
    assert isinstance(spec.pair_feature, HistoryAttention)
    with_att = P.spec_cost(cfg, ds, spec)
    spec.pair_feature = None
    assert with_att["dense_params"] > P.spec_cost(cfg, ds, spec)["dense_params"]


def _naive(att: HistoryAttention, user, item, ts):
    """The attention as written in DIN: the unit MLP over cat([q, k, q * k, q - k]), per entry."""
    ids, mask = att.window(user, item, ts)
    both = att.represent(torch.cat([item[:, None], ids], 1))
    q, k = both[:, 0], both[:, 1:]
    qe = q[:, None, :].expand_as(k)
    score = att.unit(torch.cat([qe, k, qe * k, qe - k], -1)).squeeze(-1).masked_fill(~mask, float("-inf"))
    has = mask.any(1, keepdim=True)
    w = torch.softmax(torch.where(has, score, torch.zeros_like(score)), 1) * mask
    pooled = (w[:, :, None] * k).sum(1)
    return torch.cat([pooled, pooled * q, torch.log1p(mask.sum(1, keepdim=True).float())], 1)


@pytest.mark.parametrize("batch", [2, 40])  # fewer history entries than items, and more: both paths
def test_factored_din_unit_equals_the_unit_on_concatenated_inputs(batch):
    torch.manual_seed(0)
    ds = _ds(True)
    att = HistoryAttention(ds, torch.randn(I, 6), max_len=4, dim=5, hidden=7)
    g = torch.Generator().manual_seed(1)
    user, item = torch.randint(0, U, (batch,), generator=g), torch.randint(0, I, (batch,), generator=g)
    ts = torch.full((batch,), NO_TIME)
    assert (batch * (att.max_len + 1) > I) == (batch == 40)
    grads = []
    for fn in (att, lambda u, i, t: _naive(att, u, i, t)):
        att.zero_grad()
        out = fn(user, item, ts)
        (out * torch.arange(out.shape[1])).sum().backward()
        grads.append((out.detach(), [p.grad.clone() for p in att.parameters()]))
    torch.testing.assert_close(grads[0][0], grads[1][0], rtol=1e-5, atol=1e-6)
    for a, b in zip(grads[0][1], grads[1][1]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
