"""Sharded training on 2 CPU ranks equals 1 process for the same seed and global batch. (Resuming
mid-epoch: tests/distill/test_sharded_targets.py in memory, tests/data/test_data_columnar_train.py
streamed.)"""

import pytest

from helpers import tiny_config
from helpers.metrics import assert_close_metrics
from helpers.workers import train_many_worker
from sparse_kd.local_launch import launch_local

pytestmark = pytest.mark.slow


# row-wise Adagrad keeps one accumulator per row *per column shard*, so column_wise with it is a
# different optimiser than unsharded; element-wise Adagrad is exact.
SETTINGS = (("table_wise", "rowwise_adagrad"), ("row_wise", "rowwise_adagrad"), ("column_wise", "adagrad"))


def test_two_ranks_match_one(tmp_path):
    """Each sharding type: 2 ranks end with the metrics of 1 process (one launch per world size,
    the settings trained one after the other in it)."""
    cfgs = {n: [tiny_config(str(tmp_path / f"{n}_{sh}"), nproc=n, student={"default_sharding": sh},
                            train={"sparse_optimizer": opt}) for sh, opt in SETTINGS] for n in (1, 2)}
    one = launch_local(train_many_worker, 1, cfgs[1])[0]
    two = launch_local(train_many_worker, 2, cfgs[2])
    for k, setting in enumerate(SETTINGS):
        # both ranks report the same (gathered) metrics
        assert_close_metrics(two[0][k]["metrics"], two[1][k]["metrics"], 0.0)
        assert_close_metrics(one[k]["metrics"], two[0][k]["metrics"], 1e-4)
        # and training did something: better than chance on valid
        assert one[k]["metrics"]["valid"]["auc"] > 0.55, setting
    # the settings are different trainings, not one result three times
    assert len({round(r["metrics"]["valid"]["auc"], 6) for r in one}) > 1
