"""Fixtures for the teacher tests: a tiny random BERT folder (fast) and a few realistic texts."""

from __future__ import annotations

from pathlib import Path

import pytest

TEXTS = [
    "Toy Story (1995). Genres: Animation, Children's, Comedy.",
    "",
    "A 24-year-old female student from zip code 85711. Likes Comedy and Drama movies.",
    "GoldenEye (1995). Genres: Action, Adventure, Thriller.",
    "   ",
    "A 53-year-old male retired person from zip code 94043. Likes Film-Noir, Mystery and Western movies. "
    "Recently watched Casablanca and The Maltese Falcon.",
    "Heat (1995).",
    "The Lost Kingdom, Part II: Silent River (1941). Genres: War, Drama, Romance, Musical.",
]

_WORDS = ["the", "story", "toy", "genres", "comedy", "drama", "year", "old", "from", "zip", "code", "likes",
          "movies", "part", "a", "and", "student", "male", "female"]


def make_tiny_bert(folder: Path, seed: int = 0, hidden: int = 32) -> Path:
    """Save a random 2-layer BertModel (hidden ``hidden``) and a small WordPiece tokenizer to ``folder``."""
    import torch
    from transformers import BertConfig, BertModel, BertTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    chars = list("abcdefghijklmnopqrstuvwxyz0123456789")
    vocab = (["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + chars + ["##" + c for c in chars]
             + list(".,()-:'") + _WORDS)
    BertTokenizer(vocab={w: i for i, w in enumerate(vocab)}).save_pretrained(str(folder))
    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=len(vocab), hidden_size=hidden, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=2 * hidden, max_position_embeddings=128)
    BertModel(cfg).eval().save_pretrained(str(folder))
    return folder


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_bert(tmp_path_factory.mktemp("tiny_bert"))


@pytest.fixture(scope="session")
def bert_factory():
    """``make_tiny_bert`` itself, for tests that need a second model."""
    return make_tiny_bert


@pytest.fixture(scope="session")
def texts() -> list[str]:
    return list(TEXTS)
