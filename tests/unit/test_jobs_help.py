"""Every Ray Job entrypoint in jobs/ answers `--help` as a user would call it: exit 0, usage text
naming the script's arguments, and no heavy import (Ray, torch, DeepSpeed, transformers) on that
light path."""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
JOBS = sorted((ROOT / "jobs").glob("*.py"))
HEAVY = {"ray", "torch", "deepspeed", "transformers"}

# What each job must accept, beyond what its docstring's command line already names.
EXPECTED = {
    "train": ["--config", "--preset", "--set", "--resume"],
    "export": ["run", "--config", "--name"],
    "pipeline": ["--config", "--preset", "--set"],
    "deploy": ["--config", "--set", "--detach"],
}


def _docstring_arguments(job: Path) -> list[str]:
    """Options and positionals in the docstring's `python jobs/<job>.py ...` command line
    (`RUN --config CONFIG` -> ["run", "--config"]; a metavar after an option is not one)."""
    doc = ast.get_docstring(ast.parse(job.read_text())) or ""
    m = re.search(rf"jobs/{re.escape(job.name)}((?:\s+[-A-Z][\w-]*)*)", doc)
    assert m, f"{job.name}: the docstring shows no `python jobs/{job.name} ...` command line"
    args, after_option = [], False
    for token in m.group(1).split():
        if token.startswith("--"):
            args.append(token)
            after_option = True
        elif not after_option:
            args.append(token.lower())
        else:
            after_option = False
    return args


def test_every_job_is_covered():
    assert {j.stem for j in JOBS} == set(EXPECTED)


@pytest.mark.parametrize("job", JOBS, ids=lambda p: p.name)
def test_job_help(job):
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    proc = subprocess.run(
        [sys.executable, "-X", "importtime", str(job.relative_to(ROOT)), "--help"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, f"{job.name} --help exited {proc.returncode}:\n{proc.stderr[-3000:]}"
    usage = proc.stdout
    assert usage.startswith("usage:"), usage
    for arg in dict.fromkeys(EXPECTED[job.stem] + _docstring_arguments(job)):
        pattern = rf"(?<![\w-]){re.escape(arg)}(?![\w-])"
        assert re.search(pattern, usage), f"{job.name} --help does not mention {arg}:\n{usage}"
    # -X importtime lists every module imported: "import time: self | cumulative | name".
    imported = {
        line.rsplit("|", 1)[1].strip().split(".")[0]
        for line in proc.stderr.splitlines()
        if line.startswith("import time:") and "|" in line
    }
    assert "modelfleet" in imported, "no -X importtime lines parsed"
    assert not HEAVY & imported, f"{job.name} --help imports {sorted(HEAVY & imported)}; keep them off this path"
