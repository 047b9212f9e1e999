"""Commands as a user types them: ``modelfleet``/``ray``/``serve`` subprocesses from the repository
root with this venv's binaries, and Ray jobs waited on by their status."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from .waiting import wait_until

ROOT = Path(__file__).resolve().parents[2]  # the repository
BIN = Path(sys.executable).parent  # this venv's scripts: modelfleet, ray, serve
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")


def cli_env(home: Path, **extra: str) -> dict[str, str]:
    """Environment for ``modelfleet``/``ray`` subprocesses against a simulated cluster whose state
    lives in ``home`` (MODELFLEET_HOME), with token auth and this venv's binaries first on PATH."""
    return {
        **os.environ,
        "MODELFLEET_HOME": str(home),
        "RAY_AUTH_MODE": "token",
        "DS_ACCELERATOR": "cpu",
        "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
        **extra,
    }


def run_cli(env: dict, *args: str, timeout: float = 300, check: bool = True) -> subprocess.CompletedProcess:
    """Run a command from the repository root (``modelfleet``, ``ray`` and ``serve`` resolve to this
    venv's scripts); with ``check``, a non-zero exit fails the test with the command's output."""
    cmd = list(args)
    if cmd[0] in ("modelfleet", "ray", "serve"):
        cmd[0] = str(BIN / cmd[0])
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout, check=False)
    if check and r.returncode != 0:
        raise AssertionError(f"{' '.join(args)} exited {r.returncode}:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
    return r


def mf(env: dict, *args: str, **kw) -> subprocess.CompletedProcess:
    """``modelfleet ARGS...`` (``run_cli`` with the command name filled in)."""
    return run_cli(env, "modelfleet", *args, **kw)


def job_status(env: dict, job_id: str) -> dict:
    """``modelfleet jobs status JOB --json``: status, reason, ..."""
    return json.loads(mf(env, "jobs", "status", job_id, check=False).stdout)


def wait_job(
    env: dict,
    job_id: str,
    timeout_s: float = 600,
    states=TERMINAL,
    during: Callable[[], None] | None = None,
    interval_s: float = 1.0,
) -> dict:
    """Poll ``modelfleet jobs status`` until the job is in one of ``states``; returns its status.
    ``during`` (bounded work, e.g. a few requests) runs before every poll."""

    def done() -> dict | None:
        if during:
            during()
        s = job_status(env, job_id)
        return s if s["status"] in states else None

    return wait_until(done, timeout_s, f"job {job_id} to reach {'/'.join(states)}", interval_s)
