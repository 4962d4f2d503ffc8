"""Sampled-pair KD: the pool, its batches (world-size independent), and the loss on sampled rows."""

import dataclasses

import numpy as np
import pytest
import torch

from helpers import tiny_config, tiny_dataset
from sparse_kd.config import DistillConfig, PairKDConfig, StudentConfig
from sparse_kd.data.batching import BatchBuilder, count_dense, train_batches
from sparse_kd.distill import losses
from sparse_kd.distill.module import RankerTrain
from sparse_kd.distill.pairs import SAMPLED, concat_batches, pool_batch, sample_pool, with_sampled_pairs
from sparse_kd.student.model import build_dlrm


@pytest.fixture(scope="module")
def ds():
    return tiny_dataset(tiny_config("unused"))


def test_pool_avoids_train_pairs_is_seeded_and_favours_the_tail(ds):
    pc = PairKDConfig(enabled=True, item_power=0.0)
    tr = ds.splits["train"]
    pool = sample_pool(ds, pc, 3000, seed=0)
    assert len(pool) == 3000
    train_keys = set((tr.user * ds.num_items + tr.item).tolist())
    assert not train_keys & set((pool.user * ds.num_items + pool.item).tolist())
    again = sample_pool(ds, pc, 3000, seed=0)
    assert np.array_equal(pool.user, again.user) and np.array_equal(pool.item, again.item)
    other = sample_pool(ds, pc, 3000, seed=1)
    assert not np.array_equal(pool.item, other.item)
    # uniform items: the rarest half of the items gets a larger share of the pool than of train
    ic = np.bincount(tr.item, minlength=ds.num_items)
    rare = ic <= np.median(ic)
    assert rare[pool.item].mean() > rare[tr.item].mean()
    # popularity-proportional items: close to train's share
    pop = sample_pool(ds, dataclasses.replace(pc, item_power=1.0), 3000, seed=0)
    assert rare[pop.item].mean() < rare[pool.item].mean()


def test_sampled_pairs_per_batch():
    assert pool_batch(PairKDConfig(enabled=True, ratio=1.5), 64) == 96


def _rows(batch):
    return list(zip(batch.user.tolist(), batch.item.tolist(), batch.labels.tolist(), batch.teacher_logits.tolist()))


def test_sampled_rows_of_two_ranks_are_the_rows_of_one(ds):
    ub, ib = count_dense(ds)
    bb = BatchBuilder(ds, ub, ib)
    tr = ds.splits["train"]
    pool = sample_pool(ds, PairKDConfig(enabled=True), 256, seed=3)
    pool_logits = torch.from_numpy(pool.user * 0.01 - pool.item * 0.001).float()  # a function of the pair
    B, Bp = 32, 16

    def run(rank, world, start=0):
        obs = train_batches(tr, bb, B, rank, world, epoch=1, seed=7, start_step=start)
        return list(with_sampled_pairs(obs, pool, pool_logits, bb, Bp, rank, world, epoch=1, seed=7, start_step=start))

    one = run(0, 1)
    r0, r1 = run(0, 2), run(1, 2)
    assert len(one) == len(r0) == len(r1) == len(tr) // B
    for b1, a, b in zip(one, r0, r1):
        sampled = lambda x: [r for r in _rows(x) if r[2] == SAMPLED]  # noqa: E731
        assert sampled(b1) == sampled(a) + sampled(b)
        assert len(sampled(a)) == Bp // 2
        # observed rows come first, then the sampled ones
        labels = b1.labels.tolist()
        assert labels[:B] == [x for x in labels if x != SAMPLED] and labels[B:] == [SAMPLED] * Bp
        # teacher logits of sampled rows come from the pool
        for u, i, _, t in sampled(b1):
            assert t == pytest.approx(u * 0.01 - i * 0.001, abs=1e-6)
    # resuming at a step gives the same batches as the uninterrupted epoch from there on
    resumed = run(0, 1, start=3)
    assert [_rows(b) for b in resumed] == [_rows(b) for b in one[3:]]


