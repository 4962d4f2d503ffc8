"""The command line: --help explains every subcommand; bad input exits 2 with a message naming it."""

import subprocess
import sys

import pytest

from sparse_kd.cli import build_parser, main

SUBCOMMANDS = ["data", "encode", "train", "compress", "serve", "add-items", "pipeline", "study"]


@pytest.mark.parametrize("cmd", SUBCOMMANDS)
def test_help_for_each_subcommand(cmd, capsys):
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args([cmd, "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "usage: sparse-kd " + cmd in out
    assert len(out.splitlines()) >= 3


def test_top_level_help_lists_commands():
    out = subprocess.run([sys.executable, "-m", "sparse_kd.cli", "--help"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0
    for cmd in SUBCOMMANDS:
        assert cmd in out.stdout


def test_bad_override_is_a_clear_error(capsys, tmp_path):
    rc = main(["data", "configs/demo.yaml", "data.synthetic.num_userz=5"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "data.synthetic.num_userz: unknown key" in err and "num_users" in err


def test_missing_dataset_folder_is_a_clear_error(capsys, tmp_path):
    rc = main(["data", "configs/ml100k.yaml", f"data.path={tmp_path / 'nowhere'}"])
    assert rc == 2
    assert "nowhere" in capsys.readouterr().err


def test_data_command_prints_summary(capsys):
    assert main(["data", "configs/demo.yaml", "data.synthetic.num_users=50", "data.synthetic.num_items=30", "data.synthetic.interactions_per_user=10"]) == 0
    out = capsys.readouterr().out
    assert '"users": 50' in out and '"items": 30' in out
