"""Tiny hand-built datasets, a quickly trained (unsharded) DLRM and a run folder for the compression tests.

The dataset has a clear signal: users and items belong to one of 3 hidden groups; a click is
likely when the groups match. Item text embeddings are a noisy linear function of the item's
group (so a text -> row ridge map has something to learn).
"""

from __future__ import annotations

import hashlib
import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from sparse_kd.config import ExperimentConfig, StudentConfig, to_dict
from sparse_kd.data.batching import BatchBuilder, count_dense
from sparse_kd.data.schema import Interactions, RecDataset, SparseFeature
from sparse_kd.student.model import build_dlrm

warnings.filterwarnings("ignore")

H = 24  # text embedding dim in the tiny tests
STUDENT = StudentConfig(embedding_dim=8, dense_arch=(16, 8), over_arch=(16, 1))


def _id_feature(name: str, owner: str, ids: list[str]) -> SparseFeature:
    n = len(ids)
    return SparseFeature(name, owner, list(ids), np.arange(n + 1, dtype=np.int64), np.arange(n, dtype=np.int64))


def make_dataset(num_users: int = 60, num_items: int = 40, per_user: int = 24, seed: int = 0) -> tuple[RecDataset, dict]:
    """(dataset, text {"user": (U, H), "item": (I, H)})."""
    rng = np.random.default_rng(seed)
    ug = rng.integers(0, 3, num_users)
    ig = rng.integers(0, 3, num_items)
    users = [f"u{k}" for k in range(num_users)]
    items = [f"i{k}" for k in range(num_items)]
    # user feature "age" (3 values, single), item feature "tags" (multi-hot over 5, some items with none)
    age_vals = rng.integers(0, 3, num_users)
    age = SparseFeature("age", "user", ["young", "mid", "old"], np.arange(num_users + 1, dtype=np.int64), age_vals.astype(np.int64))
    tag_bags = [sorted(set(rng.integers(0, 5, rng.integers(0, 3)).tolist())) for _ in range(num_items)]
    offs = np.concatenate([[0], np.cumsum([len(b) for b in tag_bags])]).astype(np.int64)
    tags = SparseFeature("tags", "item", [f"tag{k}" for k in range(5)], offs, np.asarray([v for b in tag_bags for v in b], dtype=np.int64))
    feats = [_id_feature("user_id", "user", users), _id_feature("item_id", "item", items), age, tags]
    # interactions (popularity skewed so frequencies differ)
    pop = 1.0 / np.arange(1, num_items + 1) ** 0.7
    pop /= pop.sum()
    uu, ii, ll = [], [], []
    for u in range(num_users):
        its = rng.choice(num_items, size=per_user, replace=False, p=pop)
        for i in its:
            p = 0.85 if ug[u] == ig[i] else 0.15
            uu.append(u)
            ii.append(i)
            ll.append(float(rng.random() < p))
    uu, ii, ll = np.array(uu), np.array(ii), np.array(ll, dtype=np.float32)
    cold = np.array([3, 7, 11, 19])
    is_cold = np.isin(ii, cold)
    warm = np.flatnonzero(~is_cold)
    warm = warm[rng.permutation(len(warm))]
    n = len(warm)
    tr, va = warm[: int(0.7 * n)], warm[int(0.7 * n): int(0.85 * n)]
    te = warm[int(0.85 * n):]
    ts = np.zeros(len(uu), dtype=np.int64)

    def sub(idx):
        return Interactions(uu[idx], ii[idx], ll[idx], ts[idx])

    splits = {"train": sub(tr), "valid": sub(va), "test": sub(te), "test_cold": sub(np.flatnonzero(is_cold))}
    ds = RecDataset(users, items, [f"user {u}" for u in users], [f"item {i}" for i in items], feats, splits)
    ds.validate()
    proj = torch.from_numpy(rng.normal(size=(3, H))).float()
    text = {
        "user": proj[torch.from_numpy(ug)] + 0.3 * torch.from_numpy(rng.normal(size=(num_users, H))).float(),
        "item": proj[torch.from_numpy(ig)] + 0.3 * torch.from_numpy(rng.normal(size=(num_items, H))).float(),
    }
    return ds, text


