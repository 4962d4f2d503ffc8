"""Device-dependent choices of the training recipe, checked without a GPU."""

import pytest

from sparse_kd.config import ConfigError, load_config
from sparse_kd.student.train import use_deterministic


@pytest.mark.parametrize(
    "setting, device, env, expected",
    [
        ("auto", "cpu", {}, True),
        ("auto", "cuda", {}, False),  # cuBLAS would fail without a workspace config
        ("auto", "cuda", {"CUBLAS_WORKSPACE_CONFIG": ":4096:8"}, True),
        (True, "cuda", {}, True),
        (False, "cpu", {}, False),
    ],
)
def test_deterministic_auto_follows_device_and_cublas_config(setting, device, env, expected):
    assert use_deterministic(setting, device, env) is expected


def test_deterministic_accepts_bool_or_auto_only():
    assert load_config(None, ["train.deterministic=false"]).train.deterministic is False
    assert load_config(None).train.deterministic == "auto"
    with pytest.raises(ConfigError, match="train.deterministic"):
        load_config(None, ["train.deterministic=sometimes"])
