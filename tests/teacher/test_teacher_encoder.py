"""TextEncoder: matches a plain transformers reference, keeps order, handles empty texts, clear errors."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from sparse_kd.config import TeacherConfig
from sparse_kd.teacher.encoder import TeacherModelError, TextEncoder, model_fingerprint, resolve_model_path


def reference_embeddings(path: Path, texts: list[str], max_length: int = 64) -> torch.Tensor:
    """AutoModel fp32, one padded batch in input order, mean pooling over the mask, L2 normalised."""
    from transformers import AutoModel, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(path))
    model = AutoModel.from_pretrained(str(path)).eval()
    with torch.inference_mode():
        enc = tok(texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
        hidden = model(**enc).last_hidden_state  # (N, T, H)
        m = enc["attention_mask"].unsqueeze(-1).float()
        return F.normalize((hidden * m).sum(1) / m.sum(1), dim=-1)


@pytest.fixture(scope="module")
def minilm_reference(texts: list[str]) -> torch.Tensor:
    return reference_embeddings(resolve_model_path("default"), texts)


def test_default_model_matches_reference(texts: list[str], minilm_reference: torch.Tensor) -> None:
    enc = TextEncoder("default", batch_size=3, show_progress=False, device="cpu")  # precision auto
    emb = enc.encode(texts)
    assert emb.shape == (len(texts), 384) and emb.dtype == torch.float32
    cos = F.cosine_similarity(emb, minilm_reference, dim=1)
    assert cos.min().item() > 0.999, (enc.precision, cos)
    assert torch.allclose(emb.norm(dim=1), torch.ones(len(texts)), atol=1e-5)


def test_fp32_path_matches_reference_tightly(texts: list[str], minilm_reference: torch.Tensor) -> None:
    emb = TextEncoder("default", precision="fp32", batch_size=3, show_progress=False, device="cpu").encode(texts)
    torch.testing.assert_close(emb, minilm_reference, atol=2e-5, rtol=0)


def test_sorting_keeps_input_order(tiny_bert: Path, texts: list[str]) -> None:
    kw = dict(precision="fp32", batch_size=2, show_progress=False, device="cpu")
    texts = texts + ["toy " * n for n in (30, 1, 12, 5)]  # lengths far from sorted order
    sorted_emb = TextEncoder(str(tiny_bert), sort_by_length=True, **kw).encode(texts)
    plain_emb = TextEncoder(str(tiny_bert), sort_by_length=False, **kw).encode(texts)
    one_by_one = torch.cat([TextEncoder(str(tiny_bert), **kw).encode([t]) for t in texts])
    torch.testing.assert_close(sorted_emb, plain_emb, atol=1e-5, rtol=0)
    torch.testing.assert_close(sorted_emb, one_by_one, atol=1e-5, rtol=0)
    torch.testing.assert_close(sorted_emb, reference_embeddings(tiny_bert, texts), atol=1e-5, rtol=0)


def test_empty_texts_are_defined(tiny_bert: Path) -> None:
    enc = TextEncoder(str(tiny_bert), precision="fp32", show_progress=False, device="cpu")
    emb = enc.encode(["", "toy story", "   ", ""])
    assert torch.isfinite(emb).all()
    torch.testing.assert_close(emb[0], emb[2])  # whitespace-only == empty: [CLS] [SEP]
    torch.testing.assert_close(emb[0], emb[3])
    assert abs(emb[0].norm().item() - 1.0) < 1e-5
    assert enc.encode([]).shape == (0, 32)


def test_truncation_and_logging(tiny_bert: Path, caplog: pytest.LogCaptureFixture) -> None:
    enc = TextEncoder(str(tiny_bert), max_length=8, precision="fp32", show_progress=False, device="cpu")
    with caplog.at_level(logging.INFO, logger="sparse_kd.teacher.encoder"):
        # 8 tokens = [CLS] + 6 words + [SEP]: both texts agree on their first 6 words only
        emb = enc.encode(["toy story drama the old year " + "story " * 50, "toy story drama the old year " + "toy " * 80,
                          "toy story drama the old"])
    torch.testing.assert_close(emb[0], emb[1])
    assert not torch.allclose(emb[0], emb[2], atol=1e-4)
    assert any("texts/s" in r.getMessage() for r in caplog.records)


def test_unnormalized_and_from_config(tiny_bert: Path) -> None:
    cfg = TeacherConfig(model=str(tiny_bert), batch_size=4, max_length=16)
    enc = TextEncoder.from_config(cfg, normalize=False, show_progress=False, device="cpu")
    assert (enc.batch_size, enc.max_length, enc.normalize) == (4, 16, False)
    assert not enc.is_loaded and enc.dim == 32  # no model load needed for dim / identity
    emb = enc.encode(["toy story", "drama"])
    assert not torch.allclose(emb.norm(dim=1), torch.ones(2))


def test_precision_and_identity(tiny_bert: Path) -> None:
    a = TextEncoder(str(tiny_bert), precision="fp32", show_progress=False)
    b = TextEncoder(str(tiny_bert), precision="bf16", show_progress=False)
    assert a.identity()["precision"] == "fp32" and b.identity()["precision"] == "bf16"
    assert a.identity()["model_fingerprint"] == b.identity()["model_fingerprint"]
    assert TextEncoder(str(tiny_bert), precision="auto").precision in ("fp32", "bf16")
    with pytest.raises(ValueError, match="precision"):
        TextEncoder(str(tiny_bert), precision="fp8")  # type: ignore[arg-type]
    emb = b.encode(["toy story", ""])
    assert emb.dtype == torch.float32 and torch.isfinite(emb).all()


def test_fingerprint_follows_content(tiny_bert: Path, tmp_path: Path) -> None:
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(tiny_bert, copy)
    assert model_fingerprint(copy) == model_fingerprint(tiny_bert)  # content, not path or mtime
    cfg = json.loads((copy / "config.json").read_text())
    cfg["layer_norm_eps"] = 1e-5
    (copy / "config.json").write_text(json.dumps(cfg))
    assert model_fingerprint(copy) != model_fingerprint(tiny_bert)


def test_missing_model_folder_is_a_clear_error(tmp_path: Path) -> None:
    missing = tmp_path / "no_such_model"
    with pytest.raises(TeacherModelError, match="does not exist") as e:
        TextEncoder(str(missing))
    assert str(missing) in str(e.value) and "teacher.model" in str(e.value) and "'default'" in str(e.value)


def test_not_a_bert_folder_is_a_clear_error(tmp_path: Path, tiny_bert: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(TeacherModelError, match="no config.json"):
        TextEncoder(str(tmp_path / "empty"))
    gpt = tmp_path / "gpt"
    gpt.mkdir()
    (gpt / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(TeacherModelError, match="'gpt2' model, not a BERT-family"):
        TextEncoder(str(gpt))
    noweights = tmp_path / "noweights"
    noweights.mkdir()
    (noweights / "config.json").write_text((tiny_bert / "config.json").read_text())
    with pytest.raises(TeacherModelError, match="no weights"):
        TextEncoder(str(noweights))
    (tmp_path / "file").write_text("x")
    with pytest.raises(TeacherModelError, match="not a model folder"):
        TextEncoder(str(tmp_path / "file"))


def test_rejects_non_strings(tiny_bert: Path) -> None:
    with pytest.raises(TypeError, match=r"texts\[1\]"):
        TextEncoder(str(tiny_bert), show_progress=False).encode(["ok", None])  # type: ignore[list-item]


def test_pickled_weights_load_only_when_the_user_opts_in(tmp_path: Path, tiny_bert: Path, capsys) -> None:
    import shutil

    from safetensors.torch import load_file

    pickled = tmp_path / "pickled"
    shutil.copytree(tiny_bert, pickled)
    torch.save(load_file(str(pickled / "model.safetensors")), pickled / "pytorch_model.bin")
    (pickled / "model.safetensors").unlink()
    with pytest.raises(TeacherModelError, match=r"weights only as a pickle \(pytorch_model\.bin\).*"
                                                 r"set teacher\.allow_pickle_weights=true"):
        TextEncoder(str(pickled))
    kw = dict(precision="fp32", device="cpu", show_progress=False)
    ref = TextEncoder(str(tiny_bert), **kw).encode(["toy story", "a drama"])
    got = TextEncoder.from_config(TeacherConfig(model=str(pickled), allow_pickle_weights=True), **kw).encode(["toy story", "a drama"])
    torch.testing.assert_close(got, ref)
    # config.json may name the weight file itself: a pickle named there is refused too
    named = tmp_path / "named"
    shutil.copytree(tiny_bert, named)
    cfg = json.loads((named / "config.json").read_text())
    (named / "config.json").write_text(json.dumps({**cfg, "transformers_weights": "pytorch_model.bin"}))
    with pytest.raises(TeacherModelError, match="only as a pickle"):
        resolve_model_path(str(named))
    # through the CLI: exit 2 with the message, nothing else
    from sparse_kd.cli import main

    demo = Path(__file__).resolve().parents[2] / "configs" / "demo.yaml"
    capsys.readouterr()
    assert main(["encode", str(demo), f"teacher.model={pickled}", f"teacher.cache_dir={tmp_path / 'c'}",
                 "data.synthetic.num_users=20", "data.synthetic.num_items=20", "data.synthetic.interactions_per_user=5"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: teacher.model: ") and "allow_pickle_weights=true" in err and "Traceback" not in err, err


def test_cuda_batch_size_applies_only_on_a_gpu():
    from sparse_kd.config import TeacherConfig
    from sparse_kd.teacher.encoder import TextEncoder

    enc = TextEncoder.from_config(TeacherConfig(batch_size=16, cuda_batch_size=1024), device="cpu")
    assert enc.batch_size == 16  # CPU: the CPU batch
    assert TextEncoder("default", batch_size=16, cuda_batch_size=512, device="cpu").batch_size == 16
