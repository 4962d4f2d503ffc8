"""Weight transfer fills exactly the rows it should, on row_wise and table_wise shards of 2 ranks."""

import pytest
import torch

from helpers import tiny_config, tiny_dataset
from helpers.workers import local_tables_worker
from sparse_kd.local_launch import launch_local
from sparse_kd.distill.transfer import pca_projection, transfer_rows
from sparse_kd.ridge import ridge_fit, ridge_predict
from sparse_kd.student.init import init_rows_block


def test_pca_rows_follow_the_text_geometry():
    g = torch.Generator().manual_seed(0)
    text = torch.randn(50, 3, generator=g) @ torch.diag(torch.tensor([5.0, 1.0, 0.1]))
    rows = transfer_rows(text, 2, "pca", 0.05)
    assert rows.shape == (50, 2)
    assert rows.pow(2).mean().sqrt().item() == pytest.approx(0.05, rel=1e-4)
    _, basis = pca_projection(text, 2)
    assert abs(basis[0, 0].item()) > 0.99  # the first direction is the high-variance axis


def test_learned_projection_recovers_a_linear_map():
    g = torch.Generator().manual_seed(1)
    text = torch.randn(200, 6, generator=g)
    w = torch.randn(6, 4, generator=g)
    target = text @ w
    fitted = ridge_predict(text, ridge_fit(text, target, l2=1e-6))
    assert torch.allclose(fitted, target, atol=1e-3)
    warm = torch.zeros(200, dtype=torch.bool)
    warm[:150] = True
    rows = transfer_rows(text, 4, "learned", 1.0, teacher_rows=target, warm=warm)
    # cold rows (never fitted on) are predicted from text alone, up to the RMS rescale
    cos = torch.nn.functional.cosine_similarity(rows[150:], target[150:], dim=1)
    assert cos.min() > 0.999


@pytest.mark.slow
def test_transfer_fills_exactly_the_seeded_rows_on_sharded_tables(tmp_path):
    cfg = tiny_config(str(tmp_path), nproc=2, student={"sharding": {"item_id": "row_wise", "user_id": "table_wise"}})
    ds = tiny_dataset(cfg)
    dim = cfg.student.embedding_dim
    items = torch.full((ds.num_items, dim), float("nan"))
    seeded_items = torch.arange(0, ds.num_items, 3)  # every third item, across both row shards
    items[seeded_items] = torch.arange(len(seeded_items) * dim, dtype=torch.float32).reshape(-1, dim) + 1.0
    users = torch.randn(ds.num_users, dim)  # every user row
    out = launch_local(local_tables_worker, 2, cfg, {"item_id": items, "user_id": users})
    assert out[0]["written"] == {"item_id": len(seeded_items), "user_id": ds.num_users}
    # reassemble each table from both ranks' shards
    for table, want_rows, n in (("t_item_id", items, ds.num_items), ("t_user_id", users, ds.num_users)):
        full = torch.full((n, dim), float("nan"))
        for r in (0, 1):
            for r0, c0, t in out[r]["tables"].get(table, []):
                full[r0 : r0 + t.shape[0], c0 : c0 + t.shape[1]] = t
        assert not torch.isnan(full).any(), f"{table}: some rows were not covered by any shard"
        default = init_rows_block(0, table, n, dim, 0, n)
        seeded = ~torch.isnan(want_rows).any(1)
        assert torch.equal(full[seeded], want_rows[seeded]), table
        assert torch.equal(full[~seeded], default[~seeded]), table
    # row_wise really split the item table over both ranks
    assert all(out[r]["tables"]["t_item_id"] for r in (0, 1))
