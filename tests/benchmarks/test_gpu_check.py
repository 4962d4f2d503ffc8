"""The GPU check's parts that run without a GPU: --help and --dry-run, the refusal without CUDA,
the plan (JSON rewritten after every check, skips, the time budget), the per-check time limit
that kills a check's whole process group, and (slow) the check functions themselves on CPU."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "gpu_check.py"
sys.path.insert(0, str(ROOT / "benchmarks"))
import gpu_check  # noqa: E402
import gpu_check_harness as harness  # noqa: E402


def test_help_and_dry_run_work_on_cpu():
    out = subprocess.run([sys.executable, str(SCRIPT), "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    for c in gpu_check.CHECKS:
        assert c.name in out.stdout
    out = subprocess.run([sys.executable, str(SCRIPT), "--dry-run", "--only", "env", "train_2ranks"],
                         capture_output=True, text=True, timeout=120, env=dict(os.environ, CUDA_VISIBLE_DEVICES=""))
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].startswith("env") and "skip: needs 1 GPU, 0 visible" in lines[0]
    assert "skip: needs 2 GPUs, 0 visible" in lines[1]


def test_refuses_clearly_without_a_gpu(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert gpu_check.main(["--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "gpu_check needs a CUDA GPU" in err and "make gpu-check" in err
    assert not (tmp_path / "out").exists()  # nothing was run or written


def test_table_and_json():
    rows = [
        harness.row("train_gpu/baseline", True, "valid AUC 0.7000, 900 examples/s", 12.34, valid_auc=0.7),
        harness.row("serve_cuda_hash", False, "vs array remap: 3.0e-02", 1.0, max_logit_diff_vs_array=0.03),
        harness.row("train_2ranks", "skip", "needs 2 GPUs, 1 visible", 0.0),
    ]
    table = harness.summary_table(rows).splitlines()
    assert table[0].split() == ["check", "status", "s", "detail"]
    assert "train_gpu/baseline" in table[2] and " ok " in table[2] and "12.3" in table[2]
    assert "serve_cuda_hash" in table[3] and "FAIL" in table[3] and "skip" in table[4]
    doc = json.loads(json.dumps(harness.result_doc(rows, {"gpu": "test"})))
    assert doc["passed"] is False and doc["complete"] is True and doc["rows"][0]["figures"]["valid_auc"] == 0.7
    assert harness.result_doc([rows[0], rows[2]], {})["passed"] is True  # a skip does not fail the run
    assert harness.result_doc([rows[0]], {}, pending=["teacher"])["passed"] is False  # incomplete never passes


def test_a_failing_check_becomes_a_row():
    def boom():
        raise RuntimeError("exit 2 | error: nproc: 2 processes\nmore")

    (r,) = harness.timed("train_gpu", boom)
    assert r["status"] == "FAIL" and r["detail"] == "RuntimeError: exit 2 | error: nproc: 2 processes"


def test_training_commands():
    cmd = harness.cli_command("train", Path("/x/run"), "nproc=1", "train.epochs=2", variants=("baseline",))
    assert cmd[1:] == ["-m", "sparse_kd.cli", "train", "configs/demo.yaml", "output_dir=/x/run", "nproc=1",
                       "train.epochs=2", "--variants", "baseline"]
    ctx = harness.Ctx(Path("/x"), ("data.synthetic.num_users=60",), device="cpu", backend="gloo")
    assert gpu_check.train_overrides(ctx, 2) == ("data.synthetic.num_users=60", "nproc=2", "train.backend=gloo",
                                                 "train.epochs=1", "train.mf_reference=false")


def test_plan_writes_json_after_every_check_and_keeps_the_budget(tmp_path, capsys):
    """Mocked checks: the JSON on disk holds every earlier row before each check starts; a failed
    check skips those that read its output; too few GPUs skips; a spent budget leaves 'not run'."""
    path, now, seen, limits = tmp_path / "gpu_check.json", [0.0], {}, {}
    plan = [c for c in gpu_check.CHECKS if c.name in
            ("env", "train_gpu", "train_2ranks", "serve_cuda_array", "uvm_caching", "teacher", "resume_cpu_to_gpu")]

    def run_one(name, limit):
        doc = json.loads(path.read_text())
        seen[name] = ([r["check"] for r in doc["rows"]], doc["pending"][0], doc["complete"])
        limits[name] = limit
        now[0] += {"uvm_caching": 300.0, "teacher": 25.0}.get(name, 10.0)  # seconds it "took"
        return [harness.row(name, name != "train_gpu", "mock", 1.0)]

    doc = harness.run_plan(plan, run_one, path, {"gpu": "mock"}, budget_s=360, gpus=1, clock=lambda: now[0])
    status = {r["check"]: r["status"] for r in doc["rows"]}
    assert status == {"env": "ok", "train_gpu": "FAIL", "train_2ranks": "skip", "serve_cuda_array": "skip",
                      "uvm_caching": "ok", "teacher": "ok", "resume_cpu_to_gpu": "not run"}
    assert seen["env"] == ([], "env", False)
    assert seen["uvm_caching"] == (["env", "train_gpu", "train_2ranks", "serve_cuda_array"], "uvm_caching", False)
    assert limits["train_gpu"] == 180 and limits["teacher"] == 40  # 360 - 10 - 10 - 300 left for the teacher
    reasons = {r["check"]: r["detail"] for r in doc["rows"]}
    assert reasons["train_2ranks"] == "needs 2 GPUs, 1 visible"
    assert "train_gpu did not pass (FAIL)" in reasons["serve_cuda_array"]
    assert "time budget spent" in reasons["resume_cpu_to_gpu"] and "--only resume_cpu_to_gpu" in reasons["resume_cpu_to_gpu"]
    on_disk = json.loads(path.read_text())
    assert on_disk == json.loads(json.dumps(doc)) and on_disk["complete"] and not on_disk["passed"]
    assert not list(tmp_path.glob(".*.tmp"))  # atomic writes leave no temp file


def test_a_check_past_its_limit_is_killed_with_its_process_group(tmp_path):
    pid_file = tmp_path / "grandchild.pid"
    cmd = ["bash", "-c", f"sleep 60 & echo $! > {pid_file}; echo started; wait"]
    t0 = time.monotonic()
    rc, timed_out, secs = harness.run_limited(cmd, 1.0, tmp_path / "logs" / "x.log")
    assert timed_out and rc != 0 and time.monotonic() - t0 < 30
    assert (tmp_path / "logs" / "x.log").read_text().strip() == "started"
    pid = int(pid_file.read_text())
    state, deadline = "?", time.monotonic() + 10  # SIGKILL was sent; on a busy machine it may take a moment
    while time.monotonic() < deadline:
        try:  # gone, or a zombie waiting for init to reap it
            state = Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0]
        except FileNotFoundError:
            return
        if state == "Z":
            return
        time.sleep(0.1)
    raise AssertionError(f"the grandchild {pid} still runs 10 s after the kill (state {state})")


def test_a_child_that_fails_becomes_a_row_with_its_log(tmp_path):
    """The real child process on a machine without CUDA: it exits 2, and the row says why."""
    ctx = harness.Ctx(tmp_path)
    env_before = dict(os.environ)
    os.environ["CUDA_VISIBLE_DEVICES"] = ""
    try:
        (r,) = gpu_check.run_child(ctx, "env", 120)
    finally:
        os.environ.clear()
        os.environ.update(env_before)
    assert r["check"] == "env" and r["status"] == "FAIL"
    assert r["detail"].startswith("exit 2: ") and "gpu_check needs a CUDA GPU" in r["detail"]
    assert (tmp_path / "logs" / "env.log").is_file()


TINY = ("data.synthetic.num_users=60", "data.synthetic.num_items=40", "data.synthetic.interactions_per_user=30",
        "train.batch_size=64", "train.eval_batch_size=256")


@pytest.mark.slow
def test_check_functions_run_on_cpu(tmp_path):
    """The check functions with gloo on CPU and tiny data: the commands run, their outputs parse,
    compress -> artifact -> Predictor serves (CPU kernels), and the Parquet loader feeds training."""
    ctx = harness.Ctx(tmp_path, TINY, device="cpu", backend="gloo")
    rows = gpu_check.check_train(ctx, "train_gpu", 1)
    assert {r["check"] for r in rows} == {"train_gpu/teacher_ranker", "train_gpu/baseline", "train_gpu/distilled"}
    assert all(0.0 < r["figures"]["valid_auc"] < 1.0 for r in rows)
    r = gpu_check.check_serve(ctx, "array", pairs=256, reps=2)
    assert r["check"] == "serve_cpu_array" and r["figures"]["device"] == "cpu", r
    assert r["figures"]["max_logit_diff_vs_cpu"] == 0.0 and r["status"] == "ok", r
    r = gpu_check.check_parquet_pinned(ctx)
    assert r["figures"]["workers"] == 2 and r["figures"]["pinned"] is False, r  # no CUDA: nothing to pin for
    assert 0.0 < r["figures"]["valid_auc"] < 1.0, r
    r = gpu_check.check_resume_cpu_to_gpu(ctx)
    assert r["detail"].startswith("resumed from the CPU checkpoint; checkpoint at epoch 2"), r["detail"]


def _script(**env):
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
