"""Users' text rows kept split over the ranks (issue 20, 4b): :func:`encode_sharded` leaves each
rank its share, rank 0 streams the cache file (miss) or each rank's share from it (hit, verified
as it passes), and the consumers (the teacher ranker's PCA features, rank 0's run file) give what
the gathered rows give."""

from __future__ import annotations

import zlib

import pytest
import torch
from safetensors.torch import load_file

from sparse_kd.distill.transfer import pca_reduce
from sparse_kd.teacher.across_ranks import distinct, encode_sharded
from sparse_kd.teacher.sharded_rows import ShardedRows, ShardedRowsError

DIM = 6
TEXTS = [f"user {i % 170} likes films" if i % 7 else "" for i in range(300)]  # repeats and blanks


def row_of(text: str) -> torch.Tensor:
    g = torch.Generator().manual_seed(zlib.crc32(text.encode()))
    return torch.randn(DIM, generator=g) * torch.linspace(3.0, 0.5, DIM)  # distinct variances: a stable PCA


class Enc:
    dim = DIM

    def __init__(self) -> None:
        self.calls: list[str] = []

    def identity(self):
        return {"model": "stand-in", "model_fingerprint": "0" * 64}

    def encode(self, texts):
        self.calls += list(texts)
        return torch.stack([row_of(t) for t in texts])


def small_blocks(monkeypatch=None) -> None:
    """Blocks of 16 rows (and localize rounds of 8 per rank), so every streamed path runs over several."""
    import sparse_kd.teacher.across_ranks as A
    import sparse_kd.teacher.cache as C
    import sparse_kd.teacher.sharded_rows as S

    for mod, name in ((A, "CHUNK"), (S, "CHUNK"), (C, "ROW_BLOCK"), (S, "MIN_ROUND")):
        if monkeypatch is None:
            setattr(mod, name, 16)
        else:
            monkeypatch.setattr(mod, name, 16)


def sharded_worker(cache_dir: str, out_file: str) -> dict:
    import torch.distributed as dist

    from sparse_kd.dist import init_distributed
    from sparse_kd.teacher.cache import cache_key, cache_path
    from sparse_kd.teacher.sharded_rows import write_rows_collective

    small_blocks()
    init_distributed("gloo", 120)
    rank = dist.get_rank()
    out: dict = {}
    enc = Enc()
    rows = encode_sharded(enc, TEXTS, cache_dir, "users", DIM)  # miss: each rank encodes its share
    out["miss"] = (rows.lo, rows.hi, rows.local.clone(), list(enc.calls))
    again = Enc()
    hit = encode_sharded(again, TEXTS, cache_dir, "users", DIM)  # hit: rank 0 streams each share
    out["hit"] = (hit.lo, hit.hi, hit.local.clone(), list(again.calls))
    if rank == 0:  # flip one byte of the tensor (the last one): the header still matches, the sha256 does not
        path = cache_path(cache_dir, "users", cache_key(enc.identity(), distinct(TEXTS)[0]))
        data = bytearray(path.read_bytes())
        data[-1] ^= 0xFF
        path.write_bytes(bytes(data))
    dist.barrier()
    third = Enc()
    redo = encode_sharded(third, TEXTS, cache_dir, "users", DIM)
    out["corrupt"] = (redo.local.clone(), list(third.calls))
    out["pca"] = pca_reduce(rows, 3)
    out["gather"] = rows.gather()
    block = rows.localize([(37, 205)] if rank == 1 else [])  # one rank asks, the other only sends
    out["block"] = block[37:205] if rank == 1 else None
    asks = {0: [(5, 40), (100, 160)], 1: [(0, 300)]}  # rows held by both ranks, in any order of owners
    loc = rows.localize(asks[rank])
    out["local"] = [loc[a:b] for a, b in asks[rank]] + [loc[120:130, 1:3]]
    out["local_outside"] = ""
    try:
        loc[38:45]
    except ShardedRowsError as e:
        out["local_outside"] = str(e)
    out["local_none"] = rows.localize([] if rank == 0 else [(7, 9)]).ranges  # a rank may ask for nothing
    try:
        rows[0:3]
    except ShardedRowsError as e:
        out["refused"] = str(e)

    class Opener:
        def __enter__(self):
            self.f = open(out_file, "wb")
            return self.f

        def __exit__(self, *exc):
            self.f.close()

    write_rows_collective(Opener, {"user": rows, "item": torch.arange(12.0).reshape(4, 3)})
    return out


