"""Is a local path the same directory on every node? On one machine it is; on a real multi-node
cluster (or ``cluster up --isolated``) a path under a node's own disk is not, and a training run
that keeps its checkpoints there loses them to whichever node wrote them. The driver writes a
marker file and a task on every alive node looks for it, before any training worker starts."""

from __future__ import annotations

import os
import uuid

from modelfleet.errors import ConfigError
from modelfleet.storage import is_remote


def _sees(path: str) -> bool:
    return os.path.isfile(path)


def check_visible_everywhere(path: str, key: str) -> None:
    """Raise ``ConfigError`` naming ``key``, the path and the nodes that cannot see it when a local
    ``path`` (a directory this process can write) is not shared by every alive node."""
    if is_remote(path):
        return  # an object store: the same for every node with the credentials (checked elsewhere)
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    nodes = [n for n in ray.nodes() if n.get("Alive")]
    if len(nodes) < 2:
        return
    os.makedirs(path, exist_ok=True)
    marker = os.path.join(path, f".modelfleet-shared-{uuid.uuid4().hex[:8]}")
    with open(marker, "w") as f:
        f.write("ok")
    try:
        probe = ray.remote(num_cpus=0, max_retries=0)(_sees)
        refs = {
            n["NodeID"]: probe.options(
                scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)
            ).remote(marker)
            for n in nodes
        }
        blind = [(nid, n["NodeManagerAddress"]) for nid, n in zip(refs, nodes) if not ray.get(refs[nid], timeout=120)]
    finally:
        os.remove(marker)
    if blind:
        names = ", ".join(f"{nid[:12]} ({addr})" for nid, addr in blind)
        raise ConfigError(
            f"{key}: {path} is not visible on {len(blind)} of {len(nodes)} nodes ({names}): it is local "
            "to this node; on a multi-node cluster every node reads and writes it, so use shared "
            "storage: an object store (s3://bucket/prefix) or a mount every node has"
        )
