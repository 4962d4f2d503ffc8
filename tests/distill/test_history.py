"""User embeddings from train clicks and the teacher's leave-one-out history pair feature,
against brute force on a hand-made dataset."""

import numpy as np
import pytest
import torch

from sparse_kd.data.schema import Interactions, RecDataset
from sparse_kd.data.split import id_feature
from sparse_kd.distill.history import (HistoryPairFeature, HistoryRows, history_sums, history_text, resolve_mode,
                                       resolve_user_text, unit)
from sparse_kd.distill.rows import as_tensor


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


@pytest.mark.parametrize("held", [True, False])
def test_pair_feature_leaves_the_pair_itself_out(held):
    ds, it = _ds(), _item_text()
    pf = HistoryPairFeature(ds, it, held_sums_bytes=None if held else 0)
    assert pf.held == held and pf.sums.shape[0] == (ds.num_users if held else 0)
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


def test_pair_feature_sums_a_batchs_users_bit_for_bit_as_the_held_sums():
    """Above held_sums_bytes no (U, H) sums are held: each batch sums its own users' clicks, and
    gives the same features, bit for bit, on train-like batches of repeated users."""
    from helpers.tiny import tiny_config
    from sparse_kd.data import load_dataset

    ds = load_dataset(tiny_config("unused", nproc=1).data)
    it = torch.randn(ds.num_items, 24, generator=torch.Generator().manual_seed(3))
    held, per_batch = HistoryPairFeature(ds, it), HistoryPairFeature(ds, it, held_sums_bytes=0)
    assert held.held and not per_batch.held and per_batch.sums.numel() == 0
    assert per_batch.item_rows.data_ptr() == it.data_ptr()  # the caller's rows, not a copy
    tr = ds.splits["train"]
    for lo in range(0, len(tr), 257):
        u, i = torch.from_numpy(tr.user[lo:lo + 257]), torch.from_numpy(tr.item[lo:lo + 257])
        assert torch.equal(per_batch(u, i), held(u, i))
    assert torch.equal(per_batch.shift, held.shift) and torch.equal(per_batch.scale, held.scale)


def _whole(ds, it):
    """The history rows of every user at once (the pair feature's sums), to compare blocks with."""
    sums, counts = history_sums(ds, it)
    return sums / counts.clamp_min(1.0)[:, None]


def test_history_rows_read_by_block_equal_the_whole_tensor():
    ds, it = _ds(), _item_text()
    whole = _whole(ds, it)
    e, tr = unit(it), ds.splits["train"]
    for u in range(4):  # by hand: the mean unit row of the user's distinct train clicks
        clicked = sorted({int(i) for i, y, uu in zip(tr.item, tr.label, tr.user) if y > 0 and uu == u})
        torch.testing.assert_close(whole[u], e[clicked].mean(0) if clicked else torch.zeros(it.shape[1]))
    rows = HistoryRows(ds, it)
    assert rows.shape == tuple(whole.shape) and len(rows) == 4
    torch.testing.assert_close(rows[0:4], whole, rtol=0, atol=0)
    torch.testing.assert_close(rows[1:3, 2:4], whole[1:3, 2:4], rtol=0, atol=0)
    mask = torch.tensor([True, False, False, True])
    torch.testing.assert_close(rows[mask], whole[mask], rtol=0, atol=0)
    torch.testing.assert_close(rows[torch.tensor([3, 0, 0])], whole[[3, 0, 0]], rtol=0, atol=0)
    assert rows[2:2].shape == (0, it.shape[1])
    torch.testing.assert_close(as_tensor(rows), whole, rtol=0, atol=0)
    with pytest.raises(TypeError, match="contiguous"):
        rows[0:4:2]


def test_history_rows_hold_no_copy_of_the_item_rows_and_sum_their_unit_rows_exactly():
    """HistoryRows keeps the caller's (I, H) rows, not a unit copy, and divides each gathered row
    by its norm: bit for bit the sums of F.normalize's rows."""
    from sparse_kd.distill.history import train_clicks

    ds, it = _ds(), _item_text()
    rows = HistoryRows(ds, it)
    assert rows.item_rows.data_ptr() == it.data_ptr()
    assert rows.item_norm.numel() == it.shape[0]  # 4 bytes per item besides the caller's rows
    u, i = train_clicks(ds)
    want = torch.zeros(4, it.shape[1]).index_add_(0, torch.from_numpy(u), unit(it)[torch.from_numpy(i)])
    sums, counts = rows.sums(torch.arange(4))
    assert torch.equal(sums, want) and counts.tolist() == [3.0, 1.0, 0.0, 0.0]


def test_history_rows_chunked_clicks_match(monkeypatch):
    """Blocks of clicks smaller than a user's history give the same rows."""
    import sparse_kd.distill.history as H

    ds, it = _ds(), _item_text()
    whole = _whole(ds, it)
    monkeypatch.setattr(H, "CLICK_CHUNK", 2)
    torch.testing.assert_close(HistoryRows(ds, it)[0:4], whole)


def test_pca_transfer_and_ridge_read_history_rows_as_they_read_the_tensor():
    from sparse_kd.distill.transfer import learned_map, pca_reduce, transfer_map

    ds, it = _ds(), _item_text()
    lazy, whole = HistoryRows(ds, it), _whole(ds, it)
    torch.testing.assert_close(pca_reduce(lazy, 2), pca_reduce(whole, 2))
    torch.testing.assert_close(transfer_map(lazy, 3, "pca", 0.1, basis_text=it).materialize(),
                               transfer_map(whole, 3, "pca", 0.1, basis_text=it).materialize())
    warm, rows = torch.tensor([True, True, False, True]), torch.randn(4, 3)
    torch.testing.assert_close(learned_map(lazy, rows, warm), learned_map(whole, rows, warm))
    assert isinstance(resolve_user_text("history", ds, None, it)[0], HistoryRows)  # never built whole


def test_replicated_targets_from_history_rows_equal_those_from_the_tensor(monkeypatch):
    import sparse_kd.distill.targets as T

    ds, it = _ds(), _item_text()
    monkeypatch.setattr(T, "WRITE_CHUNK", 3)  # blocks that end inside the table
    for unit_ in (True, False):
        torch.testing.assert_close(T.held_rows(HistoryRows(ds, it), unit_), T.held_rows(_whole(ds, it), unit_))
