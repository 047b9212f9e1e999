"""The simulated cluster end to end: `modelfleet cluster up` (3 nodes x 2 logical GPUs), jobs via
Ray's own `ray job submit` and via `modelfleet submit`, serving beside training, and a node
killed under a training job. Placement is read from Ray's state API, not our bookkeeping.

Everything runs as subprocesses against the cluster the project's own command started, on
non-default ports (8365 dashboard, 8100 Serve) so a developer's own cluster is left alone.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
DASH, SERVE_PORT, GCS = 8365, 8100, 6480
DASH_URL = f"http://127.0.0.1:{DASH}"


def _env(home: Path) -> dict[str, str]:
    return {**os.environ, "MODELFLEET_HOME": str(home), "RAY_AUTH_MODE": "token", "DS_ACCELERATOR": "cpu",
            "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}


def _run(env: dict, *args: str, timeout: float = 300, check: bool = True) -> subprocess.CompletedProcess:
    r = subprocess.run(list(args), cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    if check and r.returncode != 0:
        raise AssertionError(f"{' '.join(args)} exited {r.returncode}:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
    return r


def _mf(env: dict, *args: str, **kw) -> subprocess.CompletedProcess:
    return _run(env, str(BIN / "modelfleet"), *args, **kw)


def _state_api(path: str) -> list[dict]:
    """Ray's state API over HTTP, with the cluster's token (as `ray list ...` would send it)."""
    token = (Path.home() / ".ray" / "auth_token").read_text().strip()
    r = httpx.get(f"{DASH_URL}{path}", headers={"Authorization": f"Bearer {token}"}, timeout=30)
    r.raise_for_status()
    return r.json()["data"]["result"]["result"]


def _train_worker_nodes() -> set[str]:
    actors = _state_api("/api/v0/actors?limit=1000&filter_keys=class_name&filter_predicates=%3D"
                        "&filter_values=RayTrainWorker")
    return {a["node_id"] for a in actors if a["state"] == "ALIVE"}


def _job_status(env: dict, job_id: str) -> dict:
    r = _mf(env, "jobs", "status", job_id, check=False)
    return json.loads(r.stdout)


def _wait_job(env: dict, job_id: str, timeout_s: float = 600, during=None) -> dict:
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        if during:
            during()
        s = _job_status(env, job_id)
        if s["status"] in ("SUCCEEDED", "FAILED", "STOPPED"):
            return s
        time.sleep(2)
    raise AssertionError(f"job {job_id} did not finish within {timeout_s} s")


def _records(run_dir: Path) -> list[dict]:
    f = run_dir / "metrics.jsonl"
    return [json.loads(x) for x in f.read_text().splitlines() if x.strip()] if f.exists() else []


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    home = tmp_path_factory.mktemp("mfhome")
    env = _env(home)
    try:
        up = _mf(env, "cluster", "up", "--nodes", "3", "--cpus-per-node", "4", "--gpus-per-node", "2",
                 "--gcs-port", str(GCS), "--dashboard-port", str(DASH), "--serve-port", str(SERVE_PORT),
                 timeout=480)
        assert "3 nodes" in up.stdout
        yield env
    finally:
        # Also after a failed or timed-out `up`: nothing of ours may outlive the module.
        _mf(env, "cluster", "down", check=False)
        leftovers = subprocess.run(["pgrep", "-f", f"/tmp/modelfleet-{GCS}"], capture_output=True, text=True).stdout
        assert not leftovers.strip(), f"cluster down left processes: {leftovers}"


@pytest.fixture(scope="module")
def storage(tmp_path_factory):
    """A registry holding a random tiny model (serving needs an artifact, not a training run)."""
    import torch

    from modelfleet import registry
    from modelfleet.families import build_model
    from modelfleet.presets import load_config
    from modelfleet.train.export import write_artifact_dir

    path = tmp_path_factory.mktemp("cluster-storage")
    cfg = load_config(preset="tiny", overrides=[f"storage.path={path}"])
    torch.manual_seed(0)
    registry.publish(str(path), "tiny", write_artifact_dir(build_model(cfg.model).eval(), cfg, {}))
    return path


def test_status_shows_three_nodes_with_gpus(cluster):
    rows = json.loads(_mf(cluster, "cluster", "status", "--json").stdout)
    assert [r["name"] for r in rows] == ["head", "worker-1", "worker-2"]
    assert all(r["state"] == "ALIVE" and r["gpu"].endswith("/2") for r in rows)
    nodes = _state_api("/api/v0/nodes?limit=100")
    assert sum(1 for n in nodes if n["state"] == "ALIVE") == 3


def test_serving_beside_training_jobs(cluster, storage, tiny_data, tmp_path):
    env = cluster
    cfg = tmp_path / "serve.yaml"
    cfg.write_text(yaml.safe_dump({"preset": "tiny", "storage": {"path": str(storage)}, "serve": {
        "app_name": "shared", "port": SERVE_PORT, "models": [{
            "name": "tiny", "artifact": "tiny", "ray_actor_options": {"num_cpus": 0.5, "num_gpus": 0.5},
            "autoscaling": {"min_replicas": 2, "max_replicas": 2}}]}}))
    _mf(env, "serve", str(cfg), "--detach", timeout=240)
    url = f"http://127.0.0.1:{SERVE_PORT}/v1/completions"
    assert httpx.post(url, json={"prompt": "x", "max_tokens": 2}, timeout=60).status_code == 200

    common = ["--set", f"storage.path={storage}", "--set", f"data.path={tiny_data}", "--set", "train.use_gpu=true",
              "--set", "train.max_steps=20", "--set", "train.eval_every=20", "--set", "train.checkpoint_every=20",
              "--set", "train.eval_batches=1"]
    # 6 GPUs, 1 kept for serving's two 0.5-GPU minimum replicas: 6 GPU workers are refused, and
    # the failed job's status says why.
    _mf(env, "submit", "train", "--preset", "tiny", "--set", "train.num_workers=6", *common,
        "--submission-id", "too-big")
    s = _wait_job(env, "too-big", 180)
    assert s["status"] == "FAILED" and "reserved for the minimum replicas" in s["reason"], s

    # Ray's own CLI, exactly as the README says; the job trains 4 ZeRO-3 workers on "GPUs".
    _run(env, str(BIN / "ray"), "job", "submit", "--address", DASH_URL, "--working-dir", ".",
         "--submission-id", "ray-cli-train", "--no-wait", "--",
         "python", "jobs/train.py", "--config", "deploy/modelfleet-serve.yaml", *common,
         "--set", "train.num_workers=4", "--set", "deepspeed.zero_stage=3", "--set", "storage.run_name=shared")
    failures, answered, seen_nodes = [], [0], set()

    def traffic() -> None:
        with httpx.Client(timeout=60) as c:
            for _ in range(3):  # a few requests per poll: bounded by the job's own deadline
                r = c.post(url, json={"prompt": "def f(", "max_tokens": 4})
                answered[0] += 1
                if r.status_code != 200:
                    failures.append((r.status_code, r.text[:200]))
        seen_nodes.update(_train_worker_nodes())

    s = _wait_job(env, "ray-cli-train", 600, during=traffic)
    assert s["status"] == "SUCCEEDED", s
    assert len(seen_nodes) >= 2, f"4 training workers ran on nodes {seen_nodes}"
    assert answered[0] >= 10 and not failures, (answered, failures[:3])
    logs = _mf(env, "jobs", "logs", "ray-cli-train").stdout
    assert "artifact tiny@v2" in logs

    # An id is used once: Ray's CLI and ours both refuse it.
    again = _run(env, str(BIN / "ray"), "job", "submit", "--address", DASH_URL, "--submission-id",
                 "ray-cli-train", "--no-wait", "--", "echo", "hi", check=False)
    assert again.returncode != 0
    ours = _mf(env, "submit", "export", "--preset", "tiny", "--set", f"storage.path={storage}",
               "--submission-id", "ray-cli-train", "--arg", "shared", check=False)
    assert ours.returncode == 2 and "already exists" in ours.stderr, ours.stderr
    _mf(env, "submit", "export", "--preset", "tiny", "--set", f"storage.path={storage}",
        "--submission-id", "export-1", "--arg", "shared")
    assert _wait_job(env, "export-1", 180)["status"] == "SUCCEEDED"
    assert "artifact tiny@v3" in _mf(env, "jobs", "logs", "export-1").stdout
    listed = json.loads(_mf(env, "jobs", "list", "--json").stdout)
    assert {"too-big", "ray-cli-train", "export-1"} <= {j["id"] for j in listed}
    _run(env, str(BIN / "serve"), "shutdown", "-y", "--address", DASH_URL, check=False)


def test_training_survives_kill_node(cluster, storage, tiny_data):
    env = cluster
    _mf(env, "submit", "train", "--preset", "tiny", "--set", f"storage.path={storage}",
        "--set", f"data.path={tiny_data}", "--set", "train.use_gpu=true", "--set", "train.num_workers=4",
        "--set", "train.max_steps=80", "--set", "train.checkpoint_every=10", "--set", "train.eval_every=40",
        "--set", "train.eval_batches=1", "--set", "train.max_failures=1", "--set", "storage.run_name=drill",
        "--submission-id", "drill")
    run_dir = storage / "runs" / "drill"
    nodes = {r["node_id"]: r["name"] for r in json.loads(_mf(env, "cluster", "status", "--json").stdout)}
    killed: dict = {}

    def killer() -> None:
        deadline = time.time() + 400
        while time.time() < deadline and not killed:
            recs = _records(run_dir)
            done = [r["step"] for r in recs if r["kind"] == "checkpoint"]
            if done:  # a complete checkpoint exists: kill a worker node hosting training workers
                victims = sorted(nodes[n] for n in _train_worker_nodes() if nodes.get(n, "head") != "head")
                if victims:
                    _mf(env, "cluster", "kill-node", victims[0])
                    # 80 steps leave tens of seconds after the first checkpoint; a run that had
                    # already finished when the kill landed would make the drill vacuous.
                    recs = _records(run_dir)
                    killed.update(node=victims[0], checkpoint=max(done),
                                  at_step=max(r["step"] for r in recs if r["kind"] == "step"))
                    return
            time.sleep(0.1)

    th = threading.Thread(target=killer, daemon=True)
    th.start()
    s = _wait_job(env, "drill", 600)
    th.join(timeout=5)
    assert killed, "no worker node was killed: the drill did not run"
    assert s["status"] == "SUCCEEDED", s
    resumes = [r["step"] for r in _records(run_dir) if r["kind"] == "resume"]
    # Resumed from a complete checkpoint at or after the last one that existed at the kill.
    assert killed["at_step"] < 80, f"the run had finished before the node was killed: {killed}"
    assert len(resumes) == 1 and resumes[0] >= killed["checkpoint"] and resumes[0] < 80, (resumes, killed)
    rows = json.loads(_mf(env, "cluster", "status", "--json").stdout)
    assert next(r for r in rows if r["name"] == killed["node"])["state"] == "DEAD"


def test_stopped_job_resubmitted_resumes(cluster, storage, tiny_data):
    """`modelfleet jobs stop` (Ray's stop_job: SIGTERM to the entrypoint, then its process group)
    after the first complete checkpoint; the training workers go away; the run resubmitted as a
    new job with `--resume` continues from its last complete checkpoint, not from step 1."""
    env = cluster
    sets = ["--set", f"storage.path={storage}", "--set", f"data.path={tiny_data}", "--set", "train.use_gpu=true",
            "--set", "train.num_workers=2", "--set", "deepspeed.zero_stage=3", "--set", "train.max_steps=40",
            "--set", "train.checkpoint_every=10", "--set", "train.eval_every=20", "--set", "train.eval_batches=1",
            "--set", "storage.run_name=stopme"]
    _mf(env, "submit", "train", "--preset", "tiny", *sets, "--arg=--no-export", "--submission-id", "stopme-1")
    run_dir = storage / "runs" / "stopme"
    deadline = time.time() + 400
    while not any(r["kind"] == "checkpoint" for r in _records(run_dir)):
        assert _job_status(env, "stopme-1")["status"] in ("PENDING", "RUNNING"), _job_status(env, "stopme-1")
        assert time.time() < deadline, "no checkpoint within 400 s"
        time.sleep(0.2)
    _mf(env, "jobs", "stop", "stopme-1")
    t_stop = time.time()
    s = _wait_job(env, "stopme-1", 120)
    stop_s = time.time() - t_stop
    assert s["status"] == "STOPPED", s
    deadline = time.time() + 60
    while _train_worker_nodes():  # the stopped job's training workers must not linger
        assert time.time() < deadline, "training workers still alive 60 s after the job stopped"
        time.sleep(1)
    recs = _records(run_dir)
    at_stop = max(r["step"] for r in recs if r["kind"] == "step")
    last_ckpt = max(r["step"] for r in recs if r["kind"] == "checkpoint")
    assert at_stop < 40, f"the job finished (step {at_stop}) before it was stopped"

    _mf(env, "submit", "train", "--preset", "tiny", *sets, "--arg=--no-export", "--arg=--resume", "--arg=stopme",
        "--submission-id", "stopme-2")
    s = _wait_job(env, "stopme-2", 600)
    assert s["status"] == "SUCCEEDED", s
    after = _records(run_dir)[len(recs):]
    resumes = [r["step"] for r in after if r["kind"] == "resume"]
    steps = [r["step"] for r in after if r["kind"] == "step"]
    print(f"\n[job-stop] stopped at step {at_stop} (last checkpoint {last_ckpt}); STOPPED {stop_s:.1f} s after "
          f"`jobs stop`; resubmission resumed from {resumes}, trained steps {min(steps)}-{max(steps)}")
    assert resumes == [last_ckpt], (resumes, last_ckpt)
    assert min(steps) == last_ckpt + 1 and max(steps) == 40, steps
