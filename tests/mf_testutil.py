"""Helpers the test modules import by name (``from mf_testutil import ...``): a module of its own
because several conftest.py files exist and ``from conftest import`` would pick one at random."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

TEST_SOURCES = ["stdlib:json/*.py", "stdlib:email/*.py"]


def tiny_config(storage: Path, data_path: str, overrides: list[str] = ()):  # type: ignore[assignment]
    """The tiny preset made quick for tests: short runs, frequent eval and checkpoints."""
    from modelfleet.presets import load_config

    base = [f"storage.path={storage}", f"data.path={data_path}", "train.max_steps=30",
            "train.eval_every=10", "train.checkpoint_every=10", "train.eval_batches=2"]
    return load_config(preset="tiny", overrides=[*base, *overrides])


def ray_process_pids(title: str, ancestor: int | None = None) -> list[int]:
    """PIDs of live processes whose title starts with ``title`` (Ray titles its workers
    ``ray::<Actor>...``), sorted; found through the OS so drills work without the dashboard's
    state API. ``ancestor``: only descendants of that process (a local ``ray.init`` makes Ray's
    workers this test process's descendants), so a drill never touches another session's Ray."""
    import psutil

    procs = psutil.Process(ancestor).children(recursive=True) if ancestor else psutil.process_iter()
    pids = []
    for p in procs:
        try:
            if p.status() != psutil.STATUS_ZOMBIE and " ".join(p.cmdline()).startswith(title):
                pids.append(p.pid)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return sorted(pids)


def train_worker_pids(ancestor: int | None = None) -> list[int]:
    """PIDs of live Ray Train worker processes (``ray::RayTrainWorker...``), sorted."""
    return ray_process_pids("ray::RayTrainWorker", ancestor)


def serve_replica_pids(app: str, deployment: str, ancestor: int | None = None) -> list[int]:
    """PIDs of the live replicas of one Serve deployment (``ray::ServeReplica:APP:DEPLOYMENT``)."""
    return ray_process_pids(f"ray::ServeReplica:{app}:{deployment}", ancestor)


def read_records(run_dir: str | Path) -> list[dict]:
    """The run's ``metrics.jsonl`` records (step, eval, checkpoint, resume), [] before the first."""
    import json

    path = Path(run_dir, "metrics.jsonl")
    if not path.exists():
        return []
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


def publish_tiny_models(storage: Path, seeds: tuple[int, ...] = (1, 2), probe: str = "def main(") -> dict[str, str]:
    """Publish one randomly initialised tiny GPT per seed as tiny@v1, v2, ... (no training run)
    and return each version's greedy 8-token answer to ``probe`` (what a server must reproduce)."""
    import torch

    from modelfleet import registry
    from modelfleet.data.tokenizer import ByteTokenizer
    from modelfleet.families import build_model
    from modelfleet.models.gpt import generate
    from modelfleet.presets import load_config
    from modelfleet.train.export import write_artifact_dir

    cfg = load_config(preset="tiny", overrides=[f"storage.path={storage}"])
    tok, answers = ByteTokenizer(), {}
    for seed in seeds:
        torch.manual_seed(seed)
        model = build_model(cfg.model).eval()
        ref = registry.publish(str(storage), "tiny", write_artifact_dir(model, cfg, {}))
        ids = torch.tensor([tok.encode(probe)])
        answers[ref.version] = tok.decode(generate(model, ids, 8, temperature=0)[0, ids.size(1):])
    return answers


def deploy_app(storage: Path, port: int, app: str, models: list[dict], **serve_cfg):
    """``modelfleet.serve.app.deploy`` of one app under ``/<app>`` on ``port``; returns its URL."""
    from modelfleet.serve.app import deploy

    deploy({"app_name": app, "route_prefix": f"/{app}", "port": port, "storage_path": str(storage),
            "ingress": {"num_cpus": 0.05}, "models": models, **serve_cfg})
    return f"http://127.0.0.1:{port}/{app}"


def running_replicas(app: str, deployment: str = "model-tiny") -> dict[str, int]:
    """Replica counts by state (RUNNING, STARTING, STOPPING...) of one deployment, from Serve."""
    from modelfleet.serve.app import status

    return next((r["replicas"] for r in status() if r["app"] == app and r["deployment"] == deployment), {})


@dataclass
class LoadResult:
    """What a bounded load saw: requests sent, answered, failed (with why), and how long it took."""

    sent: int = 0
    ok: int = 0
    failed: list[str] = field(default_factory=list)
    texts: dict[str, int] = field(default_factory=dict)
    duration_s: float = 0.0


def run_load(client, n: int, concurrency: int, *, deadline_s: float, stop=None, **body) -> LoadResult:
    """Send up to ``n`` completions through ``client`` (a ``modelfleet.serve.client.Client``, which
    retries) from ``concurrency`` threads; stops at ``n``, at ``deadline_s`` or when ``stop`` is set.
    ``body`` is the request (prompt, max_tokens, ...). Failures are kept, never raised."""
    import threading
    import time

    res, lock = LoadResult(), threading.Lock()
    t0 = time.monotonic()

    def worker() -> None:
        while True:
            with lock:
                if res.sent >= n or time.monotonic() - t0 > deadline_s or (stop is not None and stop.is_set()):
                    return
                res.sent += 1
            try:
                out = client.complete(**body)
                text = out["choices"][0]["text"]
                with lock:
                    res.ok += 1
                    res.texts[text] = res.texts.get(text, 0) + 1
            except Exception as e:  # noqa: BLE001 - a failed request is data here
                with lock:
                    res.failed.append(f"{type(e).__name__}: {str(e)[:200]}")

    threads = [threading.Thread(target=worker, daemon=True) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=deadline_s + 180)  # a request in flight at the deadline may still finish
    res.duration_s = time.monotonic() - t0
    return res


def cli_env(home: Path, **extra: str) -> dict[str, str]:
    """Environment for ``modelfleet``/``ray`` subprocesses against a simulated cluster whose state
    lives in ``home`` (MODELFLEET_HOME), with token auth and this venv's binaries first on PATH."""
    import os
    import sys

    bin_dir = str(Path(sys.executable).parent)
    return {**os.environ, "MODELFLEET_HOME": str(home), "RAY_AUTH_MODE": "token", "DS_ACCELERATOR": "cpu",
            "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", **extra}


def run_cli(env: dict, *args: str, timeout: float = 300, check: bool = True):
    """Run a command from the repository root (``modelfleet ...`` resolves to this venv's script);
    with ``check``, a non-zero exit fails the test with the command's output."""
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    cmd = list(args)
    if cmd[0] in ("modelfleet", "ray", "serve"):
        cmd[0] = str(Path(sys.executable).parent / cmd[0])
    r = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=timeout)
    if check and r.returncode != 0:
        raise AssertionError(f"{' '.join(args)} exited {r.returncode}:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
    return r


def wait_job(env: dict, job_id: str, timeout_s: float, states=("SUCCEEDED", "FAILED", "STOPPED")) -> dict:
    """Poll ``modelfleet jobs status`` until the job is in one of ``states``."""
    import json
    import time

    deadline = time.monotonic() + timeout_s
    while True:
        s = json.loads(run_cli(env, "modelfleet", "jobs", "status", job_id, check=False).stdout)
        if s["status"] in states:
            return s
        if time.monotonic() > deadline:
            raise AssertionError(f"job {job_id} still {s['status']} after {timeout_s:g} s")
        time.sleep(1)
