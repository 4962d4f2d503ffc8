"""Consistency checks of in-memory data are exceptions naming what is wrong, never asserts,
so ``python -O`` (which strips asserts) keeps them."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from sparse_kd.config import DataConfig
from sparse_kd.data.batching import BatchBuilder, count_dense
from sparse_kd.data.schema import DataError, SparseFeature
from sparse_kd.data.split import split_interactions
from helpers.tiny import tiny_dataset

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("offsets,values,n,needle", [
    ([0, 1], [0], 2, "offsets have shape (2,), expected (3,) for 2 items"),
    ([0, 1, 3], [0, 1], 2, "offsets run from 0 to 3, expected 0 to 2 (the number of values)"),
    ([0, 2, 1, 2], [0, 1], 3, "offsets decrease at item 1"),
    ([0, 1, 2], [0, 2], 2, "values span 0..2, outside the vocabulary 0..1"),
])
def test_bad_sparse_feature_names_the_feature(offsets, values, n, needle):
    f = SparseFeature("genres", "item", ["a", "b"], np.array(offsets), np.array(values))
    with pytest.raises(DataError) as e:
        f.validate(n)
    assert str(e.value) == f"sparse feature 'genres' (item): {needle}"


def test_dataset_and_split_mismatches_are_errors():
    ds = tiny_dataset()
    ds.validate()
    ds.item_text = ds.item_text[:-1]
    with pytest.raises(DataError, match="item texts for 40 items: expected one text per entity"):
        ds.validate()
    with pytest.raises(DataError, match=r"must all be \(3,\)"):
        split_interactions(np.zeros(3), np.zeros(2), np.zeros(3), None, 2, DataConfig())
    ub, ib = count_dense(tiny_dataset())
    with pytest.raises(ValueError, match="dense features for 59 users and 40 items, but the dataset has 60 users"):
        BatchBuilder(tiny_dataset(), ub[:-1], ib)


def test_checks_survive_python_O():
    code = ("import numpy as np\n"
            "from sparse_kd.data.schema import DataError, SparseFeature\n"
            "f = SparseFeature('genres', 'item', ['a', 'b'], np.array([0, 1, 2]), np.array([0, 2]))\n"
            "try:\n"
            "    f.validate(2)\n"
            "except DataError as e:\n"
            "    print('DataError:', e)\n")
    out = subprocess.run([sys.executable, "-O", "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert out.stdout.startswith("DataError: sparse feature 'genres' (item): values span 0..2"), (out.stdout, out.stderr)
