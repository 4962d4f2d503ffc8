"""Issue 20, item 4/4b: a run encodes and holds only the text it uses. A baseline-only run needs no
teacher model and encodes nothing; users are encoded only when their own text is used."""

import pytest

from helpers.tiny import tiny_config
from sparse_kd import pipeline as P


def test_which_runs_use_text(tmp_path):
    cfg = tiny_config(str(tmp_path))
    assert not P.uses_text(cfg, ("baseline",))
    assert P.uses_text(cfg, ("teacher_ranker",))
    plain = tiny_config(str(tmp_path), distill={"logit": {"enabled": False}, "transfer": {"enabled": False},
                                                 "align": {"enabled": False}})
    assert not P.uses_text(plain, ("baseline", "distilled"))
    aligned = tiny_config(str(tmp_path), distill={"logit": {"enabled": False}, "align": {"enabled": True}})
    assert P.uses_text(aligned, ("distilled",))


@pytest.mark.slow
def test_baseline_only_run_encodes_nothing_and_needs_no_teacher(tmp_path, monkeypatch, one_process):
    import sparse_kd.teacher as teacher
    import sparse_kd.teacher.encoder as encoder

    def refuse(*a, **k):
        raise AssertionError("a baseline-only run must not touch the teacher")

    monkeypatch.setattr(teacher, "TextEncoder", refuse)
    monkeypatch.setattr(encoder, "resolve_model_path", refuse)
    cfg = tiny_config(str(tmp_path / "run"), nproc=1, train={"epochs": 1}, teacher={"model": "/nonexistent/model"})
    metrics = P.run_training(cfg, ("baseline",))
    assert set(metrics) == {"baseline"}
    assert not (tmp_path / "run" / "data" / "text_embeddings.safetensors").exists()


@pytest.mark.slow
def test_user_text_the_run_does_not_use_is_not_encoded(tmp_path, monkeypatch, one_process):
    import torch

    import sparse_kd.teacher as teacher
    from sparse_kd.data import load_dataset

    seen = []

    class Enc:
        dim = 8

        @classmethod
        def from_config(cls, cfg, **k):
            return cls()

        def identity(self):
            return {"model": "stand-in", "model_fingerprint": "0" * 64}

        def encode(self, texts):
            seen.append(list(texts))
            return torch.ones(len(texts), self.dim)

    monkeypatch.setattr(teacher, "TextEncoder", Enc)
    cfg = tiny_config(str(tmp_path / "run"), nproc=1, teacher={"cache_dir": str(tmp_path / "cache")},
                      distill={"user_text": "history"})
    ds = load_dataset(cfg.data)
    env = P.init_distributed("gloo", 60)
    (tmp_path / "run" / "data").mkdir(parents=True)
    user, item = P.text_embeddings(cfg, ds, env)
    assert user is None and item.shape == (ds.num_items, 8)
    assert len(seen) == 1 and set(seen[0]) <= set(ds.item_text) and len(seen[0]) == len(set(ds.item_text))
    # the file for the compression stage holds what stood for user text: the click-history rows
    from safetensors.torch import load_file

    saved = load_file(str(tmp_path / "run" / "data" / "text_embeddings.safetensors"))
    assert saved["user"].shape == (ds.num_users, 8) and saved["item"].shape == (ds.num_items, 8)


def test_hint_alignment_needs_the_teacher_ranker_not_the_text(tmp_path):
    hint = tiny_config(str(tmp_path), distill={"logit": {"enabled": False}, "transfer": {"enabled": False},
                                               "align": {"enabled": True, "target": "teacher"}})
    assert P.needs_teacher_ranker(hint) and not P.distilled_uses_text(hint.distill)
    # the default target leaves the fingerprint of runs trained before the option existed unchanged
    text = tiny_config(str(tmp_path), distill={"align": {"enabled": True}})
    assert "target" not in P.variant_fingerprint(text, "distilled", text.distill, 0)["distill"]["align"]
    assert P.variant_fingerprint(hint, "distilled", hint.distill, 0)["distill"]["align"]["target"] == "teacher"


@pytest.mark.slow
def test_hint_alignment_targets_are_the_teacher_rankers_rows(tmp_path, monkeypatch, one_process):
    """distill.align.target: teacher aligns the student's rows to the trained teacher ranker's own
    user and item rows (read from its checkpoint), and the student trains with them."""
    import torch

    from sparse_kd import checkpoint as ckpt
    from sparse_kd.student.refit import read_table

    seen = {}
    real = P.distilled_spec

    def spy(*a, **k):
        spec = real(*a, **k)
        seen["user"], seen["item"] = spec.user_text, spec.item_text
        return spec

    monkeypatch.setattr(P, "distilled_spec", spy)
    cfg = tiny_config(str(tmp_path / "run"), nproc=1, train={"epochs": 1},
                      distill={"logit": {"enabled": True}, "transfer": {"enabled": False},
                               "align": {"enabled": True, "target": "teacher", "weight": 0.5}})
    metrics = P.run_training(cfg, (P.TEACHER, "distilled"))
    assert set(metrics) >= {"distilled"} and 0.0 < metrics["distilled"]["valid"]["auc"] < 1.0
    path = ckpt.latest(tmp_path / "run" / P.TEACHER / "checkpoints")
    assert torch.equal(seen["user"], read_table(path, "user_id")) and torch.equal(seen["item"], read_table(path, "item_id"))
