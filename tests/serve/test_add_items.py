"""`sparse-kd add-items`: items.csv errors name file/line/column, the teacher config is found through
the manifest, and the new artifact reaches a running service (--notify). The teacher is replaced by
a deterministic stand-in here (the real one runs in test_serve_cli.py)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import yaml

import sparse_kd.teacher
from sparse_kd.cli import main
from sparse_kd.compress.new_items import add_items_from_csv, read_items_csv, run_config
from sparse_kd.config import ConfigError, config_from_dict, to_dict
from sparse_kd.data.schema import DataError
from sparse_kd.serve import Predictor, verify_artifact
from sparse_kd.serve.server import running_server
from sparse_kd.serve.service import Service

from serve_helpers import copy_artifact, post


def _csv(tmp_path, text: str | bytes, name="items.csv"):
    p = tmp_path / name
    (p.write_bytes if isinstance(text, bytes) else p.write_text)(text)
    return p


@pytest.mark.parametrize("content,where,words", [
    ("item_id,txt\nx1,hello\n", "line 1, column 'text'", "required column(s) ['text'] not found"),
    ("item_id,text\nx1,hello\nx2,   \n", "line 3, column 'text'", "empty or whitespace-only text"),
    ("item_id,text\nx1,hello\n,world\n", "line 3, column 'item_id'", "empty item_id"),
    ("item_id,text\nx1,hello\nx1,again\n", "line 3, column 'item_id'", "first defined on line 2"),
    ("item_id,text\nx1,hello\ni3,a known id\n", "line 3, column 'item_id'", "already in"),
    ("item_id,text\nx1,hello,extra\n", "line 2, column 3", "unexpected extra value"),
    ("item_id,text\nx1,\"unclosed\n", "line 2, column 'text'", "malformed CSV"),
    (b"item_id,text\nx1,caf\xe9\n", "line 2, column 2", "not valid UTF-8"),
    ("", "line 1", "the file is empty"),
    ("item_id,text\n", "line 2", "no data rows"),
])
def test_items_csv_errors_name_file_line_and_column(tmp_path, content, where, words):
    p = _csv(tmp_path, content)
    with pytest.raises(DataError) as e:
        read_items_csv(p, {"i3"}, 2000, "ART")
    msg = str(e.value)
    assert msg.startswith(f"{p}, {where}") and words in msg and "Fix:" in msg


def test_items_csv_rows_texts_cut_and_other_columns_listed(tmp_path):
    p = _csv(tmp_path, 'item_id,text,tags\n x1 ,"  A long text, quoted  ",a|b\n\nx2,short,\n')
    got = read_items_csv(p, set(), 6)
    assert got.ids == ["x1", "x2"] and got.texts == ["A long", "short"] and got.lines == [2, 4]
    assert got.ignored_columns == ["tags"] and got.report["truncated_texts"] == 1


def _run(tmp_path, name="run"):
    run = tmp_path / name
    run.mkdir()
    cfg = config_from_dict({"output_dir": str(run), "teacher": {"cache_dir": str(tmp_path / "cache")},
                            "data": {"max_text_chars": 50}})
    (run / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    return run


def _with_source(art, run):
    """Make the artifact's manifest name ``run`` as its source (what `sparse-kd compress` records)."""
    m = json.loads((art / "manifest.json").read_text())
    m["config"] = {"source": {"run_dir": str(run), "variant": "distilled"}}
    (art / "manifest.json").write_text(json.dumps(m))
    verify_artifact(art)
    return art


def test_teacher_config_comes_from_the_source_run_or_config(artifacts, tmp_path):
    art = copy_artifact(artifacts.a, tmp_path / "art")
    with pytest.raises(ConfigError, match=r"names no source run .*pass --config"):
        run_config(art, verify_artifact(art))
    run = _run(tmp_path)
    _with_source(art, run)
    cfg, src = run_config(art, verify_artifact(art))
    assert src == str(run / "config.yaml") and cfg.data.max_text_chars == 50
    (run / "config.yaml").unlink()
    with pytest.raises(ConfigError, match=r"config\.yaml: missing .*config\.source\.run_dir"):
        run_config(art, verify_artifact(art))
    cfg, src = run_config(art, {}, "configs/demo.yaml")
    assert src == "configs/demo.yaml" and cfg.teacher.model == "default"


class FakeTeacher:
    """Deterministic stand-in for the BERT teacher: (K, H) rows seeded by each text."""

    def __init__(self, dim):
        self.dim, self.calls = dim, []

    def __call__(self, cfg, texts, name, **kw):
        self.calls.append((list(texts), name))
        rows = [torch.randn(self.dim, generator=torch.Generator().manual_seed(sum(map(ord, t)))) for t in texts]
        return torch.stack(rows)


