"""ParallelQuantEmbeddingBagCollection must return exactly what the serial quantized EBC returns."""

from typing import Dict, List

import pytest
import torch
import torchrec
from torch import nn
from torch.ao import quantization as quant
from torchrec.modules.embedding_configs import EmbeddingBagConfig, QuantConfig
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.quant.embedding_modules import EmbeddingBagCollection as QuantEBC
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from sparse_kd.compress.parallel import (
    LEAF_MODULES,
    ParallelQuantEmbeddingBagCollection,
    ParallelTBELookup,
    parallelize_quant_ebcs,
    plan_contiguous_groups,
)

# (dim, rows) per table: mixed dims exercise D_offsets and row padding
SHAPES = [(16, 700), (32, 300), (8, 1000), (16, 200), (64, 90)]
DT = {"fp16": torch.half, "int8": torch.qint8, "int4": torch.quint4x2, "int2": torch.quint2x4}


def _float_ebc(weighted: bool = False, seed: int = 0) -> EmbeddingBagCollection:
    torch.manual_seed(seed)
    tables = [
        EmbeddingBagConfig(name=f"t{i}", embedding_dim=d, num_embeddings=n, feature_names=[f"f{i}"])
        for i, (d, n) in enumerate(SHAPES)
    ]
    return EmbeddingBagCollection(tables=tables, is_weighted=weighted, device=torch.device("cpu"))


def _quantize(ebc: EmbeddingBagCollection, dtypes: Dict[str, torch.dtype]) -> QuantEBC:
    ebc.qconfig = QuantConfig(
        activation=quant.PlaceholderObserver.with_args(dtype=torch.float),
        weight=quant.PlaceholderObserver.with_args(dtype=torch.qint8),
        per_table_weight_dtype=dtypes,
    )
    return QuantEBC.from_float(ebc)


