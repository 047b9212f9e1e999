"""The simulated cluster end to end: `modelfleet cluster up` (3 nodes x 2 logical GPUs), jobs via
Ray's own `ray job submit` and via `modelfleet submit`, serving beside training, and a node
killed under a training job. Placement is read from Ray's state API, not our bookkeeping.

Everything runs as subprocesses against the cluster the project's own command started, on
non-default ports (8365 dashboard, 8100 Serve) so a developer's own cluster is left alone.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import httpx
import pytest
import yaml

from helpers import job_status, mf, publish_tiny_models, read_records, run_cli, wait_job, wait_until
from helpers.listeners import LOOPBACK, SERVE_DIRECT_HTTP, cluster_listeners, extra_replica_listeners, ray_role


@pytest.fixture(scope="module")
def storage(tmp_path_factory) -> Path:
    """A registry holding a random tiny model (serving needs an artifact, not a training run)."""
    path = tmp_path_factory.mktemp("cluster-storage")
    publish_tiny_models(path, (0,))
    return path


def test_status_shows_three_nodes_with_gpus(cluster):
    rows = json.loads(mf(cluster.env, "cluster", "status", "--json").stdout)
    assert [r["name"] for r in rows] == ["head", "worker-1", "worker-2"]
    assert all(r["state"] == "ALIVE" and r["gpu"].endswith("/2") for r in rows)
    nodes = cluster.state_api("/api/v0/nodes?limit=100")
    assert sum(1 for n in nodes if n["state"] == "ALIVE") == 3


def test_serving_beside_training_jobs(cluster, storage, tiny_data, tmp_path):
    env, dash_url = cluster.env, cluster.dashboard_url
    cfg = tmp_path / "serve.yaml"
    cfg.write_text(
        yaml.safe_dump(
            {
                "preset": "tiny",
                "storage": {"path": str(storage)},
                "serve": {
                    "app_name": "shared",
                    "port": cluster.serve_port,
                    "models": [
                        {
                            "name": "tiny",
                            "artifact": "tiny",
                            "ray_actor_options": {"num_cpus": 0.5, "num_gpus": 0.5},
                            "autoscaling": {"min_replicas": 2, "max_replicas": 2},
                        }
                    ],
                },
            }
        )
    )
    mf(env, "serve", str(cfg), "--detach", timeout=240)
    url = f"http://127.0.0.1:{cluster.serve_port}/v1/completions"
    try:
        assert httpx.post(url, json={"prompt": "x", "max_tokens": 2}, timeout=60).status_code == 200

        common = [
            "--set",
            f"storage.path={storage}",
            "--set",
            f"data.path={tiny_data}",
            "--set",
            "train.use_gpu=true",
            "--set",
            "train.max_steps=30",
            "--set",
            "train.eval_every=30",
            "--set",
            "train.checkpoint_every=10",
            "--set",
            "train.eval_batches=1",
        ]
        # 6 GPUs, 1 kept for serving's two 0.5-GPU minimum replicas: 6 GPU workers are refused, and
        # the failed job's status says why.
        mf(
            env,
            "submit",
            "train",
            "--preset",
            "tiny",
            "--set",
            "train.num_workers=6",
            *common,
            "--submission-id",
            "too-big",
        )
        s = wait_job(env, "too-big", 180)
        assert s["status"] == "FAILED" and "reserved for the minimum replicas" in s["reason"], s

        four = [
            *common,
            "--set",
            "train.num_workers=4",
            "--set",
            "deepspeed.zero_stage=3",
            "--set",
            "storage.run_name=shared",
        ]
        failures, answered, seen_nodes = [], [0], set()

        def traffic() -> None:
            with httpx.Client(timeout=60) as c:
                for _ in range(3):  # a few requests per poll: bounded by the job's own deadline
                    r = c.post(url, json={"prompt": "def f(", "max_tokens": 4})
                    answered[0] += 1
                    if r.status_code != 200:
                        failures.append((r.status_code, r.text[:200]))
            seen_nodes.update(cluster.train_worker_nodes())

        # A job of 4 ZeRO-3 workers on "GPUs", stopped with `modelfleet jobs stop` (Ray's stop_job:
        # SIGTERM to the entrypoint, then its process group) after its first complete checkpoint:
        # the ranks checkpoint at the next step and the job ends; its workers go away.
        cfg_yaml = "deploy/modelfleet-serve.yaml"
        mf(env, "submit", "train", cfg_yaml, *four, "--arg=--no-export", "--submission-id", "shared-1")
        run_dir = storage / "runs" / "shared"

        def checkpointed() -> bool:
            traffic()
            if any(r["kind"] == "checkpoint" for r in read_records(run_dir)):
                return True
            s = job_status(env, "shared-1")
            assert s["status"] in ("PENDING", "RUNNING"), s  # ended before its first checkpoint
            return False

        wait_until(checkpointed, 400, "the first complete checkpoint of shared-1", 0.5)
        _every_listener_beyond_loopback_is_rays_own(cluster)  # while the app serves and the job trains
        mf(env, "jobs", "stop", "shared-1")
        t_stop = time.time()
        s = wait_job(env, "shared-1", 120)
        stop_s = time.time() - t_stop
        assert s["status"] == "STOPPED", s
        wait_until(lambda: not cluster.train_worker_nodes(), 60, "the stopped job's training workers to exit", 1)
        recs = read_records(run_dir)
        at_stop = max(r["step"] for r in recs if r["kind"] == "step")
        last_ckpt = max(r["step"] for r in recs if r["kind"] == "checkpoint")
        assert at_stop < 30, f"the job finished (step {at_stop}) before it was stopped"
        # The driver's SIGTERM handler had the ranks checkpoint where they stood, within the job's
        # stop wait (RAY_JOB_STOP_WAIT_TIME_S, set by `modelfleet submit`), before Ray's SIGKILL.
        stopped = [r for r in recs if r["kind"] == "stopped"]
        assert [r["step"] for r in stopped] == [at_stop] == [last_ckpt], (stopped, at_stop, last_ckpt)
        stop_logs = mf(env, "jobs", "logs", "shared-1").stdout
        assert f"checkpoint at step {at_stop} is complete" in stop_logs and "--resume shared" in stop_logs

        # Resubmitted with Ray's own CLI, exactly as the README says: it resumes from the step it
        # was stopped at, redoes none, finishes and exports.
        def ray_submit(*argv: str, check: bool = True):
            """Ray's own `ray job submit` of id ray-cli-train, not waiting."""
            base = ["ray", "job", "submit", "--address", dash_url, "--submission-id", "ray-cli-train", "--no-wait"]
            return run_cli(env, *base, *argv, check=check)

        ray_submit(
            "--working-dir",
            ".",
            "--",
            "python",
            "jobs/train.py",
            "--config",
            cfg_yaml,
            *four,
            "--resume",
            "shared",
        )
        s = wait_job(env, "ray-cli-train", 600, during=traffic, interval_s=2)
        assert s["status"] == "SUCCEEDED", s
        assert len(seen_nodes) >= 2, f"4 training workers ran on nodes {seen_nodes}"
        assert answered[0] >= 10 and not failures, (answered, failures[:3])
        logs = mf(env, "jobs", "logs", "ray-cli-train").stdout
        assert "artifact tiny@v2" in logs
        after = read_records(run_dir)[len(recs) :]
        resumes = [r["step"] for r in after if r["kind"] == "resume"]
        steps = [r["step"] for r in after if r["kind"] == "step"]
        print(
            f"\n[job-stop] stopped at step {at_stop} (last checkpoint {last_ckpt}); STOPPED {stop_s:.1f} s after "
            f"`jobs stop`; resubmission resumed from {resumes}, trained steps {min(steps)}-{max(steps)}"
        )
        assert resumes == [last_ckpt], (resumes, last_ckpt)
        assert min(steps) == last_ckpt + 1 and max(steps) == 30, steps

        # An id is used once: Ray's CLI and ours both refuse it.
        again = ray_submit("--", "echo", "hi", check=False)
        assert again.returncode != 0
        ours = mf(
            env,
            "submit",
            "export",
            "--preset",
            "tiny",
            "--set",
            f"storage.path={storage}",
            "--submission-id",
            "ray-cli-train",
            "--arg",
            "shared",
            check=False,
        )
        assert ours.returncode == 2 and "already exists" in ours.stderr, ours.stderr
        mf(
            env,
            "submit",
            "export",
            "--preset",
            "tiny",
            "--set",
            f"storage.path={storage}",
            "--submission-id",
            "export-1",
            "--arg",
            "shared",
        )
        assert wait_job(env, "export-1", 180)["status"] == "SUCCEEDED"
        assert "artifact tiny@v3" in mf(env, "jobs", "logs", "export-1").stdout
        listed = json.loads(mf(env, "jobs", "list", "--json").stdout)
        assert {"too-big", "ray-cli-train", "export-1"} <= {j["id"] for j in listed}
    finally:
        # The shared cluster's next test starts without this app (and its 2 x 0.5 reserved GPUs).
        run_cli(env, "serve", "shutdown", "-y", "--address", dash_url, check=False)
    # `serve shutdown` deletes the app asynchronously: wait until its replicas' GPUs are free again
    # (every job has ended), so the next test (the kill-node drill needs 4 of the 6) has them all.
    wait_until(lambda: _all_gpus_free(env), 180, "every GPU free after `serve shutdown`", 2)


