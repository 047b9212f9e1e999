"""Security drills: Ray token authentication on the project's own cluster (a job or driver without
the token is refused), secrets kept out of logs, manifests and job metadata, and checkpoints or
artifacts carrying a malicious pickle refused without ever running it.

The cluster is ``modelfleet cluster up --nodes 1`` on its own ports (GCS 6680, dashboard and Jobs
API 8465, Serve 8300), with its state in a temporary MODELFLEET_HOME; a finalizer takes it down.
The API key on every HTTP route is in test_http_boundary.py.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import torch

from helpers import SimCluster, publish_tiny_models, run_cli, tiny_config, wait_job
from modelfleet.families.artifact import load_artifact
from modelfleet.storage import StorageLayout, sha256_file

GCS, DASH, SERVE = 6680, 8465, 8300
DASH_URL = f"http://127.0.0.1:{DASH}"
# In the submitting environment: must not travel with jobs. Random, so that no file (this test's
# own source, uploaded with the working directory) holds it.
API_KEY = "sk-sec-" + secrets.token_hex(8)


class Payload:
    """Unpickling this runs ``touch <marker>``: the side effect a malicious checkpoint would have."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _token() -> str:
    return (Path.home() / ".ray" / "auth_token").read_text().strip()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """This module's own cluster (see tests/helpers): ``up`` waits for its ports to be free (8300 is
    also the other drill modules' Serve port), ``down`` for its processes and ports to be gone."""
    c = SimCluster(
        tmp_path_factory.mktemp("mfhome-sec"),
        gcs_port=GCS,
        dashboard_port=DASH,
        serve_port=SERVE,
        nodes=1,
        cpus_per_node=4,
        gpus_per_node=0,
        up_timeout_s=240,
        MODELFLEET_API_KEY=API_KEY,
    )
    try:
        c.up()
        print(f"\n[cluster] up in {c.up_s:.1f} s")
        yield c
    finally:
        c.down()


