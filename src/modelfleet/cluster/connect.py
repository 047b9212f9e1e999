"""Connect to the Ray cluster the user points at, or start a local instance: the only way
modelfleet code becomes a Ray driver (``tests/unit/test_layers.py`` holds us to it).

Order: an already-initialised driver (tests, jobs) -> ``RAY_ADDRESS`` or the latest cluster
started on this machine (``ray.init(address="auto")``) -> a new local instance, if allowed.
"""

from __future__ import annotations

import os
from typing import NamedTuple

from modelfleet.cluster.haproxy import apply_haproxy_env
from modelfleet.cluster.local import use_local_cluster_env
from modelfleet.errors import ConfigError

# A local instance advertises at least this many logical CPUs: Ray Train's workers each hold
# one, and Ray Data's read tasks need CPUs beside them or ingestion stalls on a 2-core machine.
MIN_LOCAL_CPUS = 4


class Connection(NamedTuple):
    address: str
    """The cluster's GCS address."""
    started_here: bool
    """True when this call started a new local Ray instance (this process owns it)."""


def connect(*, num_cpus: int | None = None, log_to_driver: bool = True, start_local: bool = True) -> Connection:
    """Make sure this process is a Ray driver. With ``start_local=False`` and no cluster running,
    raise a ConfigError saying how to start one instead of starting a private instance."""
    import ray  # here, not at the top: use_local_cluster_env must set Ray's auth env first

    started = False
    if not ray.is_initialized():
        use_local_cluster_env()  # a `modelfleet cluster up` cluster: its address and auth mode
        try:
            ray.init(address="auto", log_to_driver=log_to_driver)
        except ConnectionError:
            if not start_local:
                raise ConfigError(
                    "no Ray cluster is running (start one with `modelfleet cluster up`, "
                    "`ray start --head` or `modelfleet serve CONFIG`)"
                ) from None
            cpus = num_cpus or max(MIN_LOCAL_CPUS, os.cpu_count() or 1)
            apply_haproxy_env()  # Serve's ingress mode, before Ray starts the processes that read it
            ray.init(num_cpus=cpus, log_to_driver=log_to_driver)
            started = True
    return Connection(ray.get_runtime_context().gcs_address, started)
