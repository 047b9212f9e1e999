"""The e2e tests' one simulated cluster: `modelfleet cluster up` (3 nodes x 4 CPUs x 2 logical
GPUs) on non-default ports (GCS 6480, dashboard 8365, Serve 8100) so a developer's own cluster is
left alone. Session-scoped and shared by every e2e test; taken down as soon as the last e2e test
has run (not at the end of the session: the rest of the suite must not share 2 cores with three
idle nodes). A drill that kills a node asks for ``cluster_to_break`` instead (see tests/helpers)."""

from __future__ import annotations

import pytest

from helpers import SimCluster

GCS, DASH, SERVE_PORT = 6480, 8365, 8100
_clusters: list[SimCluster] = []  # what the early teardown below takes down
_failed_up: list[str] = []


@pytest.fixture(scope="session")
def sim_cluster(tmp_path_factory, s3):
    # After the S3 endpoint (the s3 fixture): the nodes inherit its endpoint and key, as a real
    # cluster's nodes get them from their environment.
    c = SimCluster(
        tmp_path_factory.mktemp("mfhome"),
        gcs_port=GCS,
        dashboard_port=DASH,
        serve_port=SERVE_PORT,
        nodes=3,
        cpus_per_node=4,
        gpus_per_node=2,
        up_timeout_s=480,
    )
    _clusters.append(c)
    yield c
    if c.is_up:
        c.down()


@pytest.fixture
def cluster(sim_cluster: SimCluster) -> SimCluster:
    """The shared cluster, up (started on first use, or again after a drill spoiled it). A failed
    `cluster up` is not retried for every test: the later ones fail at once with its error."""
    if _failed_up:
        pytest.fail(f"the e2e cluster did not come up (first error): {_failed_up[0]}", pytrace=False)
    if sim_cluster.spoiled:
        sim_cluster.down()
    if not sim_cluster.is_up:
        try:
            sim_cluster.up()
            assert "3 nodes" in sim_cluster.up_output, sim_cluster.up_output[-2000:]
        except BaseException as e:
            _failed_up.append(f"{type(e).__name__}: {str(e)[:2000]}")
            raise
    return sim_cluster


@pytest.fixture
def cluster_to_break(cluster: SimCluster):
    """The shared cluster for a drill that kills one of its nodes: marked spoiled afterwards, so a
    later e2e test gets a fresh one. Such a drill runs last in its module, so normally none does."""
    yield cluster
    cluster.spoiled = True


@pytest.hookimpl(wrapper=True)
def pytest_runtest_teardown(item, nextitem):
    """After the last test that uses the shared cluster (the next one is elsewhere, owns its
    cluster, or there is none), take it down: two clusters must not share 2 cores."""
    result = yield
    if nextitem is None or "sim_cluster" not in nextitem.fixturenames:
        for c in _clusters:
            if c.is_up:
                c.down()
    return result