def test_jobs_and_drivers_without_the_token_are_refused(cluster, tmp_path):
    token_file = Path.home() / ".ray" / "auth_token"
    assert token_file.stat().st_mode & 0o077 == 0, oct(token_file.stat().st_mode)  # owner-only, set by `up`
    env, marker = cluster.env, tmp_path / "ran"
    entry = f"touch {marker}"
    refused = []
    # (A token in a URL would end up in the dashboard's access log: the query case sends a wrong one.)
    for label, headers in (
        ("no token", {}),
        ("wrong token", {"Authorization": "Bearer " + "0" * 32}),
        ("token as query", None),
    ):
        r = httpx.post(
            f"{DASH_URL}/api/jobs/",
            json={"entrypoint": entry},
            timeout=30,
            headers=headers or {},
            params={"token": "1" * 32} if headers is None else None,
        )
        refused.append((label, r.status_code))
    # Ray's own CLI, from an environment that has no token (another user's HOME).
    no_token = {**env, "HOME": str(tmp_path), "RAY_AUTH_MODE": "token"}
    cli = run_cli(
        no_token, "ray", "job", "submit", "--address", DASH_URL, "--no-wait", "--", entry, check=False, timeout=120
    )
    # A driver is a job too: connecting to the GCS without the token.
    drv = subprocess.run(
        [
            sys.executable,
            "-c",
            f"import ray; ray.init(address='127.0.0.1:{GCS}'); "
            f"ray.get(ray.remote(lambda: __import__('os').system('{entry}')).remote())",
        ],
        env={**no_token, "RAY_AUTH_MODE": "disabled"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    jobs = httpx.get(f"{DASH_URL}/api/jobs/", headers={"Authorization": f"Bearer {_token()}"}, timeout=30)
    print(
        f"\n[token-auth] HTTP job submissions: {refused}; `ray job submit` without a token exited "
        f"{cli.returncode}; driver without the token exited {drv.returncode}: "
        f"{(drv.stderr.strip().splitlines() or [''])[-1][:160]}"
    )
    assert all(code in (401, 403) for _, code in refused), refused
    assert cli.returncode != 0, cli.stdout[-500:]
    assert drv.returncode != 0, drv.stdout[-500:]
    assert jobs.status_code == 200 and all(entry not in j["entrypoint"] for j in jobs.json()), jobs.text[:300]
    assert not marker.exists(), "a refused job ran anyway"


def test_no_secret_in_logs_manifests_or_job_metadata(cluster):
    """The Ray token and the serving API key (both in the submitting environment) appear in none
    of: `cluster up` output, the cluster state file, a submitted job's record (entrypoint, metadata,
    runtime env) and logs, the cluster's log files, and an artifact's manifest written meanwhile."""
    env, token = cluster.env, _token()
    wanted = {"ray token": token, "api key": API_KEY}
    storage = cluster.home / "storage"
    publish_tiny_models(storage, (1,))  # a manifest written with the API key in the environment
    # A real submission through `modelfleet submit` (the job fails fast in pre-flight: no data).
    run_cli(
        env,
        "modelfleet",
        "submit",
        "train",
        "--preset",
        "tiny",
        "--set",
        f"storage.path={storage}",
        "--set",
        f"data.path={storage}/no-data",
        "--submission-id",
        "secrets-1",
    )
    assert wait_job(env, "secrets-1", 300)["status"] == "FAILED"
    jobs = httpx.get(f"{DASH_URL}/api/jobs/", headers={"Authorization": f"Bearer {token}"}, timeout=30).json()
    assert "secrets-1" in {j["submission_id"] for j in jobs}
    texts = {"cluster up output": cluster.up_output, "job records": json.dumps(jobs)}
    for j in jobs:
        if j.get("submission_id"):  # drivers that connected directly (cluster up's own) have no logs API
            texts[f"logs of {j['submission_id']}"] = run_cli(
                env, "modelfleet", "jobs", "logs", j["submission_id"]
            ).stdout
    # This cluster's session only: the temp dir keeps earlier sessions' logs on a developer machine.
    session = Path(f"/tmp/modelfleet-{GCS}/session_latest").resolve()
    files = [*cluster.home.rglob("*"), *session.rglob("*")]
    files = [p for p in files if p.is_file() and not p.is_symlink() and p.stat().st_size < 50 << 20]
    assert any(p.name == "manifest.json" for p in files) and any(p.suffix == ".log" for p in files)
    leaks = [
        (what, name)
        for what, secret in wanted.items()
        for name, text in [*texts.items(), *((str(p), p.read_text(errors="replace")) for p in files)]
        if secret in text
    ]
    print(
        f"\n[secrets] {len(texts)} outputs and {len(files)} files (job records, logs, cluster logs, state, "
        f"manifest) scanned for the Ray token and the API key: {len(leaks)} leaks"
    )
    assert not leaks, leaks


def _tiny_run(storage: Path, run: str, step: int, marker: Path) -> Path:
    """A checkpoint that passes every structural check (COMPLETE, rank markers, sha256s) but whose
    DeepSpeed shard is a pickle that runs ``touch marker``: markers cannot vouch for content."""
    from modelfleet.train import checkpoint as ck

    local = storage / f"local-{run}-{step}"
    (local / ck.DS_TAG).mkdir(parents=True)
    torch.save(
        {"module": Payload(marker), "w": torch.zeros(4)},
        local / ck.DS_TAG / "zero_pp_rank_0_mp_rank_00_model_states.pt",
    )
    (local / ck.TRAINER_STATE).write_text(json.dumps({"state": {"step": step, "epoch": 0, "batch_in_epoch": step}}))
    ck.write_rank_marker(str(local), 0, 1, step)
    dest = storage / "runs" / run / ck.step_dir_name(step)
    dest.parent.mkdir(parents=True, exist_ok=True)
    local.rename(dest)
    ck.write_complete(StorageLayout(str(storage)).runs(), run, step, 1)
    return dest


def test_malicious_pickle_in_checkpoint_or_artifact_never_runs(tmp_path, tiny_data):
    from modelfleet import registry
    from modelfleet.errors import ArtifactError, CheckpointError
    from modelfleet.train import checkpoint as ck
    from modelfleet.train import train
    from modelfleet.train.export import export_run

    marker = tmp_path / "pwned"
    ckpt = _tiny_run(tmp_path, "evil", 10, marker)
    shard = ckpt / ck.DS_TAG / "zero_pp_rank_0_mp_rank_00_model_states.pt"

    # Control: the payload is live. DeepSpeed's own loader (weights_only=False) runs it.
    control = tmp_path / "control"
    torch.save({"module": Payload(control)}, tmp_path / "control.pt")
    subprocess.run(
        [
            sys.executable,
            "-c",
            "from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import "
            f"TorchCheckpointEngine as E; E().load({str(tmp_path / 'control.pt')!r})",
        ],
        env={**os.environ, "DS_ACCELERATOR": "cpu"},
        capture_output=True,
        timeout=120,
    )
    assert control.exists(), "the control payload did not run under DeepSpeed's loader: the drill proves nothing"
    # A file swapped in after the scan: DeepSpeed's loader inside weights_only_loads (as the workers
    # and export call it) refuses the same payload, naming the global.
    control.unlink()
    swapped = subprocess.run(
        [
            sys.executable,
            "-c",
            "from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import "
            "TorchCheckpointEngine as E\nfrom modelfleet.train.pickles import weights_only_loads\n"
            f"with weights_only_loads('swapped.pt'): E().load({str(tmp_path / 'control.pt')!r})",
        ],
        env={**os.environ, "DS_ACCELERATOR": "cpu"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert swapped.returncode != 0 and not control.exists(), swapped.stderr[-2000:]
    assert "UnsafePickleError: swapped.pt could run code" in swapped.stderr and "posix.system" in swapped.stderr, (
        swapped.stderr[-2000:]
    )

    found, skipped = ck.latest_complete(StorageLayout(str(tmp_path)).runs(), "evil")
    assert found is None and "is unsafe" in skipped[0] and "posix.system" in skipped[0], skipped
    cfg = tiny_config(tmp_path, tiny_data)
    with pytest.raises(CheckpointError, match="no complete checkpoint to resume from.*unsafe"):
        train(cfg, resume="evil", show_progress=False)  # refused before any worker starts
    with pytest.raises(CheckpointError, match="unsafe"):
        export_run(str(tmp_path), "evil")

    # Artifacts: weights replaced by a pickle (manifest sha256 updated to match), and a pickle
    # beside valid weights. Loading never unpickles either.
    publish_tiny_models(tmp_path, (1, 2))
    bad = Path(registry.resolve(str(tmp_path), "tiny@v1").uri)
    torch.save({"w": Payload(marker)}, bad / registry.WEIGHTS)
    manifest = json.loads((bad / "manifest.json").read_text())
    manifest["weights_sha256"] = sha256_file(str(bad / registry.WEIGHTS))
    (bad / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(Exception) as err:  # noqa: B017 - which parser refuses it is checked below
        load_artifact(str(bad))
    assert isinstance(err.value, ArtifactError) or type(err.value).__name__ == "SafetensorError", repr(err.value)
    beside = Path(registry.resolve(str(tmp_path), "tiny@v2").uri)
    torch.save({"w": Payload(marker)}, beside / "pytorch_model.bin")
    load_artifact(str(beside))  # loads the safetensors weights, ignores the pickle
    print(
        f"\n[pickles] checkpoint refused: {skipped[0]}\n  artifact refused: {type(err.value).__name__}: "
        f"{str(err.value)[:120]}; control payload ran under DeepSpeed's loader, ours never did"
    )
    assert not marker.exists(), "the malicious pickle ran"
    assert shard.exists()
