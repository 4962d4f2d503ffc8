"""Reliability cases the other test files did not cover (see docs/RELIABILITY.md for the whole list):
more bad input and invalid configs, serving edges and the serve command, the rerun-into-another-config
error, real SIGKILLs of a teacher-cache writer, a checkpoint writer and an artifact writer, and more
damaged files. Fast: every test here runs in a few seconds (the SIGKILL ones in a child process).

Two tests pin kill windows that the first atomic-write protocols missed and that are now covered:
a kill between the two renames of an artifact replacement, and a kill while an existing
checkpoint of the same step is being replaced.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from sparse_kd import checkpoint as ckpt
from sparse_kd.config import ConfigError, DataConfig, StudentConfig, load_config
from sparse_kd.data import DataError, load_csv

ROOT = Path(__file__).resolve().parents[2]
DEMO = ROOT / "configs" / "demo.yaml"


# --------------------------------------------------------------------------------- child processes


def _start_child(code: str, tmp_path: Path) -> subprocess.Popen:
    """Run ``code`` in a fresh interpreter; it prints READY when it has reached the kill point."""
    script = tmp_path / "child.py"
    script.write_text(textwrap.dedent(code))
    env = dict(os.environ, PYTHONWARNINGS="ignore", PYTHONPATH=str(ROOT))
    return subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, cwd=ROOT, env=env)


def _kill_when_ready(proc: subprocess.Popen, timeout: float = 90.0) -> None:
    """Wait for the child's READY line, then SIGKILL it (from outside, as a scheduler would)."""
    deadline = time.monotonic() + timeout
    line = ""
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if line.strip() == "READY" or not line:
            break
    if line.strip() != "READY":
        proc.kill()
        raise AssertionError(f"child never reached the kill point: {proc.stderr.read()[-3000:]}")
    os.kill(proc.pid, signal.SIGKILL)
    assert proc.wait(timeout=30) == -signal.SIGKILL


def _run_child(code: str, tmp_path: Path) -> None:
    """Run ``code`` in a fresh interpreter; it SIGKILLs itself at the kill point."""
    proc = _start_child(code, tmp_path)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == -signal.SIGKILL, err[-3000:]


# ====================================================================================== bad input


GOOD_ITEMS = "item_id,text\nA1,first\nB7,second\n"


def _write(root: Path, **files: str) -> Path:
    for name, text in files.items():
        (root / f"{name}.csv").write_text(text, encoding="utf-8")
    return root


def _csv_cfg(root: Path, **kw) -> DataConfig:
    return DataConfig(source="csv", path=str(root), cold_item_fraction=0.0, **kw)


@pytest.mark.parametrize("label", ["inf", "-1", "0.5", "1e3"])
def test_label_out_of_range_is_an_error_naming_line_and_column(tmp_path, label):
    root = _write(tmp_path, items=GOOD_ITEMS, interactions=f"user_id,item_id,label\nu,A1,1\nu,B7,{label}\n")
    with pytest.raises(DataError) as e:
        load_csv(_csv_cfg(root))
    msg = str(e.value)
    assert "interactions.csv, line 3, column 'label'" in msg and "is not 0 or 1" in msg and "Fix:" in msg, msg


def test_every_row_unknown_with_drop_policy_is_an_error_not_an_empty_dataset(tmp_path):
    root = _write(tmp_path, items=GOOD_ITEMS, interactions="user_id,item_id,label\nu,ZZ,1\nv,YY,0\n")
    with pytest.raises(DataError, match="no interactions left after dropping rows with unknown ids"):
        load_csv(_csv_cfg(root), unknown_ids="drop")