def _every_listener_beyond_loopback_is_rays_own(cluster) -> None:
    """Issue 28 item 8's drill: the LISTEN sockets of every process of the cluster (daemons, Ray's
    workers, the job's driver and training workers, HAProxy, the replicas and their engine cores).
    Our app's listeners are on loopback; every other one is Ray's own, by role and port range
    (helpers/listeners.py), or the drill fails naming it."""
    found = cluster_listeners(cluster.leftover_pids())
    roles = {str(x): ray_role(x, cluster.gcs_port, cluster.nodes) for x in found if x.ip not in LOOPBACK}
    assert not [x for x, role in roles.items() if role is None], [x for x, role in roles.items() if role is None]
    assert not extra_replica_listeners(found, cluster.gcs_port, cluster.nodes)
    front = [x for x in found if x.process.split()[0].endswith("/haproxy") and x.port == cluster.serve_port]
    direct = [x for x in found if x.process.startswith("ray::ServeReplica") and x.port in SERVE_DIRECT_HTTP]
    assert front and direct, f"the app's listeners were not seen: {[str(x) for x in found]}"  # not vacuous
    assert all(x.ip in LOOPBACK for x in front + direct), [str(x) for x in front + direct]
    print(f"\n[listeners] {len(found)} listening sockets, {len(roles)} beyond loopback, all Ray's own:")
    for role in sorted(set(roles.values())):
        print(f"[listeners]   {role}: {sum(1 for r in roles.values() if r == role)}")


