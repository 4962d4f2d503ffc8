"""``student.dot_logit``: the user . item dot product added to the DLRM's logit, in training, in the
checkpoint's metadata, in the compressed artifact (both kernels) and after ``add-items``."""

from __future__ import annotations

import importlib.util
import itertools
from pathlib import Path

import numpy as np
import pytest
import torch
from torchrec.models.dlrm import InteractionArch

from sparse_kd.config import StudentConfig, config_from_dict
from sparse_kd.student.model import Arch, DotOverArch, build_dlrm, dot_index, has_dot_logit

STUDENT = StudentConfig(embedding_dim=8, dense_arch=(16, 8), over_arch=(16, 1))
DOT = StudentConfig(embedding_dim=8, dense_arch=(16, 8), over_arch=(16, 1), dot_logit=True)


@pytest.mark.parametrize("keys", [list(p) for p in itertools.permutations(["user_id", "item_id", "age", "tags"])][::5])
def test_dot_index_is_where_torchrec_puts_the_user_item_dot(keys):
    torch.manual_seed(0)
    dense, pooled = torch.randn(5, 8), torch.randn(5, len(keys), 8)
    out = InteractionArch(len(keys))(dense, pooled)
    want = (pooled[:, keys.index("user_id")] * pooled[:, keys.index("item_id")]).sum(1)
    k = dot_index(keys, 8)
    torch.testing.assert_close(out[:, k], want)
    others = [c for c in range(out.shape[1]) if c != k]
    assert not any(torch.allclose(out[:, c], want) for c in others)


def _pair(keys=("user_id", "item_id", "age")):
    sizes = {k: 7 for k in keys}
    torch.manual_seed(0)
    plain = build_dlrm(sizes, 2, STUDENT, device="cpu")
    dot = build_dlrm(sizes, 2, DOT, device="cpu")
    return plain, dot


def test_the_logit_is_the_plain_dlrm_plus_the_dot_and_the_state_dict_is_the_same():
    from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

    plain, dot = _pair()
    assert isinstance(dot.over_arch, DotOverArch) and has_dot_logit(dot) and not has_dot_logit(plain)
    assert list(plain.state_dict()) == list(dot.state_dict())
    assert sum(p.numel() for p in plain.parameters()) == sum(p.numel() for p in dot.parameters())
    dot.load_state_dict(plain.state_dict())
    kjt = KeyedJaggedTensor.from_lengths_sync(["user_id", "item_id", "age"], torch.tensor([1, 2, 4, 3, 0, 6]),
                                              torch.ones(6, dtype=torch.int32))
    dense = torch.randn(2, 2)
    rows = plain.sparse_arch(kjt)  # (B, F, D)
    with torch.no_grad():
        torch.testing.assert_close(dot(dense, kjt), plain(dense, kjt) + (rows[:, 0] * rows[:, 1]).sum(1, keepdim=True))
    # the gradient reaches the user and item rows through the dot too
    dot(dense, kjt).sum().backward()
    assert dot.sparse_arch.embedding_bag_collection.embedding_bags["t_user_id"].weight.grad.abs().sum() > 0


def test_a_model_without_a_user_or_item_feature_is_refused_with_the_key():
    with pytest.raises(ValueError, match=r"student.dot_logit: the model has no 'item_id' feature"):
        build_dlrm({"user_id": 3, "age": 2}, 2, DOT, device="cpu")


def test_arch_round_trips_and_old_metadata_reads_as_off():
    a = Arch(8, (16, 8), (16, 1), dot_logit=True)
    assert Arch.from_dict(a.to_dict()) == a
    old = {k: v for k, v in a.to_dict().items() if k != "dot_logit"}
    assert Arch.from_dict(old).dot_logit is False


def test_fingerprint_leaves_the_key_out_when_off_so_older_runs_still_match():
    from sparse_kd.config import DistillConfig
    from sparse_kd.pipeline import variant_fingerprint

    off = config_from_dict({"data": {"source": "synthetic"}})
    on = config_from_dict({"data": {"source": "synthetic"}, "student": {"dot_logit": True}})
    fp_off = variant_fingerprint(off, "baseline", DistillConfig(), 0)
    assert "dot_logit" not in fp_off["student"]
    assert variant_fingerprint(on, "baseline", DistillConfig(), 0)["student"]["dot_logit"] is True
    # the teacher ranker does not take the option (teacher_arch): a trained teacher is reused
    assert variant_fingerprint(on, "teacher_ranker", DistillConfig(), 0) == variant_fingerprint(
        off, "teacher_ranker", DistillConfig(), 0)


