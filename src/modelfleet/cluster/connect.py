"""Connect to the Ray cluster the user points at, or start a local instance.

Order: an already-initialised driver (tests, jobs) -> ``RAY_ADDRESS`` or the latest cluster
started on this machine (``ray.init(address="auto")``) -> a new local instance.
"""

from __future__ import annotations

import os

from modelfleet.cluster.local import use_local_cluster_env

# A local instance advertises at least this many logical CPUs: Ray Train's workers each hold
# one, and Ray Data's read tasks need CPUs beside them or ingestion stalls on a 2-core machine.
MIN_LOCAL_CPUS = 4


def connect(*, num_cpus: int | None = None, log_to_driver: bool = True) -> str:
    """Make sure this process is a Ray driver; returns the cluster's GCS address."""
    import ray  # here, not at the top: use_local_cluster_env must set Ray's auth env first

    if not ray.is_initialized():
        use_local_cluster_env()  # a `modelfleet cluster up` cluster: its address and auth mode
        try:
            ray.init(address="auto", log_to_driver=log_to_driver)
        except ConnectionError:
            cpus = num_cpus or max(MIN_LOCAL_CPUS, os.cpu_count() or 1)
            ray.init(num_cpus=cpus, log_to_driver=log_to_driver)
    return ray.get_runtime_context().gcs_address