def expected() -> tuple[torch.Tensor, torch.Tensor]:
    uniq, inverse = distinct(TEXTS)
    return torch.stack([row_of(t) for t in uniq]), inverse


def test_two_ranks_keep_their_shares_and_agree_with_the_gathered_rows(tmp_path):
    from sparse_kd.local_launch import launch_local

    out = launch_local(sharded_worker, 2, str(tmp_path / "cache"), str(tmp_path / "rows.safetensors"))
    uniq_rows, inverse = expected()
    n = uniq_rows.shape[0]
    (lo0, hi0, loc0, calls0), (lo1, hi1, loc1, calls1) = out[0]["miss"], out[1]["miss"]
    assert (lo0, hi0, lo1, hi1) == (0, n // 2, n // 2, n)  # each rank holds only its half
    assert torch.equal(loc0, uniq_rows[:hi0]) and torch.equal(loc1, uniq_rows[lo1:])
    assert len(calls0) + len(calls1) == n and not set(calls0) & set(calls1)  # each distinct text once
    for r in (0, 1):  # the hit: same shares, no forward
        lo, hi, loc, calls = out[r]["hit"]
        assert calls == [] and torch.equal(loc, uniq_rows[lo:hi])
    # a corrupted file is noticed from the streamed hash and encoded again, on every rank
    assert out[0]["corrupt"][1] and out[1]["corrupt"][1]
    assert torch.equal(torch.cat([out[0]["corrupt"][0], out[1]["corrupt"][0]]), uniq_rows)
    full = uniq_rows.index_select(0, inverse)
    # the teacher ranker's PCA features: the same on both ranks, and what the gathered rows give
    assert torch.equal(out[0]["pca"], out[1]["pca"])
    assert torch.allclose(out[0]["pca"], pca_reduce(full, 3), atol=1e-4)
    assert torch.equal(out[0]["gather"], uniq_rows) and torch.equal(out[1]["gather"], uniq_rows)
    assert out[0]["block"] is None and torch.equal(out[1]["block"], full[37:205])
    assert "split over the ranks" in out[0]["refused"] and "gather()" in out[0]["refused"]
    # localize: each rank gets exactly the rows of the ranges it asked for, whoever held them
    a0 = out[0]["local"]
    assert torch.equal(a0[0], full[5:40]) and torch.equal(a0[1], full[100:160]) and torch.equal(a0[2], full[120:130, 1:3])
    assert torch.equal(out[1]["local"][0], full)
    assert "not held by this rank" in out[0]["local_outside"] and "(5, 40)" in out[0]["local_outside"]
    assert out[0]["local_none"] == [] and out[1]["local_none"] == [(7, 9)]
    written = load_file(str(tmp_path / "rows.safetensors"))  # rank 0's file: every user's row, in order
    assert torch.equal(written["user"], full) and torch.equal(written["item"], torch.arange(12.0).reshape(4, 3))


def test_one_process_holds_every_row_and_reduces_like_the_plain_path(tmp_path, monkeypatch):
    small_blocks(monkeypatch)
    uniq_rows, inverse = expected()
    rows = encode_sharded(Enc(), TEXTS, tmp_path, "users", DIM)
    assert isinstance(rows, ShardedRows) and (rows.lo, rows.hi, rows.shape) == (0, len(uniq_rows), (300, DIM))
    assert torch.equal(rows.local, uniq_rows)
    again = Enc()
    assert torch.equal(encode_sharded(again, TEXTS, tmp_path, "users", DIM).local, uniq_rows) and again.calls == []
    assert torch.allclose(pca_reduce(rows, 3), pca_reduce(uniq_rows.index_select(0, inverse), 3), atol=1e-4)
    with pytest.raises(ShardedRowsError, match="split over the ranks"):
        rows.materialize()


def test_a_cache_file_written_in_blocks_reads_back_and_verifies(tmp_path, monkeypatch):
    """write_blocks_atomic's patched sha256 is the one load_verified checks."""
    from sparse_kd.teacher.cache import load_verified, write_blocks_atomic

    t = torch.randn(50, 4)
    path = tmp_path / "x.safetensors"
    sha = write_blocks_atomic(path, 50, 4, {"format_version": "1", "key": "k", "num_texts": "50", "dim": "4"},
                              [t[:16], t[16:32], t[32:]])
    got, why = load_verified(path, "k", 50)
    assert why == "" and torch.equal(got, t) and len(sha) == 64
    with pytest.raises(ValueError, match="49 rows written, expected 50"):
        write_blocks_atomic(tmp_path / "y.safetensors", 50, 4, {"key": "k"}, [t[:49]])
    assert not list(tmp_path.glob("*y.safetensors*"))  # no half-written file left


def test_which_runs_keep_user_rows_sharded():
    from helpers.tiny import tiny_config, tiny_dataset
    from sparse_kd.text_stage import users_stay_sharded

    cfg = tiny_config("/tmp/unused", distill={"user_text": "text"})
    ds = tiny_dataset(cfg)
    # every student reads them split (alignment, pca and learned transfer, the refit): only the teacher decides
    assert users_stay_sharded(cfg, ds, world=2)
    assert not users_stay_sharded(cfg, ds, world=1)
    full_text = tiny_config("/tmp/unused", distill={"user_text": "text", "teacher_ranker": {"text_dim": -1}})
    assert not users_stay_sharded(full_text, ds, world=2)
    assert not users_stay_sharded(cfg, ds, world=2, teachers=[full_text])  # a teacher candidate reads every dim
    split_full = tiny_config("/tmp/unused", distill={"user_text": "text", "teacher_ranker": {"text_dim": -1,
                                                                                           "features_layout": "sharded"}})
    assert users_stay_sharded(split_full, ds, world=2)  # every dim, into the split feature table as it lies
    both = tiny_config("/tmp/unused", distill={"user_text": "both"})
    assert users_stay_sharded(both, ds, world=2)  # each rank its block of users' (own, history) rows
    assert not users_stay_sharded(tiny_config("/tmp/unused", distill={"user_text": "history"}), ds, world=2)  # no own rows


def test_which_runs_keep_item_rows_sharded():
    from helpers.tiny import tiny_config, tiny_dataset
    from sparse_kd.text_stage import items_stay_sharded

    cfg = tiny_config("/tmp/unused", distill={"user_text": "text"})
    ds = tiny_dataset(cfg)
    assert items_stay_sharded(cfg, ds, world=2) and not items_stay_sharded(cfg, ds, world=1)
    both = tiny_config("/tmp/unused", distill={"user_text": "both"})
    assert items_stay_sharded(both, ds, world=2)  # history rows split with them, beside the own rows' block
    history = tiny_config("/tmp/unused", distill={"user_text": "history"})  # 60 users, 40 items
    assert not items_stay_sharded(history, ds, world=2)  # (60 + 40) / 2 split rows per rank > 40 item rows
    assert items_stay_sharded(history, ds, world=3)  # (60 + 40) / 3 < 40
    wide = tiny_config("/tmp/unused", distill={"user_text": "history"},
                       data={"synthetic": {"num_users": 60, "num_items": 80, "interactions_per_user": 30, "num_topics": 4}})
    assert items_stay_sharded(wide, tiny_dataset(wide), world=2)  # (60 + 80) / 2 < 80
    for tr in ({"text_dim": -1}, {"history_pair": True}, {"text_dim": -1, "features_layout": "sharded", "history_pair": True},
               {"text_dim": -1, "features_layout": "sharded", "history_attention": {"enabled": True}}):
        # every dim as dense features, or read whole by the attention; any item's row per pair
        other = tiny_config("/tmp/unused", distill={"user_text": "text", "teacher_ranker": tr})
        assert not items_stay_sharded(other, ds, world=2) and not items_stay_sharded(cfg, ds, world=2, teachers=[other])
    every_dim = tiny_config("/tmp/unused", distill={"user_text": "text", "teacher_ranker": {"text_dim": -1, "features_layout": "sharded"}})
    assert items_stay_sharded(every_dim, ds, world=2)  # every dim, into the split feature table as it lies


class StandInTeacher(Enc):
    dim = 16

    def encode(self, texts):
        rows = [torch.randn(16, generator=torch.Generator().manual_seed(zlib.crc32(t.encode()))) for t in texts]
        return torch.stack(rows) if rows else torch.zeros(0, 16)

    @classmethod
    def from_config(cls, cfg, **overrides):
        return cls()


def run_worker(cfg, sharded: bool) -> dict:
    """run_training on this rank with a stand-in teacher; ``sharded`` False forces the gathered
    user rows. Returns the teacher ranker's user features, the kind of rows it read, the rows the
    student's shards were seeded with and aligned to (this rank's ranges), and the metrics."""
    import logging
    import warnings

    import sparse_kd.student.train as T
    import sparse_kd.teacher as teacher
    from sparse_kd import pipeline as P
    from sparse_kd.data.batching import TARGET_KEYS
    from sparse_kd.student.init import shard_row_ranges
    from sparse_kd.student.model import table_name

    warnings.filterwarnings("ignore")
    logging.getLogger("torchrec").setLevel(logging.ERROR)
    teacher.TextEncoder = StandInTeacher
    seen: dict = {"init": {}, "targets": {}, "refit": {}}
    real_features, real_stay, real_items = P.teacher_features, P.users_stay_sharded, P.items_stay_sharded
    real_tables, real_targets = T.write_tables, T.write_targets

    def features(cfg_, ds, user_text, item_text, *args):
        seen["rows"], seen["items"] = type(user_text).__name__, type(item_text).__name__
        out = real_features(cfg_, ds, user_text, item_text, *args)
        seen["user_dense"] = out.user_dense
        return out

    def read(dmp, sources, table_of) -> dict:
        ranges = shard_row_ranges(dmp.state_dict())
        return {f: [src[a:b].float().clone() for a, b in ranges.get(table_of(f), [])] for f, src in sources.items()}

    def tables(dmp, seed, init_rows, reinit=True):
        if init_rows:  # the student's seeding, or the refit after training
            seen["init" if reinit else "refit"] = read(dmp, init_rows, table_name)
        return real_tables(dmp, seed, init_rows, reinit)

    def targets(dmp, sources, unit=False):
        held = real_targets(dmp, sources, unit)
        from sparse_kd.checkpoint import frozen

        by_key = {TARGET_KEYS[f]: f for f in TARGET_KEYS}
        seen["targets"] = {by_key[k.split(".")[-2]]: [s.tensor.clone() for s in sorted(
            v.local_shards(), key=lambda s: tuple(s.metadata.shard_offsets))]
            for k, v in dmp.state_dict().items() if frozen(k) and k.endswith(".weight")}  # what the shards now hold
        return held

    import sparse_kd.student.refit as R

    real_read = R.read_table

    def read_table(path, feature, rows=None):  # which trained rows each rank reads (refit, learned transfer)
        out = real_read(path, feature, rows)
        seen.setdefault("reads", []).append((feature, rows, tuple(out.shape)))
        return out

    R.read_table = read_table
    P.teacher_features, T.write_tables, T.write_targets = features, tables, targets
    P.users_stay_sharded = real_stay if sharded else (lambda *a, **k: False)
    P.items_stay_sharded = real_items if sharded else (lambda *a, **k: False)
    metrics = P.run_training(cfg, ("teacher_ranker", "distilled"))
    return {**seen, "metrics": metrics}


def run_config(tmp_path, tag: str, layout: str):
    from helpers.tiny import tiny_config

    return tiny_config(str(tmp_path / f"run_{tag}"), train={"epochs": 1}, teacher={"cache_dir": str(tmp_path / f"cache_{tag}")},
                       distill={"user_text": "text", "logit": {"enabled": True},
                                "align": {"enabled": True, "layout": layout},  # users and items
                                "transfer": {"enabled": True}})  # pca, users and items


def test_a_two_rank_run_keeps_user_rows_sharded_and_trains_the_same_models(tmp_path):
    """Logit KD from a teacher ranker that reads the users' own text, alignment (targets in a
    row_wise table) and PCA transfer on users and items: with the users' and the items' rows split
    over the ranks the teacher gets the same features, each rank's shards the same seeded rows and
    targets as with every row gathered, and rank 0's run file every user's and item's row."""
    from helpers.tiny import tiny_dataset
    from sparse_kd.local_launch import launch_local

    on = launch_local(run_worker, 2, run_config(tmp_path, "on", "sharded"), True)
    off = launch_local(run_worker, 2, run_config(tmp_path, "off", "sharded"), False)
    assert on[0]["rows"] == on[1]["rows"] == "ShardedRows" and off[0]["rows"] != "ShardedRows"
    assert on[0]["items"] == on[1]["items"] == "ShardedRows" and off[0]["items"] != "ShardedRows"
    assert torch.equal(on[0]["user_dense"], on[1]["user_dense"])
    assert torch.allclose(on[0]["user_dense"], off[0]["user_dense"], atol=1e-4)
    for r in (0, 1):  # this rank's shards: seeded rows and alignment targets, users and items
        for what in ("init", "targets"):
            assert set(on[r][what]) == set(off[r][what]) == {"user_id", "item_id"}, (what, on[r][what].keys())
            for f in ("user_id", "item_id"):
                a, b = on[r][what][f], off[r][what][f]
                assert len(a) == len(b) and all(torch.allclose(x, y, atol=1e-4) for x, y in zip(a, b)), (r, what, f)
    assert sum(x.shape[0] for r in (0, 1) for x in on[r]["targets"]["user_id"]) == 60  # every user's row, once
    ds = tiny_dataset(run_config(tmp_path, "x", "sharded"))
    want, want_items = StandInTeacher().encode(ds.user_text), StandInTeacher().encode(ds.item_text)
    for tag in ("on", "off"):
        written = load_file(str(tmp_path / f"run_{tag}" / "data" / "text_embeddings.safetensors"))
        assert torch.equal(written["user"], want) and torch.equal(written["item"], want_items)
    for name in ("teacher_ranker", "distilled"):  # same inputs, same training: the same model, near enough
        assert abs(on[0]["metrics"][name]["test"]["auc"] - off[0]["metrics"][name]["test"]["auc"]) < 0.01


def test_replicated_alignment_targets_gather_sharded_user_rows(tmp_path):
    from sparse_kd.local_launch import launch_local

    out = launch_local(run_worker, 2, run_config(tmp_path, "rep", "replicated"), True)
    assert out[0]["rows"] == "ShardedRows" and out[0]["targets"] == {}  # no target table: replicated buffers
    assert set(out[0]["metrics"]) == {"teacher_ranker", "distilled"}


def test_learned_transfer_and_refit_fit_user_rows_where_they_lie(tmp_path):
    """The ``learned`` weight transfer and the refit of user_id rows: ridge maps fitted on the
    users' rows split over the ranks (:func:`~sparse_kd.distill.transfer.fit_map`) seed and refit
    each rank's shards with the rows the gathered run writes, to float rounding."""
    from helpers.tiny import tiny_config
    from sparse_kd.local_launch import launch_local

    def config(tag: str):
        return tiny_config(str(tmp_path / f"run_{tag}"), train={"epochs": 1}, teacher={"cache_dir": str(tmp_path / f"c_{tag}")},
                           distill={"user_text": "text", "logit": {"enabled": True},
                                    "transfer": {"enabled": True, "projection": "learned", "refit": True,
                                                 "refit_features": ["user_id", "item_id"], "refit_min_count": 20}})

    on = launch_local(run_worker, 2, config("on"), True)
    off = launch_local(run_worker, 2, config("off"), False)
    assert on[0]["rows"] == "ShardedRows" and off[0]["rows"] != "ShardedRows"
    for r in (0, 1):
        for what in ("init", "refit"):
            assert set(on[r][what]) == set(off[r][what]) and "user_id" in on[r][what], (r, what, on[r][what].keys())
            for f, a in on[r][what].items():
                b = off[r][what][f]
                assert len(a) == len(b) and all(torch.allclose(x, y, atol=1e-4, equal_nan=True) for x, y in zip(a, b)), (r, what, f)
    for r in (0, 1):  # each rank reads the trained rows of its share of the entities, never a whole table
        assert on[r]["reads"] and all(rows is not None and shape[0] <= {"user_id": 30, "item_id": 20}[f]
                                      for f, rows, shape in on[r]["reads"]), on[r]["reads"]
    assert {f for f, _, _ in on[0]["reads"]} == {"user_id", "item_id"} and "reads" not in off[1]  # gathered: rank 0 reads
    refit_users = [x for r in (0, 1) for x in on[r]["refit"]["user_id"]]
    kept = sum(int(torch.isnan(x).any(1).sum()) for x in refit_users)
    assert 0 < kept < sum(x.shape[0] for x in refit_users)  # some users refit, the others kept
    assert abs(on[0]["metrics"]["distilled"]["test"]["auc"] - off[0]["metrics"]["distilled"]["test"]["auc"]) < 0.01


def test_both_user_texts_stay_split_by_blocks_of_users(tmp_path):
    """``distill.user_text: both``: each rank holds its block of users' own rows beside their
    history rows; the teacher's features, the seeded rows and the alignment targets are those of
    the gathered run."""
    from sparse_kd.local_launch import launch_local

    def config(tag: str):
        cfg = run_config(tmp_path, tag, "sharded")
        return dataclass_replace(cfg, distill=dataclass_replace(cfg.distill, user_text="both"))

    on = launch_local(run_worker, 2, config("on"), True)
    off = launch_local(run_worker, 2, config("off"), False)
    assert on[0]["rows"] == "ShardedRows" and off[0]["rows"] == "Tensor"
    assert on[0]["items"] == "ShardedRows" and off[0]["items"] == "Tensor"  # the history rows split with them
    assert torch.allclose(on[0]["user_dense"], off[0]["user_dense"], atol=1e-4)
    for r in (0, 1):
        for what in ("init", "targets"):
            for f in ("user_id", "item_id"):
                a, b = on[r][what][f], off[r][what][f]
                assert len(a) == len(b) and all(torch.allclose(x, y, atol=1e-4) for x, y in zip(a, b)), (r, what, f)
    assert on[0]["targets"]["user_id"][0].shape[1] == 32  # own (16) beside history (16)


def test_click_history_users_read_item_rows_split_over_the_ranks(tmp_path):
    """``distill.user_text: history`` with more items than users: the items' rows stay split, and
    so do the users' history rows computed from them; the teacher's features, each rank's seeded
    rows (users projected on the items' PCA basis) and alignment targets, and rank 0's run file
    are those of the gathered run."""
    from helpers.tiny import tiny_config, tiny_dataset
    from sparse_kd.distill.history import history_text
    from sparse_kd.local_launch import launch_local

    def config(tag: str):
        return tiny_config(str(tmp_path / f"run_{tag}"), train={"epochs": 1}, teacher={"cache_dir": str(tmp_path / f"c_{tag}")},
                           data={"synthetic": {"num_users": 60, "num_items": 80, "interactions_per_user": 30, "num_topics": 4}},
                           distill={"user_text": "history", "logit": {"enabled": True},
                                    "align": {"enabled": True, "layout": "sharded"}, "transfer": {"enabled": True}})

    on = launch_local(run_worker, 2, config("on"), True)
    off = launch_local(run_worker, 2, config("off"), False)
    assert on[0]["rows"] == on[1]["rows"] == on[0]["items"] == "ShardedRows"
    assert off[0]["rows"] == "HistoryRows" and off[0]["items"] == "Tensor"
    assert torch.allclose(on[0]["user_dense"], off[0]["user_dense"], atol=1e-4)
    for r in (0, 1):
        for what in ("init", "targets"):
            assert set(on[r][what]) == {"user_id", "item_id"}, (what, on[r][what].keys())
            for f in ("user_id", "item_id"):
                a, b = on[r][what][f], off[r][what][f]
                assert len(a) == len(b) and all(torch.allclose(x, y, atol=1e-4) for x, y in zip(a, b)), (r, what, f)
    ds = tiny_dataset(config("x"))
    items = StandInTeacher().encode(ds.item_text)
    for tag in ("on", "off"):
        written = load_file(str(tmp_path / f"run_{tag}" / "data" / "text_embeddings.safetensors"))
        assert torch.equal(written["item"], items)
        assert torch.allclose(written["user"], history_text(ds, items), atol=1e-6)
    assert abs(on[0]["metrics"]["distilled"]["test"]["auc"] - off[0]["metrics"]["distilled"]["test"]["auc"]) < 0.01


def dataclass_replace(obj, **kw):
    import dataclasses

    return dataclasses.replace(obj, **kw)
