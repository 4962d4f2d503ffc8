"""Teacher encoding for a run (:func:`sparse_kd.teacher.cache.encode_across_ranks`): identical and
blank texts encoded once, rank 0's cache read before any forward. The 2-rank split is tested in
tests/reliability/test_multinode_folders.py."""

import torch

from sparse_kd.teacher.across_ranks import distinct, encode_across_ranks


class Enc:
    dim = 4

    def __init__(self) -> None:
        self.calls: list[list[str]] = []

    def identity(self):
        return {"model": "stand-in", "model_fingerprint": "0" * 64}

    def encode(self, texts):
        self.calls.append(list(texts))
        return torch.stack([torch.full((self.dim,), float(len(t))) for t in texts])


def test_distinct_keeps_first_seen_order_and_maps_every_text():
    uniq, inverse = distinct(["b", "", "a", "b", "", ""])
    assert uniq == ["b", "", "a"]
    assert inverse.tolist() == [0, 1, 2, 0, 1, 1]


def test_identical_and_blank_texts_are_encoded_once_and_cached(tmp_path):
    texts = ["", "toy story", "", "heat", "toy story"] + [""] * 1000
    enc = Enc()
    emb, inverse = encode_across_ranks(enc, texts, tmp_path, "users", Enc.dim)
    assert enc.calls == [["", "toy story", "heat"]]
    full = emb.index_select(0, inverse)
    assert full.shape == (len(texts), 4)
    assert torch.equal(full, torch.stack([torch.full((4,), float(len(t))) for t in texts]))
    again = Enc()
    emb2, inverse2 = encode_across_ranks(again, texts, tmp_path, "users", Enc.dim)
    assert again.calls == [] and torch.equal(emb2, emb) and torch.equal(inverse2, inverse)  # rank 0's cache


def test_a_failing_encoder_raises_with_the_name(tmp_path):
    class Bad(Enc):
        def encode(self, texts):
            raise OSError("disk gone")

    try:
        encode_across_ranks(Bad(), ["a"], tmp_path, "items", Enc.dim)
    except RuntimeError as e:
        assert "teacher encoding of items failed: OSError: disk gone" in str(e)
    else:
        raise AssertionError("no error")
