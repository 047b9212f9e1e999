"""Shared fixtures: one Ray instance per test session (start-up costs ~10 s here) and one
prepared tiny dataset built from files shipped with Python (no network)."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

from helpers import TEST_SOURCES


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
