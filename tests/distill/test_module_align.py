"""RankerTrain's cosine alignment, computed in the embedding space, equals the plain loss on head(emb)."""

import pytest
import torch

from sparse_kd.config import AlignConfig, DistillConfig, StudentConfig
from sparse_kd.distill import losses
from sparse_kd.distill.module import RankerTrain, cosine_align_from_head
from sparse_kd.distill.targets import unit_rows
from sparse_kd.student.model import build_dlrm


def _grads(loss, tensors):
    return torch.autograd.grad(loss, tensors)


@pytest.mark.parametrize("scale", [1.0, 30.0])
def test_cosine_from_head_matches_reference_value_and_gradients(scale):
    g = torch.Generator().manual_seed(0)
    B, D, H = 64, 8, 48
    head = torch.nn.Linear(D, H)
    with torch.no_grad():
        head.weight.mul_(scale)
    emb = torch.randn(B, D, generator=g, requires_grad=True)
    text = torch.randn(B, H, generator=g) * 5
    text[3] = 0.0  # an entity without text: cosine 0 in both
    ref = losses.cosine_align_loss(head(emb), text)
    got = cosine_align_from_head(head, emb, unit_rows(text))
    assert got.item() == pytest.approx(ref.item(), rel=1e-5, abs=1e-6)
    params = [emb, head.weight, head.bias]
    for a, b in zip(_grads(got, params), _grads(ref, params)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_ranker_train_align_parts_match_reference():
    torch.manual_seed(0)
    U, I, H, D = 20, 15, 24, 8
    sc = StudentConfig(embedding_dim=D, dense_arch=(16, D), over_arch=(8, 1))
    dlrm = build_dlrm({"user_id": U, "item_id": I}, 2, sc, device="cpu")
    ut, it = torch.randn(U, H), torch.randn(I, H) * 3
    dc = DistillConfig(align=AlignConfig(enabled=True, kind="cosine", weight=0.1))
    m = RankerTrain(dlrm, dc, ["user_id", "item_id"], ut, it, embedding_dim=D)
    m.train()

    from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

    from sparse_kd.data.batching import KDBatch

    B = 10
    u, i = torch.randint(0, U, (B,)), torch.randint(0, I, (B,))
    kjt = KeyedJaggedTensor.from_lengths_sync(["user_id", "item_id"], torch.cat([u, i]), torch.ones(2 * B, dtype=torch.int32))
    batch = KDBatch(torch.randn(B, 2), kjt, torch.randint(0, 2, (B,)).float(), u, i, torch.zeros(B))
    loss, _ = m(batch)
    sparse = dlrm.sparse_arch(kjt)  # (B, F, D)
    for f, ids, text in (("user_id", u, ut), ("item_id", i, it)):
        emb = sparse[:, ["user_id", "item_id"].index(f), :]
        ref = losses.cosine_align_loss(m.align_heads[f](emb), text[ids])
        assert m.last_parts[f"align_{f}"].item() == pytest.approx(ref.item(), rel=1e-5, abs=1e-6)
    loss.backward()
    assert m.align_heads["user_id"].weight.grad is not None


def test_align_heads_follow_each_feature_text_width():
    """distill.user_text=both makes user targets wider than item targets: one head per width."""
    U, I, D = 7, 5, 8
    sc = StudentConfig(embedding_dim=D, dense_arch=(16, D), over_arch=(8, 1))
    dlrm = build_dlrm({"user_id": U, "item_id": I}, 2, sc, device="cpu")
    dc = DistillConfig(align=AlignConfig(enabled=True, kind="mse"))
    m = RankerTrain(dlrm, dc, ["user_id", "item_id"], torch.randn(U, 10), torch.randn(I, 6), embedding_dim=D)
    assert m.align_heads["user_id"].out_features == 10 and m.align_heads["item_id"].out_features == 6
