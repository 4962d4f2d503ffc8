"""User embeddings from train clicks and the teacher's leave-one-out history pair feature,
against brute force on a hand-made dataset."""

import numpy as np
import pytest
import torch

from sparse_kd.data.schema import Interactions, RecDataset
from sparse_kd.data.split import id_feature
from sparse_kd.distill.history import HistoryPairFeature, history_text, resolve_mode, resolve_user_text, unit


def _ds(user_text=None) -> RecDataset:
    U, I = 4, 6
    # train: user 0 clicks items 0, 1, 2 (and item 3 is a non-click); user 1 clicks item 2 twice;
    # user 2 only non-clicks; user 3 nothing in train. valid holds a click of user 0 on item 4.
    tr = Interactions(np.array([0, 0, 0, 0, 1, 1, 2]), np.array([0, 1, 2, 3, 2, 2, 5]),
                      np.array([1, 1, 1, 0, 1, 1, 0], dtype=np.float32), np.zeros(7, dtype=np.int64))
    va = Interactions(np.array([0]), np.array([4]), np.array([1.0], dtype=np.float32), np.zeros(1, dtype=np.int64))
    users, items = [f"u{k}" for k in range(U)], [f"i{k}" for k in range(I)]
    return RecDataset(users, items, user_text or [""] * U, [f"item {k}" for k in range(I)],
                      [id_feature("user_id", "user", users), id_feature("item_id", "item", items)],
                      {"train": tr, "valid": va, "test": Interactions.empty(), "test_cold": Interactions.empty()})


def _item_text(I=6, H=5, seed=0):
    return torch.randn(I, H, generator=torch.Generator().manual_seed(seed)) * 3


def test_history_is_the_mean_unit_embedding_of_train_clicks_only():
    ds, it = _ds(), _item_text()
    e = unit(it)
    h = history_text(ds, it)
    torch.testing.assert_close(h[0], (e[0] + e[1] + e[2]) / 3)  # the non-click (item 3) and valid (item 4) are not in it
    torch.testing.assert_close(h[1], e[2])  # a repeated click counts once
    assert h[2].abs().sum() == 0 and h[3].abs().sum() == 0  # no click in train: zero


def test_auto_uses_history_only_when_users_have_no_text():
    assert resolve_mode("auto", _ds()) == "history"
    assert resolve_mode("auto", _ds(["same"] * 4)) == "history"  # identical texts say nothing either
    assert resolve_mode("auto", _ds(["a", "b", "c", "d"])) == "text"
    assert resolve_mode("text", _ds()) == "text"
    ds, it = _ds(["a", "b", "c", "d"]), _item_text()
    own = torch.randn(4, 7)
    both, mode = resolve_user_text("both", ds, own, it)
    assert mode == "both" and both.shape == (4, 7 + it.shape[1])
    with pytest.raises(ValueError, match="distill.user_text"):
        resolve_user_text("bogus", ds, own, it)


def _brute(ds, it, u, i):
    """[mean cosine, direction cosine] of item i to user u's train clicks other than i."""
    e = unit(it)
    tr = ds.splits["train"]
    clicked = sorted({int(x) for x, y, uu in zip(tr.item, tr.label, tr.user) if y > 0 and uu == u} - {i})
    if not clicked:
        return [0.0, 0.0]
    s = e[clicked].sum(0)
    return [float(s @ e[i]) / len(clicked), float(s @ e[i] / s.norm())]


def test_pair_feature_leaves_the_pair_itself_out():
    ds, it = _ds(), _item_text()
    pf = HistoryPairFeature(ds, it)
    pairs = [(0, 0), (0, 2), (0, 3), (0, 4), (1, 2), (1, 0), (2, 5), (3, 1)]
    u, i = torch.tensor([p[0] for p in pairs]), torch.tensor([p[1] for p in pairs])
    assert pf.is_click(u, i).tolist() == [True, True, False, False, True, False, False, False]
    want = torch.tensor([_brute(ds, it, a, b) for a, b in pairs])
    torch.testing.assert_close(pf.raw(u, i), want, rtol=1e-5, atol=1e-6)
    # user 1's only click is item 2: scoring that very pair leaves nothing, so both features are 0
    assert pf.raw(torch.tensor([1]), torch.tensor([2])).abs().sum() == 0
    # standardised output: the train examples have mean 0
    tr = ds.splits["train"]
    out = pf(torch.from_numpy(tr.user), torch.from_numpy(tr.item))
    assert out.shape == (len(tr), HistoryPairFeature.dim)
    torch.testing.assert_close(out.mean(0), torch.zeros(2), atol=1e-5, rtol=0)