def _remaps(keep: float = 0.5, seed: int = 1) -> List[torch.Tensor]:
    """Remaps as a pruned model has them: original id -> kept row or -1."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _d, n in SHAPES:
        kept = torch.randperm(n, generator=g)[: max(1, int(n * keep))].sort().values
        remap = torch.full((n,), -1, dtype=torch.int32)
        remap[kept] = torch.arange(kept.numel(), dtype=torch.int32)
        out.append(remap)
    return out


def _pruned_qebc(dtypes: Dict[str, torch.dtype], array: bool = True) -> QuantEBC:
    remaps = _remaps()
    # the stored tables hold only the kept rows
    torch.manual_seed(2)
    tables = [
        EmbeddingBagConfig(name=f"t{i}", embedding_dim=d, num_embeddings=int((r >= 0).sum()), feature_names=[f"f{i}"])
        for i, ((d, _n), r) in enumerate(zip(SHAPES, remaps))
    ]
    qebc = _quantize(EmbeddingBagCollection(tables=tables, device=torch.device("cpu")), dtypes)
    for tbe in qebc._emb_modules:
        if array:
            tbe.set_index_remappings_array(remaps)
        else:
            tbe.set_index_remappings(remaps, use_array_for_index_remapping=False)
    return qebc


def _kjt(B: int = 96, max_len: int = 12, seed: int = 3, weighted: bool = False, dtype=torch.int64) -> KeyedJaggedTensor:
    g = torch.Generator().manual_seed(seed)
    T = len(SHAPES)
    lengths = torch.randint(0, max_len + 1, (T * B,), generator=g)  # includes empty bags
    per = lengths.view(T, B).sum(1).tolist()
    values = torch.cat([torch.randint(0, n, (int(c),), generator=g) for (_d, n), c in zip(SHAPES, per)]).to(dtype)
    weights = torch.rand(values.numel(), generator=g) if weighted else None
    return KeyedJaggedTensor.from_lengths_sync(
        keys=[f"f{i}" for i in range(T)], values=values, lengths=lengths, weights=weights
    )


def _same(a, b) -> None:
    assert a.keys() == b.keys()
    assert a.length_per_key() == b.length_per_key()
    assert a.values().dtype == b.values().dtype
    assert torch.equal(a.values(), b.values())


ALL = {f"t{i}": None for i in range(len(SHAPES))}


def _uniform(dt: str) -> Dict[str, torch.dtype]:
    return {k: DT[dt] for k in ALL}


MIXED = {"t0": torch.qint8, "t1": torch.quint4x2, "t2": torch.quint2x4, "t3": torch.half, "t4": torch.qint8}


@pytest.mark.parametrize("dtypes", ["fp16", "int8", "int4", "int2", "mixed"])
@pytest.mark.parametrize("pruned", [False, True])
def test_eager_matches_serial(dtypes: str, pruned: bool) -> None:
    dt = MIXED if dtypes == "mixed" else _uniform(dtypes)
    qebc = _pruned_qebc(dt) if pruned else _quantize(_float_ebc(), dt)
    kjt = _kjt()
    ref = qebc(kjt)
    if pruned:  # pruned ids really are looked up as zeros, so the remap is in play
        assert (ref.values() == 0).any()
    for split in ("tables", "batch", "auto"):
        for workers in (2, 3, 8):
            p = ParallelQuantEmbeddingBagCollection(qebc, num_workers=workers, split=split, min_ids_per_worker=1)
            items = p.lookups[0].work_items(96)
            assert len(items) > 1
            _same(p(kjt), ref)


@pytest.mark.parametrize("array", [True, False], ids=["array_remap", "hash_remap"])
def test_scripted_matches_serial_and_reloads(tmp_path, array: bool) -> None:
    qebc = _pruned_qebc(MIXED, array=array)
    kjt = _kjt(B=128)
    ref = qebc(kjt)
    p = ParallelQuantEmbeddingBagCollection(qebc, num_workers=2, min_ids_per_worker=1)
    scripted = torch.jit.script(p)
    _same(scripted(kjt), ref)
    for workers in (1, 3):
        scripted.set_num_workers(workers)
        _same(scripted(kjt), ref)
    if not array:
        # FBGEMM 1.8's PrunedMapCPU (hash remap) is not restored by torch.jit.load, not even
        # for the serial TBE: serve array remaps.
        return
    path = tmp_path / "pebc.pt"
    torch.jit.save(scripted, str(path))
    loaded = torch.jit.load(str(path))
    loaded.set_num_workers(2)
    _same(loaded(kjt), ref)
    _same(loaded(_kjt(B=128, dtype=torch.int32)), qebc(_kjt(B=128, dtype=torch.int32)))


class _Model(nn.Module):
    def __init__(self, ebc: nn.Module) -> None:
        super().__init__()
        self.ebc = ebc
        self.proj = nn.Linear(sum(d for d, _n in SHAPES), 1)

    def forward(self, kjt: KeyedJaggedTensor) -> torch.Tensor:
        return self.proj(self.ebc(kjt).values())


def test_served_model_fx_trace_and_script(tmp_path) -> None:
    """The serving path: swap in parallel lookups, FX-trace with LEAF_MODULES, script, save, load."""
    torch.manual_seed(0)
    model = _Model(_float_ebc())
    model.ebc.qconfig = QuantConfig(
        activation=quant.PlaceholderObserver.with_args(dtype=torch.float),
        weight=quant.PlaceholderObserver.with_args(dtype=torch.qint8),
        per_table_weight_dtype=MIXED,
    )
    model.ebc = QuantEBC.from_float(model.ebc)
    kjt = _kjt()
    with torch.no_grad():
        ref = model(kjt)
        parallelize_quant_ebcs(model, num_workers=2, min_ids_per_worker=1)
        assert isinstance(model.ebc, ParallelQuantEmbeddingBagCollection)
        gm = torchrec.fx.symbolic_trace(model, leaf_modules=LEAF_MODULES)
        assert any(n.op == "call_module" and "lookups" in str(n.target) for n in gm.graph.nodes)
        served = torch.jit.script(gm)
        assert torch.equal(served(kjt), ref)
        path = tmp_path / "served.pt"
        torch.jit.save(served, str(path))
        assert torch.equal(torch.jit.load(str(path))(kjt), ref)


def test_weighted_ebc() -> None:
    qebc = _quantize(_float_ebc(weighted=True), MIXED)
    kjt = _kjt(weighted=True)
    ref = qebc(kjt)
    for split in ("tables", "batch"):
        p = ParallelQuantEmbeddingBagCollection(qebc, num_workers=2, split=split, min_ids_per_worker=1)
        _same(p(kjt), ref)


def test_small_batches_and_serial_fallback() -> None:
    qebc = _quantize(_float_ebc(), _uniform("int4"))
    for B in (1, 2, 5):
        kjt = _kjt(B=B)
        ref = qebc(kjt)
        for split in ("tables", "batch"):
            _same(ParallelQuantEmbeddingBagCollection(qebc, num_workers=4, split=split, min_ids_per_worker=1)(kjt), ref)
    # below min_ids_per_worker the TBE runs unchanged
    kjt = _kjt(B=8)
    p = ParallelQuantEmbeddingBagCollection(qebc, num_workers=2)
    assert kjt.values().numel() < 2 * p.lookups[0].min_ids_per_worker
    _same(p(kjt), qebc(kjt))


def test_lookup_module_and_plans() -> None:
    qebc = _quantize(_float_ebc(), MIXED)
    tbe = qebc._emb_modules[0]
    lookup = ParallelTBELookup(tbe, num_workers=2, min_ids_per_worker=1)
    kjt = _kjt()
    indices, offsets = kjt.values(), kjt.offsets()
    assert torch.equal(lookup(indices, offsets), tbe(indices, offsets))
    # groups are contiguous, cover every feature, and never exceed the features
    assert plan_contiguous_groups([1.0] * 8, 2) == [0, 4, 8]
    assert plan_contiguous_groups([4.0, 1.0, 1.0, 1.0, 1.0], 2) == [0, 1, 5]
    assert plan_contiguous_groups([1.0, 1.0], 5) == [0, 1, 2]
    with pytest.raises(ValueError):
        ParallelTBELookup(tbe, split="rows")
    with pytest.raises(TypeError):
        ParallelQuantEmbeddingBagCollection(_float_ebc())  # type: ignore[arg-type]
