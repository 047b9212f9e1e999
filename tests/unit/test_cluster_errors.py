"""Runtime failures of the local cluster are ClusterError, bad cluster config values stay
ConfigError, and the CLI prints either as one line (no cluster needed for these)."""

from __future__ import annotations

import pytest

from modelfleet.cluster.local import ClusterSpec, ClusterState, NodeState, kill_node, restart_node
from modelfleet.errors import USER_ERRORS, ClusterError, ConfigError


def _state() -> ClusterState:
    nodes = [NodeState(name="head", node_manager_port=1), NodeState(name="worker-1", node_manager_port=2)]
    return ClusterState(spec=ClusterSpec(), temp_dir="/tmp/unused", nodes=nodes, started_at=0.0)


def test_operations_on_the_running_cluster_fail_as_cluster_errors():
    st = _state()
    with pytest.raises(ClusterError, match="no simulated node named 'worker-9'; nodes: head, worker-1"):
        st.node("worker-9")
    with pytest.raises(ClusterError, match="kill-node head would take the whole cluster down"):
        kill_node(st, "head")
    with pytest.raises(ClusterError, match="node 'worker-1' is not running"):
        kill_node(st, "worker-1")  # no pids: nothing alive
    with pytest.raises(ClusterError, match="restart-node head: the head cannot be restarted alone"):
        restart_node(st, "head")


def test_bad_cluster_values_stay_config_errors_and_both_are_user_errors():
    with pytest.raises(ConfigError, match="cluster.nodes: at most 16"):
        ClusterSpec(nodes=17)
    assert ClusterError in USER_ERRORS and not issubclass(ClusterError, ConfigError)


def test_the_ray_auth_token_is_never_readable_by_other_users(tmp_path, monkeypatch):
    """A fresh home: ~/.ray is created 0700 and the token 0600 from the start (Ray's CLI writes
    it with the default mode; ensure_auth_token runs it under umask 077). An existing 0755 ~/.ray
    and a 0644 token from an older version are tightened; the token itself is kept."""
    import os
    import stat

    from modelfleet.cluster.local import ClusterSpec, ensure_auth_token

    monkeypatch.setenv("HOME", str(tmp_path))
    token = ensure_auth_token(ClusterSpec())
    assert token == tmp_path / ".ray" / "auth_token" and token.read_text().strip()
    assert stat.S_IMODE(os.stat(tmp_path / ".ray").st_mode) == 0o700
    assert stat.S_IMODE(os.stat(token).st_mode) == 0o600
    before = token.read_text()
    os.chmod(tmp_path / ".ray", 0o755)
    os.chmod(token, 0o644)
    ensure_auth_token(ClusterSpec())
    assert stat.S_IMODE(os.stat(tmp_path / ".ray").st_mode) == 0o700
    assert stat.S_IMODE(os.stat(token).st_mode) == 0o600 and token.read_text() == before
