"""The command table and the README stay in sync; bad input exits 2 with one line."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from modelfleet.cli import COMMANDS, main

README = Path(__file__).resolve().parents[2] / "README.md"


def test_readme_lists_exactly_the_commands():
    listed = re.findall(r"^\| `modelfleet (\S+)`", README.read_text(), flags=re.M)
    assert listed == list(COMMANDS)


def test_bad_override_exits_2_with_the_key(capsys):
    assert main(["prepare", "--set", "train.nope=1"]) == 2
    err = capsys.readouterr().err
    assert "train.nope: unknown key" in err and "Traceback" not in err


def test_train_missing_data_path_exits_2(capsys, tmp_path):
    rc = main(["train", "--set", f"data.path={tmp_path / 'absent'}", "--set", f"storage.path={tmp_path}"])
    assert rc == 2
    assert f"data.path '{tmp_path / 'absent'}' does not exist" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()  # failed before anything was written


@pytest.mark.parametrize(
    "argv, message",
    [
        (["deploy", "tiny", "--add", "ft-a"], "--add: name the adapter with --artifact"),
        (["deploy", "tiny", "--add", "ft-a", "--remove", "ft-b", "--artifact", "ft-a@v1"], "one change at a time"),
        (["deploy", "tiny"], "--artifact: required"),
    ],
)
def test_deploy_pool_arguments_are_checked_before_any_cluster_is_touched(capsys, argv, message):
    assert main(argv) == 2
    assert message in capsys.readouterr().err
