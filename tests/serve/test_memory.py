"""Tables on transparent huge pages (sparse_kd/serve/memory.py): same values, the model keeps working."""

from __future__ import annotations

import mmap

import pytest
import torch

from sparse_kd.serve.cpu_model import PackedTable, QuantizedLookup
from sparse_kd.serve import memory as M


def _lookup(rows=40_000, dim=64):
    torch.manual_seed(0)
    w = torch.ops.quantized.embedding_bag_byte_prepack(torch.randn(rows, dim))  # 40k x 72 B: 2.9 MB
    small = torch.ops.quantized.embedding_bag_byte_prepack(torch.randn(10, dim))
    return torch.jit.script(QuantizedLookup([PackedTable("a", "int8", dim, w, None), PackedTable("b", "int8", dim, small, None)]))


def test_thp_mode_reads_the_bracketed_setting(tmp_path, monkeypatch):
    f = tmp_path / "enabled"
    f.write_text("always [madvise] never\n")
    monkeypatch.setattr(M, "THP_ENABLED", f)
    assert M.thp_mode() == "madvise"
    f.write_text("always madvise [never]\n")
    assert M.thp_mode() == "never"
    monkeypatch.setattr(M, "THP_ENABLED", tmp_path / "missing")
    assert M.thp_mode() == "unavailable"


@pytest.mark.skipif(not hasattr(mmap, "MADV_HUGEPAGE"), reason="no MADV_HUGEPAGE here")
def test_large_buffers_move_and_lookups_are_unchanged(monkeypatch):
    monkeypatch.setattr(M, "thp_mode", lambda: "madvise")
    m = _lookup()
    ids, lengths = torch.randint(0, 10, (400,)), torch.full((20,), 10)
    ref = m(ids, lengths)
    before = [t.weight.data_ptr() for t in m.tables]
    rep = M.place_on_huge_pages(m)
    after = [t.weight.data_ptr() for t in m.tables]
    assert rep["tensors"] == 1 and rep["bytes"] == 40_000 * 72  # the small table stays where it was
    assert after[0] != before[0] and after[1] == before[1]
    assert after[0] % mmap.PAGESIZE == 0
    assert torch.equal(m(ids, lengths), ref)
    big = torch.randint(0, 40_000, (400,))
    lengths2 = torch.cat([torch.full((20,), 20), torch.zeros(20, dtype=torch.int64)])
    assert torch.equal(m(big, lengths2)[:, 0], torch.ops.quantized.embedding_bag_byte_rowwise_offsets(
        m.tables[0].weight, big.int(), torch.arange(0, 401, 20, dtype=torch.int32), False, 0, False, None, None, True))


def test_nothing_moves_when_the_kernel_says_never(monkeypatch):
    monkeypatch.setattr(M, "thp_mode", lambda: "never")
    m = _lookup()
    before = m.tables[0].weight.data_ptr()
    assert M.place_on_huge_pages(m) == {"thp": "never", "tensors": 0, "bytes": 0}
    assert m.tables[0].weight.data_ptr() == before


@pytest.mark.skipif(__import__("platform").libc_ver()[0] != "glibc", reason="glibc only")
def test_malloc_tuning_applies_on_glibc():
    assert M.keep_freed_memory() is True
