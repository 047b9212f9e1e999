"""Share-nothing nodes: `modelfleet cluster up --isolated` gives each worker node its own /tmp (a
private mount namespace), so what one node writes there the others cannot see, as on separate
machines; the head (where the CLI and job drivers run) keeps the host's view. GPU workers and
replicas land on the isolated worker nodes (the head has no GPUs).

- A training run whose storage is local to the head fails, saying to use shared storage.
- The S3 variant of prepare -> train job -> serve -> evaluate runs on these nodes, every file in
  the bucket (moto's S3 server on 127.0.0.1; the nodes inherit its endpoint and key).
"""

from __future__ import annotations

import json
import threading

import httpx
import pytest
import yaml

from helpers import SimCluster, mf, read_records, run_cli, wait_job, wait_until
from modelfleet import storage

GCS, DASH, SERVE = 6880, 8665, 8500


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, s3):
    c = SimCluster(
        tmp_path_factory.mktemp("mfhome-isolated"),
        gcs_port=GCS,
        dashboard_port=DASH,
        serve_port=SERVE,
        nodes=3,
        cpus_per_node=3,
        gpus_per_node=2,
        head_gpus=0,
        isolated=True,
        up_timeout_s=480,
    )
    try:
        c.up()
        assert "worker nodes isolated" in c.up_output, c.up_output[-2000:]
        yield c
    finally:
        c.down()


def test_storage_local_to_the_head_fails_saying_to_use_shared_storage(cluster, tmp_path, tiny_data):
    env = cluster.env
    local = tmp_path / "head-only-storage"  # under /tmp: the worker nodes cannot see it
    mf(
        env,
        "submit",
        "train",
        "--preset",
        "tiny",
        "--set",
        f"storage.path={local}",
        "--set",
        f"data.path={tiny_data}",
        "--set",
        "train.use_gpu=true",
        "--set",
        "train.num_workers=2",
        "--set",
        "train.max_steps=4",
        "--submission-id",
        "head-local",
    )
    s = wait_job(env, "head-local", 600, interval_s=2)
    logs = mf(env, "jobs", "logs", "head-local").stdout
    print(f"\n[isolated] head-local storage: {s['status']}; {s.get('reason', '')[-600:]}")
    assert s["status"] == "FAILED", s
    assert "is not visible on 2 of 3 nodes" in logs and "use shared storage" in logs, (s, logs[-3000:])


