"""The predictor's entity bags: int32 ids for CPU artifacts (no cast per request), int64 past 2**31."""

import numpy as np

from sparse_kd.serve.predictor import _CSR


def test_bags_gather_int32_ids_in_order_and_unknown_entities_are_empty():
    csr = _CSR([0, 2, 2, 5], [7, 3, 1, 4, 9], np.int32)
    lengths, values = csr.gather(np.array([2, -1, 0, 1]))
    assert values.dtype == np.int32
    assert lengths.tolist() == [3, 0, 2, 0] and values.tolist() == [1, 4, 9, 7, 3]


def test_ids_past_int32_stay_int64():
    big = 2**31 + 5
    csr = _CSR([0, 1, 2], [3, big], np.int32)
    assert csr.values.dtype == np.int64
    assert csr.gather(np.array([1]))[1].tolist() == [big]
    assert _CSR([0, 1], [3]).values.dtype == np.int64  # the default (TBE artifacts)


def test_one_id_per_entity_takes_the_fast_path_with_the_same_answer():
    rng = np.random.default_rng(0)
    values = rng.integers(0, 1000, 50)
    fast = _CSR(np.arange(51), values, np.int32)
    slow = _CSR(np.arange(51), values, np.int32)
    slow.single = False  # the general path
    assert fast.single and not _CSR([0, 2, 2, 5], [7, 3, 1, 4, 9]).single
    for ents in (rng.integers(0, 50, 30), np.array([4, -1, 0, -1, 49]), np.array([-1, -1]), np.zeros(0, np.int64)):
        (fl, fv), (sl, sv) = fast.gather(ents), slow.gather(ents)
        assert fl.tolist() == sl.tolist() and fv.tolist() == sv.tolist() and fv.dtype == sv.dtype == np.int32


def test_id_index_maps_unknown_ids_to_minus_one():
    from sparse_kd.serve.predictor import _Index

    idx = _Index((u, k) for k, u in enumerate(["a", "b", "c"]))
    assert idx.rows(["c", "zz", "a", "c"]).tolist() == [2, -1, 0, 2] and "zz" not in idx and len(idx) == 3
    assert idx.rows([]).tolist() == []
