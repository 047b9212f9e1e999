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
JOB_STATES = ("PENDING", "RUNNING", *TERMINAL)  # Ray's JobStatus values


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


def _jobs_api_status(env: dict, job_id: str) -> str | None:
    """The job's status straight from Ray's Jobs REST API (one HTTP GET with the cluster's token),
    the cluster found as the CLI finds it (the state `cluster up` wrote under MODELFLEET_HOME); None
    where there is no such cluster. Polling through this, not a `modelfleet jobs status` process a
    second (~1.5 s of CPU each to import Ray), keeps the 2-core machine for the job itself."""
    import httpx

    state = Path(env.get("MODELFLEET_HOME", "")) / "cluster" / "state.json"
    token_file = Path.home() / ".ray" / "auth_token"
    if not state.is_file() or not token_file.is_file():
        return None
    port = json.loads(state.read_text())["spec"]["dashboard_port"]
    try:
        r = httpx.get(
            f"http://127.0.0.1:{port}/api/jobs/{job_id}",
            headers={"Authorization": f"Bearer {token_file.read_text().strip()}"},
            timeout=30,
        )
    except httpx.HTTPError:
        return None
    return r.json().get("status") if r.status_code == 200 else None


def wait_job(
    env: dict,
    job_id: str,
    timeout_s: float = 600,
    states=TERMINAL,
    during: Callable[[], None] | None = None,
    interval_s: float = 1.0,
) -> dict:
    """Wait until the job is in one of ``states``, then return ``modelfleet jobs status`` (the
    user's view, so the CLI is what the test reads). The wait polls Ray's Jobs API over HTTP, or
    the CLI where no simulated cluster's state is found. ``during`` (bounded work, e.g. a few
    requests) runs before every poll."""

    def done() -> dict | None:
        if during:
            during()
        fast = _jobs_api_status(env, job_id)
        if fast in JOB_STATES and fast not in states:  # anything unexpected: ask the CLI
            return None
        s = job_status(env, job_id)
        return s if s["status"] in states else None

    return wait_until(done, timeout_s, f"job {job_id} to reach {'/'.join(states)}", interval_s)
