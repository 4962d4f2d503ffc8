"""Row sources read as the tensors they stand for: IndexedRows, and text_embeddings' users."""

import pytest
import torch

from sparse_kd.distill.rows import IndexedRows, as_tensor


def test_indexed_rows_read_like_the_tensor_they_stand_for():
    distinct, index = torch.randn(3, 5), torch.tensor([0, 0, 2, 1, 0, 2])
    rows, whole = IndexedRows(distinct, index), distinct[index]
    assert rows.shape == (6, 5) and len(rows) == 6
    torch.testing.assert_close(rows[1:4], whole[1:4], rtol=0, atol=0)
    torch.testing.assert_close(rows[2:6, 1:3], whole[2:6, 1:3], rtol=0, atol=0)
    mask = torch.tensor([True, False, True, False, False, True])
    torch.testing.assert_close(rows[mask], whole[mask], rtol=0, atol=0)
    torch.testing.assert_close(rows[torch.tensor([5, 0])], whole[[5, 0]], rtol=0, atol=0)
    torch.testing.assert_close(as_tensor(rows), whole, rtol=0, atol=0)
    assert as_tensor(None) is None and as_tensor(whole) is whole
    with pytest.raises(TypeError, match="contiguous"):
        rows[0:6:2]


def test_consumers_read_indexed_rows_as_they_read_the_tensor(monkeypatch):
    import sparse_kd.distill.targets as T
    from sparse_kd.distill.transfer import learned_map, pca_reduce, transfer_map

    g = torch.Generator().manual_seed(0)
    distinct, index = torch.randn(4, 6, generator=g), torch.randint(0, 4, (40,), generator=g)
    rows, whole = IndexedRows(distinct, index), distinct[index]
    torch.testing.assert_close(pca_reduce(rows, 3), pca_reduce(whole, 3))
    torch.testing.assert_close(transfer_map(rows, 3, "pca", 0.1).materialize(), transfer_map(whole, 3, "pca", 0.1).materialize())
    warm, target = torch.arange(40) % 3 > 0, torch.randn(40, 2, generator=g)
    torch.testing.assert_close(learned_map(rows, target, warm), learned_map(whole, target, warm))
    monkeypatch.setattr(T, "WRITE_CHUNK", 7)
    torch.testing.assert_close(T.held_rows(rows, True), T.held_rows(whole, True))


def test_repeated_user_texts_are_encoded_and_held_once(tmp_path, monkeypatch):
    """Users described by a few fields: text_embeddings keeps one row per distinct text, and rank
    0's file for the compression stage still has a row per user."""
    import sparse_kd.teacher as teacher
    from safetensors.torch import load_file

    from sparse_kd import pipeline as P
    from sparse_kd.data import load_dataset
    from helpers.tiny import tiny_config

    class Enc:
        dim = 8

        @classmethod
        def from_config(cls, *a, **k):
            return cls()

        def identity(self):
            return {"model": "stand-in", "model_fingerprint": "0" * 64}

        def encode(self, texts):
            return torch.stack([torch.full((8,), float(len(t))) for t in texts])

    monkeypatch.setattr(teacher, "TextEncoder", Enc)
    cfg = tiny_config(str(tmp_path / "run"), nproc=1, teacher={"cache_dir": str(tmp_path / "cache")},
                      distill={"user_text": "text"})
    ds = load_dataset(cfg.data)
    ds.user_text = [["young reader", "old", "student of film"][u % 3] for u in range(ds.num_users)]
    (tmp_path / "run" / "data").mkdir(parents=True)
    user, item = P.text_embeddings(cfg, ds, P.init_distributed("gloo", 60))
    assert isinstance(user, IndexedRows) and user.distinct.shape == (3, 8) and user.shape == (ds.num_users, 8)
    want = torch.tensor([float(len(t)) for t in ds.user_text])[:, None].expand(-1, 8)
    torch.testing.assert_close(as_tensor(user), want)
    saved = load_file(str(tmp_path / "run" / "data" / "text_embeddings.safetensors"))
    torch.testing.assert_close(saved["user"], want)
    assert isinstance(item, torch.Tensor) and item.shape == (ds.num_items, 8)
