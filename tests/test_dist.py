"""launch_local: ranks get one OpenMP thread; the launching process's environment is left alone."""

import os

import pytest

from helpers.workers import env_worker
from sparse_kd.dist import launch_local


@pytest.mark.slow
def test_launch_local_sets_omp_threads_for_the_ranks_only(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert launch_local(env_worker, 1, "OMP_NUM_THREADS") == {0: "1"}
    assert "OMP_NUM_THREADS" not in os.environ  # later tests and their subprocesses keep the default
