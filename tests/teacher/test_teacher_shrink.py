"""teacher-shrink: a cut, tuned teacher saved as a BERT folder that ``teacher.model`` selects; atomic writes; CLI."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

from sparse_kd.config import TeacherConfig
from sparse_kd.teacher import encode_texts
from sparse_kd.teacher.encoder import TextEncoder
from sparse_kd.teacher.layers import cut_layers, pick_layers
from sparse_kd.teacher.shrink import PROVENANCE_FILE, ShrinkError, shrink_teacher

WORDS = ["the", "story", "toy", "genres", "comedy", "drama", "year", "old", "from", "zip", "code", "likes",
         "movies", "part", "a", "and", "student", "male", "female"]


def word_texts(n: int, seed: int = 0) -> list[str]:
    r = random.Random(seed)
    return [" ".join(r.choice(WORDS) for _ in range(r.randint(2, 12))) + f" {r.randint(0, 99)}." for _ in range(n)]


def cfg(model: Path | str, tmp_path: Path, **kw) -> TeacherConfig:
    return TeacherConfig(model=str(model), cache_dir=str(tmp_path / "cache"), precision="fp32", **kw)


def shrink(tiny_bert: Path, tmp_path: Path, out: Path, **kw) -> dict:
    args = dict(layers=1, epochs=3, lr=3e-3, batch_size=16, seed=0, held_out_fraction=0.2, show_progress=False)
    args.update(kw)
    return shrink_teacher(cfg(tiny_bert, tmp_path), word_texts(160), out_dir=out, **args)


@pytest.fixture(scope="module")
def tiny_bert(bert_factory, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random 2-layer BERT whose first layer matters: dropping it moves the embeddings well away.

    (In a plain random tiny BERT the layers barely change the pooled embeddings, so a cut would
    already be at cosine ~0.9998 and there would be nothing to tune.)
    """
    from transformers import AutoModel

    folder = bert_factory(tmp_path_factory.mktemp("tiny_bert_strong"), seed=1)
    model = AutoModel.from_pretrained(str(folder))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for lin in (model.encoder.layer[0].intermediate.dense, model.encoder.layer[0].output.dense):
            lin.weight.copy_(torch.randn(lin.weight.shape, generator=g) * 0.5)
    model.save_pretrained(str(folder))
    return folder