def test_concat_batches_keeps_multi_hot_bags():
    from sparse_kd.data.schema import Interactions, RecDataset
    from sparse_kd.data.split import id_feature, make_feature

    users, items = [f"u{k}" for k in range(7)], [f"i{k}" for k in range(6)]
    genres = make_feature("genres", "item", [["a", "b"], [], ["c"], ["a", "c", "d"], ["b"], ["d", "a"]])
    e = Interactions.empty()
    ds = RecDataset(users, items, [""] * 7, [""] * 6,
                    [id_feature("user_id", "user", users), id_feature("item_id", "item", items), genres],
                    {"train": e, "valid": e, "test": e, "test_cold": e})
    bb = BatchBuilder(ds, torch.zeros(7, 1), torch.arange(6.0)[:, None])
    u1, i1 = torch.tensor([0, 1, 2]), torch.tensor([3, 1, 5])
    u2, i2 = torch.tensor([5, 6]), torch.tensor([0, 1])
    a = bb.build(u1, i1, torch.ones(3))
    b = bb.build(u2, i2, torch.full((2,), SAMPLED))
    got = concat_batches(a, b)
    want = bb.build(torch.cat([u1, u2]), torch.cat([i1, i2]), torch.cat([a.labels, b.labels]))
    gd, wd = got.sparse_features.to_dict(), want.sparse_features.to_dict()
    assert wd["genres"].lengths().tolist() == [3, 0, 2, 2, 0]
    for k in wd:
        assert torch.equal(gd[k].lengths(), wd[k].lengths()) and torch.equal(gd[k].values(), wd[k].values())
    torch.testing.assert_close(got.dense_features, want.dense_features)
    assert torch.equal(got.labels, want.labels) and torch.equal(got.user, want.user) and torch.equal(got.item, want.item)


def test_sampled_rows_get_only_the_kd_loss():
    torch.manual_seed(0)
    U, I, D = 20, 15, 8
    from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

    from sparse_kd.data.batching import KDBatch

    sc = StudentConfig(embedding_dim=D, dense_arch=(16, D), over_arch=(8, 1))
    dc = DistillConfig(pairs=PairKDConfig(enabled=True, weight=0.7, temperature=2.0))
    m = RankerTrain(build_dlrm({"user_id": U, "item_id": I}, 2, sc, device="cpu"), dc, ["user_id", "item_id"])
    m.train()
    n_obs, n_s = 6, 4
    u, i = torch.randint(0, U, (n_obs + n_s,)), torch.randint(0, I, (n_obs + n_s,))
    labels = torch.cat([torch.randint(0, 2, (n_obs,)).float(), torch.full((n_s,), SAMPLED)])
    teacher = torch.randn(n_obs + n_s)
    kjt = KeyedJaggedTensor.from_lengths_sync(["user_id", "item_id"], torch.cat([u, i]), torch.ones(2 * (n_obs + n_s), dtype=torch.int32))
    batch = KDBatch(torch.randn(n_obs + n_s, 2), kjt, labels, u, i, teacher)
    loss, (_, logits, _) = m(batch)
    click = losses.click_loss(logits[:n_obs], labels[:n_obs])
    kd = losses.logit_kd_loss(logits[n_obs:], teacher[n_obs:], 2.0)
    assert m.last_parts["click"].item() == pytest.approx(click.item(), rel=1e-5)
    assert m.last_parts["kd_sampled"].item() == pytest.approx(kd.item(), rel=1e-5)
    assert loss.item() == pytest.approx(click.item() + 0.7 * kd.item(), rel=1e-5)
    # evaluation batches have no sampled rows and only the click loss
    m.eval()
    m(KDBatch(batch.dense_features[:n_obs], KeyedJaggedTensor.from_lengths_sync(
        ["user_id", "item_id"], torch.cat([u[:n_obs], i[:n_obs]]), torch.ones(2 * n_obs, dtype=torch.int32)),
        labels[:n_obs], u[:n_obs], i[:n_obs], teacher[:n_obs]))
    assert set(m.last_parts) == {"click"}


@pytest.mark.slow
def test_sampled_pair_training_on_two_ranks_equals_one(tmp_path):
    from helpers.workers import sampled_pairs_worker
    from sparse_kd.local_launch import launch_local

    kw = dict(distill={"pairs": {"enabled": True, "ratio": 0.5, "weight": 1.0}}, train={"epochs": 2})
    one = launch_local(sampled_pairs_worker, 1, tiny_config(str(tmp_path / "one"), nproc=1, **kw))[0]
    two = launch_local(sampled_pairs_worker, 2, tiny_config(str(tmp_path / "two"), nproc=2, **kw))
    for split in ("valid", "test", "test_cold"):
        assert two[0]["metrics"][split] == two[1]["metrics"][split]
        assert one["metrics"][split]["logloss"] == pytest.approx(two[0]["metrics"][split]["logloss"], abs=1e-4)
        assert one["metrics"][split]["auc"] == pytest.approx(two[0]["metrics"][split]["auc"], abs=1e-4)
