"""The serving artifact: round trip into a fresh process, corruption, atomic writes, refused output
folders and manifest names, old format versions, Predictor edges, new items, the TBE kernel."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from sparse_kd.compress import artifact as A
from sparse_kd.compress import quantize as Q
from sparse_kd.compress import rows as QR
from sparse_kd.compress.prune import text_rows
from sparse_kd.compress.stage import artifact_mappings, compress_model, serving_builder, serving_dataset
from sparse_kd.serve import ArtifactError, Predictor, verify_artifact
from sparse_kd.serve.format import FORMAT_VERSION, KERNEL_CPU, KERNEL_TBE

ROOT = Path(__file__).resolve().parents[2]


def _settings():
    return {
        "user_id": {"keep_ratio": 0.5, "dtype": "int8", "fill": "zero"},
        "item_id": {"keep_ratio": 0.5, "dtype": "int4", "fill": "mean"},
        "age": {"keep_ratio": 1.0, "dtype": "fp16", "fill": "zero"},
        "tags": {"keep_ratio": 1.0, "dtype": "int2", "fill": "zero"},
    }


@pytest.fixture(scope="module")
def saved(tiny, tmp_path_factory):
    ds, text, model, builder = tiny
    comp = compress_model(model, ds, _settings(), text=text)
    out = tmp_path_factory.mktemp("art") / "artifact"
    A.save_artifact(out, comp, artifact_mappings(ds, comp), {"user": builder.user_dense, "item": builder.item_dense}, {"test": True})
    return out, comp


def _copy(saved, tmp_path) -> Path:
    dst = tmp_path / "copy"
    shutil.copytree(saved[0], dst)
    return dst


def _pairs(ds, split="test"):
    sp = ds.splits[split]
    return [ds.user_ids[u] for u in sp.user], [ds.item_ids[i] for i in sp.item]


def test_round_trip_fresh_process_equals_in_process_model(tiny, saved, tmp_path):
    ds, _, _, builder = tiny
    out, comp = saved
    users, items = _pairs(ds)
    users, items = users + ["nobody", "u1"], items + ["i2", "no-such-item"]
    # in-process: the eager compressed model on batches made by the training code's BatchBuilder
    # (its entity bags as the artifact holds them: tables stored hot-first address their new rows)
    sp = ds.splits["test"]
    sds = serving_dataset(ds, comp)
    b = serving_builder(ds, comp, builder).build(torch.from_numpy(sp.user), torch.from_numpy(sp.item),
                                                 torch.from_numpy(sp.label))
    with torch.no_grad():
        known = comp.serving(b.dense_features, b.sparse_features.values(), b.sparse_features.lengths())
        # documented unknown-id behaviour: empty bags and zero dense for the unknown side
        u1, i2 = ds.user_ids.index("u1"), ds.item_ids.index("i2")
        ub, ib = builder.user_dense, builder.item_dense
        dense = torch.stack([torch.cat([torch.zeros_like(ub[0]), ib[i2]]), torch.cat([ub[u1], torch.zeros_like(ib[0])])])
        vals, lens = [], []
        for f in sds.features:  # feature-major: bag of pair 0, bag of pair 1
            for k, known_side in enumerate(("item", "user")):
                e = i2 if known_side == "item" else u1
                bag = f.values[f.offsets[e]: f.offsets[e + 1]] if f.owner == known_side else []
                vals.extend(int(v) for v in bag)
                lens.append(len(bag))
        unknown = comp.serving(dense, torch.tensor(vals, dtype=torch.int64), torch.tensor(lens, dtype=torch.int32))
    expect = torch.cat([known, unknown]).numpy()
    (tmp_path / "pairs.json").write_text(json.dumps({"users": users, "items": items}))
    script = textwrap.dedent(
        f"""
        import json, sys
        import numpy as np
        from sparse_kd.serve.predictor import Predictor
        p = Predictor.load({str(out)!r})
        d = json.load(open({str(tmp_path / 'pairs.json')!r}))
        # known pairs in one call and the two unknown ones in another: the same batches as in-process
        # (a different batch size may change the last float bit of the dense layers' matmuls)
        n = len(d["users"]) - 2
        a, st_a = p.score_logits(d["users"][:n], d["items"][:n], return_stats=True)
        b, stats = p.score_logits(d["users"][n:], d["items"][n:], return_stats=True)
        assert st_a["unknown_users"] == st_a["unknown_items"] == 0
        logits = np.concatenate([a, b])
        probs = np.concatenate([p.score(d["users"][:n], d["items"][:n]), p.score(d["users"][n:], d["items"][n:])])
        np.save({str(tmp_path / 'logits.npy')!r}, logits)
        np.save({str(tmp_path / 'probs.npy')!r}, probs)
        bad = [m for m in ("transformers", "sparse_kd.student", "sparse_kd.compress", "sparse_kd.distill", "torchrec",
                          "fbgemm_gpu")
               if m in sys.modules or any(k.startswith(m + ".") for k in sys.modules)]
        print(json.dumps({{"stats": stats, "bad": bad}}))
        """
    )
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    doc = json.loads(r.stdout.strip().splitlines()[-1])
    assert doc["bad"] == [], f"the serving process imported {doc['bad']}"
    assert doc["stats"]["unknown_users"] == 1 and doc["stats"]["unknown_items"] == 1
    got = np.load(tmp_path / "logits.npy")
    np.testing.assert_array_equal(got, expect)
    np.testing.assert_allclose(np.load(tmp_path / "probs.npy"), 1 / (1 + np.exp(-expect.astype(np.float64))), rtol=1e-6)


def test_manifest_records_tables_bytes_and_files(saved):
    out, comp = saved
    m = verify_artifact(out)
    assert m["format_version"] == FORMAT_VERSION == 2 and m["model"]["output"] == "logits"
    assert m["serving"] == {"kernel": KERNEL_CPU, "device": "cpu"}
    assert set(m["files"]) == {"model.pt", "mappings.json", "entity_dense.pt", "remaps.pt", "text_maps.pt", "dense_fp32.pt"}
    t = m["tables"]["t_item_id"]
    assert t["dtype"] == "int4" and t["rows_kept"] == 20 and t["rows_stored"] == 21 and t["fill"] == "mean"
    assert m["bytes"]["total"] == sum(v["bytes"]["total"] for v in m["tables"].values())
    assert m["bytes"]["total_mb"] == m["bytes"]["total"] / 1e6 and m["bytes"]["fp32_mb"] > m["bytes"]["total_mb"]
    assert set(m["versions"]) >= {"torch", "fbgemm_gpu", "torchrec"}
    # bytes in the manifest are the loaded model's real buffers (codes, scale/bias, mappings)
    sm = torch.jit.load(str(out / "model.pt"))
    tables = list(sm.lookup.tables.children())
    w = sum(v["bytes"]["weights"] + v["bytes"]["padding"] for v in m["tables"].values())
    r = sum(v["bytes"]["remap"] for v in m["tables"].values())
    assert w == sum(t.weight.numel() * t.weight.element_size() for t in tables)
    assert r == sum(t.mapping.numel() * 4 for t in tables) == 4 * (60 + 40)
    # int8 rows: D codes + fp32 scale and bias; int4: D/2 codes + fp16 scale and bias; no padding
    assert m["tables"]["t_user_id"]["bytes"]["row_bytes"] == 8 + 8 and t["bytes"]["row_bytes"] == 4 + 4
    remaps = torch.load(out / "remaps.pt", weights_only=True)
    # the pruned tables' remaps, and the hot-first permutations of tables kept whole (folded into
    # the entity bags: the model holds no remap for them)
    assert {"t_user_id", "t_item_id"} <= set(remaps)
    for name in set(remaps) - {"t_user_id", "t_item_id"}:
        assert m["tables"][name]["remap"] == "folded" and m["tables"][name]["bytes"]["remap"] == 0
        assert sorted(remaps[name].tolist()) == list(range(m["tables"][name]["rows_original"]))


@pytest.mark.parametrize("damage", ["truncate_model", "flip_dense", "version", "missing_mappings", "bad_manifest"])
def test_corrupted_artifact_names_the_file(saved, tmp_path, damage):
    d = _copy(saved, tmp_path)
    if damage == "truncate_model":
        data = (d / "model.pt").read_bytes()
        (d / "model.pt").write_bytes(data[: len(data) // 2])
        want = r"model\.pt.*truncated"
    elif damage == "flip_dense":
        data = bytearray((d / "entity_dense.pt").read_bytes())
        data[len(data) // 2] ^= 0xFF
        (d / "entity_dense.pt").write_bytes(bytes(data))
        want = r"entity_dense\.pt.*sha256"
    elif damage == "version":
        m = json.loads((d / "manifest.json").read_text())
        m["format_version"] = 99
        (d / "manifest.json").write_text(json.dumps(m))
        want = r"manifest\.json.*version 99"
    elif damage == "missing_mappings":
        (d / "mappings.json").unlink()
        want = r"mappings\.json.*missing"
    else:
        text = (d / "manifest.json").read_text()
        (d / "manifest.json").write_text(text[: len(text) // 3])
        want = r"manifest\.json.*unreadable"
    with pytest.raises(ArtifactError, match=want):
        Predictor.load(d)


def test_atomic_write_keeps_the_old_artifact_on_failure(tiny, saved, tmp_path, monkeypatch):
    ds, _, _, builder = tiny
    d = _copy(saved, tmp_path)
    before = verify_artifact(d)

    def boom(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(A.torch, "save", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        A.save_artifact(d, saved[1], artifact_mappings(ds, saved[1]), {"user": builder.user_dense, "item": builder.item_dense}, {})
    monkeypatch.undo()
    assert verify_artifact(d) == before
    assert [p.name for p in tmp_path.iterdir()] == ["copy"]  # no temporary folder left behind
    # a successful save replaces it and cleans up
    A.save_artifact(d, saved[1], artifact_mappings(ds, saved[1]), {"user": builder.user_dense, "item": builder.item_dense}, {"again": 1})
    assert verify_artifact(d)["config"] == {"again": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["copy"]


def test_predictor_edges(tiny, saved):
    ds, _, _, _ = tiny
    p = Predictor.load(saved[0])
    e = p.score([], [])
    assert e.shape == (0,) and e.dtype == np.float32
    with pytest.raises(TypeError, match="user_ids"):
        p.score("u1", ["i1"])
    with pytest.raises(TypeError, match=r"item_ids\[1\]"):
        p.score(["u1", "u2"], ["i1", 7])
    with pytest.raises(TypeError, match="item_ids"):
        p.score(["u1"], np.array(["i1"]))
    with pytest.raises(ValueError, match="item_ids has 1"):
        p.score(["u1", "u2"], ["i1"])
    users, items = _pairs(ds, "valid")
    whole, st = p.score(users, items, return_stats=True)
    small = Predictor.load(saved[0], max_batch=7)
    chunked, st2 = small.score(users, items, return_stats=True)
    assert st["chunks"] == 1 and st2["chunks"] == -(-len(users) // 7)
    np.testing.assert_allclose(chunked, whole, rtol=1e-5, atol=1e-6)
    assert np.all((whole > 0) & (whole < 1))
    _, st3 = p.score(["ghost", "u1"], ["i1", "ghost"], return_stats=True)
    assert (st3["unknown_users"], st3["unknown_items"]) == (1, 1)
    assert st3["unknown_user_at"] == [0] and st3["unknown_item_at"] == [1]
    # positions count from the start of the arguments, across chunks
    us, its = list(users[:20]), list(items[:20])
    us[3], its[9], its[15] = "ghost", "ghost", "ghost"
    _, st4 = small.score(us, its, return_stats=True)
    assert st4["chunks"] == 3 and st4["unknown_user_at"] == [3] and st4["unknown_item_at"] == [9, 15]
    assert p.stats["unknown_users"] >= 1 and p.stats["calls"] >= 2


def test_new_text_only_item_becomes_servable(tiny, saved, tmp_path):
    ds, text, _, _ = tiny
    d = _copy(saved, tmp_path)
    old = Predictor.load(d)
    users, items = _pairs(ds, "valid")
    new_text = text["item"][5:6] * 0.9 + 0.1  # a new item described like item 5
    before, st = old.score(["u1", "u2"], ["fresh-item", "fresh-item"], return_stats=True)
    assert st["unknown_items"] == 2
    res = A.add_items(d, ["fresh-item"], new_text)
    assert res["added"] == 1
    new = Predictor.load(d)
    after, st = new.score(["u1", "u2"], ["fresh-item", "fresh-item"], return_stats=True)
    assert st["unknown_items"] == 0
    assert not np.allclose(after, before)  # it now has a row of its own
    np.testing.assert_array_equal(new.score(users, items), old.score(users, items))  # existing pairs unchanged
    # its row is the saved text map applied to its text, quantized to the table's dtype (int4)
    sm = torch.jit.load(str(d / "model.pt"))
    q = Q.extract_qtables(sm)["item_id"]
    new_id = len(ds.item_ids)
    row = int(q.remap[new_id])
    assert row == q.num_rows - 1
    deq = QR.dequantize_rows(q.weight[row: row + 1], q.scale_bias[row: row + 1], "int4")
    maps = torch.load(d / "text_maps.pt", weights_only=True)
    ref = text_rows(new_text, maps["item_id"])
    step = float(ref.max() - ref.min()) / 15
    assert float((deq - ref).abs().max()) <= 0.5 * step + 1e-2
    m = verify_artifact(d)
    assert m["tables"]["t_item_id"]["rows_original"] == len(ds.item_ids) + 1 and m["history"][-1]["added"] == 1
    with pytest.raises(ValueError, match="already"):
        A.add_items(d, ["fresh-item"], new_text)


def test_threads_change_nothing_but_speed(tiny, saved):
    ds, _, _, _ = tiny
    users, items = _pairs(ds, "valid")
    users, items = users * 40, items * 40  # enough ids per worker to fork the one-thread tables
    one = Predictor.load(saved[0], threads=1, max_batch=len(users))
    many = Predictor.load(saved[0], threads=3, max_batch=len(users))
    assert many.model.lookup.num_workers == 3 and one.model.lookup.num_workers == 1
    np.testing.assert_array_equal(many.score_logits(users, items), one.score_logits(users, items))
    with pytest.raises(ValueError, match="threads"):
        one.set_threads(0)


def test_concurrent_calls_from_several_threads_score_alike(tiny, saved):
    """The ranking service calls one Predictor from many request threads; with forked lookups
    inside each call, every call still gets the scores of a lone call."""
    from concurrent.futures import ThreadPoolExecutor

    ds, _, _, _ = tiny
    users, items = _pairs(ds, "valid")
    users, items = users * 40, items * 40
    p = Predictor.load(saved[0], threads=2, max_batch=len(users))
    expect = p.score_logits(users, items)
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda _: p.score_logits(users, items), range(12)))
    for r in results:
        np.testing.assert_array_equal(r, expect)
    assert p.stats["calls"] == 13


def _tree(d: Path) -> dict:
    """relative path -> sha256 of every file under d (and the folders, as None)."""
    return {str(p.relative_to(d)): (hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else None)
            for p in sorted(d.rglob("*"))}


def _write(tiny, saved, out):
    ds, _, _, builder = tiny
    return A.save_artifact(out, saved[1], artifact_mappings(ds, saved[1]), {"user": builder.user_dense, "item": builder.item_dense},
                           {"source": {"run_dir": "runs/demo", "variant": "distilled"}})


@pytest.mark.parametrize("kind", ["run_folder", "file", "extra_file", "bad_manifest", "foreign_manifest"])
def test_writer_refuses_what_is_not_an_artifact_and_leaves_every_byte(tiny, saved, tmp_path, kind):
    out = tmp_path / "target"
    if kind == "run_folder":  # `sparse-kd compress CONFIG --out runs/demo`
        (out / "data").mkdir(parents=True)
        (out / "config.yaml").write_text("output_dir: runs/demo\n")
        (out / "data" / "mappings.json").write_text("{}")
        (out / "distilled" / "checkpoints").mkdir(parents=True)
        (out / "distilled" / "checkpoints" / "x.distcp").write_bytes(b"\x00" * 100)
        want = r"not a sparse_kd artifact \(no manifest\.json; it holds config\.yaml, data, distilled\)"
    elif kind == "file":
        out.write_bytes(b"precious")
        want = "exists and is not a folder"
    else:
        shutil.copytree(saved[0], out)
        if kind == "extra_file":
            (out / "notes.txt").write_text("mine")
            want = r"files its manifest\.json does not list \(notes\.txt\)"
        elif kind == "bad_manifest":
            (out / "manifest.json").write_text("{not json")
            want = "does not hold a readable artifact"
        else:
            (out / "manifest.json").write_text(json.dumps({"format": "someone.else", "files": {}}))
            want = "does not hold a readable artifact.*not a sparse_kd.artifact manifest"
    before = _tree(tmp_path)
    with pytest.raises(ArtifactError, match=want) as e:
        _write(tiny, saved, out)
    assert f"refusing to write an artifact to {out}" in str(e.value)
    assert _tree(tmp_path) == before  # every byte unchanged, nothing created beside it


def test_writer_replaces_an_empty_folder_and_an_old_version_artifact(tiny, saved, tmp_path):
    out = tmp_path / "art"
    out.mkdir()
    _write(tiny, saved, out)
    m = json.loads((out / "manifest.json").read_text())
    m["format_version"] = 1  # as written before the CPU kernels: a rebuild must replace it in place
    del m["serving"]
    (out / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ArtifactError, match="version 1"):
        verify_artifact(out)
    _write(tiny, saved, out)
    assert verify_artifact(out)["format_version"] == FORMAT_VERSION
    assert sorted(p.name for p in tmp_path.iterdir()) == ["art"]


@pytest.mark.parametrize("source", ["with_source", "without_source"])
def test_old_format_version_is_refused_with_the_command_that_rebuilds_it(saved, tmp_path, source):
    d = _copy(saved, tmp_path)
    m = json.loads((d / "manifest.json").read_text())
    m["format_version"] = 1
    del m["serving"]
    if source == "with_source":
        m["config"] = {"source": {"run_dir": "runs/demo", "variant": "distilled"}}
        cmd = f"sparse-kd compress runs/demo/config.yaml --variant distilled --out {d}"
    else:
        cmd = f"sparse-kd compress CONFIG --variant VARIANT --out {d}"
    (d / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ArtifactError) as e:
        Predictor.load(d)
    msg = str(e.value)
    assert "artifact format version 1" in msg and f"reads version {FORMAT_VERSION}" in msg, msg
    assert f"rebuild it with `{cmd}`" in msg, msg


@pytest.mark.parametrize(
    "name, info, want",
    [
        ("../outside.pt", None, r"file name '\.\./outside\.pt' in 'files' is not a plain file name"),
        ("/etc/passwd", None, r"'/etc/passwd' in 'files' is not a plain file name"),
        ("sub/model.pt", None, r"'sub/model\.pt' in 'files' is not a plain file name"),
        ("..", None, r"'\.\.' in 'files' is not a plain file name"),
        (".hidden", None, r"'\.hidden' in 'files' is not a plain file name"),
        ("", None, r"'' in 'files' is not a plain file name"),
        ("manifest.json", None, r"'manifest\.json' in 'files' is not a plain file name"),
        ("extra.pt", "not a dict", r"files\.extra\.pt must be \{"),
        ("extra.pt", {"sha256": "0" * 64}, r"files\.extra\.pt must be"),
        ("extra.pt", {"sha256": "xyz", "bytes": 3}, r"files\.extra\.pt must be"),
        ("extra.pt", {"sha256": "0" * 64, "bytes": -1}, r"files\.extra\.pt must be"),
        ("extra.pt", {"sha256": "0" * 64, "bytes": True}, r"files\.extra\.pt must be"),
    ],
)
def test_manifest_file_names_and_entries_are_checked(saved, tmp_path, name, info, want):
    d = _copy(saved, tmp_path)
    (tmp_path / "outside.pt").write_bytes(b"not part of the artifact")
    m = json.loads((d / "manifest.json").read_text())
    m["files"][name] = info if info is not None else {"sha256": "0" * 64, "bytes": 24}
    (d / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ArtifactError, match=want):
        Predictor.load(d)


def test_compress_refuses_a_run_folder_as_out_before_any_work(run_folder, capsys):
    from sparse_kd.cli import main
    from sparse_kd.compress.stage import compress_run
    from sparse_kd.config import CompressConfig

    run, _, _ = run_folder
    before = _tree(run)
    with pytest.raises(ArtifactError, match=rf"refusing to write an artifact to {run}: .*not a sparse_kd artifact"):
        compress_run(run, "distilled", CompressConfig(), run)
    assert main(["compress", str(run / "config.yaml"), "--variant", "distilled", "--out", str(run)]) == 2
    assert "error: refusing to write an artifact to" in capsys.readouterr().err
    assert _tree(run) == before
    assert not list(run.parent.glob(f".{run.name}.*"))


def test_tbe_artifact_round_trip_and_agrees_with_the_cpu_kernel(tiny, saved, tmp_path):
    """The GPU-serving kernel (FBGEMM's TBE), built and served here on CPU: the artifact records it,
    the predictor loads it (importing fbgemm_gpu for its operators) and scores like the in-process
    TBE model, and like the CPU-kernel artifact up to float summation order."""
    ds, text, model, builder = tiny
    comp = compress_model(model, ds, _settings(), text=text, kernel=KERNEL_TBE)
    out = tmp_path / "tbe"
    A.save_artifact(out, comp, artifact_mappings(ds, comp), {"user": builder.user_dense, "item": builder.item_dense}, {})
    m = verify_artifact(out)
    assert m["serving"] == {"kernel": KERNEL_TBE, "device": "cpu"} and m["model"]["kernel"] == KERNEL_TBE
    p = Predictor.load(out)
    sp = ds.splits["test"]
    b = serving_builder(ds, comp, builder).build(torch.from_numpy(sp.user), torch.from_numpy(sp.item),
                                                 torch.from_numpy(sp.label))
    with torch.no_grad():
        expect = comp.serving(b.dense_features, b.sparse_features.values(), b.sparse_features.lengths()).numpy()
    users, items = _pairs(ds)
    got = p.score_logits(users, items)
    np.testing.assert_array_equal(got, expect)
    np.testing.assert_allclose(Predictor.load(saved[0]).score_logits(users, items), got, rtol=1e-5, atol=1e-5)
    # a new item on the TBE artifact keeps the kernel
    A.add_items(out, ["fresh-item"], text["item"][:1])
    assert verify_artifact(out)["serving"]["kernel"] == KERNEL_TBE
    assert Predictor.load(out).score(["u1"], ["fresh-item"], return_stats=True)[1]["unknown_items"] == 0
