"""Connect to the Ray cluster the user points at, or start a local instance: the only way
modelfleet code becomes a Ray driver (``tests/unit/test_layers.py`` holds us to it).

Order: an already-initialised driver (tests, jobs) -> ``RAY_ADDRESS`` or the latest cluster
started on this machine (``ray.init(address="auto")``) -> a new local instance, if allowed.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import NamedTuple

from modelfleet.cluster.haproxy import apply_haproxy_env
from modelfleet.cluster.local import use_local_cluster_env
from modelfleet.errors import ConfigError
from modelfleet.raycompat import ray_logs_dir

# A local instance advertises at least this many logical CPUs: Ray Train's workers each hold
# one, and Ray Data's read tasks need CPUs beside them or ingestion stalls on a 2-core machine.
MIN_LOCAL_CPUS = 4


class Connection(NamedTuple):
    address: str
    """The cluster's GCS address."""
    started_here: bool
    """True when this call started a new local Ray instance (this process owns it)."""


# Set by the CLI's --verbose: Ray's actor and worker logs are streamed to this driver's terminal.
# Without it they stay in Ray's session log directory (named once on stderr), so a command's
# screen shows our progress and figures, not hundreds of forwarded INFO lines and warnings.
VERBOSE_ENV = "MODELFLEET_VERBOSE"


def verbose() -> bool:
    """True when the user asked to see Ray's process logs live (``--verbose``)."""
    return os.environ.get(VERBOSE_ENV, "") not in ("", "0")


def connect(*, num_cpus: int | None = None, log_to_driver: bool | None = None, start_local: bool = True) -> Connection:
    """Make sure this process is a Ray driver. With ``start_local=False`` and no cluster running,
    raise a ConfigError saying how to start one instead of starting a private instance.
    ``log_to_driver`` (default: ``--verbose``) streams Ray's process logs to this terminal; left
    to the default and off, where they are is printed once to stderr."""
    import ray  # here, not at the top: use_local_cluster_env must set Ray's auth env first

    announce = log_to_driver is None and not verbose()  # a long command: say where the logs went
    if log_to_driver is None:
        log_to_driver = verbose()
    started = False
    # Ray's own driver lines ("Started a local Ray instance", "Connecting to ...", the token-auth
    # notice) only with --verbose; its errors always.
    level = logging.INFO if log_to_driver else logging.ERROR
    if not ray.is_initialized():
        use_local_cluster_env()  # a `modelfleet cluster up` cluster: its address and auth mode
        try:
            ray.init(address="auto", log_to_driver=log_to_driver, logging_level=level)
        except ConnectionError:
            if not start_local:
                raise ConfigError(
                    "no Ray cluster is running (start one with `modelfleet cluster up`, "
                    "`ray start --head` or `modelfleet serve CONFIG`)"
                ) from None
            cpus = num_cpus or max(MIN_LOCAL_CPUS, os.cpu_count() or 1)
            apply_haproxy_env()  # Serve's ingress mode, before Ray starts the processes that read it
            ray.init(num_cpus=cpus, log_to_driver=log_to_driver, logging_level=level)
            started = True
        if announce and (where := ray_logs_dir()):
            print(f"modelfleet: Ray's process logs are in {where} (--verbose shows them here)", file=sys.stderr)
    return Connection(ray.get_runtime_context().gcs_address, started)
