"""Each distillation loss on tiny hand-computed cases."""

import math

import pytest
import torch

from sparse_kd.distill import losses


def _sig(x):
    return 1 / (1 + math.exp(-x))


def test_click_loss_hand_computed():
    got = losses.click_loss(torch.tensor([0.0, 2.0]), torch.tensor([1.0, 0.0]))
    want = (-math.log(0.5) - math.log(1 - _sig(2.0))) / 2
    assert got.item() == pytest.approx(want, rel=1e-6)


def test_logit_kd_is_kl_times_t_squared():
    s, t, T = 1.0, -0.5, 2.0
    ps, pt = _sig(s / T), _sig(t / T)
    kl = pt * math.log(pt / ps) + (1 - pt) * math.log((1 - pt) / (1 - ps))
    got = losses.logit_kd_loss(torch.tensor([s]), torch.tensor([t]), T)
    assert got.item() == pytest.approx(kl * T * T, rel=1e-5)
    # zero when the student equals the teacher
    assert losses.logit_kd_loss(torch.tensor([0.3, -2.0]), torch.tensor([0.3, -2.0]), 3.0).item() == pytest.approx(0, abs=1e-6)


def test_training_loss_mixes_click_and_kd_by_kd_ratio():
    """What training optimises (RankerTrain): (1 - kd_ratio) * click + kd_ratio * KD in train mode,
    the click loss alone in eval mode."""
    from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

    from sparse_kd.config import DistillConfig, LogitKDConfig, StudentConfig
    from sparse_kd.data.batching import KDBatch
    from sparse_kd.distill.module import RankerTrain
    from sparse_kd.student.model import build_dlrm

    torch.manual_seed(0)
    B, U, I = 12, 7, 5
    dlrm = build_dlrm({"user_id": U, "item_id": I}, 2, StudentConfig(embedding_dim=8, dense_arch=(8, 8), over_arch=(4, 1)), device="cpu")
    kd = LogitKDConfig(enabled=True, kd_ratio=0.25, temperature=2.0)
    m = RankerTrain(dlrm, DistillConfig(logit=kd))
    u, i = torch.randint(0, U, (B,)), torch.randint(0, I, (B,))
    kjt = KeyedJaggedTensor.from_lengths_sync(["user_id", "item_id"], torch.cat([u, i]), torch.ones(2 * B, dtype=torch.int32))
    labels, teacher = torch.randint(0, 2, (B,)).float(), 3 * torch.randn(B)
    batch = KDBatch(torch.randn(B, 2), kjt, labels, u, i, teacher)

    loss, (_, logits, _) = m.train()(batch)
    click = losses.click_loss(logits, labels).item()
    soft = losses.logit_kd_loss(logits, teacher, 2.0).item()
    assert soft > 1e-3  # the teacher disagrees with the untrained student: the mix is visible
    assert loss.item() == pytest.approx(0.75 * click + 0.25 * soft, rel=1e-6)
    assert m.last_parts["click"].item() == pytest.approx(click) and m.last_parts["kd"].item() == pytest.approx(soft)
    loss, _ = m.eval()(batch)
    assert loss.item() == pytest.approx(click, rel=1e-6) and "kd" not in m.last_parts


def test_cosine_and_mse_alignment():
    p = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    t = torch.tensor([[1.0, 0.0], [2.0, 0.0]])
    # cosines 1 and 0 -> loss mean(0, 1) = 0.5
    assert losses.cosine_align_loss(p, t).item() == pytest.approx(0.5)
    # squared errors: 0,0 and 4,4 -> mean 2
    assert losses.mse_align_loss(p, t).item() == pytest.approx(2.0)


def test_infonce_hand_computed_and_duplicate_masking():
    p = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    t = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    tau = 0.5
    # sim = I / tau; CE per row = -log(e^2 / (e^2 + e^0))
    row = -math.log(math.exp(2) / (math.exp(2) + 1))
    assert losses.infonce_align_loss(p, t, tau).item() == pytest.approx(row, rel=1e-6)
    # the same entity twice in a batch: its copy is masked, not a negative -> loss of a 1-row batch
    p2 = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    got = losses.infonce_align_loss(p2, p2, tau, ids=torch.tensor([7, 7]))
    assert got.item() == pytest.approx(0.0, abs=1e-6)
    unmasked = losses.infonce_align_loss(p2, p2, tau)
    assert unmasked.item() > 0.5


def test_align_loss_rejects_unknown_kind():
    with pytest.raises(ValueError, match="distill.align.kind"):
        losses.align_loss("l1", torch.zeros(1, 2), torch.zeros(1, 2), 0.1)
