"""Shared fixtures: one Ray instance per test session (start-up costs ~10 s here), one prepared
tiny dataset built from files shipped with Python (no network), and one 2-worker training run per
ZeRO stage (``stage_runs``, each fit ~20 s on 2 cores) that the training tests read, the elastic
tests resume from and the LoRA tests train an adapter over."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
# Experiment tracking (MLflow, TensorBoard; on by default when installed) is off for every test
# but the tracking tests, which turn it on in their configs: the variable is the default of
# tracking.enabled, and subprocesses (the CLI, simulated clusters, Ray jobs) inherit it.
os.environ.setdefault("MODELFLEET_TRACKING", "0")
# Ray kills a pooled worker process idle for over a second once more than num_cpus are alive, and
# starts a new one (a Python start and `import ray`, then Ray Data's imports) for the next task:
# every fit's data tasks paid that again. The suite's Ray instances (and the simulated clusters'
# nodes, which inherit this) keep idle workers instead: three tiny fits took 106.6-110.2 s
# against 113.5-116.2 s, and 3.08-3.15 CPU-minutes against 3.18-3.30 (process accounting).
os.environ.setdefault("RAY_num_workers_soft_limit", "16")
os.environ.setdefault("RAY_idle_worker_killing_time_threshold_ms", "600000")

from helpers import TEST_SOURCES, tiny_config

# `make test PYTEST_LANES=2` runs the suite in two lanes at once (pytest-xdist, ``-n 2``; the
# default, 0, is one process): one lane alone leaves ~40% of 2 cores idle while it waits on Ray
# (process starts, health checks, a job's status), but on 2 cores two lanes make each test ~1.8x
# slower and timing bounds fail, so lanes are for machines with 4+ cores. Each lane runs whole on
# one worker with its own Ray instance: "training" holds the
# simulated clusters (tests/e2e), the session's ZeRO-stage runs and everything that reads them;
# "serving" the rest. Tests that share a port are in one lane (8250: test_families +
# test_hf_family; 8300: tests/reliability), so neither waits on the other. The split balances the
# lanes' minutes (docs/benchmarks.md, "The suite"); a new module goes to "serving" unless listed.
TRAINING_LANE = (
    "tests/e2e/",
    "tests/integration/test_training.py",
    "tests/integration/test_elastic.py",
    "tests/integration/test_lora.py",
    "tests/integration/test_tracking_server.py",
    "tests/integration/test_training_metrics.py",
    "tests/integration/test_device_rule.py",
    "tests/integration/test_sharded_build.py",
    "tests/integration/test_training_bad_input.py",
    "tests/reliability/test_training_faults.py",
)


def lane_of(nodeid: str) -> str:
    return "training" if nodeid.split("::", 1)[0].startswith(TRAINING_LANE) else "serving"


@pytest.hookimpl(optionalhook=True)  # a hook of pytest-xdist's (the dev extra); absent without it
def pytest_xdist_make_scheduler(config, log):
    """Scope = lane: xdist hands each lane, whole and in collection order, to one worker. (xdist's
    own ``loadgroup`` marks do not group on pytest 9.2, whose node ids it can no longer suffix.)"""
    from xdist.scheduler import LoadScopeScheduling

    class LaneScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return lane_of(nodeid)

    return LaneScheduling(config, log)


@pytest.fixture(scope="session")
def s3(tmp_path_factory):
    """moto's S3 server on 127.0.0.1 for the whole session, its endpoint and key in os.environ
    (started before Ray, whose workers inherit the environment as a cluster's nodes would)."""
    from helpers import MotoS3

    server = MotoS3(tmp_path_factory.mktemp("moto")).start()
    os.environ.update(server.env)
    yield server
    server.stop()


@pytest.fixture(scope="session")
def ray_session(s3):
    import ray

    from modelfleet.cluster.haproxy import apply_haproxy_env

    # Serve's ingress mode is a property of the cluster: set as `modelfleet cluster up` sets it.
    apply_haproxy_env()
    ray.init(num_cpus=6, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> str:
    from modelfleet.config import DataConfig
    from modelfleet.data.prepare import prepare_dataset
    from modelfleet.data.tokenizer import ByteTokenizer

    path = tmp_path_factory.mktemp("data") / "tiny"
    prepare_dataset(DataConfig(sources=TEST_SOURCES, path=str(path)), 128, ByteTokenizer())
    return str(path)


@pytest.fixture(scope="session")
def stage_runs(ray_session, tiny_data, tmp_path_factory):
    """One 30-step run per ZeRO stage on 2 workers, each exported (tiny@v1..v3, stage 3's last);
    later tests reuse them instead of training again. Read-only: a test that changes a run (or
    resumes it, or publishes its artifact elsewhere) works on a copy (``shutil.copytree``; leave Ray Train's
    ``checkpoint_manager_snapshot.json`` behind, it names the original's checkpoints)."""
    # Function-local: modelfleet.train imports Ray Train and DeepSpeed, which only training tests need.
    from modelfleet.train import train

    storage = tmp_path_factory.mktemp("storage")
    runs = {}
    for stage in (0, 2, 3):  # this order: test_training's export test expects stage 3's artifact newest
        # ZeRO-0 saves synchronously, 2 and 3 asynchronously (the default): both modes train,
        # resume and export in every run of the suite.
        mode = "sync" if stage == 0 else "async"
        over = [f"deepspeed.zero_stage={stage}", f"storage.run_name=stage{stage}", f"train.checkpoint_mode={mode}"]
        over.append(f"tracking.enabled={str(stage == 3).lower()}")  # read by tests/integration/test_tracking_server.py
        cfg = tiny_config(storage, tiny_data, over)
        runs[stage] = (cfg, train(cfg, show_progress=False))
    return storage, runs
