"""Weight-transfer and refit rows are computed slice by slice (:class:`ProjectedRows`), equal to
the whole-table computation they replace; the refit reads only the tables it refits."""

import numpy as np
import pytest
import torch
import torch.distributed.checkpoint as dcp

from sparse_kd.student.refit import read_table, refit_rows
from sparse_kd.distill.transfer import CHUNK, ProjectedRows, pca_reduce, transfer_map, transfer_rows
from sparse_kd.ridge import ridge_fit, ridge_predict
from sparse_kd.student.spec import RefitSpec


def _old_pca_rows(text, dim, scale):  # the whole-matrix computation before ProjectedRows
    mean = text.mean(0)
    x = (text - mean).double()
    evals, evecs = torch.linalg.eigh(x.T @ x / max(1, x.shape[0] - 1))
    basis = evecs[:, torch.argsort(evals, descending=True)[:dim]].float()
    rows = (text - mean) @ basis
    return rows * (scale / rows.pow(2).mean().sqrt())


def test_slices_equal_the_whole_and_pca_rows_match_the_old_computation():
    g = torch.Generator().manual_seed(0)
    text = torch.randn(CHUNK + 300, 12, generator=g) @ torch.randn(12, 12, generator=g)
    rows = transfer_map(text, 4, "pca", 0.05)
    assert rows.shape == (text.shape[0], 4)
    whole = rows.materialize()
    assert torch.equal(rows[100:200, 1:3], whole[100:200, 1:3])
    assert whole.pow(2).mean().sqrt().item() == pytest.approx(0.05, rel=1e-5)
    old = _old_pca_rows(text, 4, 0.05)
    # eigenvector signs are arbitrary: compare up to a sign per column
    signs = torch.sign((old * whole).sum(0))
    torch.testing.assert_close(whole * signs, old, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(transfer_rows(text, 4, "pca", 0.05), whole)
    assert pca_reduce(text, 3).std(0).sub(1).abs().max() < 1e-4


def test_skipped_rows_read_nan_and_rows_need_a_slice():
    text = torch.arange(12.0).reshape(6, 2)
    rows = ProjectedRows(text, lambda x: x * 2, 2, skip=torch.tensor([True, False, False, True, False, False]))
    got = rows[0:6, 0:2]
    assert torch.isnan(got[[0, 3]]).all() and torch.equal(got[[1, 2, 4, 5]], text[[1, 2, 4, 5]] * 2)
    with pytest.raises(TypeError, match="contiguous slice"):
        rows[[0, 1]]


def test_refit_rows_equal_the_old_full_table_refit(tmp_path):
    g = torch.Generator().manual_seed(1)
    n, h, d = 300, 6, 4
    text = torch.randn(n, h, generator=g)
    trained = text @ torch.randn(h, d, generator=g) + 0.01 * torch.randn(n, d, generator=g)
    other = torch.randn(50, d, generator=g)
    key = "model.sparse_arch.embedding_bag_collection.embedding_bags.t_{}.weight"
    dcp.save({"model": {key.format("user_id"): trained, key.format("item_id"): other}}, checkpoint_id=str(tmp_path), no_dist=True)
    torch.testing.assert_close(read_table(tmp_path, "user_id"), trained)
    with pytest.raises(FileNotFoundError, match="no table t_age_bucket"):
        read_table(tmp_path, "age_bucket")
    counts = np.where(np.arange(n) % 3 == 0, 0, 5)
    spec = RefitSpec(text={"user_id": text}, counts={"user_id": counts}, min_count=1, l2=1.0)
    rows = refit_rows(tmp_path, spec, {"user_id": n, "item_id": 50}, d)
    assert set(rows) == {"user_id"}
    fit_on = torch.from_numpy(counts >= 1)
    want = torch.full((n, d), float("nan"))
    want[~fit_on] = ridge_predict(text[~fit_on], ridge_fit(text[fit_on], trained[fit_on], l2=1.0))
    torch.testing.assert_close(rows["user_id"].materialize(), want, equal_nan=True)