def _all_gpus_free(env: dict) -> bool:
    rows = [r for r in json.loads(mf(env, "cluster", "status", "--json").stdout) if r["state"] == "ALIVE"]
    return bool(rows) and all(float(r["gpu"].split("/")[0]) == float(r["gpu"].split("/")[1]) for r in rows)


@pytest.mark.slow  # ~4 min: a job, a drained (then killed) node, the group restarted on the others
def test_a_drained_node_checkpoints_at_the_notice_and_the_restart_redoes_no_step(cluster_to_break, storage, tiny_data):
    """`modelfleet cluster drain-node` (Ray's drain for preemption with a deadline, then SIGKILL
    at the deadline, as a spot reclaim goes) under a 4-worker job: the ranks checkpoint at the
    step they see the notice and wait; Ray Train restarts the group on the other nodes under its
    preemption budget (train.max_failures stays 0) and the run resumes from that checkpoint,
    training no step twice."""
    cluster = cluster_to_break  # its drained node is killed: the next e2e test gets a fresh cluster
    env = cluster.env
    sets = [f"storage.path={storage}", f"data.path={tiny_data}", "train.use_gpu=true", "train.num_workers=4"]
    sets += ["deepspeed.zero_stage=2", "train.max_steps=50", "train.checkpoint_every=40", "train.eval_every=0"]
    sets += ["train.eval_batches=1", "storage.run_name=drained"]
    args = [x for kv in sets for x in ("--set", kv)]
    mf(env, "submit", "train", "--preset", "tiny", *args, "--arg=--no-export", "--submission-id", "drained-1")
    run_dir = storage / "runs" / "drained"

    def trained(n: int) -> bool:
        steps = [r["step"] for r in read_records(run_dir) if r["kind"] == "step"]
        s = job_status(env, "drained-1")
        assert s["status"] in ("PENDING", "RUNNING"), s
        return bool(steps) and max(steps) >= n

    wait_until(lambda: trained(8), 400, "8 steps of drained-1", 0.2)
    nodes = json.loads(mf(env, "cluster", "status", "--json").stdout)
    busy = cluster.train_worker_nodes()
    victims = [n["name"] for n in nodes if n["name"] != "head" and n["node_id"] in busy]
    assert victims, f"no worker node hosts a training worker: {busy} / {nodes}"
    t0 = time.monotonic()
    out = mf(env, "cluster", "drain-node", victims[0], "--deadline-s", "20").stdout  # returns once killed
    t_drain = float(out.split(" accepted at ")[1].split()[0])
    s = wait_job(env, "drained-1", 600)
    recs = read_records(run_dir)
    before = [r for r in recs if r["kind"] == "step" and r["time"] <= t_drain]
    at_notice = max(r["step"] for r in before)  # the last step done when Ray accepted the drain
    step_s = sorted(r["step_time_s"] for r in before)[len(before) // 2]
    # Ray Train looks for drains every second (RAY_TRAIN_PREEMPTION_POLL_INTERVAL_S, set by
    # train()); the ranks read its notice at their next step: at most that many steps more.
    slack = int(1.0 / step_s) + 2
    summary = {"victim": victims[0], "step_at_drain": at_notice, "step_s": step_s, "slack_steps": slack}
    summary["drain_to_end_s"] = time.monotonic() - t0
    summary["records"] = [
        {k: r.get(k) for k in ("kind", "step", "from_workers", "to_workers")}
        for r in recs
        if r["kind"] in ("preempted", "checkpoint", "resume", "built", "drain_cancelled")
    ]
    print("\n[drain] " + json.dumps(summary))
    assert s["status"] == "SUCCEEDED", (s, summary)
    (notice,) = [r for r in recs if r["kind"] == "preempted"]
    at = notice["step"]
    assert at_notice <= at <= at_notice + slack, summary
    assert at in [r["step"] for r in recs if r["kind"] == "checkpoint"], summary
    assert not [r for r in recs if r["kind"] == "drain_cancelled"], summary
    assert [r["step"] for r in recs if r["kind"] == "resume"] == [at], summary
    steps = [r["step"] for r in recs if r["kind"] == "step"]
    assert steps == list(range(1, 51)), steps  # every step once: none redone after the restart


# Last in the module: it kills a node of the shared cluster (``cluster_to_break``, tests/helpers).
@pytest.mark.slow  # ~3 min: 80 steps across a node kill, then the cluster is rebuilt
def test_training_survives_kill_node(cluster_to_break, storage, tiny_data):
    cluster = cluster_to_break
    env = cluster.env
    mf(
        env,
        "submit",
        "train",
        "--preset",
        "tiny",
        "--set",
        f"storage.path={storage}",
        "--set",
        f"data.path={tiny_data}",
        "--set",
        "train.use_gpu=true",
        "--set",
        "train.num_workers=4",
        "--set",
        "train.max_steps=80",
        "--set",
        "train.checkpoint_every=10",
        "--set",
        "train.eval_every=40",
        "--set",
        "train.eval_batches=1",
        "--set",
        "train.max_failures=1",
        "--set",
        "storage.run_name=drill",
        "--submission-id",
        "drill",
    )
    run_dir = storage / "runs" / "drill"
    nodes = {r["node_id"]: r["name"] for r in json.loads(mf(env, "cluster", "status", "--json").stdout)}
    killed: dict = {}
    stop = threading.Event()

    def killer() -> None:
        deadline = time.time() + 400
        while time.time() < deadline and not killed and not stop.is_set():
            recs = read_records(run_dir)
            done = [r["step"] for r in recs if r["kind"] == "checkpoint"]
            if done:  # a complete checkpoint exists: kill a worker node hosting training workers
                victims = sorted(nodes[n] for n in cluster.train_worker_nodes() if nodes.get(n, "head") != "head")
                if victims:
                    mf(env, "cluster", "kill-node", victims[0])
                    # 80 steps leave tens of seconds after the first checkpoint; a run that had
                    # already finished when the kill landed would make the drill vacuous.
                    recs = read_records(run_dir)
                    killed.update(
                        node=victims[0],
                        checkpoint=max(done),
                        at_step=max(r["step"] for r in recs if r["kind"] == "step"),
                    )
                    return
            time.sleep(0.1)

    th = threading.Thread(target=killer, daemon=True)
    th.start()
    try:
        s = wait_job(env, "drill", 600, interval_s=2)
    finally:
        stop.set()
        th.join(timeout=60)  # a kill-node in progress finishes
    assert killed, "no worker node was killed: the drill did not run"
    assert s["status"] == "SUCCEEDED", s
    resumes = [r["step"] for r in read_records(run_dir) if r["kind"] == "resume"]
    # Resumed from a complete checkpoint at or after the last one that existed at the kill.
    assert killed["at_step"] < 80, f"the run had finished before the node was killed: {killed}"
    assert len(resumes) == 1 and resumes[0] >= killed["checkpoint"] and resumes[0] < 80, (resumes, killed)
    rows = json.loads(mf(env, "cluster", "status", "--json").stdout)
    assert next(r for r in rows if r["name"] == killed["node"])["state"] == "DEAD"
