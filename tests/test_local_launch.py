"""launch_local: ranks forked from a preloaded forkserver see the environment a spawned rank would."""

import os

import pytest

from sparse_kd.local_launch import AGENT_VARS, agent_env, launch_local
from helpers.workers import env_worker


def test_agent_env_keeps_what_the_agent_set_and_drops_the_servers_stale_values():
    born = {"PATH": "/bin", "FOO": "old", "RANK": "0"}
    now = {"PATH": "/bin", "FOO": "old", "RANK": "0", "WORLD_SIZE": "2", "TORCHELASTIC_RUN_ID": "x"}
    # FOO is the server's (stale) value; RANK equals it but the agent always sets RANK
    assert agent_env(now, born) == {"RANK": "0", "WORLD_SIZE": "2", "TORCHELASTIC_RUN_ID": "x"}
    assert {"RANK", "LOCAL_RANK", "MASTER_PORT", "OMP_NUM_THREADS"} <= AGENT_VARS


@pytest.mark.slow
def test_ranks_see_the_parents_environment_and_folder_at_each_launch(monkeypatch, tmp_path):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    names = ("SKD_A", "SKD_B", "RANK", "WORLD_SIZE", "OMP_NUM_THREADS")
    monkeypatch.setenv("SKD_A", "1")
    monkeypatch.setenv("SKD_B", "gone later")
    here = os.getcwd()
    first = launch_local(env_worker, 2, *names)  # starts the forkserver with this environment
    assert first == {r: {"SKD_A": "1", "SKD_B": "gone later", "RANK": str(r), "WORLD_SIZE": "2",
                         "OMP_NUM_THREADS": "1", "threads": 1, "cwd": here} for r in (0, 1)}
    assert "OMP_NUM_THREADS" not in os.environ  # the setting reached the ranks only
    monkeypatch.setenv("SKD_A", "2")
    monkeypatch.delenv("SKD_B")
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    monkeypatch.chdir(tmp_path)
    second = launch_local(env_worker, 2, *names)  # same server, changed environment and folder
    assert second == {r: {"SKD_A": "2", "SKD_B": None, "RANK": str(r), "WORLD_SIZE": "2",
                          "OMP_NUM_THREADS": "2", "threads": 2, "cwd": str(tmp_path)} for r in (0, 1)}
    assert launch_local(env_worker, 1, "SKD_A", start_method="spawn") == {0: {"SKD_A": "2", "threads": 2, "cwd": str(tmp_path)}}


@pytest.mark.slow
def test_a_function_from_a_module_the_server_never_saw(monkeypatch, tmp_path):
    """multiprocessing passes sys.path to each new process; this keeps it so."""
    launch_local(env_worker, 1)  # the server is running (or starts here) without tmp_path on its path
    (tmp_path / "skd_probe.py").write_text("def answer():\n    return 42\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    import skd_probe

    assert launch_local(skd_probe.answer, 2) == {0: 42, 1: 42}
