"""One argument rule for every command (overrides before or after flags), and the admin token:
never from argv, required before the service listens beyond this machine."""

import argparse

import pytest

from sparse_kd.cli import main, parse
from sparse_kd.cli.serve_commands import ADMIN_TOKEN_ENV, admin_token, is_loopback


def test_overrides_after_flags_join_the_overrides():
    a = parse(["compress", "c.yaml", "--variant", "combined", "compress.default_dtype=int4"])
    assert (a.config, a.variant, a.overrides) == ("c.yaml", "combined", ["compress.default_dtype=int4"])
    a = parse(["train", "c.yaml", "train.epochs=1", "--seed", "3", "nproc=1"])
    assert a.overrides == ["train.epochs=1", "nproc=1"] and a.seed == 3
    a = parse(["data", "convert", "c.yaml", "--out", "o", "data.seed=2"])
    assert a.overrides == ["c.yaml", "data.seed=2"] and a.out == "o"


@pytest.mark.parametrize("argv", [["train", "c.yaml", "--bogus"], ["serve", "art", "train.epochs=1"],
                                  ["compress", "c.yaml", "--variant", "x", "notakeyvalue"]])
def test_stray_arguments_are_still_refused(argv, capsys):
    with pytest.raises(SystemExit) as e:
        parse(argv)
    assert e.value.code == 2 and "unrecognized arguments" in capsys.readouterr().err


def test_compress_takes_overrides_after_variant(tmp_path, capsys):
    """The newcomer's command line reaches the config loader (which names the bad key)."""
    rc = main(["compress", "configs/demo.yaml", "--variant", "distilled", "compress.default_dtypo=int4"])
    assert rc == 2 and "compress.default_dtypo: unknown key" in capsys.readouterr().err


@pytest.mark.parametrize("host, loop", [("127.0.0.1", True), ("127.3.0.9", True), ("::1", True), ("[::1]", True),
                                        ("localhost", True), ("0.0.0.0", False), ("10.1.2.3", False),
                                        ("example.org", False), ("::", False)])
def test_loopback(host, loop):
    assert is_loopback(host) is loop


def _args(**kw):
    base = {"admin_token": None, "admin_token_file": None}
    base.update(kw)
    return argparse.Namespace(**base)


def test_token_comes_from_a_file_or_the_environment(tmp_path, monkeypatch):
    monkeypatch.delenv(ADMIN_TOKEN_ENV, raising=False)
    assert admin_token(_args()) is None
    monkeypatch.setenv(ADMIN_TOKEN_ENV, " env-secret \n")
    assert admin_token(_args()) == "env-secret"
    f = tmp_path / "token"
    f.write_text("file-secret\nsecond line ignored\n")
    assert admin_token(_args(admin_token_file=str(f))) == "file-secret"  # the file wins
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(ValueError, match="first line is empty"):
        admin_token(_args(admin_token_file=str(tmp_path / "empty")))
    with pytest.raises(ValueError, match="cannot read a token"):
        admin_token(_args(admin_token_file=str(tmp_path / "missing")))
    with pytest.raises(ValueError, match="visible to every user in ps"):
        admin_token(_args(admin_token="argv-secret"))


def test_serve_refuses_an_open_admin_beyond_loopback(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv(ADMIN_TOKEN_ENV, raising=False)
    base = ["serve", str(tmp_path / "no-artifact"), "--port", "0", "--no-malloc-tuning"]
    assert main(base + ["--host", "0.0.0.0"]) == 2
    err = capsys.readouterr().err
    assert "--host 0.0.0.0" in err and "--admin-token-file" in err and ADMIN_TOKEN_ENV in err
    # with a token, or the explicit flag, or on loopback, it goes on (and stops at the missing artifact)
    for extra in (["--host", "0.0.0.0", "--allow-open-admin"], ["--host", "127.0.0.1"]):
        assert main(base + extra) == 2
        err = capsys.readouterr().err
        assert "admin token" not in err and "no-artifact" in err
    monkeypatch.setenv(ADMIN_TOKEN_ENV, "s3cret")
    assert main(base + ["--host", "0.0.0.0"]) == 2
    err = capsys.readouterr().err
    assert "admin token" not in err and "no-artifact" in err
    assert main(base + ["--admin-token", "s3cret"]) == 2
    assert "visible to every user in ps" in capsys.readouterr().err