def test_skipped_and_truncated_rows_are_logged_and_written_to_metrics_json(tmp_path, monkeypatch):
    """The documented skip policy (blank lines, over-long texts, empty user text): counts in the log
    and in metrics.json["data_report"], never a silent drop. No training: ``variants=()``."""
    import torch.distributed as dist

    from sparse_kd import pipeline
    from sparse_kd.dist import free_port

    (tmp_path / "in").mkdir()
    data = _write(tmp_path / "in",
                  items="item_id,text\nA1," + "x" * 500 + "\n\nB7,second\n",  # 1 blank line, 1 long text
                  users="user_id,text\nu,\nv,likes jazz\n",  # 1 empty user text
                  interactions="user_id,item_id,label\n" + "u,A1,1\n\nv,B7,0\nu,B7,1\nv,A1,0\n" * 3)  # 3 blank lines
    out = tmp_path / "run"
    cfg = load_config(DEMO, [f"output_dir={out}", "nproc=1", "train.batch_size=8", "data.source=csv",
                             f"data.path={data}", "data.max_text_chars=100", "data.cold_item_fraction=0.0"])
    for k, v in dict(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port())).items():
        monkeypatch.setenv(k, v)
    monkeypatch.setattr(pipeline, "text_embeddings", lambda cfg, ds, env, **kw: (torch.zeros(ds.num_users, 4), torch.zeros(ds.num_items, 4)))
    records: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda r: records.append(r.getMessage())  # type: ignore[method-assign]
    lg = logging.getLogger("sparse_kd.pipeline")
    lg.addHandler(handler)
    old_level = lg.level
    lg.setLevel(logging.INFO)
    try:
        assert pipeline.run_training(cfg, variants=()) == {}
    finally:
        lg.removeHandler(handler)
        lg.setLevel(old_level)
        if dist.is_initialized():
            dist.destroy_process_group()
    rep = json.loads((out / "metrics.json").read_text())["data_report"]
    assert rep["truncated_texts"] == 1 and rep["blank_lines"] == 1 + 3 and rep["empty_user_text"] == 1, rep
    line = next(m for m in records if "skipped or changed while loading" in m)
    assert "'truncated_texts': 1" in line and "'blank_lines': 4" in line and "'empty_user_text': 1" in line, line


# ========================================================================================= configs


@pytest.mark.parametrize(
    "override,needle",
    [
        ("nproc=0", "nproc: must be >= 1"),
        ("data.cold_item_fraction=1.0", "data.cold_item_fraction: must be in [0, 1)"),
        ("data.valid_fraction=0.45 && data.test_fraction=0.45", "data.test_fraction: valid + test must leave >= 10% for training"),
        ("data.synthetic.label_noise=0.7", "data.synthetic.label_noise: must be in [0, 0.5)"),
        ("teacher.max_length=1024", "teacher.max_length: must be in [8, 512]"),
        ("teacher.precision=fp8", "teacher.precision: 'fp8' is not valid; expected one of 'auto', 'fp32', 'bf16'"),
        ("student.dense_arch=[32, 8]", "student.dense_arch: the last layer must equal student.embedding_dim"),
        ("distill.align.features=[genres]", "distill.align.features: 'genres': only user_id and item_id have text"),
        ("distill.align.kind=l1", "distill.align.kind: 'l1' is not valid; expected one of 'cosine', 'mse', 'infonce'"),
        ("train.backend=mpi", "train.backend: 'mpi' is not valid; expected one of 'auto', 'gloo', 'nccl'"),
        ("train.sparse_optimizer=lamb", "train.sparse_optimizer: 'lamb' is not valid"),
        ("train.collective_timeout_s=1", "train.collective_timeout_s: must be >= 10"),
        ("train.keep_checkpoints=0", "train.keep_checkpoints: must be >= 1"),
        ("compress.default_dtype=int3", "compress.default_dtype: 'int3' is not valid"),
        ("compress.keep_ratio.item_id=0", "compress.keep_ratio.item_id: must be in (0, 1]"),
        ("compress.pruned_fill.item_id=random", "compress.pruned_fill.item_id: 'random' is not valid; expected one of zero, mean, text, cluster, text_cluster"),
        ("compress.row_alignment=3", "compress.row_alignment: 3 is not valid; expected 1, 2, 4, 8 or 16"),
        ("study.dtypes=[int3]", "study.dtypes: 'int3' is not valid"),
        ("study.seeds=[]", "study.seeds: needs at least one seed"),
        ("student.dense_arch=8", "student.dense_arch: expected a list"),
        ("student.sharding=[table_wise]", "student.sharding: expected a mapping"),
        ("train.batch_size=", "train.batch_size: expected an integer, got str ''"),
        ("student.dense_arch=[16, 1", "is not valid YAML"),
    ],
)
def test_more_invalid_values_name_the_key_and_what_is_valid(override, needle):
    with pytest.raises(ConfigError) as e:
        load_config(DEMO, override.split(" && "))
    assert needle in str(e.value), str(e.value)


