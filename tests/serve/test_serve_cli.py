"""End to end through the command line: `sparse-kd serve ARTIFACT --port 0` in its own process, then
`sparse-kd add-items` (the real BERT teacher) in another, which tells the service to swap the new
artifact in. The serving process never imports transformers, torchrec or the training code."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from sparse_kd.config import config_from_dict, to_dict

from serve_helpers import ROOT, compress_fixtures, get, post, save

# a 384-dim text map: the size of the default teacher's embeddings (read from the model below)
SERVER = """
import json, sys
from sparse_kd.cli import main
rc = main(sys.argv[1:])
bad = sorted(m for m in sys.modules if m.split(".")[0] in ("transformers", "torchrec")
             or m.startswith(("sparse_kd.student", "sparse_kd.teacher", "sparse_kd.distill", "sparse_kd.compress")))
print("MODULES " + json.dumps(bad), flush=True)
sys.exit(rc)
"""


def _teacher_dim() -> int:
    from sparse_kd.config import TeacherConfig
    from sparse_kd.teacher import resolve_model_path

    cfg = json.loads((Path(resolve_model_path(TeacherConfig().model)) / "config.json").read_text())
    return int(cfg["hidden_size"])


def _start_server(args: list[str], log: Path, timeout: float = 120.0) -> tuple[subprocess.Popen, str]:
    f = open(log, "w")
    proc = subprocess.Popen([sys.executable, "-c", SERVER, *args], cwd=ROOT, stdout=subprocess.PIPE, stderr=f, text=True)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        m = re.search(r"listening on (http://127\.0\.0\.1:\d+)", log.read_text())
        if m:
            return proc, m.group(1)
        if proc.poll() is not None:
            break
        time.sleep(0.1)
    proc.kill()
    raise AssertionError(f"the server did not start:\n{log.read_text()[-3000:]}")


@pytest.mark.slow
def test_serve_and_add_items_from_the_command_line(tmp_path):
    fx = compress_fixtures()
    ds, _ = fx.make_dataset(num_users=30, num_items=20, per_user=10)
    model, builder = fx.train_dlrm(ds, epochs=1)
    h = _teacher_dim()
    g = torch.Generator().manual_seed(0)
    text = {"user": torch.randn(len(ds.user_ids), h, generator=g), "item": torch.randn(len(ds.item_ids), h, generator=g)}
    run = tmp_path / "run"
    run.mkdir()
    cfg = config_from_dict({"output_dir": str(run), "teacher": {"cache_dir": str(tmp_path / "cache")}})
    (run / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    art = save(tmp_path / "art", model, ds, builder, "int4", text, {"source": {"run_dir": str(run), "variant": "x"}})
    (tmp_path / "items.csv").write_text("item_id,text\nnew-space,A documentary about the Apollo moon landings.\n"
                                        "new-bread,A beginner's course on sourdough bread and home baking.\n")

    log = tmp_path / "server.log"
    proc, url = _start_server(["serve", str(art), "--port", "0", "--watch", "0"], log)
    try:
        user = ds.user_ids[0]
        body = {"user": user, "items": ["new-space", "new-bread", "ghost"]}
        status, doc = post(url, "/rank", body)
        assert status == 200 and doc["unknown_items"] == [0, 1, 2]
        old_id = doc["artifact"]
        r = subprocess.run([sys.executable, "-m", "sparse_kd.cli", "add-items", str(art), str(tmp_path / "items.csv"),
                            "--notify", url], cwd=ROOT, capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, r.stderr[-3000:]
        assert "swapped=True" in r.stdout
        status, doc = post(url, "/rank", body)
        assert status == 200 and doc["artifact"] != old_id and doc["unknown_items"] == [2]
        assert len(set(doc["scores"])) == 3  # each new item has a row of its own, from its text
        health = json.loads(get(url, "/health")[1])
        assert health["artifact"]["items"] == len(ds.item_ids) + 2 and health["reloads"]["ok"] == 1
    finally:
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, log.read_text()[-3000:]
    modules = json.loads(out.split("MODULES ", 1)[1])
    assert modules == [], f"the serving process imported {modules}"
    text_log = log.read_text()
    for words in ("serving artifact", "listening on", "loading", "swapped", "stopped"):
        assert words in text_log, (words, text_log[-2000:])


@pytest.mark.slow
def test_serve_refuses_a_corrupt_artifact_at_start_and_a_taken_port(tmp_path, artifacts):
    import shutil
    import socket

    bad = tmp_path / "bad"
    shutil.copytree(artifacts.a, bad)
    (bad / "model.pt").write_bytes((bad / "model.pt").read_bytes()[:100])
    r = subprocess.run([sys.executable, "-m", "sparse_kd.cli", "serve", str(bad), "--port", "0"], cwd=ROOT,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "model.pt" in r.stderr and "truncated" in r.stderr
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        port = s.getsockname()[1]
        r = subprocess.run([sys.executable, "-m", "sparse_kd.cli", "serve", str(artifacts.a), "--port", str(port)],
                           cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and f"cannot listen on 127.0.0.1:{port}" in r.stderr
