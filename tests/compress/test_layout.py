"""Hot-first row layout (sparse_kd/compress/layout.py): exact, hot rows first, folded where needed."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sparse_kd.compress.importance import table_importance
from sparse_kd.compress.layout import hot_first, reorder_table, reorder_tables, row_reads
from sparse_kd.compress.prune import PrunedTable
from sparse_kd.compress.stage import artifact_mappings, compress_model, model_weights, serving_dataset
from sparse_kd.config import CompressConfig, ConfigError, load_config


def _table(n=10, d=4, remap=None, rows=None):
    w = torch.arange((rows or n) * d, dtype=torch.float32).view(-1, d)
    return PrunedTable("item_id", w, remap, n, rows or n, "zero")


def test_hot_first_is_stable_and_descending():
    reads = np.array([0, 5, 1, 5, 0, 9])
    assert hot_first(reads).tolist() == [5, 1, 3, 2, 0, 4]


def test_whole_table_gets_a_permutation_to_fold_and_keeps_every_row():
    pt = _table()
    freq = np.array([0, 0, 7, 0, 1, 0, 0, 9, 0, 0])
    out, fold = reorder_table(pt, freq)
    assert fold and out.remap is not None
    assert out.weight[0].tolist() == pt.weight[7].tolist() and out.weight[1].tolist() == pt.weight[2].tolist()
    assert torch.equal(out.lookup_rows(), pt.lookup_rows())  # every id still gets its own row


def test_pruned_table_composes_its_remap_and_keeps_pruned_ids_pruned():
    remap = torch.tensor([0, -1, 1, -1, 2, 3, -1, 4, -1, -1], dtype=torch.int32)
    pt = _table(remap=remap, rows=5)
    freq = np.array([1, 50, 2, 50, 0, 3, 50, 8, 0, 0])
    assert row_reads(pt, freq).tolist() == [1, 2, 0, 3, 8]
    out, fold = reorder_table(pt, freq)
    assert not fold
    assert torch.equal(out.lookup_rows(), pt.lookup_rows())
    assert (out.remap < 0).tolist() == (remap < 0).tolist()
    assert int(out.remap[7]) == 0  # the most read stored row comes first


def test_nothing_to_move_and_bad_input():
    pt = _table(n=3)
    same, fold = reorder_table(pt, np.array([3, 2, 1]))
    assert same is pt and not fold
    with pytest.raises(ValueError, match="2 read counts for a table of 3 ids"):
        reorder_table(pt, np.array([1, 2]))
    with pytest.raises(ValueError, match="row order 'bogus'"):
        reorder_tables({"item_id": pt}, {"item_id": np.ones(3)}, "bogus")
    with pytest.raises(ValueError, match="before folding"):
        reorder_table(PrunedTable("f", pt.weight, None, 3, 3, "zero", folded=torch.arange(3, dtype=torch.int32)),
                      np.ones(3))


def test_config_rejects_an_unknown_row_order(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("compress:\n  row_order: hot\n")
    with pytest.raises(ConfigError, match="row_order"):
        load_config(p)
    assert CompressConfig().row_order == "frequency"


@pytest.mark.parametrize("remap", ["array", "fold"])
def test_compressed_scores_do_not_depend_on_the_row_order(tiny, remap):
    """Same settings, row_order frequency vs id: bit-identical embeddings of every entity bag the
    artifact would serve, hot rows first in the stored tables."""
    from sparse_kd.compress.quantize import extract_qtables
    from sparse_kd.data.batching import BatchBuilder

    ds, text, model, builder = tiny
    settings = {
        "user_id": {"keep_ratio": 0.5, "dtype": "int8", "fill": "zero"},
        "item_id": {"keep_ratio": 1.0, "dtype": "int4", "fill": "zero"},
        "age": {"keep_ratio": 1.0, "dtype": "fp16", "fill": "zero"},
        "tags": {"keep_ratio": 0.5, "dtype": "int2", "fill": "cluster"},
    }
    got = {}
    for order in ("id", "frequency"):
        comp = compress_model(model, ds, settings, remap=remap, text=text, row_order=order)
        sds = serving_dataset(ds, comp)
        assert artifact_mappings(ds, comp)["features"]["item_id"]["values"] == sds.features[
            [f.name for f in ds.features].index("item_id")].values.tolist()
        b = BatchBuilder(sds, builder.user_dense, builder.item_dense)
        tr = ds.splits["train"]
        batch = b.build(torch.from_numpy(tr.user[:256]), torch.from_numpy(tr.item[:256]), torch.zeros(256))
        kjt = batch.sparse_features
        with torch.no_grad():
            got[order] = (comp.serving.embeddings(kjt.values(), kjt.lengths()), comp)
    e_id, e_fr = got["id"][0], got["frequency"][0]
    assert e_id is not None and torch.equal(e_id, e_fr)
    comp = got["frequency"][1]
    assert comp.tables["t_item_id"]["remap"] == "folded" and comp.model_info["row_order"] == "frequency"
    # the first stored item row is the most read item
    imps = table_importance("frequency", model_weights(model), ds, text)
    q = extract_qtables(comp.serving)["item_id"]
    ref = extract_qtables(got["id"][1].serving)["item_id"]
    hottest = int(np.argmax(imps["item_id"].freq))
    assert torch.equal(q.weight[0], ref.weight[hottest])
