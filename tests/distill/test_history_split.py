"""Click-history user rows from item rows split over the ranks (issue 20, 4b):
:func:`~sparse_kd.distill.history.history_split` gives each rank its block of the rows
:class:`~sparse_kd.distill.history.HistoryRows` computes from every item row, and no rank holds
another rank's items."""

from __future__ import annotations

import torch

from sparse_kd.distill.history import HistoryRows, history_split, resolve_user_text

H = 5


def item_rows(n_distinct: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(3)
    return torch.randn(n_distinct, H, generator=g) * torch.linspace(0.2, 4.0, n_distinct)[:, None]  # unequal norms


def split_worker(chunk: int, click_chunk: int) -> dict:
    import torch.distributed as dist

    import sparse_kd.distill.history as Hy
    from helpers.tiny import tiny_config, tiny_dataset
    from sparse_kd.dist import init_distributed, split_range
    from sparse_kd.teacher.sharded_rows import ShardedRows

    Hy.ROW_CHUNK, Hy.CLICK_CHUNK = chunk, click_chunk  # several blocks of users and of clicks per rank
    init_distributed("gloo", 120)
    rank = dist.get_rank()
    ds = tiny_dataset(tiny_config("/tmp/unused"))
    index = torch.arange(ds.num_items) % 29  # items share rows (identical texts): 29 distinct rows
    distinct = item_rows(29)
    lo, hi = split_range(29, rank, 2)
    items = ShardedRows(distinct[lo:hi].clone(), index, lo, 29)
    hist = history_split(ds, items)
    out = {"lo": hist.lo, "hi": hist.hi, "local": hist.local.clone(), "n": hist.shape[0], "items_held": items.local.shape[0]}
    hist_mode, _ = resolve_user_text("history", ds, None, items)
    out["resolved"] = (type(hist_mode).__name__, hist_mode.lo, torch.equal(hist_mode.local, hist.local))
    return out


def test_history_rows_from_split_items_are_each_ranks_block_of_the_whole_rows():
    from helpers.tiny import tiny_config, tiny_dataset
    from sparse_kd.local_launch import launch_local

    ds = tiny_dataset(tiny_config("/tmp/unused"))
    want = HistoryRows(ds, item_rows(29)[torch.arange(ds.num_items) % 29]).materialize()
    assert want.abs().sum(1).gt(0).sum() > 40  # most users clicked: the test sees real sums
    for chunk, click_chunk in ((1 << 14, 1 << 16), (7, 5)):  # one block each; many blocks of users and clicks
        out = launch_local(split_worker, 2, chunk, click_chunk)
        assert (out[0]["lo"], out[0]["hi"], out[1]["lo"], out[1]["hi"]) == (0, 30, 30, 60)
        assert out[0]["n"] == out[1]["n"] == 60
        assert out[0]["items_held"] + out[1]["items_held"] == 29  # each rank its share of the item rows only
        got = torch.cat([out[0]["local"], out[1]["local"]])
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)
        for r in (0, 1):
            assert out[r]["resolved"] == ("ShardedRows", out[r]["lo"], True)  # history mode reads the split rows


def test_one_process_splits_nothing_and_gives_the_whole_rows():
    from helpers.tiny import tiny_config, tiny_dataset
    from sparse_kd.teacher.sharded_rows import ShardedRows

    ds = tiny_dataset(tiny_config("/tmp/unused"))
    rows = item_rows(ds.num_items)
    hist = history_split(ds, ShardedRows(rows, torch.arange(ds.num_items), 0, ds.num_items))
    assert (hist.lo, hist.hi) == (0, ds.num_users)
    torch.testing.assert_close(hist.local, HistoryRows(ds, rows).materialize(), atol=1e-6, rtol=1e-5)
