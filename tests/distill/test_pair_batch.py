"""distill.pairs with nproc: auto loads (it used to raise TypeError), and the real world size must
split the pair batch evenly, or training refuses before any work (issue 20, item 3)."""

import pytest

from sparse_kd.config import ConfigError, load_config
from sparse_kd.distill.pairs import check_pair_batch, pool_batch


def test_pairs_with_nproc_auto_loads():
    cfg = load_config("configs/demo.yaml", ["nproc=auto", "distill.pairs.enabled=true", "distill.pairs.ratio=0.5"])
    assert cfg.nproc == "auto" and pool_batch(cfg.distill.pairs, cfg.train.batch_size) == cfg.train.batch_size // 2


def test_an_integer_nproc_is_still_checked_at_load():
    with pytest.raises(ConfigError, match="distill.pairs.ratio: .* must be a whole multiple of nproc \\(2\\)"):
        load_config("configs/demo.yaml", ["nproc=2", "train.batch_size=300", "distill.pairs.enabled=true",
                                          "distill.pairs.ratio=0.25"])


@pytest.mark.parametrize("per_batch, world, ok", [(128, 2, True), (128, 4, True), (129, 2, False), (128, 3, False),
                                                   (0, 1, False)])
def test_world_size_must_split_the_pair_batch(per_batch, world, ok):
    if ok:
        check_pair_batch(per_batch, world)
    else:
        with pytest.raises(ConfigError, match=f"{per_batch} sampled pairs per global batch, which {world} ranks"):
            check_pair_batch(per_batch, world)