def test_object_store_train_serve_evaluate_on_isolated_nodes(cluster, s3, tmp_path):
    """The S3 variant on share-nothing nodes: `prepare` writes shards to the bucket, a training
    job's workers (on the isolated GPU nodes) read them and write checkpoints, metrics and the
    artifact there; the node holding its workers is killed after the step-10 checkpoint and the
    run resumes from the bucket on the other node; Serve's replicas load the artifact from the
    bucket, `evaluate` writes its report there."""
    env, root = cluster.env, "s3://modelfleet/isolated"
    mf(env, "prepare", "--preset", "tiny", "--set", f"storage.path={root}", timeout=300)
    mf(
        env,
        "submit",
        "train",
        "--preset",
        "tiny",
        "--set",
        f"storage.path={root}",
        "--set",
        "train.use_gpu=true",
        "--set",
        "train.num_workers=2",
        "--set",
        "train.max_steps=40",
        "--set",
        "train.eval_every=40",
        "--set",
        "train.checkpoint_every=10",
        "--set",
        "train.eval_batches=1",
        "--set",
        "train.max_failures=1",
        "--set",
        "storage.run_name=s3",
        "--submission-id",
        "s3-train",
    )
    names = {r["node_id"]: r["name"] for r in json.loads(mf(env, "cluster", "status", "--json").stdout)}
    killed: dict = {}
    stop = threading.Event()

    def killer() -> None:
        # By condition: step 10's COMPLETE object is in the bucket; then the node holding a worker goes.
        try:
            wait_until(
                lambda: (
                    stop.is_set()
                    or "isolated/runs/s3/step_00000010/COMPLETE"
                    in s3.keys("modelfleet", "isolated/runs/s3/step_00000010/")
                ),
                600,
                "the step-10 checkpoint",
                0.2,
            )
            victims = sorted(names[n] for n in cluster.train_worker_nodes() if names.get(n, "head") != "head")
            if stop.is_set() or not victims:
                return
            mf(env, "cluster", "kill-node", victims[0])
            killed["node"] = victims[0]
            # What was complete when its workers died: the resume must come from the newest of these.
            done = [k for k in s3.keys("modelfleet", "isolated/runs/s3/") if k.endswith("/COMPLETE")]
            killed["complete"] = sorted(int(k.split("/")[-2].split("_")[1]) for k in done)
        except Exception as e:  # noqa: BLE001 - reported below
            killed["error"] = repr(e)

    th = threading.Thread(target=killer, daemon=True)
    th.start()
    try:
        s = wait_job(env, "s3-train", 900, interval_s=2)
    finally:
        stop.set()
        th.join(timeout=120)
    assert s["status"] == "SUCCEEDED", s
    assert killed.get("node"), killed
    resumes = [r["step"] for r in read_records(f"{root}/runs/s3") if r["kind"] == "resume"]
    # Restored from the bucket on the surviving node, from the newest checkpoint complete at the kill.
    assert killed["complete"] and killed["complete"][-1] < 40, killed  # the kill hit a run in progress
    assert resumes == [killed["complete"][-1]], (resumes, killed)
    assert f"artifact tiny@v1: {root}/models/tiny/v1" in mf(env, "jobs", "logs", "s3-train").stdout
    keys = set(s3.keys("modelfleet", "isolated/"))
    assert {
        "isolated/runs/s3/metrics.jsonl",
        "isolated/runs/s3/result.json",
        "isolated/models/tiny/LATEST",
        "isolated/models/tiny/v1/model.safetensors",
        "isolated/models/tiny/v1/manifest.json",
        "isolated/data/tiny/meta.json",
    } <= keys
    # Every checkpoint written after the resume is whole in the bucket: both ranks' markers, then COMPLETE.
    for step in range(killed["complete"][-1] + 10, 41, 10):
        d = f"isolated/runs/s3/step_{step:08d}"
        assert {f"{d}/COMPLETE", f"{d}/rank-00000.json", f"{d}/rank-00001.json"} <= keys, (step, sorted(keys))
    records = read_records(f"{root}/runs/s3")  # both attempts, rolled as one object
    assert max(r["step"] for r in records if r["kind"] == "step") == 40
    result = json.loads(storage.read_text(f"{root}/runs/s3/result.json"))
    assert result["step"] == 40 and result["artifact"] == f"{root}/models/tiny/v1", result
    assert storage.read_text(f"{root}/models/tiny/LATEST").strip() == "v1"
    mf(env, "cluster", "restart-node", killed["node"])  # capacity back for serving
    print(
        f"\n[isolated-s3] killed {killed['node']} with checkpoints {killed['complete']} complete; "
        f"resumed from {resumes} on the other node"
    )

    cfg = tmp_path / "serve.yaml"  # read by the CLI on the head
    cfg.write_text(
        yaml.safe_dump(
            {
                "preset": "tiny",
                "storage": {"path": root},
                "serve": {
                    "app_name": "s3",
                    "port": cluster.serve_port,
                    "models": [
                        {"name": "tiny", "artifact": "tiny", "ray_actor_options": {"num_cpus": 0.5, "num_gpus": 0.5}}
                    ],
                },
            }
        )
    )
    mf(env, "serve", str(cfg), "--detach", timeout=240)
    try:
        r = httpx.post(
            f"http://127.0.0.1:{cluster.serve_port}/v1/completions",
            timeout=60,
            json={"prompt": "def main(", "max_tokens": 4, "temperature": 0},
        )
        assert r.status_code == 200 and r.headers["x-modelfleet-artifact"] == "tiny@v1", r.text
        replicas = [
            a
            for a in cluster.state_api("/api/v0/actors?limit=1000")
            if a.get("class_name", "").startswith("ServeReplica") and a.get("state") == "ALIVE"
        ]
        nodes = {n["node_id"]: n["name"] for n in json.loads(mf(env, "cluster", "status", "--json").stdout)}
        # The model's replicas hold the GPUs (workers only); a cache-aware router's replicas, when
        # serve.router is on, sit beside each node's HAProxy, the head's included.
        models = [a for a in replicas if a["class_name"].startswith("ServeReplica:s3:model-")]
        assert models and all(nodes.get(a["node_id"]) != "head" for a in models), replicas
    finally:
        run_cli(env, "serve", "shutdown", "-y", "--address", cluster.dashboard_url, check=False)
    out = mf(env, "evaluate", "tiny", "--storage", root, "--data", f"{root}/data/tiny", timeout=300).stdout
    assert f"{root}/evaluations/tiny-v1/evaluation.json" in out
    assert set(s3.keys("modelfleet", "isolated/evaluations/")) >= {
        "isolated/evaluations/tiny-v1/evaluation.json",
        "isolated/evaluations/tiny-v1/loss_curves.png",  # drawn from the run's metrics in the bucket
    }
    report = json.loads(storage.read_text(f"{root}/evaluations/tiny-v1/evaluation.json"))
    assert report["metrics"]["loss"] < 4.0 and report["loss_curve"]["step"][-1] == 40, report["metrics"]