@pytest.fixture(scope="module")
def shrunk(tiny_bert: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    tmp = tmp_path_factory.mktemp("shrunk")
    out = tmp / "tiny-l1"
    return out, shrink(tiny_bert, tmp, out, data_info={"what": "test texts"})


def test_pick_layers() -> None:
    assert pick_layers(6, 2) == [2, 5]
    assert pick_layers(6, 3) == [1, 3, 5]
    assert pick_layers(6, 1) == [5]
    assert pick_layers(6, 6) == list(range(6))
    assert pick_layers(12, 5) == sorted(set(pick_layers(12, 5)))
    with pytest.raises(ValueError):
        pick_layers(6, 7)


def test_cut_keeps_the_chosen_layers(tiny_bert: Path) -> None:
    teacher = TextEncoder(str(tiny_bert), precision="fp32", show_progress=False).model
    student = cut_layers(teacher, [1])
    assert student.config.num_hidden_layers == 1 and len(student.encoder.layer) == 1
    torch.testing.assert_close(student.encoder.layer[0].state_dict(), teacher.encoder.layer[1].state_dict())
    torch.testing.assert_close(student.embeddings.state_dict(), teacher.embeddings.state_dict())


def test_shrunk_folder_loads_through_the_config(shrunk: tuple[Path, dict], tiny_bert: Path, tmp_path: Path,
                                                texts: list[str]) -> None:
    out, rep = shrunk
    assert rep["layers"] == 1 and rep["kept_layers"] == [1]
    assert rep["train_texts"] + rep["held_out_texts"] == len(set(word_texts(160)))
    assert rep["held_out_texts"] >= 1 and -1.0 <= rep["held_out_min_cos"] <= rep["held_out_mean_cos"] <= 1.0
    c = cfg(out, tmp_path)
    enc = TextEncoder.from_config(c, show_progress=False)
    assert enc.model.config.num_hidden_layers == 1
    assert enc.model.config.num_hidden_layers < TextEncoder(str(tiny_bert)).model.config.num_hidden_layers
    emb = encode_texts(c, texts, "items", show_progress=False)  # the path encode / train / add-items take
    assert emb.shape == (len(texts), 32) and torch.isfinite(emb).all()
    torch.testing.assert_close(emb.norm(dim=1), torch.ones(len(texts)), atol=1e-5, rtol=0)
    prov = json.loads((out / PROVENANCE_FILE).read_text())
    assert prov["kept_layers"] == [1] and prov["source"]["num_layers"] == 2
    assert prov["source"]["fingerprint"] == TextEncoder(str(tiny_bert)).fingerprint
    assert prov["data"]["info"] == {"what": "test texts"} and len(prov["data"]["train_texts_sha256"]) == 64
    assert prov["held_out"]["mean_cos"] == rep["held_out_mean_cos"]
    assert (out / "model.safetensors").is_file() and not (out / "pytorch_model.bin").exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")], "temp folders left behind"


def test_tuning_beats_the_untuned_cut(shrunk: tuple[Path, dict], tiny_bert: Path, tmp_path: Path) -> None:
    _, rep = shrunk
    untuned = shrink(tiny_bert, tmp_path, tmp_path / "untuned", epochs=0)
    assert untuned["held_out_mean_cos"] == pytest.approx(untuned["untuned_held_out_mean_cos"], abs=1e-5)
    assert untuned["untuned_held_out_mean_cos"] == pytest.approx(rep["untuned_held_out_mean_cos"], abs=1e-5)
    assert rep["held_out_mean_cos"] > rep["untuned_held_out_mean_cos"] + 0.01, rep


def test_a_failed_write_leaves_no_folder(tiny_bert: Path, tmp_path: Path) -> None:
    def boom(tmp: Path) -> None:
        assert (tmp / "config.json").is_file() and (tmp / PROVENANCE_FILE).is_file()
        raise RuntimeError("killed before the rename")

    out = tmp_path / "m"
    with pytest.raises(RuntimeError, match="killed"):
        shrink(tiny_bert, tmp_path, out, epochs=1, _before_rename=boom)
    assert not out.exists()
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]
    # an earlier complete folder survives a failed rerun, and a good rerun replaces it whole
    first = shrink(tiny_bert, tmp_path, out, epochs=1)
    before = (out / "model.safetensors").read_bytes()
    with pytest.raises(RuntimeError, match="killed"):
        shrink(tiny_bert, tmp_path, out, epochs=2, _before_rename=boom)
    assert (out / "model.safetensors").read_bytes() == before
    second = shrink(tiny_bert, tmp_path, out, epochs=2)
    assert json.loads((out / PROVENANCE_FILE).read_text())["tuning"]["epochs"] == 2 and second != first
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_refuses_a_folder_it_did_not_write(tiny_bert: Path, tmp_path: Path) -> None:
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    with pytest.raises(ShrinkError, match="not written by shrink_teacher"):
        shrink(tiny_bert, tmp_path, out, epochs=0)
    assert (out / "notes.txt").read_text() == "keep me"
    with pytest.raises(ShrinkError, match="held_out_fraction"):
        shrink(tiny_bert, tmp_path, tmp_path / "x", held_out_fraction=0.0)
    with pytest.raises(ShrinkError, match="between 1 and 2"):
        shrink(tiny_bert, tmp_path, tmp_path / "x", layers=3)


def test_cli_help_and_run(tiny_bert: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from sparse_kd.cli import build_parser, main

    with pytest.raises(SystemExit) as e:
        build_parser().parse_args(["teacher-shrink", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "usage: sparse-kd teacher-shrink" in out and "--layers" in out and "teacher.model=" in out
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args(["--help"])
    assert "teacher-shrink" in capsys.readouterr().out
    folder = tmp_path / "cli-l1"
    rc = main(["teacher-shrink", "configs/demo.yaml", f"teacher.model={tiny_bert}", f"teacher.cache_dir={tmp_path}",
               "--layers", "1", "--out", str(folder), "--epochs", "1", "--max-texts", "120", "--threads", "1"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert f"teacher.model={folder}" in printed
    prov = json.loads((folder / PROVENANCE_FILE).read_text())
    assert prov["data"]["info"]["config"] == "configs/demo.yaml" and prov["data"]["distinct_texts"] == 120
    rc = main(["teacher-shrink", "configs/demo.yaml", f"teacher.model={tiny_bert}", "--layers", "5", "--out",
               str(tmp_path / "never")])
    assert rc == 2 and "keep between 1 and 2 layers, got 5" in capsys.readouterr().err
    assert not (tmp_path / "never").exists()