def _plan(sharding: dict, world_size: int, dim: int = 8, default: str = "table_wise"):
    from sparse_kd.student.model import build_dlrm
    from sparse_kd.student.sharding import build_plan

    cfg = StudentConfig(embedding_dim=dim, dense_arch=(16, dim), over_arch=(8, 1), default_sharding=default, sharding=sharding)
    model = build_dlrm({"user_id": 10, "item_id": 20, "genres": 5}, 3, cfg, device="meta")
    return build_plan(model, cfg, world_size)


def test_column_wise_that_the_ranks_cannot_split_names_the_feature():
    # 8 columns over 4 ranks = 2 per rank: FBGEMM needs multiples of 4
    with pytest.raises(ConfigError, match=r"student\.sharding\.item_id: column_wise needs embedding_dim \(8\) split into 4 parts "
                                          r"that are multiples of 4"):
        _plan({"item_id": "column_wise"}, world_size=4)
    with pytest.raises(ConfigError, match=r"student\.sharding\.\w+: column_wise needs embedding_dim \(16\) split into 3 parts"):
        _plan({}, world_size=3, dim=16, default="column_wise")
    _plan({"item_id": "column_wise"}, world_size=2)  # 4 + 4 columns: fine


def test_sharding_for_a_feature_that_does_not_exist_lists_the_features():
    with pytest.raises(ConfigError, match=r"student\.sharding\.genre: no such sparse feature; features are \['genres', 'item_id', 'user_id'\]"):
        _plan({"genre": "row_wise"}, world_size=2)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only machine")
def test_nccl_backend_without_cuda_is_a_config_error(monkeypatch):
    from sparse_kd.dist import free_port, init_distributed

    for k, v in dict(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port())).items():
        monkeypatch.setenv(k, v)
    with pytest.raises(ConfigError, match=r"train\.backend: 'nccl' needs CUDA GPUs; none is visible\. Use train\.backend=gloo \(or auto\)"):
        init_distributed("nccl", 30)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only machine")
