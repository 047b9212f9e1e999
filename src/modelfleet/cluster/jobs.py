"""Ray Jobs through ``JobSubmissionClient``: what ``modelfleet submit`` and ``modelfleet jobs`` do.

A job runs ``python jobs/<JOB>.py --config CONFIG [--set ...]`` from an uploaded copy of the
working directory, exactly like ``ray job submit --working-dir . -- python jobs/train.py ...``.
Because that copy lives in a temporary directory on the cluster, relative storage and data paths
are made absolute here, before submission (on a real cluster they must name shared storage).
"""

from __future__ import annotations

import os
import shlex
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from modelfleet.cluster import JOBS
from modelfleet.cluster.local import use_local_cluster_env
from modelfleet.errors import ConfigError, JobError
from modelfleet.presets import load_config

# Never uploaded: environments, data, outputs and VCS metadata (Ray's upload limit is 500 MiB).
EXCLUDES = [
    ".venv/",
    ".git/",
    "storage/",
    "runs/",
    "tools/",
    "bench/results/",
    "**/__pycache__/",
    "*.egg-info/",
    ".pytest_cache/",
    # Secrets that sit in working directories: never uploaded to the cluster with a job.
    ".env",
    ".env.*",
    "*.pem",
    "*.key",
]
DEFAULT_ADDRESS = "http://127.0.0.1:8265"


def address() -> str:
    """The Jobs API address: ``RAY_API_SERVER_ADDRESS``/``RAY_ADDRESS`` when they are HTTP URLs,
    else the local simulated cluster's dashboard, else 127.0.0.1:8265."""

    for var in ("RAY_API_SERVER_ADDRESS", "RAY_ADDRESS"):
        v = os.environ.get(var, "")
        if v.startswith("http"):
            return v
    st = use_local_cluster_env()
    return st.dashboard_url if st else DEFAULT_ADDRESS


def client(addr: str | None = None) -> Any:
    from ray.job_submission import JobSubmissionClient

    addr = addr or address()
    try:
        return JobSubmissionClient(addr)
    except ConnectionError as e:
        raise JobError(
            f"cannot reach the Ray Jobs API at {addr}: {e} (is a cluster up? `modelfleet cluster up`)"
        ) from None


def build_entrypoint(
    job: str, config: str | None, overrides: list[str], *, preset: str | None = None, workdir: str = "."
) -> tuple[str, dict[str, Any]]:
    """Validate the config here (fail before anything starts) and build the job's command line."""
    if job not in JOBS:
        raise ConfigError(f"job {job!r} is not one of {', '.join(JOBS)}")
    wd = Path(workdir).resolve()
    if not (wd / "jobs" / f"{job}.py").is_file():
        raise ConfigError(f"{wd}/jobs/{job}.py does not exist: run `modelfleet submit` from the project root")
    cfg = load_config(config, preset=preset, overrides=overrides)  # resolves paths against our cwd
    args = ["python", f"jobs/{job}.py"]
    if config:
        cpath = Path(config).resolve()
        if wd not in cpath.parents:
            raise ConfigError(
                f"config {config!r} is outside the working directory {wd}; the job only sees files uploaded from it"
            )
        args += ["--config", str(cpath.relative_to(wd))]
    if preset:
        args += ["--preset", preset]
    sets = list(overrides) + [f"storage.path={cfg.storage.path}", f"data.path={cfg.data.path}"]
    if job in ("train", "pipeline"):
        sets.append(f"storage.run_name={cfg.storage.run_name}")  # so a resubmission can --resume it
    for s in sets:
        args += ["--set", s]
    return shlex.join(args), {"run_name": cfg.storage.run_name, "storage": cfg.storage.path}


STOP_WAIT_ENV = "RAY_JOB_STOP_WAIT_TIME_S"
STOP_WAIT_S = 120
"""Seconds between `jobs stop`'s SIGTERM and SIGKILL; an operator's own value wins."""


