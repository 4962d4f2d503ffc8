"""Nothing a user made is overwritten: a command whose settings differ from those a run folder
was trained with is refused before it writes anything (one ``error:`` line, exit 2), under
every launch path: one process, the self-relaunch under torchrun, torchrun started by hand,
``pipeline`` and ``compress``.

Fast tests check the decision on hand-made run folders; the slow ones run the real CLI, hash
every file under the run folder, rerun with a changed setting and compare the hashes.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from sparse_kd.config import DistillConfig, replace, to_dict
from sparse_kd.integrity import sha256_file
from sparse_kd.pipeline import TEACHER, variant_fingerprint
from sparse_kd.run_folder import StaleRunError, check_run_folder, check_same_experiment
from helpers.tiny import tiny_config

ROOT = Path(__file__).resolve().parents[2]


def tree(root: Path) -> dict[str, str]:
    """Relative path -> sha256 (or "dir") of everything under ``root``."""
    return {str(p.relative_to(root)): ("dir" if p.is_dir() else sha256_file(p)) for p in sorted(root.rglob("*"))}


def fake_run(cfg, variants=("baseline",), epoch: int = 1, step_in_epoch: int = 0) -> Path:
    """A run folder as training leaves it, minus the tensors: config.yaml, data/, and per variant a
    model_meta.json fingerprint and one complete checkpoint manifest."""
    run = Path(cfg.output_dir)
    (run / "data").mkdir(parents=True)
    (run / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    (run / "data" / "mappings.json").write_text("{}")
    for v in variants:
        step = run / v / "checkpoints" / "step_00000003"
        step.mkdir(parents=True)
        (step / "meta.json").write_text(json.dumps({"format_version": 1, "epoch": epoch, "step_in_epoch": step_in_epoch,
                                                     "global_step": 3, "files": {}}))
        fp = variant_fingerprint(cfg, v, cfg.distill if v == "distilled" else DistillConfig(), cfg.train.seed)
        (run / v / "model_meta.json").write_text(json.dumps({"fingerprint": fp}))
    return run


def fps(cfg, variants=("baseline",), seed=None):
    seed = cfg.train.seed if seed is None else seed
    return {v: variant_fingerprint(cfg, v, cfg.distill if v == "distilled" else DistillConfig(), seed) for v in variants}


# ---------------------------------------------------------------------------------------- the decision


def test_settings_that_change_training_are_refused_naming_old_and_new(tmp_path):
    cfg = tiny_config(str(tmp_path / "run"), nproc=1, train={"epochs": 2})
    run = fake_run(cfg)
    new = replace(cfg, ["data.synthetic.num_users=50", "train.dense_lr=0.02"])
    with pytest.raises(StaleRunError) as e:
        check_run_folder(new, fps(new))
    msg = str(e.value)
    assert msg.startswith(f"{run} holds a run trained with other settings (")
    assert "data.synthetic.num_users: 60 -> 50, train.dense_lr: 0.01 -> 0.02);" in msg, msg
    assert "set output_dir=<another folder> to keep both runs, or delete" in msg and "\n" not in msg


@pytest.mark.parametrize("override", [
    "train.epochs=5", "train.eval_batch_size=128", "train.log_every=1", "train.checkpoint_every=2", "nproc=2",
    "teacher.batch_size=7", "teacher.cache_dir=elsewhere", "teacher.allow_pickle_weights=true", "compress.default_dtype=int4",
    "study.seeds=[4]", "name=other", "distill.align.layout=sharded", "distill.teacher_ranker.features_layout=sharded",
])
def test_settings_that_do_not_change_training_are_allowed(tmp_path, override):
    cfg = tiny_config(str(tmp_path / "run"), nproc=1, train={"epochs": 2})
    fake_run(cfg, variants=("baseline", TEACHER))
    new = replace(cfg, [override])
    check_run_folder(new, fps(new, ("baseline", TEACHER)))


def test_another_seed_is_refused_by_the_variant_fingerprint(tmp_path):
    cfg = tiny_config(str(tmp_path / "run"), nproc=1)
    fake_run(cfg)
    with pytest.raises(StaleRunError, match=r"\(seed: 0 -> 3\)"):
        check_run_folder(cfg, fps(cfg, seed=3))


@pytest.mark.parametrize("epoch,step_in_epoch,refused", [(2, 0, False), (3, 0, True), (2, 4, True), (1, 4, False)])
def test_fewer_epochs_than_already_trained_is_refused(tmp_path, epoch, step_in_epoch, refused):
    cfg = tiny_config(str(tmp_path / "run"), nproc=1, train={"epochs": 3})
    fake_run(cfg, epoch=epoch, step_in_epoch=step_in_epoch)
    new = replace(cfg, ["train.epochs=2"])
    if refused:
        with pytest.raises(StaleRunError, match=r"train\.epochs: \d already trained in baseline/ -> 2"):
            check_run_folder(new, fps(new))
    else:
        check_run_folder(new, fps(new))


def test_a_folder_without_results_may_be_rewritten(tmp_path):
    cfg = tiny_config(str(tmp_path / "run"), nproc=1)
    run = fake_run(cfg)
    shutil.rmtree(run / "baseline")  # a first attempt that failed before its first checkpoint
    check_run_folder(replace(cfg, ["data.synthetic.num_users=50"]), {})
    check_run_folder(replace(cfg, ["data.synthetic.num_users=50"]), fps(cfg))


def test_an_artifact_counts_as_a_result(tmp_path):
    cfg = tiny_config(str(tmp_path / "run"), nproc=1)
    run = fake_run(cfg)
    shutil.rmtree(run / "baseline")
    (run / "artifact" / "baseline").mkdir(parents=True)
    with pytest.raises(StaleRunError, match="data.synthetic.num_users: 60 -> 50"):
        check_run_folder(replace(cfg, ["data.synthetic.num_users=50"]), {})


def test_config_from_an_older_version_compares_missing_keys_as_defaults(tmp_path):
    cfg = tiny_config(str(tmp_path / "run"), nproc=1)
    run = fake_run(cfg)
    doc = yaml.safe_load((run / "config.yaml").read_text())
    del doc["train"]["deterministic"], doc["teacher"]["allow_pickle_weights"]
    (run / "config.yaml").write_text(yaml.safe_dump(doc))
    check_run_folder(cfg, fps(cfg))
    doc["train"]["removed_since"] = 1  # a key this version does not know: still compared, not a crash
    (run / "config.yaml").write_text(yaml.safe_dump(doc))
    with pytest.raises(StaleRunError, match=r"train\.removed_since: 1 -> \(not set\)"):
        check_run_folder(cfg, fps(cfg))


def test_unreadable_config_is_refused_saying_why(tmp_path):
    cfg = tiny_config(str(tmp_path / "run"), nproc=1)
    run = fake_run(cfg)
    (run / "config.yaml").write_text("train: [unclosed\n")
    with pytest.raises(StaleRunError, match=r"config\.yaml: unreadable \(.*\), so it cannot be told whether"):
        check_run_folder(cfg, fps(cfg))


def test_compress_with_other_training_settings_is_refused(tmp_path):
    cfg = tiny_config(str(tmp_path / "run"), nproc=1)
    fake_run(cfg)
    check_same_experiment(replace(cfg, ["compress.default_dtype=int2", "train.epochs=9"]))
    with pytest.raises(StaleRunError, match=r"was trained with other settings than this command's "
                       r"\(student\.dense_arch: \[16, 8\] -> \[16, 16\], student\.embedding_dim: 8 -> 16\); nothing"):
        check_same_experiment(replace(cfg, ["student.embedding_dim=16", "student.dense_arch=[16,16]"]))


def test_distill_study_checks_each_seed_folder(tmp_path):
    from sparse_kd.studies.distill_study import check_seed, seed_dir

    cfg = tiny_config(str(tmp_path / "study"), nproc=1, study={"seeds": [0, 1], "variants": ["baseline", "align"]})
    fake_run(replace(cfg, [f"output_dir={seed_dir(cfg, 1)}", "train.seed=1", "data.seed=1"]))  # a study seed sets both
    check_seed(cfg, 1)
    check_seed(replace(cfg, ["train.epochs=7"]), 1)
    with pytest.raises(StaleRunError, match=r"seed_1 holds a run trained with other settings \(distill\.align\.weight: 0\.1 -> 0\.5\)"):
        check_seed(replace(cfg, ["distill.align.weight=0.5"]), 1)


# ---------------------------------------------------------------------------------------- the real CLI


def _env() -> dict:
    return dict(os.environ, PYTHONPATH=str(ROOT), PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")


def cli(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sparse_kd.cli", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT, env=_env())


def tiny_yaml(tmp_path: Path) -> Path:
    cfg = tiny_config("unused", nproc=1, train={"epochs": 1}, data={"synthetic": {
        "num_users": 40, "num_items": 30, "interactions_per_user": 12, "num_topics": 4}})
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    return path


def assert_one_clean_refusal(proc: subprocess.CompletedProcess, traceback_ok: bool = False) -> str:
    out = proc.stdout + proc.stderr
    errors = [ln for ln in out.splitlines() if ln.startswith("error:")]
    assert proc.returncode != 0 and len(errors) == 1, (proc.returncode, out[-3000:])
    assert "holds a run trained with other settings" in errors[0] or "was trained with other settings" in errors[0]
    if not traceback_ok:
        assert proc.returncode == 2 and "Traceback" not in out and "ChildFailedError" not in out, out[-3000:]
    return errors[0]


@pytest.mark.parametrize("nproc", ["1", "2"])
def test_cli_refuses_a_hand_made_run_folder_before_starting(tmp_path, nproc):
    """Both launch paths, on a folder with manifests only: the refusal comes before any training
    (training would fail on the missing tensors with another message)."""
    cfg = tiny_config(str(tmp_path / "run"), nproc=1, train={"epochs": 1})
    run = fake_run(cfg)
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    before = tree(run)
    proc = cli("train", str(tmp_path / "c.yaml"), f"nproc={nproc}", "train.sparse_lr=0.3", "--variants", "baseline")
    err = assert_one_clean_refusal(proc)
    assert "train.sparse_lr: 0.2 -> 0.3" in err
    assert tree(run) == before


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A real tiny run (teacher ranker, baseline, distilled; 1 process, 1 epoch) and its file hashes."""
    tmp = tmp_path_factory.mktemp("clobber")
    cfg_file = tiny_yaml(tmp)
    common = [str(cfg_file), f"output_dir={tmp / 'run'}", f"teacher.cache_dir={tmp / 'cache'}"]
    proc = cli("train", *common, "nproc=1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = tmp / "run"
    for f in ("config.yaml", "data/mappings.json", "data/text_embeddings.safetensors", "data/entity_dense.pt",
              "data/heldout_pairs.csv", "metrics.json"):
        assert (run / f).is_file(), f
    return run, common, tree(run)


REFUSED = [
    pytest.param(["train", "nproc=1", "data.synthetic.num_users=30"], id="train-1proc"),
    pytest.param(["train", "nproc=2", "train.dense_lr=0.02"], id="train-relaunch"),
    pytest.param(["train", "nproc=1", "--seed", "3", "--variants", "baseline"], id="train-seed"),
    pytest.param(["pipeline", "nproc=2", "student.embedding_dim=16", "student.dense_arch=[16,16]"], id="pipeline-relaunch"),
    pytest.param(["compress", "distill.align.enabled=true", "--variant", "baseline"], id="compress"),
]


@pytest.mark.slow
@pytest.mark.parametrize("args", REFUSED)
def test_refused_rerun_changes_no_byte_under_the_run_folder(trained, args):
    run, common, hashes = trained
    cmd, *rest = args
    proc = cli(cmd, *common, *rest)
    assert_one_clean_refusal(proc)
    assert tree(run) == hashes


@pytest.mark.slow
def test_torchrun_started_by_hand_stops_every_rank_with_one_message(trained):
    run, common, hashes = trained
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "sparse_kd.cli",
         "train", *common, "nproc=2", "train.batch_size=32"],
        capture_output=True, text=True, timeout=300, cwd=ROOT, env=_env())
    # torchrun reports its failed workers itself; the workers say why exactly once (rank 0) and exit 2
    err = assert_one_clean_refusal(proc, traceback_ok=True)
    assert "train.batch_size: 64 -> 32" in err
    assert "exitcode  : 2" in proc.stderr and "exitcode  : 1" not in proc.stderr, proc.stderr[-3000:]
    assert tree(run) == hashes


