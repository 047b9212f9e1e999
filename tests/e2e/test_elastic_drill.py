"""Elastic training drill (make test-slow; its own cluster): 3 simulated nodes (the head without
GPUs, two workers with 2 logical GPUs each), a run with ``train.num_workers: [2, 4]`` on them.
After its first complete checkpoint a worker node is killed: the run goes on with 2 workers from
that checkpoint; the node is started again: the run grows back to 4. It finishes SUCCEEDED with a
validation loss within 5% of the same run left alone, and each resize is a record in
metrics.jsonl (the figures go to docs/reliability.md)."""

from __future__ import annotations

import json
import threading
import time

import pytest

from helpers import SimCluster, mf, read_records, wait_job, wait_until

GCS, DASH, SERVE = 6780, 8565, 8400
STEPS = 60


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    c = SimCluster(
        tmp_path_factory.mktemp("mfhome-elastic"),
        gcs_port=GCS,
        dashboard_port=DASH,
        serve_port=SERVE,
        nodes=3,
        cpus_per_node=3,
        gpus_per_node=2,
        head_gpus=0,
        up_timeout_s=480,
    )
    try:
        c.up()
        yield c
    finally:
        c.down()


def _submit(env, storage, data, run: str) -> None:
    mf(
        env,
        "submit",
        "train",
        "--preset",
        "tiny",
        "--set",
        f"storage.path={storage}",
        "--set",
        f"data.path={data}",
        "--set",
        "train.use_gpu=true",
        "--set",
        "train.num_workers=[2, 4]",
        "--set",
        f"train.max_steps={STEPS}",
        "--set",
        "train.checkpoint_every=10",
        "--set",
        "train.eval_every=30",
        "--set",
        "train.eval_batches=2",
        "--set",
        "train.max_failures=3",
        "--set",
        "train.elastic_resize_interval_s=5",
        "--set",
        f"storage.run_name={run}",
        "--submission-id",
        run,
    )


@pytest.mark.slow  # ~10 min: two 60-step runs of 4 DeepSpeed workers on 2 cores, a node lost and regained
def test_elastic_run_shrinks_on_node_loss_and_grows_back(cluster, tmp_path, tiny_data):
    env, storage = cluster.env, tmp_path / "storage"
    _submit(env, storage, tiny_data, "alone")
    alone = wait_job(env, "alone", 900, interval_s=2)
    assert alone["status"] == "SUCCEEDED", alone
    base = [r for r in read_records(storage / "runs" / "alone") if r["kind"] == "eval"][-1]["val_loss"]

    run_dir = storage / "runs" / "elastic"
    _submit(env, storage, tiny_data, "elastic")
    drill: dict = {}
    stop = threading.Event()

    def chaos() -> None:
        try:
            wait_until(
                lambda: stop.is_set() or any(r["kind"] == "checkpoint" for r in read_records(run_dir)),
                600,
                "the first complete checkpoint",
                0.2,
            )
            if stop.is_set():
                return
            drill["killed_after_step"] = max(r["step"] for r in read_records(run_dir) if r["kind"] == "step")
            mf(env, "cluster", "kill-node", "worker-1")
            drill["t_kill"] = time.monotonic()
            wait_until(
                lambda: stop.is_set() or any(r["kind"] == "resize" for r in read_records(run_dir)),
                600,
                "the run going on with fewer workers",
                0.2,
            )
            drill["t_shrunk"] = time.monotonic()
            if stop.is_set():
                return
            mf(env, "cluster", "restart-node", "worker-1")
            drill["t_restart"] = time.monotonic()
            wait_until(
                lambda: stop.is_set() or sum(r["kind"] == "resize" for r in read_records(run_dir)) >= 2,
                600,
                "the run growing back",
                0.2,
            )
            drill["t_grown"] = time.monotonic()
        except Exception as e:  # noqa: BLE001 - reported by the assertions below
            drill["error"] = repr(e)

    th = threading.Thread(target=chaos, daemon=True)
    th.start()
    try:
        s = wait_job(env, "elastic", 1200, interval_s=2)
    finally:
        stop.set()
        th.join(timeout=120)
    recs = read_records(run_dir)
    resizes = [r for r in recs if r["kind"] == "resize"]
    final = [r for r in recs if r["kind"] == "eval"][-1]
    summary = {
        "baseline_val_loss": base,
        "val_loss": final["val_loss"],
        "resizes": resizes,
        "reshards": [r for r in recs if r["kind"] == "reshard"],
        "kill_to_shrunk_s": round(drill.get("t_shrunk", float("nan")) - drill.get("t_kill", float("nan")), 1),
        "restart_to_grown_s": round(drill.get("t_grown", float("nan")) - drill.get("t_restart", float("nan")), 1),
        **{k: v for k, v in drill.items() if not k.startswith("t_")},
    }
    print("\n[elastic] " + json.dumps(summary))
    assert s["status"] == "SUCCEEDED", s
    assert "error" not in drill, drill
    assert [(r["from_workers"], r["to_workers"]) for r in resizes] == [(4, 2), (2, 4)], resizes
    assert 10 <= resizes[0]["step"] <= drill["killed_after_step"], (resizes, drill)  # from a complete checkpoint
    reshards = [r for r in recs if r["kind"] == "reshard"]
    # Every checkpoint carries the probe, so every reshard compares the restored logits.
    assert reshards and all(r.get("max_abs_logit_diff", 1.0) <= 1e-5 for r in reshards), reshards
    assert max(r["step"] for r in recs if r["kind"] == "step") == STEPS
    assert abs(final["val_loss"] - base) <= 0.05 * base, summary
