"""`cluster up --isolated` gives each worker node a private /tmp, yet a checkout or venv that lives
under /tmp (CI clones there) must still be visible on the node: the paths the node runs from are
bound back, every other /tmp path stays private. Runs the real wrapper (``unshare`` + mounts)."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from modelfleet.cluster.local import _isolate, _under_tmp_paths
from modelfleet.errors import ConfigError

pytestmark = pytest.mark.skipif(shutil.which("unshare") is None, reason="needs unshare (util-linux)")


@pytest.fixture
def under_tmp():
    kept = Path(tempfile.mkdtemp(prefix="mf-kept-", dir="/tmp"))
    other = Path(tempfile.mkdtemp(prefix="mf-private-", dir="/tmp"))
    (kept / "venv" / "bin").mkdir(parents=True)
    (kept / "venv" / "bin" / "ray").write_text("#!/bin/sh\necho node-started\n")
    (kept / "venv" / "bin" / "ray").chmod(0o755)
    (other / "secret").write_text("host only")
    yield kept, other
    shutil.rmtree(kept, ignore_errors=True)
    shutil.rmtree(other, ignore_errors=True)


def test_a_kept_path_under_tmp_runs_and_every_other_tmp_path_stays_private(under_tmp):
    kept, other = under_tmp
    script = f"{kept}/venv/bin/ray; test -e {other}/secret && echo LEAK; ls /tmp; echo w > {kept}/written"
    r = subprocess.run(_isolate(["sh", "-c", script], keep=[str(kept)]), capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    assert "node-started" in r.stdout, r.stdout + r.stderr  # the executable under /tmp was found
    assert "LEAK" not in r.stdout  # another host /tmp path stays invisible on the node
    assert r.stdout.split("node-started", 1)[1].split() == [kept.name]  # the node's /tmp: the kept path only
    assert (kept / "written").read_text() == "w\n"  # the same directory as the host's, not a copy


def test_the_paths_kept_are_the_outermost_under_tmp_this_environment_runs_from(monkeypatch, under_tmp):
    kept, _ = under_tmp
    monkeypatch.chdir(kept / "venv")
    monkeypatch.setenv("PYTHONPATH", f"{kept}{os.pathsep}/usr/lib")
    paths = _under_tmp_paths()
    assert str(kept.resolve()) in paths and str((kept / "venv").resolve()) not in paths  # nested: the outer one
    assert all(Path(p).is_relative_to("/tmp") and p != "/tmp" for p in paths)


def test_a_path_to_keep_outside_tmp_is_refused_naming_it():
    with pytest.raises(ConfigError, match=r"under /tmp, got '/work'"):
        _isolate(["true"], keep=["/work"])