@pytest.mark.slow
def test_allowed_rerun_continues_training_in_the_same_folder(trained, tmp_path):
    run0, common, _ = trained
    run = tmp_path / "copy"
    shutil.copytree(run0, run)
    common = [common[0], f"output_dir={run}", *common[2:]]
    proc = cli("train", *common, "nproc=1", "train.epochs=2", "train.eval_batch_size=128", "--variants", "baseline")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert yaml.safe_load((run / "config.yaml").read_text())["train"]["epochs"] == 2
    meta = json.loads(sorted((run / "baseline" / "checkpoints").glob("step_*"))[-1].joinpath("meta.json").read_text())
    assert meta["epoch"] == 2


def test_one_process_study_writes_its_summary(tmp_path):
    """`study distill` with nproc=1 trains in this process, which sets RANK / LOCAL_RANK itself: the
    summary (docs/distill_study_<name>.md, .json) must still be written at the end."""
    cfg_file = tiny_yaml(tmp_path)
    proc = cli("study", "distill", str(cfg_file), "nproc=1", f"output_dir={tmp_path / 'study'}",
               f"teacher.cache_dir={tmp_path / 'cache'}", "study.seeds=[0]", "study.variants=[baseline,combined]",
               "--docs", str(tmp_path / "docs"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    doc = json.loads((tmp_path / "docs" / "distill_study_tiny.json").read_text())
    assert (tmp_path / "docs" / "distill_study_tiny.md").is_file() and doc
