"""Test helpers (not part of the product): tiny configs and datasets, workers that multi-rank tests
run under :func:`sparse_kd.local_launch.launch_local`, comparing two runs' metrics (``helpers.metrics``), and
fault injection (``helpers.faults``).

Importable as ``helpers`` because ``tests/`` is on ``sys.path`` (pytest puts the directory of
the root ``conftest.py`` there; spawned ranks inherit the parent's path).
"""

from helpers.tiny import tiny_config, tiny_dataset

__all__ = ["tiny_config", "tiny_dataset"]
