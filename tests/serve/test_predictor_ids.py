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