def test_the_teacher_ranker_keeps_its_own_architecture():
    from sparse_kd.config import TeacherRankerConfig
    from sparse_kd.student.model import teacher_arch

    assert teacher_arch(DOT, TeacherRankerConfig()).dot_logit is False


@pytest.fixture(scope="module")
def dot_tiny():
    spec = importlib.util.spec_from_file_location(
        "_compress_fixtures", Path(__file__).resolve().parents[1] / "compress" / "conftest.py")
    fx = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(fx)
    ds, text = fx.make_dataset()
    model, builder = fx.train_dlrm(ds, student=DOT)
    return ds, text, model, builder


@pytest.mark.parametrize("kernel,dense_int8", [("torch_quantized", False), ("fbgemm_tbe", False), ("torch_quantized", True)])
def test_the_artifact_serves_the_dot_and_keeps_it_after_add_items(dot_tiny, tmp_path, kernel, dense_int8):
    from sparse_kd.compress import artifact as A
    from sparse_kd.compress.stage import artifact_mappings, compress_model
    from sparse_kd.serve import Predictor, verify_artifact

    ds, text, model, builder = dot_tiny
    fp32 = {f.name: {"keep_ratio": 1.0, "dtype": "fp32", "fill": "zero"} for f in ds.features}
    comp = compress_model(model, ds, fp32, text=text, kernel=kernel, dense_int8=dense_int8)
    out = tmp_path / "art"
    A.save_artifact(out, comp, artifact_mappings(ds, comp), {"user": builder.user_dense, "item": builder.item_dense}, {})
    assert verify_artifact(out)["model"]["dot_logit"] is True
    sp = ds.splits["test"]
    b = builder.build(torch.from_numpy(sp.user), torch.from_numpy(sp.item), torch.from_numpy(sp.label))
    with torch.no_grad():
        want = model(b.dense_features, b.sparse_features).reshape(-1).numpy()
        rows = model.sparse_arch(b.sparse_features)
        keys = b.sparse_features.keys()
        dot = (rows[:, keys.index("user_id")] * rows[:, keys.index("item_id")]).sum(1).numpy()
    assert np.abs(dot).max() > 0.1  # the term matters here: a server that dropped it would fail below
    users, items = [ds.user_ids[u] for u in sp.user], [ds.item_ids[i] for i in sp.item]
    got = Predictor.load(out).score_logits(users, items)
    # int8 dense layers: close to the fp32 model, far closer than the dot term is large
    tol = 0.05 * np.abs(dot).max() if dense_int8 else 1e-5
    np.testing.assert_allclose(got, want, rtol=0, atol=tol)
    A.add_items(out, ["fresh-item"], text["item"][:1])  # rebuilds the model from the manifest
    assert verify_artifact(out)["model"]["dot_logit"] is True
    np.testing.assert_allclose(Predictor.load(out).score_logits(users, items), got, rtol=1e-5, atol=1e-5)


def test_compression_finetuning_trains_the_model_with_the_dot(dot_tiny):
    """compress.finetune's fake-quantized model (fp32 rows: no rounding) scores like the student,
    the dot included, before any step."""
    from sparse_kd.compress.finetune import _FakeQuantDLRM, _Table
    from sparse_kd.compress.importance import table_importance
    from sparse_kd.compress.prune import prune_tables
    from sparse_kd.compress.stage import model_weights

    ds, text, model, builder = dot_tiny
    feats = [f.name for f in ds.features]
    imps = table_importance("frequency", model_weights(model), ds, text)
    pruned = prune_tables(model_weights(model), imps, {f: 1.0 for f in feats}, {f: "zero" for f in feats}, text)
    fq = _FakeQuantDLRM(model, {f: _Table(pruned[f], "fp32", imps[f].freq) for f in feats}, feats)
    assert has_dot_logit(fq.over_arch)
    sp = ds.splits["test"]
    b = builder.build(torch.from_numpy(sp.user), torch.from_numpy(sp.item), torch.from_numpy(sp.label))
    with torch.no_grad():
        torch.testing.assert_close(fq.forward(b)[0], model(b.dense_features, b.sparse_features).reshape(-1),
                                   rtol=1e-5, atol=1e-5)