def submit(
    job: str,
    config: str | None,
    overrides: list[str],
    *,
    preset: str | None = None,
    submission_id: str | None = None,
    extra_args: list[str] = (),
    addr: str | None = None,
    env: dict[str, str] | None = None,
) -> str:
    """Submit ``jobs/<job>.py``; refuses an id that already exists."""
    entry, info = build_entrypoint(job, config, overrides, preset=preset)
    if extra_args:
        entry += " " + shlex.join(extra_args)
    c = client(addr)
    if submission_id:
        try:
            old = c.get_job_info(submission_id)
        except RuntimeError:  # "does not exist": the id is free
            old = None
        if old is not None:
            raise JobError(
                f"submission id {submission_id!r} already exists (status {old.status}); "
                "choose another id, or `modelfleet jobs status` it"
            )
    runtime_env = {
        "working_dir": ".",
        "excludes": EXCLUDES,
        "env_vars": {
            "DS_ACCELERATOR": os.environ.get("DS_ACCELERATOR", "cpu"),
            "RAY_TRAIN_V2_ENABLED": "1",
            "PYTHONUNBUFFERED": "1",
            # Ray's job supervisor SIGKILLs the entrypoint this long after `jobs stop`'s SIGTERM
            # (Ray's default 3 s): time for a step and a checkpoint (train/stopping.py).
            STOP_WAIT_ENV: os.environ.get(STOP_WAIT_ENV, str(STOP_WAIT_S)),
            **(env or {}),
        },
    }
    try:
        return c.submit_job(
            entrypoint=entry,
            runtime_env=runtime_env,
            submission_id=submission_id,
            metadata={"modelfleet_job": job, "run_name": info["run_name"]},
        )
    except RuntimeError as e:
        raise JobError(f"submitting {job} failed: {e}") from None


def list_jobs(addr: str | None = None) -> list[dict[str, Any]]:
    rows = []
    for j in client(addr).list_jobs():
        rows.append(
            {
                "id": j.submission_id,
                "status": str(j.status),
                "entrypoint": j.entrypoint,
                "message": j.message or "",
                "start_time": j.start_time,
                "end_time": j.end_time,
            }
        )
    return sorted(rows, key=lambda r: r["start_time"] or 0)


def status(job_id: str, addr: str | None = None) -> dict[str, Any]:
    try:
        j = client(addr).get_job_info(job_id)
    except RuntimeError:
        raise JobError(f"no job with id {job_id!r}; `modelfleet jobs list` shows the ids") from None
    out = {
        "id": j.submission_id,
        "status": str(j.status),
        "entrypoint": j.entrypoint,
        "message": j.message or "",
        "error_type": j.error_type,
        "driver_exit_code": j.driver_exit_code,
    }
    if str(j.status) == "FAILED":
        # Ray's message says "exited with code 2"; the last lines of the log say why.
        tail = [ln for ln in logs(job_id, addr).strip().splitlines() if ln.strip()][-3:]
        out["reason"] = " | ".join(tail)
    return out


def logs(job_id: str, addr: str | None = None) -> str:
    try:
        return client(addr).get_job_logs(job_id)
    except RuntimeError:
        raise JobError(f"no job with id {job_id!r}; `modelfleet jobs list` shows the ids") from None


def follow(job_id: str, addr: str | None = None) -> Iterator[str]:
    import asyncio

    c = client(addr)
    status(job_id, addr)  # a clear error for an unknown id
    agen = c.tail_job_logs(job_id)
    loop = asyncio.new_event_loop()
    try:
        while True:
            try:
                yield loop.run_until_complete(agen.__anext__())
            except StopAsyncIteration:
                return
    finally:
        loop.close()


def stop(job_id: str, addr: str | None = None) -> bool:
    status(job_id, addr)
    return client(addr).stop_job(job_id)


def wait(job_id: str, timeout_s: float = 600, addr: str | None = None) -> dict[str, Any]:
    """Poll until the job is terminal (SUCCEEDED/FAILED/STOPPED) or ``timeout_s`` passes."""
    deadline = time.time() + timeout_s
    while True:
        s = status(job_id, addr)
        if s["status"] in ("SUCCEEDED", "FAILED", "STOPPED"):
            return s
        if time.time() > deadline:
            raise JobError(f"job {job_id} still {s['status']} after {timeout_s:g} s")
        time.sleep(1)
