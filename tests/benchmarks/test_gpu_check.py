"""The GPU check's parts that run without a GPU: the refusal on a machine without CUDA, the table
and JSON it prints, the commands it runs, and its lookup comparison (rebuilding a compressed
table batch on another device, here the CPU itself)."""

import json
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))
import gpu_check  # noqa: E402


def test_refuses_clearly_without_a_gpu(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert gpu_check.main(["--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "gpu_check needs a CUDA GPU" in err and "make gpu-check" in err
    assert not (tmp_path / "out").exists()  # nothing was run or written


def test_table_and_json():
    rows = [
        gpu_check.row("train_gpu/baseline", True, "valid AUC 0.7000, 900 examples/s", 12.34, valid_auc=0.7),
        gpu_check.row("lookup_int4", False, "vs CPU kernel: max rel diff 3.0e-02", 1.0, max_rel_diff_vs_cpu=0.03),
    ]
    table = gpu_check.summary_table(rows).splitlines()
    assert table[0].split() == ["check", "status", "s", "detail"]
    assert "train_gpu/baseline" in table[2] and " ok " in table[2] and "12.3" in table[2]
    assert "lookup_int4" in table[3] and "FAIL" in table[3]
    doc = json.loads(json.dumps(gpu_check.result_doc(rows, {"gpu": "test"})))
    assert doc["passed"] is False and doc["rows"][0]["figures"]["valid_auc"] == 0.7
    assert gpu_check.result_doc(rows[:1], {})["passed"] is True


def test_a_failing_check_becomes_a_row():
    def boom():
        raise RuntimeError("exit 2 | error: nproc: 2 processes\nmore")

    (r,) = gpu_check.timed("train_gpu", boom)
    assert r["status"] == "FAIL" and r["detail"] == "RuntimeError: exit 2 | error: nproc: 2 processes"


def test_training_commands():
    cmd = gpu_check.cli_command("train", Path("/x/run"), "nproc=1", "train.epochs=2", variants=("baseline",))
    assert cmd[1:] == ["-m", "sparse_kd.cli", "train", "configs/demo.yaml", "output_dir=/x/run", "nproc=1",
                       "train.epochs=2", "--variants", "baseline"]


@pytest.fixture(scope="module")
def compressed():
    from sparse_kd.compress.quantize import table_name, tbe_of
    from sparse_kd.compress.stage import compress_model, model_weights
    from sparse_kd.config import StudentConfig
    from sparse_kd.data.batching import count_dense
    from sparse_kd.student.model import build_dlrm
    from helpers.tiny import tiny_dataset

    torch.manual_seed(0)
    ds = tiny_dataset()
    ub, ib = count_dense(ds)
    cfg = StudentConfig(embedding_dim=8, dense_arch=(8,), over_arch=(4, 1))
    model = build_dlrm({f.name: f.num_embeddings for f in ds.features}, ub.shape[1] + ib.shape[1], cfg, device="cpu")
    weights = model_weights(model)
    comp = compress_model(model, ds, {f: {"keep_ratio": 0.5, "dtype": "int8", "fill": "zero"} for f in weights},
                          kernel="fbgemm_tbe", row_order="id")
    tbe = tbe_of(comp.serving)
    feats = [spec[0][2:] for spec in tbe.embedding_specs]
    return tbe, [comp.remaps.get(table_name(f)) for f in feats], [weights[f] for f in feats]


def test_rebuilt_table_batch_gives_the_same_lookups(compressed):
    tbe, remaps, weights = compressed
    assert any(r is not None for r in remaps)  # half the rows pruned: remaps in play
    res = gpu_check.compare_lookup(tbe, remaps, weights, torch.device("cpu"), batch=64, bag=5, reps=2)
    assert res["max_rel_diff_vs_cpu"] == 0.0  # same bytes, same kernel
    assert 0.0 < res["rel_err_vs_fp32"] < 0.05  # int8 rounding only; pruned ids are zero in both
    assert res["ids_per_s"] > 0


def test_rebuild_without_remaps_would_be_caught(compressed):
    """The comparison can fail: a rebuild that lost the id remaps answers differently."""
    tbe, remaps, weights = compressed
    num_ids = [int(r.numel()) if r is not None else s[1] for r, s in zip(remaps, tbe.embedding_specs)]
    idx, offsets = gpu_check.lookup_batch(num_ids, 64, 5)
    unmapped = gpu_check.rebuild_tbe(tbe, [None] * len(remaps), torch.device("cpu"))
    assert not torch.equal(unmapped(idx, offsets), tbe(idx, offsets))
    assert torch.equal(gpu_check.rebuild_tbe(tbe, remaps, torch.device("cpu"))(idx, offsets), tbe(idx, offsets))


TINY = ("data.synthetic.num_users=60", "data.synthetic.num_items=40", "data.synthetic.interactions_per_user=30",
        "train.batch_size=64", "train.eval_batch_size=256")


@pytest.mark.slow
def test_training_and_lookup_checks_run_on_cpu(tmp_path):
    """The same check functions with gloo on CPU and tiny data: the commands run, their outputs
    parse, and the lookups compare (the CPU stands in for the GPU)."""
    rows = gpu_check.check_train_gpu(tmp_path / "train", TINY, backend="gloo")
    assert {r["check"] for r in rows} == {"train_gpu/teacher_ranker", "train_gpu/baseline", "train_gpu/distilled"}
    assert all(0.0 < r["figures"]["valid_auc"] < 1.0 for r in rows)
    r = gpu_check.check_resume_cpu_to_gpu(tmp_path / "resume", TINY)
    assert r["detail"].startswith("resumed from the CPU checkpoint; checkpoint at epoch 2"), r["detail"]
    rows = gpu_check.check_lookups(tmp_path / "train", torch.device("cpu"), dtypes=("int4",), keeps=(0.5,))
    assert [r["check"] for r in rows] == ["lookup_int4_keep0.5"] and rows[0]["status"] == "ok", rows


def _script(**env):
    import os
    import subprocess

    return subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh")], capture_output=True, text=True,
                          timeout=60, env=dict(os.environ, **env))


def test_script_refuses_a_cuda_build_pytorch_does_not_publish():
    out = _script(CUDA_FLAVOR="cu128")
    assert out.returncode == 2 and "expected cu126 or cu130" in out.stderr and "no cu128 build" in out.stderr


def test_script_stops_before_installing_on_a_machine_without_gpu():
    import shutil

    if shutil.which("nvidia-smi"):
        pytest.skip("this machine has nvidia-smi: the script would install the CUDA stack")
    before = (ROOT / ".venv-gpu").exists()
    out = _script()
    assert out.returncode == 2 and "no NVIDIA GPU visible" in out.stderr
    assert (ROOT / ".venv-gpu").exists() == before  # no environment created