def test_add_items_from_csv_writes_an_artifact_that_knows_the_items(artifacts, tmp_path, monkeypatch):
    art = _with_source(copy_artifact(artifacts.a, tmp_path / "art"), _run(tmp_path))
    fake = FakeTeacher(artifacts.text_dim)
    monkeypatch.setattr(sparse_kd.teacher, "encode_texts", fake)
    p = _csv(tmp_path, "item_id,text\nnew-1,A sourdough baking course\nnew-2," + "x" * 80 + "\n")
    res = add_items_from_csv(art, p, out=tmp_path / "out")
    assert res["added"] == 2 and res["artifact"] == str(tmp_path / "out") and res["truncated_texts"] == 1
    assert fake.calls == [(["A sourdough baking course", "x" * 50], "new_items")]  # cut to data.max_text_chars
    new = Predictor.load(tmp_path / "out")
    scores, st = new.score(["u1"] * 3, ["new-1", "new-2", "ghost"], return_stats=True)
    assert st["unknown_items"] == 1 and len(set(scores.tolist())) == 3
    assert Predictor.load(art).score(["u1"], ["new-1"], return_stats=True)[1]["unknown_items"] == 1  # not in place

    wrong = FakeTeacher(artifacts.text_dim + 1)
    monkeypatch.setattr(sparse_kd.teacher, "encode_texts", wrong)
    with pytest.raises(ConfigError, match=rf"gives {artifacts.text_dim + 1}-dim .* maps {artifacts.text_dim}-dim"):
        add_items_from_csv(art, _csv(tmp_path, "item_id,text\nnew-3,hello\n", "more.csv"))


def test_cli_add_items_notifies_a_running_service(artifacts, tmp_path, monkeypatch, capsys):
    art = _with_source(copy_artifact(artifacts.a, tmp_path / "art"), _run(tmp_path))
    monkeypatch.setattr(sparse_kd.teacher, "encode_texts", FakeTeacher(artifacts.text_dim))
    p = _csv(tmp_path, "item_id,text\nnew-1,A sourdough baking course\n")
    body = {"user": artifacts.ds.user_ids[0], "items": ["new-1", artifacts.ds.item_ids[0]]}
    with running_server(Service(art)) as url:
        assert post(url, "/rank", body)[1]["unknown_items"] == [0]
        assert main(["add-items", str(art), str(p), "--notify", url]) == 0
        out = capsys.readouterr().out
        assert '"added": 1' in out and "swapped=True" in out
        status, doc = post(url, "/rank", body)
        assert status == 200 and doc["unknown_items"] == []
        # the known item's score is unchanged: existing rows are copied byte for byte
        np.testing.assert_array_equal(np.float32(doc["scores"][1]), Predictor.load(artifacts.a).score([body["user"]], [body["items"][1]]))
        # a second run of the same file: the ids exist now -> a clear error, exit 2, nothing written
        before = verify_artifact(art)
        assert main(["add-items", str(art), str(p), "--notify", url]) == 2
        assert "line 2, column 'item_id'" in capsys.readouterr().err and verify_artifact(art) == before


def test_cli_add_items_reports_an_unreachable_service(artifacts, tmp_path, monkeypatch, capsys):
    import socket

    art = _with_source(copy_artifact(artifacts.a, tmp_path / "art"), _run(tmp_path))
    monkeypatch.setattr(sparse_kd.teacher, "encode_texts", FakeTeacher(artifacts.text_dim))
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    rc = main(["add-items", str(art), str(_csv(tmp_path, "item_id,text\nnew-1,hello\n")), "--notify", f"http://127.0.0.1:{port}"])
    assert rc == 1
    err = capsys.readouterr().err
    assert "the new artifact is in" in err and "cannot reach the service" in err
    assert "new-1" in json.loads((art / "mappings.json").read_text())["item_ids"]  # written all the same


def test_serve_command_line_needs_one_mode(artifacts, capsys):
    assert main(["serve", str(artifacts.a)]) == 2
    assert "nothing to do: give --port P" in capsys.readouterr().err
    assert main(["serve", str(artifacts.a), "--port", "0", "--user", "u1", "--item", "i1"]) == 2
    assert "--port starts the HTTP service" in capsys.readouterr().err
    assert main(["serve", str(artifacts.a), "--port", "0", "--workers", "-1"]) == 2
    assert "workers must be >= 0" in capsys.readouterr().err
    assert main(["serve", str(artifacts.a), "--port", "0", "--max-candidates", "0"]) == 2
    assert "max_candidates must be an integer >= 1" in capsys.readouterr().err