def train_dlrm(ds: RecDataset, epochs: int = 5, seed: int = 0, student: StudentConfig = STUDENT, lr: float = 0.03):
    """A plain (unsharded) fp32 DLRM trained with Adam on the train split. Returns (model, builder)."""
    torch.manual_seed(seed)
    ub, ib = count_dense(ds)
    builder = BatchBuilder(ds, ub, ib)
    model = build_dlrm({f.name: f.num_embeddings for f in ds.features}, builder.dense_dim, student, device="cpu")
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    tr = ds.splits["train"]
    u, i, y = torch.from_numpy(tr.user), torch.from_numpy(tr.item), torch.from_numpy(tr.label)
    g = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        perm = torch.randperm(len(tr), generator=g)
        for s in range(0, len(tr), 128):
            idx = perm[s: s + 128]
            b = builder.build(u[idx], i[idx], y[idx])
            loss = torch.nn.functional.binary_cross_entropy_with_logits(model(b.dense_features, b.sparse_features).reshape(-1), b.labels)
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model.eval(), builder


def write_variant(run_dir: Path, name: str, model, ds: RecDataset, dense_in: int, student: StudentConfig = STUDENT) -> None:
    """Save ``model`` the way the training pipeline does: model_meta.json + a DCP checkpoint with meta.json."""
    import torch.distributed.checkpoint as dcp

    from sparse_kd import checkpoint as ckpt
    from sparse_kd.student.export import write_model_meta

    vd = run_dir / name
    write_model_meta(vd, {f.name: f.num_embeddings for f in ds.features}, dense_in, to_dict(student))
    path = vd / "checkpoints" / "step_00000001"
    state = {"model": {f"model.{k}": v.detach().clone() for k, v in model.state_dict().items()}}
    dcp.save(state, checkpoint_id=str(path), no_dist=True)
    files = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(path.iterdir()) if p.is_file()}
    (path / "meta.json").write_text(json.dumps({"format_version": ckpt.FORMAT_VERSION, "epoch": 1, "step_in_epoch": 0,
                                                "global_step": 1, "files": files}))


@pytest.fixture(scope="session")
def tiny():
    """(dataset, text, trained model, builder) shared by the tests (do not modify the model)."""
    ds, text = make_dataset()
    model, builder = train_dlrm(ds)
    return ds, text, model, builder


@pytest.fixture(scope="session")
def run_folder(tmp_path_factory):
    """A run folder over a tiny synthetic dataset (the real loader) with two trained variants,
    'baseline' and 'distilled' (here just another seed). Returns (run_dir, dataset, baseline model)."""
    from safetensors.torch import save_file

    from sparse_kd.config import config_from_dict
    from sparse_kd.data import load_dataset

    root = tmp_path_factory.mktemp("run")
    raw = {"output_dir": str(root), "nproc": 1,
           "data": {"source": "synthetic", "synthetic": {"num_users": 50, "num_items": 30, "interactions_per_user": 12}},
           "student": {"embedding_dim": STUDENT.embedding_dim, "dense_arch": list(STUDENT.dense_arch),
                       "over_arch": list(STUDENT.over_arch)},
           "train": {"batch_size": 64}}
    cfg: ExperimentConfig = config_from_dict(raw)
    ds = load_dataset(cfg.data)
    (root / "data").mkdir(parents=True)
    (root / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    ds.save_mappings(root / "data" / "mappings.json")
    ub, ib = count_dense(ds)
    torch.save({"user": ub, "item": ib}, root / "data" / "entity_dense.pt")
    g = torch.Generator().manual_seed(0)
    save_file({"user": torch.randn(ds.num_users, H, generator=g), "item": torch.randn(ds.num_items, H, generator=g)},
              str(root / "data" / "text_embeddings.safetensors"))
    model, builder = train_dlrm(ds, epochs=3)
    write_variant(root, "baseline", model, ds, builder.dense_dim)
    other, _ = train_dlrm(ds, epochs=3, seed=1)
    write_variant(root, "distilled", other, ds, builder.dense_dim)
    return root, ds, model