def test_train_command_with_nccl_on_cpu_exits_2_with_the_message(monkeypatch, tmp_path, capsys):
    from sparse_kd.cli import main
    from sparse_kd.dist import free_port

    for k, v in dict(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port())).items():
        monkeypatch.setenv(k, v)
    assert main(["train", str(DEMO), "nproc=1", "train.backend=nccl", f"output_dir={tmp_path}"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: train.backend: 'nccl' needs CUDA GPUs") and "Traceback" not in err, err


def test_encode_command_with_a_missing_teacher_model_exits_2_with_the_message(tmp_path, capsys):
    from sparse_kd.cli import main

    assert main(["encode", str(DEMO), f"teacher.model={tmp_path / 'no_model'}", f"teacher.cache_dir={tmp_path / 'c'}",
                 "data.synthetic.num_users=20", "data.synthetic.num_items=20", "data.synthetic.interactions_per_user=5"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: teacher.model: ") and "no_model' does not exist" in err and "Traceback" not in err, err


def test_rerun_into_a_folder_trained_under_another_config_is_refused(tmp_path):
    from sparse_kd.student.export import MODEL_META, StaleRunError, check_fingerprint, write_model_meta

    vd = tmp_path / "baseline"
    fp = {"train": {"dense_lr": 0.005, "seed": 0}, "student": {"embedding_dim": 16}}
    write_model_meta(vd, {"user_id": 3}, 2, {"embedding_dim": 16}, fp)
    changed = {"train": {"dense_lr": 0.01, "seed": 0}, "student": {"embedding_dim": 32}}
    write_model_meta(vd, {"user_id": 3}, 2, {"embedding_dim": 32}, changed)  # no checkpoints yet: allowed
    write_model_meta(vd, {"user_id": 3}, 2, {"embedding_dim": 16}, fp)
    step = vd / "checkpoints" / "step_00000005"
    step.mkdir(parents=True)
    (step / "meta.json").write_text("{}")
    check_fingerprint(vd, fp)  # same settings: resuming is fine
    with pytest.raises(StaleRunError) as e:
        write_model_meta(vd, {"user_id": 3}, 2, {"embedding_dim": 32}, changed)
    msg = str(e.value)
    assert "holds checkpoints trained with a different configuration (changed: student.embedding_dim, train.dense_lr)" in msg
    assert "Delete that folder to retrain, or set output_dir=" in msg
    assert json.loads((vd / MODEL_META).read_text())["fingerprint"] == fp  # the old record is kept


# ========================================================================================= serving


def _compress_fixtures():
    spec = importlib.util.spec_from_file_location("_compress_fixtures", ROOT / "tests" / "compress" / "conftest.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    """A real artifact of a quickly trained tiny DLRM; items 'tags' bags include empty ones."""
    from sparse_kd.compress import artifact as A
    from sparse_kd.compress.stage import artifact_mappings, compress_model

    fx = _compress_fixtures()
    ds, text = fx.make_dataset(num_users=30, num_items=20, per_user=10)
    model, builder = fx.train_dlrm(ds, epochs=1)
    settings = {f.name: {"keep_ratio": 1.0, "dtype": "int8", "fill": "zero"} for f in ds.features}
    comp = compress_model(model, ds, settings, text=text)
    out = tmp_path_factory.mktemp("art") / "artifact"
    A.save_artifact(out, comp, artifact_mappings(ds, comp), {"user": builder.user_dense, "item": builder.item_dense}, {"test": True})
    return out, ds


def test_empty_bags_unknown_ids_and_numpy_strings_give_finite_documented_scores(artifact):
    from sparse_kd.serve import Predictor

    out, ds = artifact
    p = Predictor.load(out)
    tags = ds.feature("tags")
    empty = [ds.item_ids[e] for e in range(ds.num_items) if tags.offsets[e] == tags.offsets[e + 1]]
    assert empty, "the fixture should have items without tags"
    users = ["u0"] * len(empty) + ["ghost", "u0", "ghost"]
    items = empty + ["i0", "ghost", "ghost"]
    scores, st = p.score(users, items, return_stats=True)
    assert scores.dtype == np.float32 and np.all(np.isfinite(scores)) and np.all((scores > 0) & (scores < 1))
    assert (st["unknown_users"], st["unknown_items"]) == (2, 2)
    _, _, lengths, _ = p.inputs(["u0"], empty[:1])
    t = p.keys.index("tags")
    assert int(lengths[t]) == 0  # the empty bag goes to the model as length 0
    # numpy string ids (np.str_ is a str) score exactly like Python strings
    np.testing.assert_array_equal(p.score([np.str_("u0")], [np.str_("i0")]), p.score(["u0"], ["i0"]))
    with pytest.raises(TypeError, match=r"user_ids\[0\] must be str, got bytes"):
        p.score([b"u0"], ["i0"])
    with pytest.raises(TypeError, match=r"item_ids\[0\] must be str, got int"):
        p.score(["u0"], [np.int64(3)])


def test_max_batch_below_one_is_an_error():
    from sparse_kd.serve import Predictor

    with pytest.raises(ValueError, match="max_batch must be >= 1, got 0"):
        Predictor(None, {}, {}, {}, max_batch=0)


def test_serve_command_reports_bad_artifacts_and_pairs_files_without_a_traceback(artifact, tmp_path, capsys):
    from sparse_kd.cli import main

    out, _ = artifact
    assert main(["serve", str(tmp_path / "nowhere"), "--user", "u0", "--item", "i0"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "nowhere: no such artifact folder" in err and "Traceback" not in err, err
    bad = tmp_path / "corrupt"
    shutil.copytree(out, bad)
    data = bytearray((bad / "entity_dense.pt").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (bad / "entity_dense.pt").write_bytes(bytes(data))
    assert main(["serve", str(bad), "--user", "u0", "--item", "i0"]) == 2
    err = capsys.readouterr().err
    assert "entity_dense.pt: sha256 mismatch with manifest.json" in err and "Traceback" not in err, err
    pairs = tmp_path / "pairs.csv"
    pairs.write_text("user,item_id\nu0,i0\n")
    assert main(["serve", str(out), "--pairs", str(pairs)]) == 2
    err = capsys.readouterr().err
    assert f"{pairs}, line 1: column(s) ['user_id'] not found" in err and "Fix:" in err, err
    assert main(["serve", str(out), "--user", "u0", "u1", "--item", "i0"]) == 2
    assert "give as many --user as --item values" in capsys.readouterr().err
    pairs.write_text("user_id,item_id\nu0,i0\nghost,i1\n")
    assert main(["serve", str(out), "--pairs", str(pairs)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert [ln.split("\t")[:2] for ln in lines] == [["u0", "i0"], ["ghost", "i1"]]


# ================================================================================= faults: SIGKILL


def test_sigkilled_teacher_cache_writer_leaves_nothing_that_is_read(tmp_path):
    """A real writer process SIGKILLed halfway through writing its temp file; the next run misses,
    recomputes and never reads the half file; a temp file older than an hour is cleaned up."""
    from sparse_kd.teacher.cache import cache_key, encode_cached_with_report, load_verified

    cache = tmp_path / "cache"
    texts = [f"text number {i}" for i in range(2000)]
    child = f"""
        import sys, time, torch
        import sparse_kd.teacher.cache as C

        class Enc:
            def identity(self): return {{"model": "stand-in", "model_fingerprint": "0" * 64}}
            def encode(self, texts): return torch.arange(len(texts) * 8, dtype=torch.float32).reshape(len(texts), 8)

        class SlowFile:  # writes the first half, then waits to be killed
            def __init__(self, f): self.f = f
            def __enter__(self): return self
            def __exit__(self, *a): return self.f.__exit__(*a)
            def write(self, data):
                self.f.write(data[: len(data) // 2]); self.f.flush()
                print("READY", flush=True); time.sleep(600)
            def __getattr__(self, k): return getattr(self.f, k)

        C.open = lambda *a, **k: SlowFile(open(*a, **k))
        C.encode_cached_with_report(Enc(), {texts!r}, {str(cache)!r}, "items")
    """
    _kill_when_ready(_start_child(child, tmp_path))
    left = sorted(p.name for p in cache.iterdir())
    assert len(left) == 1 and left[0].startswith(".items-") and left[0].endswith(".tmp"), left  # only the half temp file

    class Enc:
        calls = 0

        def identity(self):
            return {"model": "stand-in", "model_fingerprint": "0" * 64}

        def encode(self, texts):
            Enc.calls += 1
            return torch.arange(len(texts) * 8, dtype=torch.float32).reshape(len(texts), 8)

    emb, rep = encode_cached_with_report(Enc(), texts, cache, "items")
    assert rep.status == "miss" and Enc.calls == 1 and emb.shape == (2000, 8)
    assert encode_cached_with_report(Enc(), texts, cache, "items")[1].hit
    assert load_verified(rep.path, cache_key(Enc().identity(), texts), len(texts))[1] == ""
    half = cache / left[0]
    assert half.exists()  # young temp files are left alone (could be a live writer)...
    old = time.time() - 2 * 3600
    os.utime(half, (old, old))
    encode_cached_with_report(Enc(), texts[:5], cache, "items")  # ...and removed by a later write once stale
    assert not half.exists()


_CKPT_CHILD = """
    import os, signal, shutil, sys, torch
    from sparse_kd import checkpoint as ckpt

    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ck = {ck!r}
    ckpt.save(ck, model, opt, 0, 5, 5)
    with torch.no_grad():
        model.weight.add_(1.0)

    def die(*a, **k):
        os.kill(os.getpid(), signal.SIGKILL)

    point = {point!r}
    if point == "dcp_write":  # the DCP writer dies after writing part of its files
        real = ckpt.dcp.save
        def partial(state, checkpoint_id):
            real(state, checkpoint_id=checkpoint_id)
            data = next(p for p in os.scandir(checkpoint_id) if p.name.endswith(".distcp"))
            os.truncate(data.path, os.path.getsize(data.path) // 2)
            die()
        ckpt.dcp.save = partial
    elif point == "manifest":  # dies while checksumming, before meta.json and the rename
        ckpt.sha256_file = die
    elif point == "after_rename":  # the new checkpoint is in place; dies before pruning
        ckpt._prune = die
    elif point == "replace_same_step":  # re-saving step 5 (e.g. after the refit): dies mid-delete of the old step_5
        def rm_part(path, *a, **k):
            victim = next(p for p in sorted(os.listdir(path)) if p.endswith(".distcp"))
            os.remove(os.path.join(path, victim))
            die()
        ckpt.shutil.rmtree = rm_part
        ckpt.save(ck, model, opt, 0, 5, 5)
    ckpt.save(ck, model, opt, 0, 10, 10)
"""


def _weights_after_load(path: Path) -> torch.Tensor:
    torch.manual_seed(1)
    model = torch.nn.Linear(4, 3)
    ckpt.load(path, model, torch.optim.SGD(model.parameters(), lr=0.1))
    return model.weight.detach().clone()


@pytest.mark.parametrize("point, survivor", [("dcp_write", "step_00000005"), ("manifest", "step_00000005"),
                                             ("after_rename", "step_00000010")])
def test_sigkilled_checkpoint_writer_leaves_the_last_complete_checkpoint(tmp_path, point, survivor):
    ck = tmp_path / "checkpoints"
    _run_child(_CKPT_CHILD.format(ck=str(ck), point=point), tmp_path)
    good = ckpt.latest(ck)
    assert good is not None and good.name == survivor, sorted(p.name for p in ck.iterdir())
    meta = ckpt.verify(good)
    assert meta["global_step"] == int(survivor[-2:])
    torch.manual_seed(0)
    expect = torch.nn.Linear(4, 3).weight.detach() + (1.0 if survivor.endswith("10") else 0.0)
    torch.testing.assert_close(_weights_after_load(good), expect, atol=0, rtol=0)
    # the next save removes whatever the killed writer left behind
    m = torch.nn.Linear(4, 3)
    ckpt.save(ck, m, torch.optim.SGD(m.parameters(), lr=0.1), 1, 0, 20)
    assert not list(ck.glob("*.tmp"))


def test_sigkilled_while_replacing_a_checkpoint_of_the_same_step(tmp_path):
    """save() moves the old step_N aside (atomic rename) before renaming the new one in, so a kill
    while deleting the old copy leaves the new, complete step_N; the .old leftover is ignored."""
    ck = tmp_path / "checkpoints"
    _run_child(_CKPT_CHILD.format(ck=str(ck), point="replace_same_step"), tmp_path)
    good = ckpt.latest(ck)
    assert good is not None and good.name == "step_00000005", sorted(p.name for p in ck.iterdir())
    ckpt.verify(good)


_ARTIFACT_CHILD = """
    import os, signal, torch
    from sparse_kd.compress import artifact as A

    class Tiny(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x + {tag}

    def save(tag):
        comp = A.Compressed(serving=None, tables={{}}, remaps={{}}, text_maps={{}},
                            dense_fp32={{"w": torch.full((1000,), float(tag))}}, model_info={{"keys": []}})
        return A.save_artifact({out!r}, comp, {{"user_ids": [], "item_ids": [], "features": {{}}}},
                               {{"user": torch.zeros(0, 1), "item": torch.zeros(0, 1)}}, {{"tag": tag}},
                               scripted=torch.jit.script(Tiny()))

    def die(*a, **k):
        os.kill(os.getpid(), signal.SIGKILL)

    point = {point!r}
    if point == "mid_write":  # dies while writing the files of the new version
        real = A.torch.save
        def half(obj, f):
            if str(f).endswith("remaps.pt"):
                die()
            real(obj, f)
        A.torch.save = half
    elif point == "between_renames":  # old version moved aside, new one not yet renamed in
        real_replace = A.os.replace
        calls = []
        def replace(src, dst):
            calls.append(1)
            real_replace(src, dst)
            if len(calls) == 1 and ".old-" in str(dst):
                die()
        A.os.replace = replace
    save(2)
"""


class _Tiny(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + 1


def _stub_artifact(out: Path, tag: int = 1) -> dict:
    """Write a small (verifiable, not servable) artifact the way the child writes version 2; return its manifest."""
    from sparse_kd.compress import artifact as A

    comp = A.Compressed(serving=None, tables={}, remaps={}, text_maps={},
                        dense_fp32={"w": torch.full((1000,), float(tag))}, model_info={"keys": []})
    return A.save_artifact(out, comp, {"user_ids": [], "item_ids": [], "features": {}},
                           {"user": torch.zeros(0, 1), "item": torch.zeros(0, 1)}, {"tag": tag},
                           scripted=torch.jit.script(_Tiny()))


def test_sigkilled_artifact_writer_leaves_the_previous_artifact(tmp_path):
    from sparse_kd.serve import verify_artifact

    out = tmp_path / "art" / "distilled"
    before = _stub_artifact(out)
    _run_child(_ARTIFACT_CHILD.format(out=str(out), point="mid_write", tag=2), tmp_path)
    assert verify_artifact(out) == before  # untouched, checksums still match
    assert [p.name for p in out.parent.iterdir() if p.name.startswith(".distilled.tmp-")]  # the dead writer's folder
    assert torch.load(out / "dense_fp32.pt", weights_only=True)["w"][0] == 1.0
    _stub_artifact(out)  # the next save cleans up
    assert sorted(p.name for p in out.parent.iterdir()) == ["distilled"]


def test_sigkilled_between_the_two_renames_of_an_artifact_replacement(tmp_path):
    """A kill between the two renames leaves the old copy in .<name>.old-*; loading (and the next
    save) move it back into place instead of reporting no artifact or deleting it."""
    from sparse_kd.serve import verify_artifact

    out = tmp_path / "art" / "distilled"
    before = _stub_artifact(out)
    _run_child(_ARTIFACT_CHILD.format(out=str(out), point="between_renames", tag=2), tmp_path)
    assert verify_artifact(out)["config"]["tag"] in (before["config"]["tag"], 2)


# =================================================================================== corrupt files


def _small_checkpoint(ck: Path) -> Path:
    m = torch.nn.Linear(4, 3)
    return ckpt.save(ck, m, torch.optim.SGD(m.parameters(), lr=0.1), 0, 1, 1)


@pytest.mark.parametrize(
    "damage, needle",
    [
        ("no_meta", "no meta.json: not a complete sparse_kd checkpoint"),
        ("truncated_meta", "meta.json: unreadable manifest"),
        ("missing_file", "file .metadata listed in meta.json is missing"),
        ("metadata_flip", ".metadata: checksum mismatch: the checkpoint was truncated or modified"),
        ("version", "checkpoint format version 2 but this sparse_kd reads version 1"),
    ],
)
def test_damaged_checkpoint_is_rejected_naming_the_file(tmp_path, damage, needle):
    path = _small_checkpoint(tmp_path / "checkpoints")
    mf = path / "meta.json"
    if damage == "no_meta":
        mf.unlink()
    elif damage == "truncated_meta":
        mf.write_text(mf.read_text()[:20])
    elif damage == "missing_file":
        (path / ".metadata").unlink()
    elif damage == "metadata_flip":
        data = bytearray((path / ".metadata").read_bytes())
        data[len(data) // 2] ^= 0x01
        (path / ".metadata").write_bytes(bytes(data))
    else:
        meta = json.loads(mf.read_text())
        meta["format_version"] = 2
        mf.write_text(json.dumps(meta))
    m = torch.nn.Linear(4, 3)
    with pytest.raises(ckpt.CheckpointError) as e:
        ckpt.load(path, m, torch.optim.SGD(m.parameters(), lr=0.1))
    assert needle in str(e.value), str(e.value)


def test_corrupt_checkpoint_stops_export_for_compression(tmp_path):
    """load_dlrm (what `sparse-kd compress` reads) verifies the checkpoint before loading it."""
    from sparse_kd.student.export import load_dlrm, write_model_meta

    vd = tmp_path / "baseline"
    student = {"embedding_dim": 8, "dense_arch": [8], "over_arch": [4, 1]}
    write_model_meta(vd, {"user_id": 3, "item_id": 4}, 2, student)
    path = _small_checkpoint(vd / "checkpoints")
    data = next(p for p in path.iterdir() if p.suffix == ".distcp")
    data.write_bytes(data.read_bytes()[:-7])
    with pytest.raises(ckpt.CheckpointError, match=rf"{data.name}: checksum mismatch"):
        load_dlrm(vd)
    shutil.rmtree(vd / "checkpoints")
    with pytest.raises(FileNotFoundError, match="checkpoints: no complete checkpoint"):
        load_dlrm(vd)


@pytest.mark.parametrize(
    "damage, needle",
    [
        ("format", "not a sparse_kd.artifact manifest"),
        ("unlisted_model", "required file model.pt is not listed"),
        ("no_files", "no 'files' table"),
        ("not_utf8", "unreadable manifest"),
        ("no_manifest", "manifest.json: missing;"),
        ("version_string", "artifact format version '2', but this sparse_kd reads version 2; rebuild it with `sparse-kd compress"),
    ],
)
def test_damaged_artifact_manifest_is_rejected_naming_the_file(artifact, tmp_path, damage, needle):
    from sparse_kd.serve import ArtifactError, Predictor

    d = tmp_path / "copy"
    shutil.copytree(artifact[0], d)
    mf = d / "manifest.json"
    m = json.loads(mf.read_text())
    if damage == "format":
        m["format"] = "something.else"
    elif damage == "unlisted_model":
        del m["files"]["model.pt"]
    elif damage == "no_files":
        del m["files"]
    elif damage == "version_string":
        m["format_version"] = "2"
    mf.write_text(json.dumps(m))
    if damage == "not_utf8":
        mf.write_bytes(b"\xff\xfe" + mf.read_bytes())
    elif damage == "no_manifest":
        mf.unlink()
    with pytest.raises(ArtifactError) as e:
        Predictor.load(d)
    assert needle in str(e.value), str(e.value)


def test_artifact_from_another_torch_version_loads_with_a_warning(artifact, tmp_path, caplog):
    from sparse_kd.serve import Predictor

    d = tmp_path / "copy"
    shutil.copytree(artifact[0], d)
    m = json.loads((d / "manifest.json").read_text())
    m["versions"]["torch"] = "1.0.0"
    (d / "manifest.json").write_text(json.dumps(m))
    lg = logging.getLogger("sparse_kd.serve.predictor")
    lg.addHandler(caplog.handler)
    try:
        with caplog.at_level(logging.WARNING, logger="sparse_kd.serve.predictor"):
            Predictor.load(d, warmup=False)
    finally:
        lg.removeHandler(caplog.handler)
    assert any(f"artifact made with torch 1.0.0, running {torch.__version__}" in r.getMessage() for r in caplog.records)


class _StandIn:
    def __init__(self) -> None:
        self.calls = 0

    def identity(self) -> dict:
        return {"model": "stand-in", "model_fingerprint": "0" * 64}

    def encode(self, texts):
        self.calls += 1
        return torch.ones(len(texts), 4) * len(texts)


@pytest.mark.parametrize("damage, reason", [
    ("other_key", "key in metadata does not match"),
    ("old_version", "format version '0', expected 1"),
    ("wrong_shape", "tensor (3, 4) torch.float32, expected (2, H) float32"),
])
def test_teacher_cache_file_for_other_inputs_or_version_is_recomputed_with_the_reason(tmp_path, damage, reason, caplog):
    from sparse_kd.teacher.cache import cache_key, cache_path, encode_cached_with_report, tensor_sha256, write_atomic

    enc = _StandIn()
    texts = ["a", "b"]
    key = cache_key(enc.identity(), texts)
    path = cache_path(tmp_path, "items", key)
    emb = torch.ones(3 if damage == "wrong_shape" else 2, 4)
    meta = {"format_version": "0" if damage == "old_version" else "1", "key": "f" * 64 if damage == "other_key" else key,
            "sha256": tensor_sha256(emb), "num_texts": str(emb.shape[0]), "dim": "4"}
    write_atomic(path, emb, meta)
    lg = logging.getLogger("sparse_kd.teacher.cache")
    lg.addHandler(caplog.handler)
    try:
        with caplog.at_level(logging.WARNING, logger="sparse_kd.teacher.cache"):
            got, rep = encode_cached_with_report(enc, texts, tmp_path, "items")
    finally:
        lg.removeHandler(caplog.handler)
    assert rep.status == "invalid" and reason in rep.reason and enc.calls == 1, rep
    assert torch.equal(got, torch.full((2, 4), 2.0))
    assert any(str(path) in r.getMessage() and reason in r.getMessage() for r in caplog.records)
